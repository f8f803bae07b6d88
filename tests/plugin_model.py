"""A user model for the plugin test: imported only because a config names it in model.factory."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyBigram(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(257, width)
        self.head = nn.Linear(width, 257)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def per_example_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    targets = batch["tokens"][..., 1:]
    loss = F.cross_entropy(logits.reshape(-1, 257), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape).mean(-1)


def make(options: dict, data) -> tuple[nn.Module, object]:
    return TinyBigram(int(options.get("width", 8))), per_example_loss
