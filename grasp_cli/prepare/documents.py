"""Reading documents: user files (.txt / .jsonl / .parquet) and the offline demo corpus.

A ``Document`` is one unit that is never split between corpus and task. Files are read as
streams: .jsonl line by line, .parquet by record batches of the needed columns, .txt in
chunks; ``text_sources``/``demo_sources`` hand them to prepare one unit at a time. Every
bad input raises ``InputError`` with the file (and line) at fault.
"""

from __future__ import annotations

import codecs
import dataclasses
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.tables import parquet_file, unreadable_parquet
from grasp_cli.errors import InputError
from grasp_cli.prepare.split import UINT64_SPAN, unit_key
from grasp_cli.prepare.tokens import (
    TokenSpace,
    byte_sequences,
    sequences_of_chunks,
    streamed_unit,
    token_windows,
)
from grasp_cli.prepare.units import Source, Unit

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_SUFFIXES = (".bin", ".npy")  # flat token arrays (pre-tokenized, see pretokenized.py)
INPUT_SUFFIXES = TEXT_SUFFIXES + TOKEN_SUFFIXES
DOMAINS_SIDECAR = ".domains.jsonl"  # FILE.bin.domains.jsonl: one line per document of FILE.bin

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
            matches = [p for p in walk_files(path) if p.suffix in INPUT_SUFFIXES]
            matches = [p for p in matches if not is_sidecar(p)]
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
            if match.suffix not in INPUT_SUFFIXES:
                raise InputError(
                    f"{match}: unsupported file type (use .txt, .jsonl, .parquet, .bin or .npy)"
                )
            if is_sidecar(match) and not path.is_file():
                continue  # a glob that also matched a token file's domains sidecar
            real = match.resolve()
            if real not in seen:
                seen.add(real)
                files.append((match, path if path.is_dir() else match.parent))
    return files


def is_sidecar(path: Path) -> bool:
    """Whether ``path`` is the domains sidecar of a flat token file beside it (not an input)."""
    if not path.name.endswith(DOMAINS_SIDECAR):
        return False
    owner = path.with_name(path.name[: -len(DOMAINS_SIDECAR)])
    return owner.suffix in TOKEN_SUFFIXES and owner.is_file()


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
        raise unreadable_parquet(path, exc) from None


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


def text_units(
    path: Path, seq_len: int, root: Path | None = None, space: TokenSpace | None = None
) -> Iterator[Unit]:
    """The units of one text file: each document with its rows (bytes, or ``space``'s ids
    + EOS). A .txt is streamed in chunks (never held whole); empty documents are read but
    ``skip``ped. A .txt's id is its path; its key (what the split hashes) is the path relative
    to ``root``."""
    if space is not None:
        if space.tokenizer is None:
            raise InputError(
                f"{path}: a text input needs prepare.tokenizer (prepare.eos_id and vocab_size "
                "describe pre-tokenized inputs only)"
            )
        yield from _tokenized_text_units(path, seq_len, root, space)
        return
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


def text_sources(
    patterns: list[str], seq_len: int, space: TokenSpace | None = None, token_dtype: str = ""
) -> list[Source]:
    """One ``Source`` per input file (see ``expand_inputs``): text files, and with a token
    ``space`` also pre-tokenized ones (Parquet ``input_ids``, flat .bin/.npy)."""
    from grasp_cli.prepare.pretokenized import is_pretokenized, pretokenized_units

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
                functools.partial(pretokenized_units, path, seq_len, space, token_dtype)
                if is_pretokenized(path)
                else functools.partial(text_units, path, seq_len, root, space),
            )
        )
    return sources


# ---------------------------------------------------------------- text through a tokenizer

ENCODE_BATCH = 64  # documents encoded at once (the tokenizers library batches in Rust)


def tokenized_units(
    documents: Iterable[Document], seq_len: int, space: TokenSpace
) -> Iterator[Unit]:
    """Units of in-memory documents encoded with ``space``'s tokenizer: ids + EOS, windowed.
    Documents are encoded ``ENCODE_BATCH`` at a time; a unit's ``digest`` is the sha1 of its
    ids (int32, EOS included), so text and pre-tokenized copies of a document match."""
    iterator = iter(documents)
    while batch := list(itertools.islice(iterator, ENCODE_BATCH)):
        for document, ids in zip(batch, space.encode([d.text for d in batch]), strict=True):
            tokens = np.append(ids, np.int32(space.eos_id)).astype(np.int32)
            yield Unit(
                document.doc_id,
                document.domain,
                document.source,
                tuple(token_windows([tokens], seq_len, space.pad_id)),
                digest=hashlib.sha1(tokens.tobytes()).digest(),
                skip=not document.text.strip(),
            )


def _tokenized_text_units(
    path: Path, seq_len: int, root: Path | None, space: TokenSpace
) -> Iterator[Unit]:
    """``text_units`` through a tokenizer. A .txt is encoded in pieces of about
    ``TXT_CHUNK_BYTES`` cut after a newline (never held whole; a tokenizer that merges across
    a newline may give slightly different ids at a cut than on the whole text)."""
    if path.suffix != ".txt":
        yield from tokenized_units(read_documents(path), seq_len, space)
        return
    domain = path.parent.name or "default"
    key = path.relative_to(root).as_posix() if root is not None else path.name
    if not _txt_has_text(path):
        yield Unit(str(path), domain, str(path), (), skip=True, key=key)
        return

    def pieces() -> Iterator[np.ndarray]:
        for text in _txt_text_pieces(path):
            yield space.encode([text])[0]
        yield np.array([space.eos_id], dtype=np.int32)

    yield streamed_unit(str(path), domain, str(path), pieces(), seq_len, space.pad_id, key=key)


def _txt_text_pieces(path: Path) -> Iterator[str]:
    """The text of a .txt in pieces of at least ``TXT_CHUNK_BYTES`` characters, each ending
    after a newline where the text has one."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    for chunk in _txt_chunks(path):
        buffer += decoder.decode(chunk)
        if len(buffer) >= TXT_CHUNK_BYTES:
            cut = buffer.rfind("\n") + 1 or len(buffer)
            yield buffer[:cut]
            buffer = buffer[cut:]
    buffer += decoder.decode(b"", final=True)
    if buffer:
        yield buffer


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

    def apply(self, units: Iterable[Unit]) -> Iterator[Unit]:
        """``units``, each followed by its copies when it is repeated."""
        for unit in units:
            repeated = unit_key(self.seed, "repeat", unit.doc) / UINT64_SPAN < self.fraction
            if not repeated:
                yield unit
                continue
            blocks = tuple(unit.blocks)  # read once (a generator is one-shot), shared by copies
            unit.blocks = blocks
            yield unit
            for copy in range(1, self.copies + 1):
                yield dataclasses.replace(
                    unit, doc=f"{unit.doc}~copy{copy}", key=unit.name, blocks=blocks
                )


def demo_sources(
    domains: list[str] | None,
    seq_len: int,
    space: TokenSpace | None = None,
    repeats: Repeats | None = None,
) -> list[Source]:
    """The demo corpus as sources: pydoc's topics (one source) and each stdlib module file,
    with ``repeats`` (when given) repeating some documents."""
    return [
        Source(name, size, stamp, functools.partial(_document_units, read, seq_len, space, repeats))
        for name, size, stamp, read in _demo_pieces(domains)
    ]


def demo_texts(domains: list[str] | None = None) -> Iterator[str]:
    """The texts of the demo corpus's documents, in order (e.g. to train a tokenizer on)."""
    for *_, read in _demo_pieces(domains):
        for document in read():
            yield document.text


def _document_units(
    read, seq_len: int, space: TokenSpace | None = None, repeats: Repeats | None = None
) -> Iterator[Unit]:
    units = (
        tokenized_units(read(), seq_len, space)
        if space is not None
        else (document_unit(document, seq_len) for document in read())
    )
    yield from (repeats.apply(units) if repeats is not None else units)


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
