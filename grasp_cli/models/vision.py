"""Small image classifiers: an MLP and a CNN. Images arrive as uint8 ``[B, H, W]`` or ``[B, H, W, C]``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def as_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W(, C)]`` -> float ``[B, C, H, W]`` in [0, 1]."""
    x = images.float() / 255.0
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.permute(0, 3, 1, 2)


class MLP(nn.Module):
    def __init__(self, image_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        pixels = 1
        for size in image_shape:
            pixels *= size
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = as_float_nchw(images).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self, image_shape: tuple[int, ...], num_classes: int, channels: int = 16) -> None:
        super().__init__()
        in_channels = image_shape[2] if len(image_shape) == 3 else 1
        height, width = image_shape[0], image_shape[1]
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc = nn.Linear(2 * channels * (height // 4) * (width // 4), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = as_float_nchw(images)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def image_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (batch["image"],)


def classifier_per_example_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Cross-entropy of each example, ``[B]`` (nats)."""
    return F.cross_entropy(logits.float(), batch["label"], reduction="none")


def classifier_per_example_accuracy(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    return (logits.argmax(-1) == batch["label"]).float()


def classifier_margin_output(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRAK's multiclass margin and out-to-loss weight per example: ``(f [B], Q [B])`` with
    ``f = logit_y − logsumexp_{j≠y} logit_j = log(p_y / (1 − p_y))`` and ``Q = 1 − p_y``."""
    labels = batch["label"]
    logits = logits.float()
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    output = correct - torch.logsumexp(others, dim=-1)
    q = 1.0 - torch.softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return output, q
