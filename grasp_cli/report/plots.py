"""The report's figures. Each function takes plain rows/arrays and returns one PNG as bytes
(embedded in the page, never written beside it). matplotlib is optional (``grasp-cli[report]``):
``available()`` says whether figures can be drawn."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GRASP_COLOR = "#c0392b"
OTHER_COLOR = "#7f8c8d"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def available() -> bool:
    return _pyplot() is not None


def _png(fig, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    return buffer.getvalue()


def method_comparison(rows: list[dict], ceiling: float | None) -> bytes:
    """Bar chart of the mean-over-tasks Spearman per method, with 95 % bootstrap intervals."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: -np.nan_to_num(r["spearman"], nan=-2))
    names = [r["method"] for r in rows]
    values = np.array([r["spearman"] for r in rows], dtype=float)
    low = values - np.array([r["ci_low"] for r in rows], dtype=float)
    high = np.array([r["ci_high"] for r in rows], dtype=float) - values
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = [GRASP_COLOR if n == "grasp" else OTHER_COLOR for n in names]
    ax.bar(names, values, yerr=[np.nan_to_num(low), np.nan_to_num(high)], color=colors, capsize=4)
    if ceiling is not None and np.isfinite(ceiling):
        ax.axhline(
            ceiling, color="#2c3e50", ls="--", lw=1, label=f"noise ceiling √ρ = {ceiling:.2f}"
        )
        ax.legend(loc="lower left", fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("Spearman (held-out subsets)")
    ax.set_title("Counterfactual subset fidelity, mean over tasks")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return _png(fig, dpi=110)


@dataclass
class ScatterPanel:
    """One panel: a method's predictions against the measurements on one task's eval subsets."""

    task: str
    method: str
    predicted: np.ndarray  # [E] utility (−loss, nats)
    measured: np.ndarray  # [E]
    designs: np.ndarray  # [E] str, the subset design of each point
    rho: float


def scatter_grid(panels: list[ScatterPanel], methods: Sequence[str], tasks: Sequence[str]) -> bytes:
    """Rows = methods, columns = tasks. Each column shares one square axis range (the same for
    x and y), so the dashed y = x line is the diagonal and a method that shrinks its predictions
    towards the mean shows as a flat cloud. Points are coloured by subset design."""
    plt = _pyplot()
    designs = sorted({str(d) for p in panels for d in p.designs})
    cmap = plt.get_cmap("tab10")
    color = {d: cmap(i % 10) for i, d in enumerate(designs)}
    limits = {}
    for task in tasks:
        values = np.concatenate(
            [np.r_[p.predicted, p.measured] for p in panels if p.task == task] or [np.zeros(1)]
        )
        values = values[np.isfinite(values)]
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        pad = 0.05 * (hi - lo) if hi > lo else 1e-3 * max(1.0, abs(lo))
        limits[task] = (lo - pad, hi + pad)
    size = 2.7
    fig, axes = plt.subplots(
        len(methods),
        len(tasks),
        figsize=(size * len(tasks) + 0.6, size * len(methods) + 0.7),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for panel in panels:
        row, col = methods.index(panel.method), tasks.index(panel.task)
        ax = axes[row][col]
        ax.set_visible(True)
        lo, hi = limits[panel.task]
        ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="#555")
        for design in designs:
            mask = panel.designs == design
            if mask.any():
                ax.scatter(
                    panel.predicted[mask], panel.measured[mask], s=14, alpha=0.85,
                    color=color[design], edgecolors="none",
                )  # fmt: skip
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        ax.ticklabel_format(useOffset=False)
        ax.locator_params(nbins=4)
        ax.set_title(f"{panel.method} · {panel.task} (ρ = {panel.rho:.2f})", fontsize=9)
        ax.tick_params(labelsize=7)
        if row == len(methods) - 1:
            ax.set_xlabel("predicted utility", fontsize=8)
        if col == 0:
            ax.set_ylabel("measured utility (−loss)", fontsize=8)
    handles = [plt.Line2D([], [], marker="o", ls="", color=color[d], label=d) for d in designs] + [
        plt.Line2D([], [], ls="--", color="#555", label="y = x")
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return _png(fig)


def cost_curve(points: list[tuple[int, float, float, float]], baseline: float | None) -> bytes:
    """GRASP's held-out Spearman against the number of fit subsets (the artifact cost)."""
    plt = _pyplot()
    points = sorted(points)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    n = [p[0] for p in points]
    ax.errorbar(
        n,
        [p[1] for p in points],
        yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]],
        marker="o",
        color=GRASP_COLOR,
        capsize=3,
        label="grasp",
    )
    if baseline is not None:
        ax.axhline(
            baseline, color=OTHER_COLOR, ls="--", label="best additive baseline (all fit subsets)"
        )
    ax.set_xticks(n)
    ax.set_xlabel("fit subsets (retraining runs)")
    ax.set_ylabel("Spearman (held-out)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig, dpi=110)


def domain_composition(domains: Sequence[str], shares: dict[str, Sequence[float]]) -> bytes:
    """Grouped bars: each domain's share (0–1) of the corpus and of each selection."""
    plt = _pyplot()
    names = list(shares)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.9 * len(domains) * len(names) ** 0.5), 3.4))
    palette = {"corpus": OTHER_COLOR, "selection": GRASP_COLOR}
    xs = np.arange(len(domains))
    for index, name in enumerate(names):
        ax.bar(xs + index * width, shares[name], width, label=name, color=palette.get(name))
    ax.set_xticks(xs + width * (len(names) - 1) / 2, list(domains))
    ax.tick_params(axis="x", rotation=30 if len(domains) > 6 else 0)
    ax.set_ylabel("share of examples")
    ax.set_title("Domain composition: selection against the corpus")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig, dpi=110)


def curation_differences(differences: list[dict]) -> bytes:
    """GRASP − each other selection, mean task loss, with the seeds' 95 % t interval (< 0: GRASP
    trained the better model). A difference view: the zero line is what matters."""
    plt = _pyplot()
    rows = sorted(differences, key=lambda r: r["difference"])
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.45 * len(rows)))
    ys = np.arange(len(rows))
    values = np.array([r["difference"] for r in rows])
    low = values - np.array([r["ci_low"] for r in rows])
    high = np.array([r["ci_high"] for r in rows]) - values
    colors = [
        "#27ae60" if r["ci_high"] < 0 else GRASP_COLOR if r["ci_low"] > 0 else OTHER_COLOR
        for r in rows
    ]
    finite = np.isfinite(low) & np.isfinite(high)
    ax.barh(ys, values, color=colors)
    ax.errorbar(
        values[finite], ys[finite], xerr=[low[finite], high[finite]], fmt="none",
        ecolor="black", capsize=3,
    )  # fmt: skip
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(ys, [f"vs {r['baseline']}" for r in rows])
    ax.set_xlabel("GRASP − other: mean task loss (nats; < 0 = GRASP better)")
    fig.tight_layout()
    return _png(fig, dpi=110)
