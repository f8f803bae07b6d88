"""grasp's own TRAK and DSIR against the authors' packages (``traker``, ``data-selection``).

Both packages are installed by the ``test`` extra, so these run in CI. The pins use inputs
where the reference and grasp must agree exactly (up to float rounding and, for TRAK, one
positive factor per λ that traker applies to ``(XᵀX)⁻¹``): the same model, model output,
out-to-loss weights and projection for TRAK; the same texts for DSIR.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grasp_cli.config import ModelSection
from grasp_cli.models import DataShape, build_model
from grasp_cli.select.dsir import dsir_rows, log_importance_weights, resample
from grasp_cli.sketch.trak import TrakFeaturizer

pytest.importorskip("trak")
pytest.importorskip("data_selection")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trak_scores_equal_trakers_on_the_same_projection(tmp_path):
    from trak.projectors import AbstractProjector, ProjectionType

    from grasp_cli.anchors.trak_ref import trak_reference

    torch.manual_seed(0)
    bundle = build_model(ModelSection(n_layer=1, n_head=2, d_model=16), DataShape(seq_len=16), 0)
    n, k = 160, 24
    tokens = torch.randint(0, 256, (n, 17))
    tokens[5, 10:] = 256  # a padded tail: the margin and Q skip it
    tasks = {
        "noise": [{"tokens": torch.randint(0, 256, (6, 17))}],
        "letters": [{"tokens": torch.randint(97, 110, (5, 17))}],
    }
    featurizer = TrakFeaturizer(bundle, k=k, seed=3)
    psi, q = featurizer.featurize({"tokens": tokens})
    targets = np.stack([featurizer.task_direction(tasks[name]) for name in sorted(tasks)])

    class GraspProjection(AbstractProjector):  # traker with grasp's own P
        def __init__(self) -> None:
            super().__init__(1, k, 0, ProjectionType.normal, "cpu")

        def project(self, grads, model_id):
            return featurizer._project(grads)

        def free_memory(self) -> None:
            pass

    state = {name: value.clone() for name, value in bundle.module.state_dict().items()}
    lambdas = [0.0, 0.1]
    reference = trak_reference(
        bundle,
        state,
        [{"tokens": tokens[s : s + 32]} for s in range(0, n, 32)],
        n,
        tasks,
        k=k,
        rel_lambdas=lambdas,
        projector=GraspProjection(),
        scratch=tmp_path,
    )
    np.testing.assert_allclose(reference["q"], q, rtol=1e-5)
    gram = psi.astype(np.float64).T @ psi.astype(np.float64)
    for index, rel in enumerate(lambdas):
        kernel = gram + rel * np.trace(gram) / k * np.eye(k)
        ours = (q[:, None] * psi.astype(np.float64)) @ np.linalg.solve(kernel, targets.T)
        theirs = reference["scores"][index]
        factor = float((theirs * ours).sum() / (ours * ours).sum())  # traker rescales (XᵀX)⁻¹
        assert factor > 0
        scale = np.abs(ours).max()
        np.testing.assert_allclose(theirs, factor * ours, atol=2e-3 * scale * factor)


def test_dsir_equals_the_data_selection_package(tmp_path):
    from grasp_cli.anchors.dsir_ref import dsir_reference

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "(", ")"]

    def texts(bias, count):
        p = np.asarray(bias, dtype=float) / np.sum(bias)
        return [" ".join(rng.choice(words, 14, p=p)) for _ in range(count)]

    flat, code, prose = [1] * 10, [1, 1, 1, 1, 4, 4, 4, 4, 2, 2], [4, 4, 4, 4, 1, 1, 1, 1, 1, 1]
    raw = texts(flat, 120) + texts(code, 40) + texts(prose, 40)
    targets = {"code": texts(code, 15), "prose": texts(prose, 15)}
    ours, names = log_importance_weights(raw, targets)
    assert names == ["code", "prose"]
    ids, theirs = dsir_reference(  # the corpus streamed into 4 files of <= 64 rows
        np.arange(200), iter(raw), targets, 40, seed=0, top_k=True, scratch=tmp_path, file_rows=64
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(resample(ours, 40, seed=0, top_k=True), ids)
    # streamed in blocks (two passes, O(B·T) held): the same rows, whatever the block size
    np.testing.assert_array_equal(
        dsir_rows(raw, targets, 40, seed=0, block_rows=7, top_k=True), ids
    )
    drawn = dsir_rows(raw, targets, 40, seed=3, block_rows=7)
    np.testing.assert_array_equal(drawn, dsir_rows(raw, targets, 40, seed=3, block_rows=500))
    np.testing.assert_array_equal(drawn, resample(ours, 40, seed=3))
    # importance resampling puts the budget where the targets' n-grams are: random would
    # take 80/200 = 40 % of its rows from the 80 target-like ones
    chosen = resample(ours, 40, seed=1)
    assert (chosen >= 120).mean() > 1.5 * 80 / 200


def test_streamed_resample_picks_the_packages_rows(tmp_path):
    """``package_resample_rows`` (a file at a time, O(B) memory) against the package's own
    ``resample`` (all N weights and N Gumbel keys at once), on the same fitted estimator:
    three targets with unequal shares of the budget, the corpus in 5 files, several seeds."""
    import json

    from grasp_cli.anchors.dsir_ref import fitted_package, package_resample_rows

    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(30)]

    def texts(bias_to, count):
        p = np.ones(len(words))
        p[bias_to] = 6.0
        return [" ".join(rng.choice(words, 12, p=p / p.sum())) for _ in range(count)]

    raw = texts(slice(0, 30), 150) + texts(slice(0, 8), 50) + texts(slice(20, 30), 50)
    targets = {"a": texts(slice(0, 8), 10), "b": texts(slice(20, 30), 10), "c": texts(10, 10)}
    ids = np.arange(1000, 1000 + len(raw))
    with fitted_package(ids, iter(raw), targets, scratch=tmp_path, file_rows=60) as dsir:
        # 249 of 250 rows: the last target takes all but one row left (the package fails at all)
        for seed, budget in [(0, 31), (7, 90), (2**32 + 5, 249)]:
            np.random.seed(seed % 2**32)
            out = tmp_path / f"out-{seed}"
            dsir.resample(out_dir=str(out), num_to_sample=budget)
            theirs = sorted(
                json.loads(line)["id"]
                for path in sorted(out.glob("*.jsonl"))
                for line in path.read_text().splitlines()
                if line.strip()
            )
            ours = ids[package_resample_rows(dsir, budget, seed)]
            assert len(ours) == budget
            np.testing.assert_array_equal(ours, theirs)
