"""Geometries ``G`` of the quadratic penalty ``‖m‖²_G = mᵀ G m`` on a sketch prefix.

- ``identity``: ``G = I``.
- ``diagonal``: ``G = diag(C)`` normalized to mean 1, ``C = ΦᵀΦ / N``.
- ``whitened``: the sketched Gauss–Newton metric ``G = C / (tr C / k')`` (full second
  moment, normalized so its mean eigenvalue is 1). Directions in which the corpus
  gradients are large count more.

Every geometry is normalized to mean eigenvalue 1 so that the fitted curvature
``b`` means the same thing across geometries. A prefix ``k' ≤ k`` restricts
everything to the first ``k'`` sketch coordinates (a prefix of a JL sketch is a
JL sketch).
"""

from __future__ import annotations

import numpy as np

from grasp_cli.surrogate.features import CorpusMoments

__all__ = ["GEOMETRIES", "GEOMETRY_ORDER", "geometry_matrix", "sq_norm"]

GEOMETRIES = ("identity", "diagonal", "whitened")
#: Simplicity order used to break ties in the LCB protocol (simplest first).
GEOMETRY_ORDER = {name: i for i, name in enumerate(GEOMETRIES)}


def geometry_matrix(name: str, k_prime: int, moments: CorpusMoments | None = None) -> np.ndarray:
    """The metric ``G`` ``[k', k']`` float64 for geometry ``name`` on the first ``k'`` coords.

    ``moments`` is required for ``diagonal`` and ``whitened``. Raises ValueError for an
    unknown name, a prefix longer than the sketch, or sketches with no energy.
    """
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}: choose one of {', '.join(GEOMETRIES)}")
    if k_prime <= 0:
        raise ValueError(f"sketch prefix k' must be positive, got {k_prime}")
    if name == "identity":
        return np.eye(k_prime)
    if moments is None:
        raise ValueError(f"geometry {name!r} needs the corpus moments of the sketches")
    if k_prime > moments.k:
        raise ValueError(f"sketch prefix k'={k_prime} exceeds the sketch dimension k={moments.k}")
    second = moments.second_moment[:k_prime, :k_prime]
    scale = float(np.trace(second)) / k_prime
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"geometry {name!r}: the sketches have no energy in the first {k_prime} dims"
        )
    if name == "diagonal":
        return np.diag(np.diag(second) / scale)
    metric = second / scale
    return 0.5 * (metric + metric.T)


def sq_norm(means: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """``‖m‖²_G`` for each row of ``means`` ``[M, k']`` → ``[M]``."""
    return np.einsum("ij,jk,ik->i", means, metric, means, optimize=True)
