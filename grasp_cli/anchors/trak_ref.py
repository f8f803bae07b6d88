"""TRAK computed by the authors' ``traker`` package on grasp's θ0, rows and tasks.

``TRAKer`` featurizes every corpus row (per-example gradients of the model output through its
own JL projector, float32), finalizes ``Φ(ΦᵀΦ + λI)⁻¹``, scores every task example as a target,
and multiplies by the out-to-loss weights; a task's score of a row is the mean over the task's
examples (TRAK is linear in the target, so that is the score of the task's mean output). The
model output is grasp's own ``ModelBundle.model_output`` (margin, ``1 − p``), wrapped in
traker's ``AbstractModelOutput`` interface, so both implementations score the same thing.

``λ`` is re-finalized for each value of a grid relative to ``tr(ΦᵀΦ)/k`` (traker's own
``lambda_reg``; 0 is its default), so the λ of ``trak-ref`` is chosen on fit subsets exactly
like ours. ``projector``: traker's ``BasicProjector`` by default — built here with one block of
all ``k`` columns when the ``[D, k]`` matrix fits in ``cache_bytes``, so it is drawn once rather
than regenerated in 100-column blocks for every batch (traker's CPU default; the same class and
distribution, hundreds of times less random-number generation); a test passes grasp's own
projection to pin that the two implementations agree to float precision.

Work-around: traker 0.3.2's ``BasicProjector.free_memory`` deletes the projection matrix and
only rebuilds it for ``proj_dim > 100``, which breaks a second ``finalize_features``; it is
made a no-op (the matrix is small here).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grasp_cli.anchors import missing, quiet_stderr
from grasp_cli.models import ModelBundle, call_functional

Batch = dict[str, torch.Tensor]


def _traker():
    try:
        import trak
        from trak.modelout_functions import AbstractModelOutput
    except ImportError:
        raise missing("traker", "the trak-ref baseline") from None
    return trak, AbstractModelOutput


def bundle_model_output(bundle: ModelBundle, keys: Sequence[str]) -> Any:
    """A traker ``AbstractModelOutput`` for ``bundle``: batches are the tensors of ``keys``."""
    _, base = _traker()

    class GraspModelOutput(base):
        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, *example):
            single = {key: value.unsqueeze(0) for key, value in zip(keys, example, strict=True)}
            outputs = call_functional(model, (weights, buffers), bundle.inputs(single))
            return bundle.model_output(outputs, single)[0].sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            data = dict(zip(keys, batch, strict=True))
            outputs = call_functional(model, (weights, buffers), bundle.inputs(data))
            return bundle.model_output(outputs, data)[1].detach().clone().unsqueeze(-1)

    return GraspModelOutput()


def trak_reference(
    bundle: ModelBundle,
    state: dict[str, torch.Tensor],
    corpus_batches: Iterable[Batch],
    n_rows: int,
    task_batches: dict[str, list[Batch]],
    *,
    k: int,
    rel_lambdas: Sequence[float],
    seed: int = 0,
    device: str = "cpu",
    scratch: Path | None = None,
    projector: Any = None,
    cache_bytes: int = 1 << 31,
) -> dict[str, np.ndarray]:
    """``{"scores": [L, N, T], "q": [N], "abs_lambdas": [L]}`` from ``traker`` (tasks sorted)."""
    trak, _ = _traker()
    model = bundle.module.to(device).eval()
    model.load_state_dict(state)
    grad_dim = sum(p.numel() for p in model.parameters())
    if projector is None and grad_dim * k * 4 <= cache_bytes:
        from trak.projectors import BasicProjector, ProjectionType

        projector = BasicProjector(
            grad_dim, k, seed, ProjectionType.normal, torch.device(device), block_size=k
        )
    names = sorted(task_batches)
    keys: list[str] | None = None
    with tempfile.TemporaryDirectory(dir=scratch) as folder, quiet_stderr():
        traker = None
        done = 0
        for batch in corpus_batches:
            if keys is None:
                keys = sorted(batch)
                traker = trak.TRAKer(
                    model=model,
                    task=bundle_model_output(bundle, keys),
                    train_set_size=n_rows,
                    save_dir=str(Path(folder) / "trak"),
                    load_from_save_dir=True,  # a fresh folder: it creates the store
                    device=device,
                    proj_dim=k,
                    projector=projector,
                    projector_seed=seed,
                    use_half_precision=False,
                    logging_level=logging.ERROR,
                    lambda_reg=0.0,
                )
                traker.projector.free_memory = lambda: None
                traker.load_checkpoint(state, model_id=0)
            size = next(iter(batch.values())).shape[0]
            traker.featurize(batch=[batch[key].to(device) for key in keys], num_samples=size)
            done += size
        if traker is None or done != n_rows:
            raise ValueError(f"trak-ref featurized {done} rows, expected {n_rows}")
        traker.finalize_features()
        grads = np.asarray(traker.saver.current_store["grads"], dtype=np.float64)
        q = np.asarray(traker.saver.current_store["out_to_loss"], dtype=np.float64).reshape(-1)
        counts = [sum(next(iter(b.values())).shape[0] for b in task_batches[n]) for n in names]
        traker.start_scoring_checkpoint(
            exp_name="tasks", checkpoint=state, model_id=0, num_targets=int(sum(counts))
        )
        for name in names:
            for batch in task_batches[name]:
                size = next(iter(batch.values())).shape[0]
                traker.score(batch=[batch[key].to(device) for key in keys], num_samples=size)
        offsets = np.cumsum([0, *counts])
        trace = float(np.sum(grads**2))
        scores, abs_lambdas = [], []
        for rel in rel_lambdas:
            absolute = float(rel) * trace / k
            traker.score_computer.lambda_reg = absolute
            traker.saver.model_ids[0]["is_finalized"] = 0
            traker.finalize_features(model_ids=[0])
            raw = np.asarray(traker.finalize_scores(exp_name="tasks"), dtype=np.float64)
            scores.append(
                np.stack(
                    [raw[:, offsets[t] : offsets[t + 1]].mean(axis=1) for t in range(len(names))],
                    axis=1,
                )
            )
            abs_lambdas.append(absolute)
        del traker
    return {"scores": np.stack(scores), "q": q, "abs_lambdas": np.asarray(abs_lambdas)}
