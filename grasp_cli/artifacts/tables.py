"""Parquet tables: atomic writes and reads that name the file when something is wrong."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from grasp_cli.artifacts.atomic import atomic_path
from grasp_cli.errors import InputError, first_line


def write_table(path: Path, table: pa.Table, row_group_rows: int = 65536) -> None:
    """Write ``table`` to ``path`` atomically (a reader never sees a half-written file)."""
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp, row_group_size=max(1, row_group_rows))


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file; a missing, truncated or corrupt file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise unreadable_parquet(path, exc) from None
    except KeyError as exc:  # a requested column is absent
        raise InputError(f"{path}: missing column {exc}") from None
    return table


def unreadable_parquet(path: Path, exc: BaseException) -> InputError:
    """The one-line error for a Parquet file Arrow cannot read (raise it ``from None``)."""
    return InputError(f"{path}: not a readable Parquet file ({first_line(exc)})")


def parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise unreadable_parquet(path, exc) from None


def require_columns(table: pa.Table, path: Path, expected: dict[str, str]) -> None:
    """Check that ``table`` has each column with a type whose string form starts as expected."""
    for name, type_prefix in expected.items():
        if name not in table.column_names:
            raise InputError(
                f"{path}: missing column '{name}' (has: {', '.join(table.column_names)})"
            )
        actual = str(table.schema.field(name).type)
        if not actual.startswith(type_prefix):
            raise InputError(f"{path}: column '{name}' has type {actual}, expected {type_prefix}")
