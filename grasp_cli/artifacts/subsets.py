"""``RUN/subsets.zarr`` on disk, bit-packed membership, and tables of user-given subsets.

Layout: ``membership`` [M, ceil(N/8)] uint8 (``np.packbits`` along examples, big bit order:
bit ``j`` of subset ``m`` is example row ``j``), ``size`` [M] int64, ``role`` [M] str
(fit | eval | given), ``design`` [M] str, ``params`` [M] str (JSON of what the design drew);
attrs ``n``, ``m``, ``domains``, ``bitorder``. This module is the one place that packs and
unpacks membership and reads a ``(subset_id, id[, role])`` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from grasp_cli.artifacts.zarr_io import CheckedGroup, chunk_digests, open_group_read
from grasp_cli.errors import InputError

ROLES = ("fit", "eval", "given")


class SubsetInputError(InputError, ValueError):
    """A given-subsets table is malformed (a ValueError, and a user-facing InputError)."""


# ---------------------------------------------------------------- bit packing


def pack_membership(mask: np.ndarray) -> np.ndarray:
    """bool ``[..., N]`` -> uint8 ``[..., ceil(N/8)]`` (``np.packbits``, big bit order)."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=-1, bitorder="big")


def unpack_membership(packed: np.ndarray, n_examples: int) -> np.ndarray:
    """uint8 ``[..., ceil(N/8)]`` -> bool ``[..., N]``."""
    bits = np.unpackbits(
        np.asarray(packed, dtype=np.uint8), axis=-1, count=n_examples, bitorder="big"
    )
    return bits.view(bool)  # 0/1 bytes are valid bools: no second [..., N] array


def members_of(packed_row: np.ndarray, n_examples: int) -> np.ndarray:
    """Sorted int64 row indices of one packed membership row."""
    return np.flatnonzero(unpack_membership(packed_row, n_examples)).astype(np.int64, copy=False)


# ---------------------------------------------------------------- subsets.zarr


def write_subsets(
    folder: Path,
    membership: np.ndarray,
    sizes: np.ndarray,
    roles: Any,
    design: Any,
    params: Any,
    n_rows: int,
    domain_names: list[str],
) -> dict[str, dict[str, str]]:
    """Write ``subsets.zarr`` into ``folder``; returns the chunk digests of its arrays."""
    group = zarr.open_group(str(folder), mode="w")
    membership = np.asarray(membership, dtype=np.uint8)
    group.create_array(
        "membership",
        shape=membership.shape,
        chunks=(min(256, max(1, membership.shape[0])), membership.shape[1]),
        dtype="uint8",
        dimension_names=["subset", "member_byte"],
    )[:] = membership
    group.create_array("size", shape=(len(sizes),), dtype="int64", dimension_names=["subset"])[
        :
    ] = np.asarray(sizes)
    for name, column in (("role", roles), ("design", design), ("params", params)):
        values = np.array([str(v) for v in column])
        group.create_array(name, shape=(len(values),), dtype=str, dimension_names=["subset"])[:] = (
            values
        )
    group.attrs.update({"n": n_rows, "m": len(sizes), "domains": domain_names, "bitorder": "big"})
    return {name: chunk_digests(array) for name, array in group.arrays()}


@dataclass
class Subsets:
    """An opened ``subsets.zarr`` (membership stays packed: ``M × N/8`` bytes)."""

    group: CheckedGroup
    membership: np.ndarray  # uint8 [M, ceil(N/8)]
    roles: np.ndarray  # str [M]
    design: np.ndarray  # str [M]
    n: int

    @property
    def m(self) -> int:
        return int(self.membership.shape[0])

    def rows(self, subset_id: int) -> np.ndarray:
        """Corpus row indices of one subset."""
        return members_of(self.membership[subset_id], self.n)


def read_subsets(path: Path) -> Subsets:
    group = open_group_read(path, "retrain-subsets")
    return Subsets(
        group=group,
        membership=np.asarray(group["membership"][:]),
        roles=np.array([str(r) for r in group["role"][:]]),
        design=np.array([str(d) for d in group["design"][:]]),
        n=int(group.attrs["n"]),
    )


# ---------------------------------------------------------------- (subset_id, id[, role]) tables


def read_subset_table(
    source: Any, ids: np.ndarray, limit: int = 0, where: str | None = None
) -> tuple[np.ndarray, list[str], list[dict[str, Any]], np.ndarray]:
    """Subsets from a pyarrow Table or Parquet path with columns subset_id, id[, role].

    ``ids``: the corpus ids ``[N]`` (row i has id ``ids[i]``). Returns membership bool
    ``[G, N]`` (subsets in increasing subset_id; at most ``limit`` if ``limit > 0``),
    roles, params ``{"given_subset_id": ...}`` and the subset ids. Unknown ids, a
    non-integer column, a subset with mixed roles or an unknown role raise
    ``SubsetInputError`` naming the source (``where``, default: the path).
    """
    import pyarrow as pa

    from grasp_cli.artifacts.tables import read_table

    if isinstance(source, (str, Path)):
        where = where or str(source)
        if not Path(source).exists():
            raise SubsetInputError(f"{where}: file not found")
        table = read_table(Path(source))
    elif isinstance(source, pa.Table):
        where = where or "given subsets"
        table = source
    else:
        raise TypeError(f"expected a pyarrow Table or a path, got {type(source).__name__}")
    missing = [c for c in ("subset_id", "id") if c not in table.column_names]
    if missing:
        raise SubsetInputError(
            f"{where}: missing column '{missing[0]}' (need subset_id, id[, role]; "
            f"found {', '.join(table.column_names)})"
        )
    for column in ("subset_id", "id"):
        kind = table.schema.field(column).type
        if not pa.types.is_integer(kind):
            raise SubsetInputError(f"{where}: column '{column}' has type {kind}, expected integers")
    subset_ids = np.asarray(table.column("subset_id").to_numpy(zero_copy_only=False))
    example_ids = np.asarray(table.column("id").to_numpy(zero_copy_only=False))
    ids = np.asarray(ids)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if len(sorted_ids) > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
        raise ValueError("corpus ids are not unique")
    pos = np.minimum(np.searchsorted(sorted_ids, example_ids), max(len(sorted_ids) - 1, 0))
    known = sorted_ids[pos] == example_ids if len(sorted_ids) else np.zeros(len(pos), bool)
    if not known.all():
        unknown = list(dict.fromkeys(example_ids[~known].tolist()))
        shown = ", ".join(map(str, unknown[:10])) + (
            f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        )
        raise SubsetInputError(f"{where}: {len(unknown)} id(s) not in the corpus: {shown}")
    rows = order[pos]
    roles_col = (
        np.asarray(table.column("role").to_numpy(zero_copy_only=False)).astype(str)
        if "role" in table.column_names
        else None
    )
    unique_sids = np.unique(subset_ids)
    if limit > 0:
        unique_sids = unique_sids[:limit]
    masks = np.zeros((len(unique_sids), len(ids)), dtype=bool)
    roles: list[str] = []
    params: list[dict[str, Any]] = []
    for g, sid in enumerate(unique_sids):
        selected = subset_ids == sid
        masks[g, rows[selected]] = True
        role = "given"
        if roles_col is not None:
            values = np.unique(roles_col[selected])
            if len(values) != 1 or values[0] not in ROLES:
                raise SubsetInputError(
                    f"{where}: subset_id {sid} has role(s) {', '.join(values)}; use one of "
                    f"{', '.join(ROLES)} per subset"
                )
            role = str(values[0])
        roles.append(role)
        params.append({"given_subset_id": sid.item() if hasattr(sid, "item") else sid})
    return masks, roles, params, unique_sids.astype(np.int64)
