"""The report's plots. Each function takes plain tables/arrays and writes one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def method_comparison(rows: list[dict], path: Path, ceiling: float | None) -> None:
    """Bar chart of the mean-over-tasks Spearman per method, with 95 % bootstrap intervals."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: -np.nan_to_num(r["spearman"], nan=-2))
    names = [r["method"] for r in rows]
    values = np.array([r["spearman"] for r in rows], dtype=float)
    low = values - np.array([r["ci_low"] for r in rows], dtype=float)
    high = np.array([r["ci_high"] for r in rows], dtype=float) - values
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["#c0392b" if n == "grasp" else "#7f8c8d" for n in names]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predicted_vs_measured(
    panels: list[tuple[str, str, np.ndarray, np.ndarray, float]], path: Path
) -> None:
    """Scatter per (task, method): predicted utility against measured utility on eval subsets."""
    plt = _pyplot()
    tasks = sorted({p[0] for p in panels})
    methods = sorted({p[1] for p in panels}, key=lambda m: (m != "grasp", m))
    fig, axes = plt.subplots(
        len(methods), len(tasks), figsize=(3.1 * len(tasks), 2.8 * len(methods)), squeeze=False
    )
    for task, method, predicted, measured, rho in panels:
        ax = axes[methods.index(method)][tasks.index(task)]
        ax.scatter(
            predicted,
            measured,
            s=12,
            alpha=0.8,
            color="#c0392b" if method == "grasp" else "#34495e",
        )
        ax.set_title(f"{task} · {method} (ρ={rho:.2f})", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("measured (−loss)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cost_curve(
    points: list[tuple[int, float, float, float]], path: Path, baseline: float | None
) -> None:
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
        color="#c0392b",
        capsize=3,
        label="grasp",
    )
    if baseline is not None:
        ax.axhline(
            baseline, color="#7f8c8d", ls="--", label="best additive baseline (all fit subsets)"
        )
    ax.set_xlabel("fit subsets (retraining runs)")
    ax.set_ylabel("Spearman (held-out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curation(losses: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars: measured task loss after training on each selection (lower is better)."""
    plt = _pyplot()
    selections = sorted(losses)
    tasks = sorted({t for v in losses.values() for t in v})
    width = 0.8 / max(1, len(selections))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.4))
    palette = {"grasp": "#c0392b", "random": "#7f8c8d", "additive": "#2980b9"}
    for index, name in enumerate(selections):
        xs = np.arange(len(tasks)) + index * width
        ax.bar(
            xs,
            [losses[name].get(t, np.nan) for t in tasks],
            width,
            label=name,
            color=palette.get(name, None),
        )
    ax.set_xticks(np.arange(len(tasks)) + width * (len(selections) - 1) / 2, tasks)
    values = [v for d in losses.values() for v in d.values() if np.isfinite(v)]
    if values:
        span = max(values) - min(values)
        ax.set_ylim(min(values) - 0.5 * span - 1e-3, max(values) + 0.3 * span + 1e-3)
    ax.set_ylabel("task loss (nats)")
    ax.set_title("Curation check: train on each selection")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curation_differences(differences: list[dict], path: Path) -> None:
    """GRASP − each other selection, mean task loss, with the seeds' 95 % t interval (< 0: GRASP
    trained the better model). A difference view: the zero line is what matters."""
    plt = _pyplot()
    rows = sorted(differences, key=lambda r: r["difference"])
    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.45 * len(rows)))
    ys = np.arange(len(rows))
    values = np.array([r["difference"] for r in rows])
    low = values - np.array([r["ci_low"] for r in rows])
    high = np.array([r["ci_high"] for r in rows]) - values
    colors = [
        "#27ae60" if r["ci_high"] < 0 else "#c0392b" if r["ci_low"] > 0 else "#7f8c8d" for r in rows
    ]
    ax.barh(ys, values, color=colors, xerr=[low, high], capsize=3)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(ys, [f"vs {r['baseline']}" for r in rows])
    ax.set_xlabel("GRASP − other: mean task loss (nats; < 0 = GRASP better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
