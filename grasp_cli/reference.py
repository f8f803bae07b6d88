"""The reference model θ0: a user's checkpoint, or one grasp trains on a seeded slice of the corpus.

Saved as ``RUN/reference/model.pt`` (a plain state dict, loaded with
``weights_only=True``) with its manifest. Both ``sketch`` and ``retrain-subsets``
start from it.
"""

from __future__ import annotations

import io
import pickle
import re

import numpy as np
import torch

from grasp_cli.artifacts.atomic import atomic_dir, creation_lock, sweep_debris
from grasp_cli.artifacts.examples import Corpus, Examples
from grasp_cli.artifacts.manifest import (
    build_manifest,
    file_digest,
    folder_digest,
    read_manifest_or_none,
    require,
    staleness,
    write_manifest,
)
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError
from grasp_cli.models import DataShape, ModelBundle, build_model

STATE_FILE = "model.pt"


def data_shape_of(examples: Examples | Corpus) -> DataShape:
    shapes = examples.row_shapes()
    if "tokens" in shapes:
        return DataShape(seq_len=int(shapes["tokens"][0] - 1))
    return DataShape(image_shape=tuple(shapes["image"]), num_classes=examples.num_classes())


def data_shape_from_manifest(ctx: StageContext) -> DataShape:
    extra = require(ctx.layout, "corpus", ctx.config, force=ctx.force).extra
    if extra.get("kind") == "image":
        return DataShape(
            image_shape=tuple(extra["image_shape"]), num_classes=int(extra["num_classes"])
        )
    return DataShape(seq_len=int(extra["seq_len"]))


def new_bundle(ctx: StageContext, shape: DataShape) -> ModelBundle:
    """A freshly initialized model of the configured kind (seeded from run.seed)."""
    return build_model(ctx.config.model, shape, ctx.config.derived_seed(-1, "model-init"))


def load_state_dict(path: str, bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (weights_only) and check it fits the model, key by key."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as exc:  # weights_only refused it (or it is not a pickle at all)
        # torch's own text suggests weights_only=False, i.e. running the file's code: never do that here.
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(exc).strip())
        reason = found.group(1).strip() if found else type(exc).__name__
        raise InputError(
            f"{path}: unreadable checkpoint (not a plain state dict of tensors; the safe loader "
            f"refused it: {reason[:160]})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: unreadable checkpoint ({first.split('. ')[0][:200]})") from None
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    expected = bundle.module.state_dict()
    missing = [k for k in expected if k not in raw]
    unexpected = [k for k in raw if k not in expected]
    wrong = [
        f"{k} {tuple(raw[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in raw and raw[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        detail = "; ".join(
            filter(
                None,
                [
                    f"missing {missing[:3]}" if missing else "",
                    f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"shape {wrong[:3]}" if wrong else "",
                ],
            )
        )
        raise InputError(f"{path}: checkpoint does not fit the configured model ({detail})")
    return {k: raw[k].to(expected[k].dtype) for k in expected}


def ensure_reference(
    ctx: StageContext, corpus: Examples | Corpus, bundle: ModelBundle, *, rebuild: bool = False
) -> dict[str, torch.Tensor]:
    """θ0 from RUN/reference if fresh; else from the checkpoint, or trained now; saved with a manifest.

    ``rebuild`` (``grasp sketch --force``, the stage that owns θ0) makes it again even when it
    is fresh; other stages' ``--force`` never touches it.

    Held under the artifact's creation lock: when several shards start on a fresh run, one
    trains θ0 and the others wait, then load it (instead of racing to replace the folder).
    """
    with creation_lock(ctx.layout.reference):
        return _ensure_reference_locked(ctx, corpus, bundle, rebuild)


def _ensure_reference_locked(
    ctx: StageContext, corpus: Examples | Corpus, bundle: ModelBundle, rebuild: bool
) -> dict[str, torch.Tensor]:
    folder = ctx.layout.reference
    checkpoint = ctx.config.reference.checkpoint
    existing = read_manifest_or_none(folder, force=ctx.force)
    sweep_debris(folder.parent, [folder.name])  # under the lock: no one else writes it now
    if (
        existing is not None
        and existing.complete
        and not rebuild
        and staleness(ctx.layout, "reference", ctx.config) is None
    ):
        if not checkpoint or existing.extra.get("checkpoint_digest") == _digest_of(checkpoint):
            return load_state_dict(str(folder / STATE_FILE), bundle)
    extra: dict[str, object] = {}
    seed = ctx.config.derived_seed(-1, "reference")
    if checkpoint:
        state = load_state_dict(checkpoint, bundle)
        extra = {"source": f"checkpoint {checkpoint}", "checkpoint_digest": _digest_of(checkpoint)}
    else:
        from grasp_cli.train import TrainRecipe, train

        rng = np.random.default_rng(seed)
        size = max(1, int(round(ctx.config.reference.slice_fraction * len(corpus))))
        rows = np.sort(rng.choice(len(corpus), size=size, replace=False))
        result = train(
            bundle,
            corpus.to_torch(),
            rows,
            TrainRecipe.from_section(ctx.config.reference),
            seed,
            init_state=None,
            progress=ctx.progress,
            device=ctx.device,
        )
        state = {k: v.detach().cpu() for k, v in result.state_dict.items()}
        extra = {
            "source": "trained",
            "slice_rows": size,
            "final_loss": result.final_loss,
            "wall_s": result.wall_s,
        }
    with atomic_dir(folder) as tmp:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (tmp / STATE_FILE).write_bytes(buffer.getvalue())
        manifest = build_manifest(
            ctx.layout,
            "reference",
            ctx.config,
            seeds={"reference": seed},
            content=folder_digest(tmp),
            extra=extra,
        )
        write_manifest(tmp, manifest)
    return state


def _digest_of(path: str) -> str:
    from pathlib import Path

    try:
        return file_digest([Path(path)])
    except OSError:
        return ""
