"""Subset features from one streaming pass over the sketch array.

Everything the surrogate and the baselines know about a subset ``S`` comes from
sums over its members: ``Σ_{i∈S} φ_i`` (GRASP, additive alignment, TRAK-style),
``Σ_{i∈S} φ_i / ‖φ_i‖`` (gradient cosine), per-domain counts (mixture
regression) and pairwise overlaps ``|S ∩ S'|`` (datamodels). All of them are
accumulated in a single pass over row blocks of ``φ`` ``[N, k]``; membership
arrives bit-packed (``np.packbits(bool[M, N], axis=1)``, big bit order) and
only the columns of the current block are ever unpacked, so no dense
``M × N`` array exists. The same pass accumulates the corpus moments
(``Σ φ_i``, ``ΦᵀΦ``) that the geometries and the TRAK-style baseline need.

Arithmetic is float64 whatever the sketch dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "CorpusMoments",
    "SubsetFeatures",
    "compute_subset_features",
    "dense_membership",
]

_SUB_BLOCK_ROWS = 4096


@dataclass
class CorpusMoments:
    """First and second moments of the sketches over the whole corpus.

    n: number of examples ``N``; ``total``: ``Σ_i φ_i`` ``[k]``; ``gram``: ``ΦᵀΦ`` ``[k, k]``.
    kernel: for a feature set built from weighted rows ``φ_i = w_i ψ_i`` (TRAK's ``Q_i ψ_i``),
    the *unweighted* ``ΨᵀΨ`` ``[k, k]`` (TRAK's kernel); None otherwise (it is then ``gram``).
    """

    n: int
    total: np.ndarray
    gram: np.ndarray
    kernel: np.ndarray | None = None
    # derived matrices (a geometry's G on a prefix), made once per moments: every candidate
    # and fold of the LCB protocol asks for the same few
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def kernel_gram(self) -> np.ndarray:
        """The Gram matrix a TRAK-style kernel ``(K + λI)⁻¹`` uses."""
        return self.gram if self.kernel is None else self.kernel

    @property
    def k(self) -> int:
        return int(self.gram.shape[0])

    @property
    def second_moment(self) -> np.ndarray:
        """``C = ΦᵀΦ / N`` ``[k, k]`` (the sketched Gauss–Newton metric, unnormalized)."""
        return self.gram / max(self.n, 1)

    @property
    def mean(self) -> np.ndarray:
        """Corpus mean sketch ``[k]``."""
        return self.total / max(self.n, 1)


@dataclass
class SubsetFeatures:
    """Per-subset sums over members; row ``j`` describes subset ``index[j]``.

    sums: ``[M, k]`` float64, ``Σ_{i∈S} φ_i``.
    sizes: ``[M]`` float64, ``|S|``.
    index: ``[M]`` int64, the subset's row in the membership array (global id).
    sq_norm_sums: ``[M]``, ``Σ_{i∈S} ‖φ_i‖²`` (full k), or None.
    normalized_sums: ``{k': [M, k']}``, ``Σ_{i∈S} φ_i[:k'] / ‖φ_i[:k']‖`` (zero rows stay zero).
    domain_counts: ``[M, D]`` members per domain code, or None.
    domain_names: names of the ``D`` domain codes, or None.
    overlaps: ``[M, M_all]`` ``|S_j ∩ S_l|`` against every subset ``l`` of the
        membership array (columns are global ids, so taking rows keeps them valid), or None.
    n_examples: corpus size ``N``.
    sets: other feature sets' sums over the same subsets, ``{name: [M, k_set]}`` (e.g.
        ``"trak"``: ``Σ_{i∈S} Q_i ψ_i``; ``"trak-ref"``: summed per-example reference scores).
        ``sums`` is the set named ``"sketch"``.
    """

    sums: np.ndarray
    sizes: np.ndarray
    index: np.ndarray
    sq_norm_sums: np.ndarray | None = None
    normalized_sums: dict[int, np.ndarray] = field(default_factory=dict)
    domain_counts: np.ndarray | None = None
    domain_names: list[str] | None = None
    overlaps: np.ndarray | None = None
    n_examples: int = 0
    sets: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.sums.shape[0])

    @property
    def k(self) -> int:
        return int(self.sums.shape[1])

    def take(self, rows: np.ndarray | Sequence[int]) -> SubsetFeatures:
        """The features of a selection of rows (positions, not global ids)."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            sums=self.sums[rows],
            sizes=self.sizes[rows],
            index=self.index[rows],
            sq_norm_sums=None if self.sq_norm_sums is None else self.sq_norm_sums[rows],
            normalized_sums={d: s[rows] for d, s in self.normalized_sums.items()},
            domain_counts=None if self.domain_counts is None else self.domain_counts[rows],
            overlaps=None if self.overlaps is None else self.overlaps[rows],
            sets={name: values[rows] for name, values in self.sets.items()},
        )

    def set_sums(self, name: str) -> np.ndarray:
        """``[M, k_set]`` sums of feature set ``name`` (``"sketch"``: ``sums``)."""
        if name == "sketch":
            return self.sums
        if name not in self.sets:
            raise ValueError(
                f"feature set {name!r} was not computed (have: sketch, {', '.join(self.sets)})"
            )
        return self.sets[name]

    def check_nonempty(self) -> None:
        """Raise ValueError if a subset has no members (its mean is undefined)."""
        empty = np.flatnonzero(self.sizes <= 0)
        if empty.size:
            raise ValueError(
                f"subsets {self.index[empty[:10]].tolist()} are empty; "
                "drop them before fitting or scoring"
            )


def dense_membership(membership_packed: np.ndarray, n_examples: int) -> np.ndarray:
    """Unpack ``[M, ceil(N/8)]`` bits to bool ``[M, N]`` (small N only; tests and debugging)."""
    bits = np.unpackbits(np.asarray(membership_packed, dtype=np.uint8), axis=1, count=n_examples)
    return bits.astype(bool)


def _unpack_columns(packed: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Membership bits for columns ``[start, stop)`` as uint8 ``[M, stop - start]``."""
    byte_lo, byte_hi = start // 8, (stop + 7) // 8
    bits = np.unpackbits(packed[:, byte_lo:byte_hi], axis=1)
    offset = start - 8 * byte_lo
    return bits[:, offset : offset + (stop - start)]


_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.int64)


def _popcount_rows(packed: np.ndarray, chunk_bytes: int = 1 << 16) -> np.ndarray:
    """Set bits per row of a packed ``[M, B]`` array, ``B`` bytes at a time in chunks."""
    counts = np.zeros(packed.shape[0], dtype=np.int64)
    for lo in range(0, packed.shape[1], chunk_bytes):
        counts += _POPCOUNT[packed[:, lo : lo + chunk_bytes]].sum(axis=1)
    return counts


def compute_subset_features(
    membership_packed: np.ndarray,
    phi_blocks: Iterable[tuple[int, np.ndarray]],
    *,
    n_examples: int | None = None,
    domains: np.ndarray | None = None,
    domain_names: Sequence[str] | None = None,
    normalized_dims: Sequence[int] = (),
    with_overlaps: bool = False,
    row_weights: np.ndarray | None = None,
) -> tuple[SubsetFeatures, CorpusMoments]:
    """One pass over ``phi_blocks`` → per-subset features and corpus moments.

    membership_packed: uint8 ``[M, ceil(N/8)]``, ``np.packbits(bool[M, N], axis=1)``.
    phi_blocks: ``(start, block)`` pairs, ``block`` ``[b, k]`` holding rows
        ``start .. start+b-1`` of ``φ``; any order, together covering every row once.
    n_examples: ``N``; default the number of rows the blocks cover.
    domains: int codes ``[N]`` in ``0..D-1`` (``D = len(domain_names)`` or ``max+1``).
    normalized_dims: prefixes ``k'`` for which to accumulate sums of unit-normalized rows.
    with_overlaps: also accumulate the ``[M, M]`` overlap counts (datamodels; costs ``M²N``).
    row_weights: ``[N]``: the features are ``w_i · block_i`` (TRAK's ``Q_i ψ_i``), and the
        moments also get the unweighted ``kernel`` ``ΨᵀΨ``.

    Raises ValueError when blocks overlap, leave members uncovered or disagree on ``k``.
    """
    packed = np.ascontiguousarray(membership_packed, dtype=np.uint8)
    if packed.ndim != 2:
        raise ValueError(f"membership must be [M, ceil(N/8)] uint8, got shape {packed.shape}")
    n_subsets = packed.shape[0]
    n_domains = 0
    if domains is not None:
        domains = np.asarray(domains)  # any integer codes, indexed per sub-block (no [N] copy)
        if not np.issubdtype(domains.dtype, np.integer):
            raise ValueError(f"domain codes must be integers, got {domains.dtype}")
        if domains.size and domains.min() < 0:
            raise ValueError("domain codes must be non-negative integers")
        n_domains = (
            len(domain_names) if domain_names is not None else int(domains.max(initial=-1)) + 1
        )
        if domains.size and domains.max() >= n_domains:
            raise ValueError(
                f"domain code {int(domains.max())} has no name (got {n_domains} names)"
            )

    sums: np.ndarray | None = None
    gram: np.ndarray | None = None
    kernel: np.ndarray | None = None
    total: np.ndarray | None = None
    sizes = np.zeros(n_subsets, dtype=np.int64)
    sq_norm_sums = np.zeros(n_subsets)
    normalized: dict[int, np.ndarray] = {}
    domain_counts = np.zeros((n_subsets, n_domains)) if domains is not None else None
    overlaps = np.zeros((n_subsets, n_subsets)) if with_overlaps else None
    covered = 0
    spans: list[tuple[int, int]] = []

    for start, block in phi_blocks:
        block = np.asarray(block)
        if block.ndim != 2:
            raise ValueError(f"phi block at row {start} must be 2-D [rows, k], got {block.shape}")
        k = block.shape[1]
        if sums is None:
            sums = np.zeros((n_subsets, k))
            gram = np.zeros((k, k))
            kernel = np.zeros((k, k)) if row_weights is not None else None
            total = np.zeros(k)
            for d in normalized_dims:
                if not 0 < d <= k:
                    raise ValueError(f"normalized_dims: {d} is outside 1..{k}")
                normalized[int(d)] = np.zeros((n_subsets, int(d)))
        elif k != sums.shape[1]:
            raise ValueError(
                f"phi block at row {start} has {k} columns, earlier blocks {sums.shape[1]}"
            )
        stop = int(start) + block.shape[0]
        if 8 * packed.shape[1] < stop:
            raise ValueError(f"phi block rows {start}..{stop} exceed the membership width")
        spans.append((int(start), stop))
        for lo in range(int(start), stop, _SUB_BLOCK_ROWS):
            hi = min(lo + _SUB_BLOCK_ROWS, stop)
            rows = block[lo - start : hi - start].astype(np.float64)
            if row_weights is not None:
                kernel += rows.T @ rows
                rows = rows * np.asarray(row_weights[lo:hi], dtype=np.float64)[:, None]
            bits = _unpack_columns(packed, lo, hi)
            mask = bits.astype(np.float64)
            sizes += bits.sum(axis=1, dtype=np.int64)
            sums += mask @ rows
            gram += rows.T @ rows
            total += rows.sum(axis=0)
            row_sq = np.einsum("ij,ij->i", rows, rows)
            sq_norm_sums += mask @ row_sq
            for d, acc in normalized.items():
                norms = np.sqrt(np.einsum("ij,ij->i", rows[:, :d], rows[:, :d]))
                unit = rows[:, :d] / np.where(norms > 0, norms, 1.0)[:, None]
                acc += mask @ unit
            if domain_counts is not None:
                codes = domains[lo:hi]
                onehot = np.zeros((hi - lo, n_domains))
                onehot[np.arange(hi - lo), codes] = 1.0
                domain_counts += mask @ onehot
            if overlaps is not None:
                # Counts per sub-block are < 2**24, so float32 products are exact.
                m32 = bits.astype(np.float32)
                overlaps += m32 @ m32.T
        covered += stop - int(start)

    if sums is None:
        raise ValueError("phi_blocks yielded no rows")
    spans.sort()
    for (_, prev_stop), (next_start, _) in zip(spans, spans[1:], strict=False):
        if next_start < prev_stop:
            raise ValueError(f"phi blocks overlap at row {next_start}")
    if n_examples is None:
        n_examples = covered
    if covered != n_examples:
        raise ValueError(f"phi blocks cover {covered} rows, expected N = {n_examples}")
    members = _popcount_rows(packed)
    if not np.array_equal(members, sizes):
        bad = int(np.flatnonzero(members != sizes)[0])
        raise ValueError(
            f"subset {bad} has {int(members[bad])} member bits but only {int(sizes[bad])} "
            "fall in rows covered by phi blocks (membership wider than the sketch array?)"
        )
    if domains is not None and domains.shape[0] != n_examples:
        raise ValueError(f"domains has {domains.shape[0]} entries, expected N = {n_examples}")

    features = SubsetFeatures(
        sums=sums,
        sizes=sizes.astype(np.float64),
        index=np.arange(n_subsets, dtype=np.int64),
        sq_norm_sums=sq_norm_sums,
        normalized_sums=normalized,
        domain_counts=domain_counts,
        domain_names=list(domain_names)
        if domain_names is not None
        else ([str(i) for i in range(n_domains)] if domains is not None else None),
        overlaps=overlaps,
        n_examples=int(n_examples),
    )
    return features, CorpusMoments(n=int(n_examples), total=total, gram=gram, kernel=kernel)
