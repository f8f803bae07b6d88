"""The offline image demo: scikit-learn's handwritten digits, each put in one visual domain.

``digits_demo`` builds the whole corpus in memory (1797 images of 16×16 pixels): it is one
input of ``prepare``, like a file, and goes through the same split and writers as any
image input. Needs the optional extra ``pip install grasp-cli[vision]`` (scikit-learn).
"""

from __future__ import annotations

import numpy as np

from grasp_cli.artifacts.examples import Examples
from grasp_cli.errors import ConfigError, InputError
from grasp_cli.prepare.images import VISION_EXTRA

# Each of sklearn's 1797 handwritten digits goes to exactly one visual domain,
# with these default shares. The two rare domains give the target tasks.
DIGIT_DOMAIN_SHARES = {
    "original": 0.30,
    "thick": 0.20,
    "noisy": 0.15,
    "shifted": 0.15,
    "rotated": 0.10,
    "inverted": 0.10,
}
DEMO_IMAGE_HOLDOUT = ["rotated", "inverted"]
DEMO_IMAGE_SIZE = 16
DEMO_DIGIT_SIZE = 12  # each 8×8 digit is upsampled to 12×12 and centred on the 16×16 canvas


def digits_demo(shares: dict[str, float], image_size: int, seed: int) -> Examples:
    """sklearn's 1797 handwritten digits, each put (seeded) in one visual domain and transformed.

    Domains: ``original`` (upsampled to 12×12, centred on a 16×16 canvas), ``thick`` (strokes
    dilated), ``noisy`` (Gaussian pixel noise, σ = 0.2), ``shifted`` (moved 2–3 px along each
    axis), ``rotated`` (±15–25°),
    ``inverted`` (dark strokes on white). ``shares`` gives each domain's fraction of the
    digits ({} = ``DIGIT_DOMAIN_SHARES``). Returns uint8 images ``[N, S, S]`` with
    ``S = image_size or 16`` and labels 0..9.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError(
            f"prepare.demo_images needs scikit-learn (its bundled digits): {VISION_EXTRA}"
        ) from None
    import torch
    import torch.nn.functional as F

    shares = dict(shares or DIGIT_DOMAIN_SHARES)
    unknown = sorted(set(shares) - set(DIGIT_DOMAIN_SHARES))
    if unknown:
        raise ConfigError(
            f"prepare.demo_image_shares: unknown domain(s) {unknown} "
            f"(choose from {', '.join(DIGIT_DOMAIN_SHARES)})"
        )
    if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
        raise ConfigError("prepare.demo_image_shares: shares must be >= 0 with a positive sum")
    digits = load_digits()
    n = len(digits.target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    names = [name for name in DIGIT_DOMAIN_SHARES if shares.get(name, 0) > 0]
    counts = _largest_remainder([shares[name] for name in names], n)
    base = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [n,1,8,8]
    base = F.interpolate(
        base, size=(DEMO_DIGIT_SIZE, DEMO_DIGIT_SIZE), mode="bilinear", align_corners=False
    )
    margin = (DEMO_IMAGE_SIZE - DEMO_DIGIT_SIZE) // 2
    base = F.pad(
        base, (margin, margin, margin, margin)
    )  # room to shift and rotate without cropping
    images, labels, domains, docs = [], [], [], []
    start = 0
    for name, count in zip(names, counts, strict=True):
        rows = np.sort(order[start : start + count])
        start += count
        x = _transform(name, base[rows], rng)
        images.append(x.clamp(0, 1))
        labels.append(digits.target[rows])
        domains += [name] * len(rows)
        docs += [f"digits/{int(r)}" for r in rows]
    x = torch.cat(images)
    size = image_size or DEMO_IMAGE_SIZE
    if size != DEMO_IMAGE_SIZE:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    pixels = (x * 255.0).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    return Examples(
        np.arange(len(pixels), dtype=np.int64),
        np.array(domains, dtype=object),
        np.array(docs, dtype=object),
        {"image": pixels, "label": np.concatenate(labels).astype(np.int64)},
    )


def _largest_remainder(shares: list[float], total: int) -> list[int]:
    raw = np.asarray(shares, dtype=np.float64) / sum(shares) * total
    counts = np.floor(raw).astype(int)
    for index in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[index] += 1
    return counts.tolist()


def _transform(name: str, x, rng: np.random.Generator):
    """One demo domain's transformation of float images ``[b, 1, S, S]`` in [0, 1]."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    if name == "original":
        return x
    if name == "thick":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    if name == "inverted":
        return 1.0 - x
    if name == "noisy":
        noise = torch.from_numpy(rng.normal(0.0, 0.2, size=tuple(x.shape)).astype(np.float32))
        return x + noise
    if name == "shifted":
        shifts = rng.integers(2, 4, size=(b, 2)) * rng.choice([-1, 1], size=(b, 2))
        pad = 3
        padded = F.pad(x, (pad, pad, pad, pad))
        size = x.shape[-1]
        out = torch.empty_like(x)
        for i, (dy, dx) in enumerate(shifts.tolist()):
            out[i] = padded[i, :, pad - dy : pad - dy + size, pad - dx : pad - dx + size]
        return out
    if name == "rotated":
        angles = np.deg2rad(rng.uniform(15, 25, size=b) * rng.choice([-1, 1], size=b))
        cos, sin = np.cos(angles), np.sin(angles)
        theta = np.zeros((b, 2, 3), dtype=np.float32)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(torch.from_numpy(theta), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    raise ConfigError(f"unknown demo image domain {name!r}")
