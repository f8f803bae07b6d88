"""Per-example marginal gains against a reference set ``R``, in closed form.

With ``F_t(m) = c_t + ⟨v_t, m⟩ − ½ mᵀ B_t m`` (``v_t = a_t(r_t + Δ_t)``, ``B_t = b_t G``),
changing the aggregate from ``base`` to ``base + d`` changes the utility by

    gain = ⟨v_t, d⟩  −  b_t (baseᵀ G d + ½ dᵀ G d)
         = alignment  −  redundancy

``alignment`` is the change of the linear (residual-alignment) term, ``redundancy`` the
growth of the quadratic penalty it causes: positive when ``i`` points where ``R`` already
is (redundant), smaller or negative when it is complementary. ``alignment − redundancy``
is the gain exactly; the intercept cancels. All three are in utility units (−task loss,
nats per token for language models), the same units as ``Û_t``; the same sign convention
as a subset's ``predicted = intercept + alignment − redundancy``.

Which ``base`` and ``d`` (``s_R = Σ_{j∈R} φ_j``, ``n = |R|``):

- ``i ∉ R`` — the gain of adding it, ``Û(R ∪ {i}) − Û(R)``:
  mean form ``base = s_R/n``, ``d = (φ_i − base)/(n + 1)``; sum form ``base = s_R/n_ref``,
  ``d = φ_i/n_ref``.
- ``i ∈ R`` — its leave-one-out value, ``Û(R) − Û(R ∖ {i})`` (what ``i`` is worth as a
  member; with ``R`` = the whole corpus every example is scored this way):
  mean form ``base = (s_R − φ_i)/(n − 1)``, ``d = s_R/n − base``; sum form
  ``base = (s_R − φ_i)/n_ref``, ``d = φ_i/n_ref``.

By convention the empty set has aggregate 0 (mean form with ``n = 0``, or ``n = 1``
leave-one-out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grasp_cli.surrogate.model import GraspSurrogate

__all__ = ["ExampleGains", "example_gains", "surrogate_gains"]


@dataclass
class ExampleGains:
    """``[b, T]`` arrays: gain = alignment − redundancy, per example and task (utility units)."""

    gain: np.ndarray
    alignment: np.ndarray
    redundancy: np.ndarray


def example_gains(
    phi_block: np.ndarray,
    linear_vectors: np.ndarray,
    curvature: np.ndarray,
    metric: np.ndarray,
    *,
    reference_sum: np.ndarray,
    reference_size: float,
    aggregation: str = "mean",
    n_ref: float | None = None,
    in_reference: np.ndarray | None = None,
) -> ExampleGains:
    """Closed-form gains for a block of examples (see the module docstring).

    phi_block: ``[b, k]`` sketches (only the first ``k'`` columns are used).
    linear_vectors: ``v_t`` ``[T, k']``; curvature: ``b_t`` ``[T]``; metric: ``G`` ``[k', k']``.
    reference_sum: ``Σ_{j∈R} φ_j`` (``[k]`` or ``[k']``); reference_size: ``|R|``.
    aggregation: 'mean' or 'sum' (then ``n_ref``, the model's reference size, is required).
    in_reference: bool ``[b]``, which examples belong to ``R`` (default none).
    """
    v = np.atleast_2d(np.asarray(linear_vectors, dtype=np.float64))
    k_prime = v.shape[1]
    phi = np.asarray(phi_block)[:, :k_prime].astype(np.float64)
    if phi.shape[1] != k_prime:
        raise ValueError(f"phi block has {phi.shape[1]} columns, the surrogate needs {k_prime}")
    s = np.asarray(reference_sum, dtype=np.float64)[:k_prime]
    n = float(reference_size)
    member = (
        np.zeros(phi.shape[0], dtype=bool)
        if in_reference is None
        else np.asarray(in_reference, bool)
    )
    if member.shape != (phi.shape[0],):
        raise ValueError(f"in_reference must be bool [{phi.shape[0]}], got shape {member.shape}")
    if n < 0 or (member.any() and n < 1):
        raise ValueError(f"reference size {n} cannot hold members")

    base = np.empty_like(phi)
    step = np.empty_like(phi)
    out, inn = ~member, member
    if aggregation == "mean":
        m_ref = s / n if n > 0 else np.zeros(k_prime)
        base[out] = m_ref
        step[out] = (phi[out] - m_ref) / (n + 1.0)
        base[inn] = (s - phi[inn]) / (n - 1.0) if n > 1 else 0.0
        step[inn] = m_ref - base[inn]
    elif aggregation == "sum":
        if n_ref is None or not n_ref > 0:
            raise ValueError("aggregation 'sum' needs the model's positive reference size n_ref")
        base[out] = s / n_ref
        base[inn] = (s - phi[inn]) / n_ref
        step[:] = phi / n_ref
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")

    metric = np.asarray(metric, dtype=np.float64)
    step_g = step @ metric
    interaction = np.einsum("ij,ij->i", base, step_g) + 0.5 * np.einsum("ij,ij->i", step, step_g)
    alignment = step @ v.T
    redundancy = interaction[:, None] * np.asarray(curvature, dtype=np.float64)[None, :]
    return ExampleGains(gain=alignment - redundancy, alignment=alignment, redundancy=redundancy)


def surrogate_gains(
    surrogate: GraspSurrogate,
    phi_block: np.ndarray,
    *,
    reference_sum: np.ndarray,
    reference_size: float,
    in_reference: np.ndarray | None = None,
) -> ExampleGains:
    """``example_gains`` with ``v``, ``b``, ``G``, aggregation and ``n_ref`` from a fitted model."""
    return example_gains(
        phi_block,
        surrogate.linear_vectors,
        surrogate.curvature_,
        surrogate.metric_,
        reference_sum=reference_sum,
        reference_size=reference_size,
        aggregation=surrogate.aggregation,
        n_ref=surrogate.n_ref_,
        in_reference=in_reference,
    )
