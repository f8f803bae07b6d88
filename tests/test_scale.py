"""Memory does not grow with the corpus: each stage's peak RSS at N and 4N rows (a small
version of ``scripts/bench_scale.py``, which measures N and 10N for ``make bench``).

Every stage runs through the real CLI in its own process; its peak resident memory comes from
the kernel for that process alone. Buffers (row groups, sketch and score chunks, select
blocks) are set small so that N already fills them: what is left to grow is anything held per
corpus row. Holding the tokens would add N x 65 x 4 bytes (about 4 MB at 4N); the bound below
allows 8 % + 24 MiB of noise (allocator, import order), a generous constant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_scale import measure_stages, recipe  # noqa: E402

STAGES = ["prepare", "sketch", "retrain-subsets", "fit-surrogate", "export"]
N = 3000


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS of a child needs Linux wait4")
def test_peak_memory_of_each_stage_is_flat_from_n_to_4n(tmp_path):
    config = recipe(row_group_rows=256, chunk_rows=512)
    small = measure_stages(tmp_path / "small", N, STAGES, config)
    large = measure_stages(tmp_path / "large", 4 * N, STAGES, config)
    assert large["rows"] > 3.5 * small["rows"]
    report = []
    for stage in STAGES:
        a = small["stages"][stage]["peak_rss_mib"]
        b = large["stages"][stage]["peak_rss_mib"]
        report.append(f"{stage}: {a:.1f} -> {b:.1f} MiB")
        assert b <= 1.08 * a + 24.0, "; ".join(report)
