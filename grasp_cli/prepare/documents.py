"""Reading documents: user files (.txt / .jsonl / .parquet) and the offline demo corpus.

A ``Document`` is one unit that is never split between corpus and task. Files are read as
streams: .jsonl line by line, .parquet by record batches of the needed columns, .txt in
chunks; ``text_sources``/``demo_sources`` hand them to prepare one unit at a time. Every
bad input raises ``InputError`` with the file (and line) at fault.
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.tables import parquet_file
from grasp_cli.errors import InputError
from grasp_cli.prepare.split import UINT64_SPAN, unit_key
from grasp_cli.prepare.tokens import byte_sequences, sequences_of_chunks
from grasp_cli.prepare.units import Source, Unit

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")

# Stdlib packages that make the demo's code domains (each a distinct style of Python).
DEMO_DOMAINS = [
    "docs",
    "asyncio",
    "email",
    "json",
    "http",
    "unittest",
    "xml",
    "logging",
    "multiprocessing",
    "tkinter",
    "urllib",
    "importlib",
]


@dataclass(frozen=True)
class Document:
    doc_id: str
    domain: str
    text: str
    source: str  # "file" or "file:line", for error messages


def walk_files(root: Path) -> list[Path]:
    """Files under ``root``, following symlinked folders but visiting each real folder once
    (a symlink loop ends instead of repeating files until the OS refuses the path)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            info = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
            dirs[:] = []
            continue
        seen.add(key)
        dirs.sort()
        found += [Path(folder) / name for name in sorted(files)]
    return [p for p in found if p.is_file()]


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths, folders (searched recursively) or globs; sorted, each file once
    (by its resolved path: a file reached twice through symlinks is read once)."""
    return [path for path, _ in expand_inputs_with_roots(patterns)]


def expand_inputs_with_roots(patterns: list[str]) -> list[tuple[Path, Path]]:
    """``expand_inputs`` with, for each file, the folder its name is taken relative to: the
    folder the user named, or the file's own folder for a file or glob."""
    files: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = [p for p in walk_files(path) if p.suffix in TEXT_SUFFIXES]
        elif path.is_file():
            matches = [path]
        else:
            try:
                hits = sorted(glob.glob(pattern, recursive=True))
            except OSError as exc:  # a path too deep through a symlink loop
                raise InputError(f"{pattern}: cannot expand ({exc.strerror})") from None
            matches = [Path(p) for p in hits if Path(p).is_file()]
        if not matches:
            raise InputError(f"{pattern}: no input files found")
        for match in matches:
            if match.suffix not in TEXT_SUFFIXES:
                raise InputError(f"{match}: unsupported file type (use .txt, .jsonl or .parquet)")
            real = match.resolve()
            if real not in seen:
                seen.add(real)
                files.append((match, path if path.is_dir() else match.parent))
    return files


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is encoding, not text
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte {exc.start})") from None


def _open(path: Path):
    try:
        return open(path, "rb")  # noqa: SIM115 - the callers close it
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def _decode_line(raw: bytes, path: Path, number: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}:{number}: not valid UTF-8 (byte {offset + exc.start})") from None


def _jsonl_records(path: Path) -> Iterator[tuple[object, str, str]]:
    """``(record, where, default id)`` for each non-blank line, read one line at a time."""
    with _open(path) as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            line = _decode_line(raw, path, number, start)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            yield record, f"{path}:{number}", f"{path.stem}-{number}"


PARQUET_BATCH_ROWS = 4096


def _parquet_records(path: Path) -> Iterator[tuple[object, str, str]]:
    """``(record, where, default id)`` per row, read in record batches of the needed columns."""
    handle = parquet_file(path)
    schema = handle.schema_arrow
    if "text" not in schema.names:
        raise InputError(f"{path}: missing column 'text' (has: {', '.join(schema.names)})")
    text_type = schema.field("text").type
    if pa.types.is_dictionary(text_type):  # a normal Arrow encoding of repeated strings
        text_type = text_type.value_type
    if not pa.types.is_string(text_type) and not pa.types.is_large_string(text_type):
        raise InputError(
            f"{path}: column 'text' has type {schema.field('text').type}, expected string"
        )
    columns = [name for name in ("text", "domain", "id") if name in schema.names]
    row = 0
    try:
        batches = handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        for batch in batches:
            for record in batch.to_pylist():
                yield record, f"{path}:row {row}", f"{path.stem}-{row}"
                row += 1
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()
        raise InputError(
            f"{path}: not a readable Parquet file ({first[0] if first else type(exc).__name__})"
        ) from None


def read_documents(path: Path) -> Iterator[Document]:
    """Documents of one file, streamed: a .txt is one document (domain = its folder's name);
    .jsonl lines and .parquet rows carry ``text`` and optional ``domain`` and ``id``."""
    if path.suffix == ".txt":
        yield Document(str(path), path.parent.name or "default", _read_text(path), str(path))
        return
    records = _jsonl_records(path) if path.suffix == ".jsonl" else _parquet_records(path)
    for record, where, default_id in records:
        yield _record_document(record, path, where, default_id)


TXT_CHUNK_BYTES = 1 << 20


def _txt_chunks(path: Path, digest: hashlib._Hash | None = None) -> Iterator[bytes]:
    """The bytes of a .txt (without a byte-order mark) in chunks, checked to be UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with _open(path) as handle:
        first = True
        while True:
            chunk = handle.read(TXT_CHUNK_BYTES)
            if first and chunk.startswith(codecs.BOM_UTF8):
                chunk, offset = chunk[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            first = False
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                line = lines + exc.object[: exc.start].count(b"\n")
                raise InputError(f"{path}:{line}: not valid UTF-8 (byte {at})") from None
            if not chunk:
                return
            if digest is not None:
                digest.update(chunk)
            offset += len(chunk)
            lines += chunk.count(b"\n")
            yield chunk


def _txt_has_text(path: Path) -> bool:
    """Whether a .txt holds anything but whitespace (read only until the first character)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for chunk in _txt_chunks(path):
        if decoder.decode(chunk).strip():
            return True
    return False


def text_units(path: Path, seq_len: int, root: Path | None = None) -> Iterator[Unit]:
    """The units of one text file: each document with its byte-sequence rows. A .txt is
    streamed in chunks (never held whole); empty documents are read but ``skip``ped. A .txt's
    id is its path; its key (what the split hashes) is the path relative to ``root``."""
    if path.suffix == ".txt":
        domain = path.parent.name or "default"
        key = path.relative_to(root).as_posix() if root is not None else path.name
        if not _txt_has_text(path):
            yield Unit(str(path), domain, str(path), (), skip=True, key=key)
            return
        digest = hashlib.sha1()
        unit = Unit(str(path), domain, str(path), (), key=key)

        def blocks() -> Iterator[dict[str, np.ndarray]]:
            for rows in sequences_of_chunks(_txt_chunks(path, digest), seq_len):
                yield {"tokens": rows}
            unit.digest = digest.digest()

        unit.blocks = blocks()
        yield unit
        return
    for document in read_documents(path):
        yield document_unit(document, seq_len)


def document_unit(document: Document, seq_len: int) -> Unit:
    """A document held in memory as a unit with its byte-sequence rows."""
    raw = document.text.encode("utf-8")
    return Unit(
        document.doc_id,
        document.domain,
        document.source,
        ({"tokens": byte_sequences(raw, seq_len)},),
        digest=hashlib.sha1(raw).digest(),
        skip=not document.text.strip(),
    )


def text_sources(patterns: list[str], seq_len: int) -> list[Source]:
    """One ``Source`` per input file (see ``expand_inputs``)."""
    sources = []
    for path, root in expand_inputs_with_roots(patterns):
        try:
            info = path.stat()
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
        sources.append(
            Source(
                str(path),
                info.st_size,
                f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}",
                functools.partial(text_units, path, seq_len, root),
            )
        )
    return sources


def _record_document(record: object, path: Path, where: str, default_id: str) -> Document:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object with a 'text' field")
    text = record.get("text")
    if text is None:
        raise InputError(f"{where}: missing field 'text'")
    if not isinstance(text, str):
        raise InputError(f"{where}: field 'text' must be a string")
    domain = record.get("domain") or path.stem
    return Document(document_id(record.get("id"), where, default_id), str(domain), text, where)


def document_id(raw: object, where: str, default: str) -> str:
    """A document id as text. The rule: a missing or null id is ``default`` (``<file stem>-<line
    or row>``); a string is itself (non-empty); an integer, or a float with an integral value,
    is its integer text (so ``1``, ``1.0`` and ``"1"`` are the same id, and a duplicate);
    anything else (``1.5``, booleans, lists) is an error."""
    if raw is None:
        return default
    if isinstance(raw, bool):
        raise InputError(f"{where}: id {raw!r} must be a string or an integer")
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        if math.isfinite(raw) and raw == math.floor(raw):
            return str(int(raw))
        raise InputError(f"{where}: id {raw!r} must be a string or an integer")
    if isinstance(raw, str):
        if not raw:
            raise InputError(f"{where}: id is an empty string")
        return raw
    raise InputError(f"{where}: id {raw!r} must be a string or an integer")


# ---------------------------------------------------------------- demo corpus

_TOP_LEVEL = re.compile(r"^(?:@.*\n)*(?:async def |def |class )", re.MULTILINE)


def split_python_source(text: str) -> list[str]:
    """Cut a module at its top-level definitions: each def/class (with its decorators) is a document."""
    cuts = [0] + [match.start() for match in _TOP_LEVEL.finditer(text)] + [len(text)]
    pieces = [text[start:stop] for start, stop in itertools.pairwise(cuts)]
    return [piece for piece in pieces if piece.strip()]


@dataclass(frozen=True)
class Repeats:
    """Exact copies of a seeded ``fraction`` of documents (the demo's crawl without
    deduplication): a document is repeated when ``unit_key(seed, "repeat", id)`` falls in the
    lowest ``fraction`` of the key range, ``copies`` more times, each copy with its own id
    (``<id>~copy<j>``) but the original's split key, so every copy lands where the original
    does (corpus or task: a repeat never leaks a task document into the corpus)."""

    fraction: float
    copies: int
    seed: int

    def of(self, document: Document, seq_len: int) -> Iterator[Unit]:
        yield document_unit(document, seq_len)
        if unit_key(self.seed, "repeat", document.doc_id) / UINT64_SPAN < self.fraction:
            for copy in range(1, self.copies + 1):
                unit = document_unit(document, seq_len)
                unit.doc, unit.key = f"{document.doc_id}~copy{copy}", document.doc_id
                yield unit


def demo_sources(
    domains: list[str] | None, seq_len: int, repeats: Repeats | None = None
) -> list[Source]:
    """The demo corpus as sources: pydoc's topics (one source) and each stdlib module file,
    with ``repeats`` (when given) repeating some documents."""
    return [
        Source(name, size, stamp, functools.partial(_document_units, read, seq_len, repeats))
        for name, size, stamp, read in _demo_pieces(domains)
    ]


def _document_units(read, seq_len: int, repeats: Repeats | None = None) -> Iterator[Unit]:
    for document in read():
        if repeats is None or repeats.fraction <= 0:
            yield document_unit(document, seq_len)
        else:
            yield from repeats.of(document, seq_len)


def _demo_pieces(domains: list[str] | None) -> list[tuple]:
    """``(name, size, stamp, read)`` per demo input, ``read()`` giving its documents."""
    wanted = domains or DEMO_DOMAINS
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pieces: list[tuple] = []
    for domain in wanted:
        if domain == "docs":
            try:
                from pydoc_data.topics import topics
            except ImportError:
                raise InputError(
                    "demo: pydoc_data is not part of this Python installation"
                ) from None
            size = sum(len(text) for text in topics.values())
            pieces.append(("pydoc_data.topics", size, f"pydoc_data:{sys.version}", _pydoc_docs))
            continue
        package = stdlib / domain
        if not package.is_dir():
            raise InputError(f"demo: the standard library has no package {domain!r} at {package}")
        for path in sorted(package.rglob("*.py")):
            relative = path.relative_to(stdlib)
            if any(part in ("test", "tests", "idle_test") for part in relative.parts):
                continue
            info = path.stat()
            stamp = f"{path}:{info.st_size}:{info.st_mtime_ns}"
            read = functools.partial(_module_docs, path, relative, domain)
            pieces.append((str(path), info.st_size, stamp, read))
    return pieces


def _pydoc_docs() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"docs/{name}", "docs", topics[name], f"pydoc_data.topics[{name}]")


def _module_docs(path: Path, relative: Path, domain: str) -> Iterator[Document]:
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, piece in enumerate(split_python_source(text)):
        yield Document(f"{relative}#{number}", domain, piece, str(path))


def default_demo_holdout() -> list[str]:
    return ["docs", "asyncio", "email", "xml"]


def stdlib_exists() -> bool:
    return os.path.isdir(sysconfig.get_paths()["stdlib"])
