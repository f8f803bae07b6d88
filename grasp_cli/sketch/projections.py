"""Johnson–Lindenstrauss projections ``P: R^D -> R^k`` that are regenerated from a seed, never stored.

Every random number is drawn on the CPU with numpy's PCG64 from a seed derived from
``(seed, what, parameter or layer name, block index)`` and then moved to the device, so
the same seed gives the same ``P`` on every machine and every device, and the
projection of one parameter does not depend on which other parameters are sketched.

Scaling: every entry of ``P`` has mean 0 and variance ``1/k``, so
``E <P g, P g'> = <g, g'>``.

Prefixes: each output coordinate (row of ``P``) is its own stretch of the random stream
(matrices are drawn row-major as ``[k, columns]``), so the unscaled rows do not depend on
``k``: the first ``k'`` columns of a ``k``-dim sketch, times ``sqrt(k / k')``, are exactly
the ``k'``-dim sketch of the same seed (dense and Kronecker kinds; see ``take_prefix``).
SJLT hashes coordinates into ``k`` buckets, so its prefixes are valid sparse JL sketches
(exchangeable rows) but not equal to the ``k'``-dim SJLT of the same seed.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

DENSE_KINDS = ("gaussian", "rademacher")
KINDS = ("gaussian", "rademacher", "sjlt", "kronecker")

# Input coordinates per generated block: part of the definition of P (changing it changes
# the numbers), so it is a constant and is recorded in every sketch artifact.
BLOCK_COLS = 1 << 16
GENERATOR = "numpy.PCG64"


def derive_seed(seed: int, *parts: str | int) -> int:
    """A stable 64-bit seed for one named piece of a projection (no Python ``hash``)."""
    text = "|".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *parts)))


def gaussian_rows(seed: int, parts: tuple[str | int, ...], rows: int, cols: int) -> np.ndarray:
    """Unscaled standard normal ``[rows, cols]`` float32, drawn row-major: row r never depends on ``rows``."""
    return _rng(seed, *parts).standard_normal((rows, cols), dtype=np.float32)


def rademacher_rows(seed: int, parts: tuple[str | int, ...], rows: int, cols: int) -> np.ndarray:
    """Unscaled ±1 ``[rows, cols]`` float32, drawn row-major like ``gaussian_rows``."""
    bits = _rng(seed, *parts).integers(0, 2, size=(rows, cols), dtype=np.int8)
    return (bits.astype(np.float32) * 2.0) - 1.0


def take_prefix(sketch: np.ndarray, k_prime: int) -> np.ndarray:
    """The ``k'``-dim sketch inside a ``k``-dim one: ``sketch[..., :k'] * sqrt(k / k')``.

    Without the factor, inner products of a prefix are ``k'/k`` times the full ones
    (entries of ``P`` have variance ``1/k``, not ``1/k'``).
    """
    k = sketch.shape[-1]
    if not 0 < k_prime <= k:
        raise ValueError(f"prefix k' = {k_prime} must lie in 1..{k}")
    return sketch[..., :k_prime] * np.float32(math.sqrt(k / k_prime))


class _BlockCache:
    """Device tensors keyed by name, kept while they fit in ``budget_bytes`` (else regenerated)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.items: dict[tuple, object] = {}

    def get(self, key: tuple, make, nbytes: int):
        if key in self.items:
            return self.items[key]
        value = make()
        if self.used_bytes + nbytes <= self.budget_bytes:
            self.items[key] = value
            self.used_bytes += nbytes
        return value


class DenseProjector:
    """Dense Gaussian or Rademacher ``P``, one ``[k, numel]`` slab per named parameter.

    Each parameter's slab is generated in column blocks of ``BLOCK_COLS`` input
    coordinates, each from its own seed ``(seed, kind, name, block)``; blocks are cached on
    the device while they fit in ``cache_bytes`` and regenerated on each call otherwise, so
    a ``D x k`` matrix is never held whole for large ``D``.
    """

    def __init__(
        self,
        kind: str,
        k: int,
        seed: int,
        device: str | torch.device = "cpu",
        cache_bytes: int = 1 << 28,
    ) -> None:
        if kind not in DENSE_KINDS:
            raise ValueError(f"dense projection kind must be one of {DENSE_KINDS}, got {kind!r}")
        self.kind, self.k, self.seed = kind, k, seed
        self.device = torch.device(device)
        self._cache = _BlockCache(cache_bytes)

    def block(self, name: str, index: int, cols: int) -> torch.Tensor:
        """Scaled block ``[k, cols]`` of the slab of parameter ``name``."""

        def make() -> torch.Tensor:
            draw = gaussian_rows if self.kind == "gaussian" else rademacher_rows
            rows = draw(self.seed, (self.kind, name, index), self.k, cols)
            rows *= np.float32(1.0 / math.sqrt(self.k))
            return torch.from_numpy(rows).to(self.device)

        return self._cache.get((name, index, cols), make, 4 * self.k * cols)

    def project(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """``flat [B, numel]`` (per-example gradients of parameter ``name``) -> ``[B, k]``."""
        numel = flat.shape[1]
        out = torch.zeros(flat.shape[0], self.k, device=flat.device, dtype=torch.float32)
        for index, start in enumerate(range(0, numel, BLOCK_COLS)):
            stop = min(start + BLOCK_COLS, numel)
            out.addmm_(flat[:, start:stop].float(), self.block(name, index, stop - start).T)
        return out

    def matrix(self, name: str, numel: int) -> torch.Tensor:
        """The whole scaled slab ``[k, numel]`` (tests and baselines only: it is materialized)."""
        blocks = [
            self.block(name, index, min(start + BLOCK_COLS, numel) - start)
            for index, start in enumerate(range(0, numel, BLOCK_COLS))
        ]
        return torch.cat(blocks, dim=1)


class SparseProjector:
    """SJLT: each input coordinate has ``nnz`` non-zeros ``±1/sqrt(nnz)`` in distinct rows.

    Rows are split into ``nnz`` contiguous bands (as equal as possible); coordinate ``j``
    gets one non-zero in a uniformly chosen row of each band (Kane–Nelson's block
    construction), so every entry has variance ``1/k`` and ``E <Pg, Pg'> = <g, g'>``.
    Hash tables come from seeds ``(seed, "sjlt", name, block)`` like the dense blocks.
    """

    def __init__(
        self,
        k: int,
        nnz: int,
        seed: int,
        device: str | torch.device = "cpu",
        cache_bytes: int = 1 << 28,
    ) -> None:
        self.k, self.seed = k, seed
        self.nnz = min(nnz, k)
        self.device = torch.device(device)
        self._cache = _BlockCache(cache_bytes)
        self._edges = np.array(
            [(band * k) // self.nnz for band in range(self.nnz + 1)], dtype=np.int64
        )

    def block(self, name: str, index: int, cols: int) -> torch.Tensor:
        """Sparse COO block ``[k, cols]`` (scaled) for parameter ``name``."""

        def make() -> torch.Tensor:
            rng = _rng(self.seed, "sjlt", name, index)
            widths = np.diff(self._edges)
            offsets = rng.integers(0, widths, size=(cols, self.nnz))  # [cols, nnz]
            rows = self._edges[:-1][None, :] + offsets
            signs = (
                rng.integers(0, 2, size=(cols, self.nnz), dtype=np.int8).astype(np.float32) * 2 - 1
            )
            values = signs * np.float32(1.0 / math.sqrt(self.nnz))
            cols_index = np.repeat(np.arange(cols, dtype=np.int64), self.nnz)
            indices = torch.from_numpy(np.stack([rows.reshape(-1), cols_index]))
            matrix = torch.sparse_coo_tensor(
                indices, torch.from_numpy(values.reshape(-1)), (self.k, cols), check_invariants=True
            )
            return matrix.coalesce().to(self.device)

        return self._cache.get((name, index, cols), make, 16 * self.nnz * cols)

    def project(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """``flat [B, numel]`` -> ``[B, k]``."""
        numel = flat.shape[1]
        out_t = torch.zeros(self.k, flat.shape[0], device=flat.device, dtype=torch.float32)
        for index, start in enumerate(range(0, numel, BLOCK_COLS)):
            stop = min(start + BLOCK_COLS, numel)
            block = self.block(name, index, stop - start)
            out_t += torch.sparse.mm(block, flat[:, start:stop].float().T.contiguous())
        return out_t.T.contiguous()

    def matrix(self, name: str, numel: int) -> torch.Tensor:
        """The whole scaled ``[k, numel]`` as a dense tensor (tests only)."""
        blocks = [
            self.block(name, index, min(start + BLOCK_COLS, numel) - start).to_dense()
            for index, start in enumerate(range(0, numel, BLOCK_COLS))
        ]
        return torch.cat(blocks, dim=1)


class KroneckerProjector:
    """Kronecker-factored sketch of linear layers, followed by one dense Gaussian map.

    For a linear layer with weight ``[d_out, d_in]`` (and a bias, treated as an extra
    input column of ones: ``d_in + 1``), ``P_out [kd, d_out]`` and ``P_in [kd, d_in(+1)]``
    have N(0, 1/kd) entries, so ``(P_out ⊗ P_in)`` is a JL map of the (row-major
    flattened) weight gradient to ``kd²`` numbers. A final map ``Q = [Q_1 | Q_2 | ...]``
    with N(0, 1/k) entries takes the concatenated ``Σ kd²`` numbers to ``k``; its rows are
    i.i.d. so any prefix of the ``k`` outputs is still a JL sketch, and the whole map
    ``Q · blockdiag(P_out ⊗ P_in)`` satisfies ``E <Mg, Mg'> = <g, g'>``.

    ``P_in`` is drawn column by column (as ``[d_in+1, kd]``, transposed), so the bias
    column is the last one and a layer sketched without its bias uses the same first
    ``d_in`` columns.
    """

    def __init__(self, kd: int, k: int, seed: int, device: str | torch.device = "cpu") -> None:
        self.kd, self.k, self.seed = kd, k, seed
        self.device = torch.device(device)
        self._cache: dict[tuple, torch.Tensor] = {}

    def _scaled(self, key: tuple, rows: int, cols: int, scale: float) -> torch.Tensor:
        cache_key = (*key, rows, cols)
        if cache_key not in self._cache:
            draw = gaussian_rows(self.seed, key, rows, cols) * np.float32(scale)
            self._cache[cache_key] = torch.from_numpy(draw).to(self.device)
        return self._cache[cache_key]

    def factors(self, layer: str, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_out [kd, d_out], P_in [kd, d_in])``; ``d_in`` counts the bias column if any."""
        scale = 1.0 / math.sqrt(self.kd)
        p_out = self._scaled(("kron", layer, "out"), d_out, self.kd, scale).T
        p_in = self._scaled(("kron", layer, "in"), d_in, self.kd, scale).T
        return p_out, p_in

    def final_map(self, layer: str) -> torch.Tensor:
        """This layer's columns ``Q_layer [k, kd*kd]`` of the final Gaussian map."""
        return self._scaled(
            ("kron-final", layer), self.k, self.kd * self.kd, 1.0 / math.sqrt(self.k)
        )

    def project_io(
        self, layer: str, inputs: torch.Tensor, deltas: torch.Tensor, bias: bool
    ) -> torch.Tensor:
        """Per-example sketch ``[B, k]`` of a layer's weight gradient from its inputs and output gradients.

        ``inputs [B, T, d_in]`` and ``deltas [B, T, d_out]`` (T positions, possibly 1): the
        per-example gradient ``Σ_τ δ_τ x̃_τᵀ`` is never formed; ``P_out (Σ_τ δ_τ x̃_τᵀ) P_inᵀ =
        Σ_τ (P_out δ_τ)(P_in x̃_τ)ᵀ`` costs ``O(T (d_in + d_out + kd) kd)`` per example.
        """
        d_in, d_out = inputs.shape[-1], deltas.shape[-1]
        x_proj = self.project_inputs(layer, inputs, d_out, bias)
        delta_proj = self.project_deltas(layer, deltas, d_in + int(bias))
        return self.combine(layer, x_proj, delta_proj)

    def project_inputs(
        self, layer: str, inputs: torch.Tensor, d_out: int, bias: bool
    ) -> torch.Tensor:
        """``P_in x̃_τ`` for every position: ``inputs [B, ..., d_in]`` -> float32 ``[B, T, kd]``.

        The first half of ``project_io``, done as soon as a layer's input is seen so that only
        ``kd`` numbers per position are kept until its output gradient arrives.
        """
        batch, d_in = inputs.shape[0], inputs.shape[-1]
        _, p_in = self.factors(layer, d_out, d_in + int(bias))
        x_proj = inputs.reshape(batch, -1, d_in).float() @ p_in[:, :d_in].T
        return x_proj + p_in[:, d_in] if bias else x_proj

    def project_deltas(self, layer: str, deltas: torch.Tensor, d_in: int) -> torch.Tensor:
        """``P_out δ_τ`` for every position: ``deltas [B, ..., d_out]`` -> float32 ``[B, T, kd]``;
        ``d_in`` counts the bias column if any (it names the factor pair)."""
        batch, d_out = deltas.shape[0], deltas.shape[-1]
        p_out, _ = self.factors(layer, d_out, d_in)
        return deltas.reshape(batch, -1, d_out).float() @ p_out.T

    def combine(self, layer: str, x_proj: torch.Tensor, delta_proj: torch.Tensor) -> torch.Tensor:
        """``Q_layer vec(Σ_τ (P_out δ_τ)(P_in x̃_τ)ᵀ)`` per example: ``[B, T, kd]`` twice -> ``[B, k]``."""
        layer_sketch = torch.bmm(delta_proj.transpose(1, 2), x_proj)  # [B, kd, kd]
        return layer_sketch.reshape(x_proj.shape[0], -1) @ self.final_map(layer).T

    def project_gradient(self, layer: str, gradient: torch.Tensor) -> torch.Tensor:
        """``gradient [d_out, d_in(+1)]`` (bias as last column) -> ``[k]``, the same map as ``project_io``."""
        p_out, p_in = self.factors(layer, gradient.shape[0], gradient.shape[1])
        layer_sketch = p_out @ gradient.float() @ p_in.T  # [kd, kd]
        return self.final_map(layer) @ layer_sketch.reshape(-1)
