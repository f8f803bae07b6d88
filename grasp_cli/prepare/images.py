"""Image readers: folder trees of PNG/JPEG, ``.npz`` arrays and ``.parquet`` tables.

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
error unless ``prepare.image_size`` resizes them all. PNG/JPEG decoding needs the optional
extra ``pip install grasp-cli[vision]`` (Pillow); ``.npz`` and raw ``.parquet`` inputs need
nothing beyond the base install. The digits demo is in ``digits.py``; which image goes to the
corpus and which to a task is decided in ``split.py``, the same way as for text.
"""

from __future__ import annotations

import functools
import glob
import io
import json
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
from grasp_cli.artifacts.tables import parquet_file, unreadable_parquet
from grasp_cli.errors import InputError, first_line
from grasp_cli.prepare.documents import walk_files
from grasp_cli.prepare.units import Source, Unit

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npz", ".parquet")
IMAGE_SUFFIXES = PICTURE_SUFFIXES + ARRAY_SUFFIXES
VISION_EXTRA = "pip install grasp-cli[vision]"
IMAGE_BATCH_ROWS = 1024  # images decoded (and parquet rows read) at a time


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


_GRAY_MODES = ("1", "L", "LA", "I")
_COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def image_header(data: bytes | Path, source: str) -> np.ndarray:
    """The shape ``decode_image`` would give, from the file's header only (nothing decoded):
    a read-only zero-copy placeholder ``[H, W]`` or ``[H, W, 3]``."""
    Image = _pillow()
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            mode, (width, height) = img.mode, img.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, ...
        detail = first_line(exc)
        raise InputError(f"{source}: unreadable image ({detail[:160]})") from None
    if mode in _GRAY_MODES or mode.startswith("I;16"):
        shape: tuple[int, ...] = (height, width)
    elif mode in _COLOUR_MODES:
        shape = (height, width, 3)
    else:
        raise InputError(f"{source}: unsupported image mode {mode!r} (use grayscale or RGB)")
    return np.broadcast_to(np.zeros((), np.uint8), shape)


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


def picture_label(path: Path, root: Path | None) -> tuple[str, str]:
    """``(label, domain)`` of a PNG/JPEG from its place in a ``DOMAIN/CLASS/file`` tree."""
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
    return label, domain or "default"


def read_picture(path: Path, root: Path | None, header_only: bool = False) -> ImageRecord:
    """One PNG/JPEG of a ``DOMAIN/CLASS/file`` tree (``header_only``: shape, no pixels)."""
    label, domain = picture_label(path, root)
    image = image_header(path, str(path)) if header_only else decode_image(path, str(path))
    return ImageRecord(image, label, domain, str(path), str(path))


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


def iter_image_parquet(path: Path, header_only: bool = False) -> Iterator[ImageRecord]:
    """Rows of a ``.parquet`` with ``image``, ``label`` and optional ``domain`` columns, streamed
    by record batches (``header_only``: shapes, no pixels)."""
    handle = parquet_file(path)
    schema = handle.schema_arrow
    names = schema.names
    if "image" not in names:
        raise InputError(f"{path}: missing column 'image' (has: {', '.join(names)})")
    if "label" not in names:
        raise InputError(f"{path}: missing labels: no column 'label' (has: {', '.join(names)})")
    if handle.metadata.num_rows == 0:
        raise InputError(f"{path}: no images (the table has no rows)")
    image_type = schema.field("image").type
    struct = pa.types.is_struct(image_type)
    if struct and image_type.get_field_index("bytes") < 0:
        raise InputError(f"{path}: column 'image' is a struct without a 'bytes' field")
    if not struct and not (
        pa.types.is_binary(image_type)
        or pa.types.is_large_binary(image_type)
        or pa.types.is_fixed_size_binary(image_type)
    ):
        raise InputError(
            f"{path}: column 'image' has type {image_type}; expected binary (PNG/JPEG bytes, or raw "
            "uint8 pixels with grasp.image_shape metadata)"
        )
    meta = schema.metadata or {}
    raw_shape = None
    if IMAGE_SHAPE_KEY in meta:
        raw_shape = tuple(int(s) for s in json.loads(meta[IMAGE_SHAPE_KEY]))
    label_type = schema.field("label").type
    if not (
        pa.types.is_integer(label_type)
        or pa.types.is_string(label_type)
        or pa.types.is_large_string(label_type)
    ):
        raise InputError(
            f"{path}: column 'label' has type {label_type}; expected integers or class names"
        )
    columns = [name for name in ("image", "label", "domain") if name in names]
    row = 0
    try:
        batches = handle.iter_batches(batch_size=IMAGE_BATCH_ROWS, columns=columns)
        for batch in batches:
            column = batch.column("image")
            blobs = (column.field("bytes") if struct else column).to_pylist()
            labels = batch.column("label").to_pylist()
            domains = (
                batch.column("domain").to_pylist() if "domain" in columns else [None] * len(labels)
            )
            for blob, label, domain in zip(blobs, labels, domains, strict=True):
                yield _parquet_record(path, row, blob, label, domain, raw_shape, header_only)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_parquet(path, exc) from None


def _parquet_record(
    path: Path,
    row: int,
    blob: bytes | None,
    label: int | str | None,
    domain: str | None,
    raw_shape: tuple[int, ...] | None,
    header_only: bool,
) -> ImageRecord:
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
        image = image_header(blob, where) if header_only else decode_image(blob, where)
    return ImageRecord(image, label, str(domain or path.stem), f"{path}#{row}", where)


def load_image_records(patterns: list[str]) -> list[ImageRecord]:
    """Every image of the inputs, in file order; empty input is an error."""
    records = [r for path, root in expand_image_inputs(patterns) for r in iter_records(path, root)]
    if not records:
        raise InputError(f"{', '.join(patterns)}: no images found")
    return records


def iter_records(path: Path, root: Path | None, header_only: bool = False) -> Iterator[ImageRecord]:
    """The images of one input file, streamed (a ``.npz`` is read whole: it is one array).

    ``header_only``: PNG/JPEG are not decoded, their records hold a zero-copy placeholder of
    the decoded shape (what the plan needs: shapes and labels)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        yield from read_npz(path)
    elif suffix == ".parquet":
        yield from iter_image_parquet(path, header_only)
    else:
        yield read_picture(path, root, header_only)


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


def stack_records(
    records: list[ImageRecord], image_size: int, colour: bool | None = None
) -> np.ndarray:
    """One uint8 array ``[N, H, W(, C)]``: gray promoted to RGB when colour is present (in
    ``records``, or anywhere when ``colour`` says so), resized to ``image_size`` when it is
    set, otherwise every image must have the same shape."""
    if colour is None:
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


# ---------------------------------------------------------------- the plan and the stream


@dataclass(frozen=True)
class ImagePlan:
    """What must be known about all images before the first is written, found by one pass
    over labels and image headers (``scan_images``): class names (numbered in sorted order;
    empty when labels are integers), whether any image is in colour (then gray ones are
    promoted to RGB), and the one shape every row gets."""

    shape: tuple[int, ...]
    colour: bool
    size: int  # prepare.image_size (0 = keep the common size)
    class_names: tuple[str, ...] = ()

    def codes(self, labels: list[int | str]) -> np.ndarray:
        """int64 codes of ``labels`` (class names by their sorted position)."""
        lookup = {name: code for code, name in enumerate(self.class_names)}
        out = []
        for label in labels:
            if isinstance(label, str) and not label.isdigit():
                out.append(lookup[label])
            else:
                out.append(int(label))
        return np.asarray(out, dtype=np.int64)

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "colour": self.colour,
            "size": self.size,
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_json(cls, data: dict) -> ImagePlan:
        return cls(tuple(data["shape"]), data["colour"], data["size"], tuple(data["class_names"]))


def scan_images(files: list[tuple[Path, Path | None]], image_size: int) -> ImagePlan:
    """One pass over ``files`` (corpus inputs, then each task's) reading labels and headers:
    PNG/JPEG are not decoded. Raises the errors ``label_codes`` and ``stack_records`` raise."""
    colour, named, numbered = False, set(), False
    first_of_shape: dict[tuple[int, int], str] = {}
    count = 0
    for path, root in files:
        for record in iter_records(path, root, header_only=True):
            count += 1
            colour |= record.image.ndim == 3
            label = record.label
            if isinstance(label, str) and not label.isdigit():
                named.add(label)
            else:
                numbered = True
            first_of_shape.setdefault(tuple(record.image.shape[:2]), record.source)
    if named and numbered:
        raise InputError(
            "labels mix class names and integers; name every class folder or label the same way"
        )
    if image_size > 0:
        base: tuple[int, ...] = (image_size, image_size)
    else:
        shapes = list(first_of_shape.items())
        if len(shapes) > 1:
            (first_shape, first), (other_shape, other) = shapes[:2]
            extra = (3,) if colour else ()
            raise InputError(
                f"{other}: image shape {list(other_shape + extra)} differs from "
                f"{list(first_shape + extra)} of {first}; set prepare.image_size "
                "(e.g. --set prepare.image_size=32) to resize all images to one square size"
            )
        base = shapes[0][0] if shapes else (0, 0)
    return ImagePlan(base + ((3,) if colour else ()), colour, image_size, tuple(sorted(named)))


def records_to_units(
    records: list[ImageRecord], plan: ImagePlan, path: Path | None = None, root: Path | None = None
) -> Iterator[Unit]:
    """Units of decoded ``records`` of the file ``path``: promoted and resized as ``plan``
    says, one row each; their keys name the file relative to ``root`` (the folder the user
    named, else the file's own folder)."""
    if not records:
        return
    images = stack_records(records, plan.size, plan.colour)
    if images.shape[1:] != plan.shape:
        raise InputError(
            f"{records[0].source}: image shape {list(images.shape[1:])} differs from "
            f"{list(plan.shape)}; set prepare.image_size to resize all images to one size"
        )
    labels = plan.codes([r.label for r in records])
    prefix = str(path) if path is not None else ""
    relative = (path.relative_to(root) if root is not None else Path(path.name)) if path else None
    for index, record in enumerate(records):
        key = ""
        if relative is not None and record.doc.startswith(prefix):
            key = relative.as_posix() + record.doc[len(prefix) :]
        yield Unit(
            record.doc,
            record.domain,
            record.source,
            ({"image": images[index : index + 1], "label": labels[index : index + 1]},),
            key=key,
        )


def image_units(path: Path, root: Path | None, plan: ImagePlan) -> Iterator[Unit]:
    """The units of one image file, decoded in batches of ``IMAGE_BATCH_ROWS``."""
    batch: list[ImageRecord] = []
    for record in iter_records(path, root):
        batch.append(record)
        if len(batch) >= IMAGE_BATCH_ROWS:
            yield from records_to_units(batch, plan, path, root)
            batch = []
    yield from records_to_units(batch, plan, path, root)


def image_sources(patterns: list[str], plan: ImagePlan) -> list[Source]:
    """One ``Source`` per image input file."""
    sources = []
    for path, root in expand_image_inputs(patterns):
        info = path.stat()
        sources.append(
            Source(
                str(path),
                info.st_size,
                f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}:{root}",
                functools.partial(image_units, path, root, plan),
            )
        )
    return sources


def examples_units(examples: Examples) -> Iterator[Unit]:
    """Units of image rows already in memory (the digits demo), one row each."""
    for index in range(len(examples)):
        rows = slice(index, index + 1)
        yield Unit(
            str(examples.docs[index]),
            str(examples.domains[index]),
            str(examples.docs[index]),
            ({name: values[rows] for name, values in examples.fields.items()},),
        )
