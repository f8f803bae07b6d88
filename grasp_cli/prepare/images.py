"""Image corpora: folder trees of PNG/JPEG, ``.npz`` arrays, ``.parquet`` tables, and the digits demo.

Inputs (each image is one "document": it lands in the corpus or in a task, never both):

- a folder tree ``ROOT/DOMAIN/CLASS/*.png|*.jpg`` (``ROOT/CLASS/*.png`` gives domain ROOT's
  name; a file named directly, or by a glob, takes CLASS from its folder and DOMAIN from the
  folder above). Class folder names that are all integers are the labels; otherwise the
  sorted names are numbered 0, 1, ... (the names are kept in the corpus manifest).
- ``.npz`` with ``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (or float in [0, 1]),
  ``labels`` ``[N]`` int and optional ``domains`` ``[N]`` str (default: the file's stem).
- ``.parquet`` with ``image`` (PNG/JPEG bytes, a ``{bytes, path}`` struct as Hugging Face
  datasets write it, or raw uint8 pixels with the ``grasp.image_shape`` schema metadata),
  ``label`` (int or class name) and optional ``domain``.

Grayscale and colour inputs together are promoted to RGB; images of different sizes are an
error unless ``prepare.image_size`` resizes them all. PNG/JPEG decoding and the demo need
the optional extra ``pip install grasp-cli[vision]`` (Pillow, scikit-learn); ``.npz`` and raw
``.parquet`` inputs need nothing beyond the base install.
"""

from __future__ import annotations

import glob
import io
import math
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.examples import IMAGE_SHAPE_KEY, Examples
from grasp_cli.artifacts.layout import RunLayout
from grasp_cli.artifacts.tables import read_table
from grasp_cli.config import GraspConfig
from grasp_cli.errors import ConfigError, InputError, first_line
from grasp_cli.prepare.documents import walk_files

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npz", ".parquet")
IMAGE_SUFFIXES = PICTURE_SUFFIXES + ARRAY_SUFFIXES
VISION_EXTRA = "pip install grasp-cli[vision]"

# The digits demo: each of sklearn's 1797 handwritten digits goes to exactly one visual domain,
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


@dataclass(frozen=True)
class ImageRecord:
    """One image before stacking: uint8 ``[H, W]`` or ``[H, W, C]``, its label and where it came from."""

    image: np.ndarray
    label: int | str
    domain: str
    doc: str
    source: str  # "file" or "file:row N", for error messages


# ---------------------------------------------------------------- finding inputs


def _candidates(pattern: str) -> Iterator[Path]:
    path = Path(pattern)
    if path.is_dir():
        yield from walk_files(path)
    elif path.is_file():
        yield path
    else:
        yield from (
            Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()
        )


def _parquet_has_images(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        return "image" in pq.read_schema(path).names
    except Exception:  # noqa: BLE001 - unreadable files are reported by the reader that owns them
        return False


def inputs_are_images(patterns: list[str]) -> bool:
    """Whether the inputs hold images (PNG/JPEG/.npz, or .parquet with an ``image`` column)."""
    for pattern in patterns:
        for path in _candidates(pattern):
            suffix = path.suffix.lower()
            if suffix in PICTURE_SUFFIXES or suffix == ".npz":
                return True
            if suffix == ".parquet" and _parquet_has_images(path):
                return True
    return False


def expand_image_inputs(patterns: list[str]) -> list[tuple[Path, Path | None]]:
    """``(file, root)`` pairs: ``root`` is the folder the user named (None for files and globs)."""
    found: list[tuple[Path, Path | None]] = []
    seen: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        root = path if path.is_dir() else None
        matches = [
            p
            for p in _candidates(pattern)
            if root is None or p.suffix.lower() in IMAGE_SUFFIXES  # folders: skip READMEs etc.
        ]
        if not matches:
            raise InputError(
                f"{pattern}: no image files found (.png, .jpg, .jpeg, .npz or .parquet)"
            )
        for match in matches:
            if match.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(
                    f"{match}: not an image input (use .png, .jpg, .jpeg, .npz or .parquet; "
                    "prepare text and images in separate runs)"
                )
            if match.resolve() not in seen:
                seen.add(match.resolve())
                found.append((match, root))
    return found


# ---------------------------------------------------------------- decoding


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InputError(f"reading PNG/JPEG images needs Pillow: {VISION_EXTRA}") from None
    return Image


def decode_image(data: bytes | Path, source: str) -> np.ndarray:
    """PNG/JPEG (anything Pillow reads) -> uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (colour)."""
    Image = _pillow()
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            mode = img.mode
            if mode.startswith("I;16") or mode == "I":
                pixels = np.asarray(img, dtype=np.float64)
                return np.clip(np.round(pixels / 257.0), 0, 255).astype(np.uint8)
            if mode in ("1", "L", "LA"):
                return np.asarray(img.convert("L"), dtype=np.uint8)
            if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, ...
        detail = first_line(exc)
        raise InputError(f"{source}: unreadable image ({detail[:160]})") from None
    raise InputError(f"{source}: unsupported image mode {mode!r} (use grayscale or RGB)")


def to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    """uint8 as is; integers within 0..255; bool; floats in [0, 1] scaled to 0..255 and rounded."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if np.issubdtype(values.dtype, np.integer):
        if values.size and (values.min() < 0 or values.max() > 255):
            raise InputError(
                f"{source}: integer pixels must lie in 0..255 (found {values.min()}..{values.max()})"
            )
        return values.astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise InputError(f"{source}: images contain NaN or infinite values")
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            raise InputError(
                f"{source}: float pixels must lie in [0, 1] (found {values.min():g}..{values.max():g}); "
                "divide by 255 or store uint8"
            )
        return np.round(values * 255.0).astype(np.uint8)
    raise InputError(f"{source}: images have dtype {values.dtype}; use uint8 or float in [0, 1]")


def _channels_last(images: np.ndarray, source: str) -> np.ndarray:
    """``[N, H, W]`` or ``[N, H, W, C]`` with C in (1, 3); C = 1 is squeezed."""
    if images.ndim == 3:
        return images
    if images.ndim == 4:
        if images.shape[3] == 1:
            return images[..., 0]
        if images.shape[3] == 3:
            return images
        if images.shape[1] in (1, 3):
            raise InputError(
                f"{source}: images have shape {list(images.shape)}, which looks channel-first; "
                "store them as [N, H, W, C]"
            )
    raise InputError(
        f"{source}: images have shape {list(images.shape)}; expected [N, H, W] or [N, H, W, C] "
        "with C = 1 or 3"
    )


def _labels_array(values: np.ndarray, n: int, source: str) -> list[int | str]:
    if values.ndim != 1 or len(values) != n:
        raise InputError(
            f"{source}: 'labels' has shape {list(values.shape)}, expected [{n}] (one per image)"
        )
    if values.dtype.kind in "US":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise InputError(f"{source}: 'labels' must be integers")
        values = values.astype(np.int64)
    if values.dtype.kind not in "iu":
        raise InputError(f"{source}: 'labels' has dtype {values.dtype}; expected integers")
    if n and values.min() < 0:
        raise InputError(f"{source}: 'labels' must be non-negative (found {values.min()})")
    return [int(v) for v in values]


# ---------------------------------------------------------------- readers


def read_picture(path: Path, root: Path | None) -> ImageRecord:
    """One PNG/JPEG of a ``DOMAIN/CLASS/file`` tree."""
    if root is not None:
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            raise InputError(
                f"{path}: missing label: the image lies directly in {root}; put images in class "
                f"folders ({root}/DOMAIN/CLASS/*.png or {root}/CLASS/*.png)"
            )
        label, domain = parts[-2], (parts[0] if len(parts) >= 3 else root.name)
    else:
        label, domain = path.parent.name, path.parent.parent.name
    if not label:
        raise InputError(f"{path}: missing label: put the image in a folder named after its class")
    return ImageRecord(
        decode_image(path, str(path)), label, domain or "default", str(path), str(path)
    )


def read_npz(path: Path) -> list[ImageRecord]:
    """``images`` / ``labels`` / optional ``domains`` arrays of one ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise InputError(
                    f"{path}: a single array, not an .npz archive with 'images' and 'labels'"
                )
            names = list(archive.files)
            if "images" not in names:
                raise InputError(
                    f"{path}: missing array 'images' (has: {', '.join(names) or 'none'})"
                )
            if "labels" not in names:
                raise InputError(
                    f"{path}: missing labels: no array 'labels' (has: {', '.join(names)})"
                )
            images = archive["images"]
            labels = archive["labels"]
            domains = archive["domains"] if "domains" in names else None
    except InputError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputError(
                f"{path}: holds an object array; save labels as integers and domains as a "
                "str array (np.array(names, dtype=str))"
            ) from None
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    images = _channels_last(to_uint8(images, str(path)), str(path))
    if len(images) == 0:
        raise InputError(f"{path}: no images (the 'images' array is empty)")
    labels_list = _labels_array(labels, len(images), str(path))
    if domains is None:
        domain_list = [path.stem] * len(images)
    else:
        if domains.shape != (len(images),) or domains.dtype.kind not in "US":
            raise InputError(
                f"{path}: 'domains' must be a str array of shape [{len(images)}] "
                f"(has {domains.dtype}, {list(domains.shape)})"
            )
        domain_list = [v.decode() if isinstance(v, bytes) else str(v) for v in domains.tolist()]
    return [
        ImageRecord(
            images[i],
            labels_list[i],
            domain_list[i] or path.stem,
            f"{path}#{i}",
            f"{path}:image {i}",
        )
        for i in range(len(images))
    ]


def read_image_parquet(path: Path) -> list[ImageRecord]:
    """Rows of a ``.parquet`` with ``image``, ``label`` and optional ``domain`` columns."""
    table = read_table(path)
    names = table.column_names
    if "image" not in names:
        raise InputError(f"{path}: missing column 'image' (has: {', '.join(names)})")
    if "label" not in names:
        raise InputError(f"{path}: missing labels: no column 'label' (has: {', '.join(names)})")
    if table.num_rows == 0:
        raise InputError(f"{path}: no images (the table has no rows)")
    image_type = table.schema.field("image").type
    if pa.types.is_struct(image_type):
        if image_type.get_field_index("bytes") < 0:
            raise InputError(f"{path}: column 'image' is a struct without a 'bytes' field")
        blobs = table.column("image").combine_chunks().field("bytes").to_pylist()
    elif (
        pa.types.is_binary(image_type)
        or pa.types.is_large_binary(image_type)
        or pa.types.is_fixed_size_binary(image_type)
    ):
        blobs = table.column("image").to_pylist()
    else:
        raise InputError(
            f"{path}: column 'image' has type {image_type}; expected binary (PNG/JPEG bytes, or raw "
            "uint8 pixels with grasp.image_shape metadata)"
        )
    meta = table.schema.metadata or {}
    raw_shape = None
    if IMAGE_SHAPE_KEY in meta:
        import json

        raw_shape = tuple(int(s) for s in json.loads(meta[IMAGE_SHAPE_KEY]))
    label_type = table.schema.field("label").type
    if not (
        pa.types.is_integer(label_type)
        or pa.types.is_string(label_type)
        or pa.types.is_large_string(label_type)
    ):
        raise InputError(
            f"{path}: column 'label' has type {label_type}; expected integers or class names"
        )
    labels = table.column("label").to_pylist()
    domains = table.column("domain").to_pylist() if "domain" in names else [None] * len(labels)
    records = []
    for row, (blob, label, domain) in enumerate(zip(blobs, labels, domains, strict=True)):
        where = f"{path}:row {row}"
        if blob is None:
            raise InputError(f"{where}: missing image")
        if label is None:
            raise InputError(f"{where}: missing label")
        if isinstance(label, int) and label < 0:
            raise InputError(f"{where}: label {label} is negative")
        if raw_shape is not None:
            if len(blob) != math.prod(raw_shape):
                raise InputError(
                    f"{where}: {len(blob)} image bytes, expected {math.prod(raw_shape)} for shape {list(raw_shape)}"
                )
            image = np.frombuffer(blob, dtype=np.uint8).reshape(raw_shape)
            if image.ndim == 3 and image.shape[2] == 1:
                image = image[..., 0]
        else:
            image = decode_image(blob, where)
        records.append(ImageRecord(image, label, str(domain or path.stem), f"{path}#{row}", where))
    return records


def load_image_records(patterns: list[str]) -> list[ImageRecord]:
    """Every image of the inputs, in file order; empty input is an error."""
    records: list[ImageRecord] = []
    for path, root in expand_image_inputs(patterns):
        suffix = path.suffix.lower()
        if suffix == ".npz":
            records += read_npz(path)
        elif suffix == ".parquet":
            records += read_image_parquet(path)
        else:
            records.append(read_picture(path, root))
    if not records:
        raise InputError(f"{', '.join(patterns)}: no images found")
    return records


# ---------------------------------------------------------------- stacking


def label_codes(labels: list[int | str]) -> tuple[list[int], list[str]]:
    """Integer labels as given; class names numbered in sorted order (all-digit names are integers).

    Returns the codes and the class names ([] when the labels were integers).
    """
    as_ints = [int(v) if isinstance(v, str) and v.isdigit() else v for v in labels]
    named = sorted({v for v in as_ints if isinstance(v, str)})
    if not named:
        return [int(v) for v in as_ints], []
    if len(named) != len(set(as_ints)):
        raise InputError(
            "labels mix class names and integers; name every class folder or label the same way"
        )
    lookup = {name: code for code, name in enumerate(named)}
    return [lookup[v] for v in as_ints], named


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[N, H, W(, C)]`` -> uint8 ``[N, size, size(, C)]`` (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    if images.shape[1:3] == (size, size):
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    y = y.squeeze(1) if images.ndim == 3 else y.permute(0, 2, 3, 1)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def stack_records(records: list[ImageRecord], image_size: int) -> np.ndarray:
    """One uint8 array ``[N, H, W(, C)]``: gray promoted to RGB when colour is present, resized
    to ``image_size`` when it is set, otherwise every image must have the same shape."""
    colour = any(r.image.ndim == 3 for r in records)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    images = []
    for index, record in enumerate(records):
        image = record.image
        if colour and image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        images.append(image)
        by_shape[image.shape].append(index)
    if image_size > 0:
        out = np.empty(
            (len(records), image_size, image_size) + ((3,) if colour else ()), dtype=np.uint8
        )
        for indices in by_shape.values():
            out[indices] = resize_images(np.stack([images[i] for i in indices]), image_size)
        return out
    if len(by_shape) > 1:
        (first_shape, first), (other_shape, other) = sorted(
            by_shape.items(), key=lambda item: item[1][0]
        )[:2]
        raise InputError(
            f"{records[other[0]].source}: image shape {list(other_shape)} differs from "
            f"{list(first_shape)} of {records[first[0]].source}; set prepare.image_size "
            "(e.g. --set prepare.image_size=32) to resize all images to one square size"
        )
    return np.stack(images)


def records_to_examples(
    records: list[ImageRecord], images: np.ndarray, codes: list[int]
) -> Examples:
    return Examples(
        np.arange(len(records), dtype=np.int64),
        np.array([r.domain for r in records], dtype=object),
        np.array([r.doc for r in records], dtype=object),
        {"image": images, "label": np.asarray(codes, dtype=np.int64)},
    )


# ---------------------------------------------------------------- the digits demo


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


# ---------------------------------------------------------------- the stage


def split_holdout_images(
    corpus: Examples, domains: list[str], fraction: float, seed: int
) -> tuple[Examples, dict[str, Examples]]:
    """Move a seeded ``fraction`` of each named domain's images (at least one, never all) to a task."""
    present = sorted(set(corpus.domains.tolist()))
    rng = np.random.default_rng(seed)
    held: dict[str, Examples] = {}
    keep = np.ones(len(corpus), dtype=bool)
    for domain in domains:
        pool = np.flatnonzero(corpus.domains == domain)
        if len(pool) == 0:
            raise InputError(
                f"prepare.holdout_domains: no images in domain {domain!r} (domains: {', '.join(present)})"
            )
        if len(pool) < 2:
            raise InputError(
                f"prepare.holdout_domains: domain {domain!r} has one image; need two to hold one out"
            )
        count = min(len(pool) - 1, max(1, math.ceil(fraction * len(pool))))
        chosen = np.sort(rng.choice(pool, size=count, replace=False))
        held[domain] = _renumber(corpus.take(chosen))
        keep[chosen] = False
    return _renumber(corpus.take(np.flatnonzero(keep))), held


def _renumber(examples: Examples) -> Examples:
    examples.ids = np.arange(len(examples), dtype=np.int64)
    return examples


def _cap_per_domain(examples: Examples, cap: int, seed: int) -> Examples:
    rng = np.random.default_rng(seed)
    kept = []
    for domain in sorted(set(examples.domains.tolist())):
        members = np.flatnonzero(examples.domains == domain)
        if len(members) > cap:
            members = np.sort(rng.choice(members, size=cap, replace=False))
        kept.append(members)
    return _renumber(examples.take(np.sort(np.concatenate(kept))))


def load_image_inputs(
    config: GraspConfig, seed: int
) -> tuple[Examples, dict[str, Examples], list[str]]:
    """Corpus, ``--task`` tasks and class names from the configured inputs (or the digits demo)."""
    section = config.prepare
    if section.demo_images:
        if section.inputs:
            raise ConfigError(
                "prepare.demo_images builds its own corpus; drop the inputs or set demo_images = false"
            )
        corpus = digits_demo(section.demo_image_shares, section.image_size, seed)
        tasks = {
            name: _task_examples(
                load_image_records([pattern]), corpus.fields["image"].shape[1:], name
            )
            for name, pattern in section.tasks.items()
        }
        return corpus, tasks, []
    if not section.inputs:
        raise InputError(
            "prepare: no inputs; give image files/folders/globs, or prepare.demo_images"
        )
    from grasp_cli.prepare.stage import check_no_shared_files

    check_no_shared_files(
        [path for path, _ in expand_image_inputs(section.inputs)],
        {
            name: [path for path, _ in expand_image_inputs([pattern])]
            for name, pattern in section.tasks.items()
        },
    )
    corpus_records = load_image_records(section.inputs)
    task_records = {
        name: load_image_records([pattern]) for name, pattern in sorted(section.tasks.items())
    }
    everything = corpus_records + [r for records in task_records.values() for r in records]
    codes, class_names = label_codes([r.label for r in everything])
    images = stack_records(everything, section.image_size)
    corpus = records_to_examples(
        corpus_records, images[: len(corpus_records)], codes[: len(corpus_records)]
    )
    tasks = {}
    start = len(corpus_records)
    for name, records in task_records.items():
        stop = start + len(records)
        tasks[name] = records_to_examples(records, images[start:stop], codes[start:stop])
        start = stop
    return corpus, tasks, class_names


def _task_examples(records: list[ImageRecord], shape: tuple[int, ...], name: str) -> Examples:
    """A ``--task`` of the demo: resized to the demo's shape; labels must be digits 0..9."""
    codes, names = label_codes([r.label for r in records])
    if names:
        raise InputError(
            f"task {name!r}: the digits demo needs integer labels 0..9, got class names"
        )
    images = stack_records(records, int(shape[0]))
    if images.shape[1:] != tuple(shape):
        raise InputError(
            f"task {name!r}: images have shape {list(images.shape[1:])}, the demo corpus {list(shape)}"
        )
    return records_to_examples(records, images, codes)


def run_prepare_images(config: GraspConfig, layout: RunLayout):
    """``prepare`` for images: read (or build the demo), cap, hold out tasks, write shards."""
    from grasp_cli.prepare.stage import PrepareSummary, write_prepared

    section = config.prepare
    seed = config.seed("prepare")
    if section.demo:
        raise ConfigError("prepare.demo (text) and prepare.demo_images are exclusive; choose one")
    corpus, tasks, class_names = load_image_inputs(config, seed)
    holdout = section.holdout_domains
    if section.demo_images and not holdout and not section.tasks:
        holdout = DEMO_IMAGE_HOLDOUT
    if section.max_docs_per_domain > 0:
        corpus = _cap_per_domain(corpus, section.max_docs_per_domain, seed + 2)
    corpus, held = split_holdout_images(corpus, holdout, section.holdout_fraction, seed)
    tasks.update(held)
    if not tasks:
        raise InputError("prepare: no target tasks; give --task NAME=PATH or --holdout-domains")
    if len(corpus) == 0:
        raise InputError("prepare: the corpus has no images left after holding out the tasks")
    num_classes = int(corpus.fields["label"].max()) + 1
    for name in sorted(tasks):
        labels = tasks[name].fields["label"]
        if labels.max() >= num_classes:
            raise InputError(
                f"task {name!r} has label {int(labels.max())} but the corpus only has labels "
                f"0..{num_classes - 1}; a classifier trained on the corpus cannot predict it"
            )
        if section.max_task_seqs > 0 and len(tasks[name]) > section.max_task_seqs:
            rng = np.random.default_rng(seed + 1)
            keep = np.sort(rng.choice(len(tasks[name]), size=section.max_task_seqs, replace=False))
            tasks[name] = _renumber(tasks[name].take(keep))
    tasks = dict(sorted(tasks.items()))
    extra = {"class_names": class_names} if class_names else {}
    write_prepared(config, layout, corpus, tasks, seed, extra=extra)
    counts = dict(zip(*np.unique(corpus.domains.astype(str), return_counts=True), strict=True))
    return PrepareSummary(
        len(corpus),
        {k: int(v) for k, v in counts.items()},
        {k: len(v) for k, v in tasks.items()},
        unit="images",
    )
