"""Reading documents: user files (.txt / .jsonl / .parquet) and the offline demo corpus.

A ``Document`` is one unit that is never split between corpus and task. Every
bad input raises ``InputError`` with the file (and line) at fault.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from grasp_cli.artifacts.tables import read_table
from grasp_cli.errors import InputError

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
    files: list[Path] = []
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
                files.append(match)
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


def read_documents(path: Path) -> Iterator[Document]:
    """Documents of one file: a .txt is one document (domain = its folder's name);
    .jsonl rows and .parquet rows carry ``text`` and optional ``domain`` and ``id``."""
    if path.suffix == ".txt":
        yield Document(str(path), path.parent.name or "default", _read_text(path), str(path))
    elif path.suffix == ".jsonl":
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            yield _record_document(record, path, f"{path}:{number}", f"{path.stem}-{number}")
    elif path.suffix == ".parquet":
        table = read_table(path)
        if "text" not in table.column_names:
            raise InputError(
                f"{path}: missing column 'text' (has: {', '.join(table.column_names)})"
            )
        text_type = table.schema.field("text").type
        if pa.types.is_dictionary(text_type):  # a normal Arrow encoding of repeated strings
            text_type = text_type.value_type
        if not pa.types.is_string(text_type) and not pa.types.is_large_string(text_type):
            raise InputError(
                f"{path}: column 'text' has type {table.schema.field('text').type}, expected string"
            )
        for row, record in enumerate(table.to_pylist()):
            yield _record_document(record, path, f"{path}:row {row}", f"{path.stem}-{row}")


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


def load_documents(patterns: list[str]) -> list[Document]:
    """All documents of the inputs; duplicate ids and empty input are errors."""
    documents: list[Document] = []
    seen: dict[str, str] = {}
    for path in expand_inputs(patterns):
        for document in read_documents(path):
            if document.doc_id in seen:
                raise InputError(
                    f"{document.source}: duplicate id {document.doc_id!r} (first seen at {seen[document.doc_id]})"
                )
            seen[document.doc_id] = document.source
            if document.text.strip():
                documents.append(document)
    if not documents:
        raise InputError(f"{', '.join(patterns)}: no non-empty documents found")
    return documents


# ---------------------------------------------------------------- demo corpus

_TOP_LEVEL = re.compile(r"^(?:@.*\n)*(?:async def |def |class )", re.MULTILINE)


def split_python_source(text: str) -> list[str]:
    """Cut a module at its top-level definitions: each def/class (with its decorators) is a document."""
    cuts = [0] + [match.start() for match in _TOP_LEVEL.finditer(text)] + [len(text)]
    pieces = [text[start:stop] for start, stop in itertools.pairwise(cuts)]
    return [piece for piece in pieces if piece.strip()]


def demo_documents(domains: list[str] | None = None) -> list[Document]:
    """Real text shipped with Python: pydoc's language reference ('docs') and stdlib packages."""
    wanted = domains or DEMO_DOMAINS
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents: list[Document] = []
    for domain in wanted:
        if domain == "docs":
            try:
                from pydoc_data.topics import topics
            except ImportError:
                raise InputError(
                    "demo: pydoc_data is not part of this Python installation"
                ) from None
            for name in sorted(topics):
                documents.append(
                    Document(f"docs/{name}", "docs", topics[name], f"pydoc_data.topics[{name}]")
                )
            continue
        package = stdlib / domain
        if not package.is_dir():
            raise InputError(f"demo: the standard library has no package {domain!r} at {package}")
        for path in sorted(package.rglob("*.py")):
            relative = path.relative_to(stdlib)
            if any(part in ("test", "tests", "idle_test") for part in relative.parts):
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for number, piece in enumerate(split_python_source(text)):
                documents.append(Document(f"{relative}#{number}", domain, piece, str(path)))
    return documents


def default_demo_holdout() -> list[str]:
    return ["docs", "asyncio", "email", "xml"]


def stdlib_exists() -> bool:
    return os.path.isdir(sysconfig.get_paths()["stdlib"])
