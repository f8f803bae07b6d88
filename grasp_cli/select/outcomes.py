"""What training on each curation selection measured: means, seed spread, paired differences.

Every selection is trained with the same seeds (common random numbers: the same
initialization and batch stream), so for each seed ``s`` the difference of mean task loss
``d_s = L(GRASP, s) − L(other, s)`` removes the training noise both runs share. Across the
``n`` seeds, ``mean(d) ± t_{0.975, n−1} · sd(d)/√n`` is a 95 % interval for the difference
(a Student-t interval; with 3 seeds ``t = 4.30``, so only differences that are consistent
across seeds exclude 0). Loss is in nats; lower is better, so a negative difference means
GRASP's selection trained the better model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

# Student-t 0.975 quantiles for 1..30 degrees of freedom (beyond: 1.96).
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def loss_table(
    rows: list[dict[str, Any]], metric: str = "loss"
) -> dict[str, dict[int, dict[str, float]]]:
    """selection -> seed -> task -> value, from curation result rows."""
    table: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["metric"] == metric:
            table[row["role"]][int(row["seed"])][row["task"]] = float(row["value"])
    return {name: dict(seeds) for name, seeds in table.items()}


def summarize(
    rows: list[dict[str, Any]], reference: str = "grasp", exclude: tuple[str, ...] = ("whole",)
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-selection summary rows, paired-difference rows) of curation results.

    Summary: selection, task ("mean" = over tasks), mean over seeds, std over seeds, seeds.
    Differences: ``reference`` − each other selection (``exclude``: reference lines that are
    not the same budget), per-seed paired on the mean over tasks, with a t interval; ``best``
    marks the other selection with the lowest mean loss.
    """
    table = loss_table(rows)
    summary: list[dict[str, Any]] = []
    per_seed_mean: dict[str, dict[int, float]] = {}
    for name, seeds in sorted(table.items()):
        tasks = sorted({t for values in seeds.values() for t in values})
        for task in tasks:
            values = np.array([seeds[s][task] for s in sorted(seeds) if task in seeds[s]])
            summary.append(_stat(name, task, values))
        per_seed_mean[name] = {s: float(np.mean(list(v.values()))) for s, v in seeds.items()}
        summary.append(_stat(name, "mean", np.array(list(per_seed_mean[name].values()))))
    differences: list[dict[str, Any]] = []
    if reference not in per_seed_mean:
        return summary, differences
    others = [n for n in per_seed_mean if n != reference and n not in exclude]
    means = {n: float(np.mean(list(per_seed_mean[n].values()))) for n in others}
    best = min(others, key=lambda n: means[n]) if others else None
    for other in others:
        shared = sorted(set(per_seed_mean[reference]) & set(per_seed_mean[other]))
        d = np.array([per_seed_mean[reference][s] - per_seed_mean[other][s] for s in shared])
        if len(d) == 0:
            continue
        half = (
            t975(len(d) - 1) * float(np.std(d, ddof=1)) / math.sqrt(len(d))
            if len(d) > 1
            else math.inf
        )
        differences.append(
            {
                "selection": reference,
                "baseline": other,
                "difference": float(d.mean()),
                "ci_low": float(d.mean() - half),
                "ci_high": float(d.mean() + half),
                "seeds": int(len(d)),
                "best": other == best,
            }
        )
    return summary, differences


def _stat(name: str, task: str, values: np.ndarray) -> dict[str, Any]:
    return {
        "selection": name,
        "task": task,
        "loss": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "seeds": int(len(values)),
    }
