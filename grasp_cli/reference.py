"""The reference model θ0: a user's checkpoint, the model's initial weights, or those trained further.

Where θ0 comes from, in order:

1. ``reference.checkpoint`` (``--checkpoint``): a state dict, used as it is.
2. ``reference.steps = 0``: the model's initial weights as they are: for ``model.kind = 'hf'``
   the ``model.path`` checkpoint (the default for that kind), else the seeded init.
3. ``reference.steps > 0``: the initial weights trained that many steps on a seeded
   ``reference.slice_fraction`` of the corpus with the one trainer.

Saved as ``RUN/reference/model.pt`` (a plain state dict, loaded with ``weights_only=True``)
with its manifest, except a Hugging Face checkpoint used as it is: its weights are not
copied; the manifest records their origin (``extra.origin``: the folder, each file's size
and mtime, and sha256 digests of the weight files and of ``config.json``), and the
manifest's content digest is that of the checkpoint. A later stage reuses θ0 only while
the folder still holds those bytes (the digests are recomputed when a file's size or mtime
changed), so a replaced checkpoint makes θ0, and everything made from it, stale. Both
``sketch`` and ``retrain-subsets`` start from θ0.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grasp_cli.artifacts.atomic import atomic_dir, creation_lock, sweep_debris
from grasp_cli.artifacts.examples import Corpus, Examples
from grasp_cli.artifacts.manifest import (
    Manifest,
    build_manifest,
    file_digest,
    folder_digest,
    read_manifest_or_none,
    require,
    staleness,
    write_manifest,
)
from grasp_cli.config import AUTO_STEPS, DEFAULT_REFERENCE_STEPS, GraspConfig
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError, StaleError, first_line
from grasp_cli.models import DataShape, ModelBundle, build_model
from grasp_cli.models.transformer import PAD_ID

STATE_FILE = "model.pt"
INITIAL = "initial weights"  # extra.source of a θ0 that is the model's initial weights


def data_shape_of(
    examples: Examples | Corpus, pad_id: int = PAD_ID, tasks: dict[str, Examples] | None = None
) -> DataShape:
    """What the model must know about the data; for tokens also the largest non-pad id of the
    corpus and ``tasks`` (checked against the model's vocabulary when it is built). A ``Corpus``
    is read by row groups, so this holds one block in memory, never the corpus."""
    shapes = examples.row_shapes()
    if "tokens" in shapes:
        largest = max(_max_token(data, pad_id) for data in [examples, *(tasks or {}).values()])
        return DataShape(seq_len=int(shapes["tokens"][0] - 1), pad_id=pad_id, max_token_id=largest)
    return DataShape(image_shape=tuple(shapes["image"]), num_classes=examples.num_classes())


def _max_token(data: Examples | Corpus, pad_id: int) -> int:
    if isinstance(data, Corpus):
        return data.max_token_id(pad_id)
    tokens = data.fields["tokens"]
    real = tokens[tokens != pad_id]
    return int(real.max()) if real.size else -1


def corpus_pad_id(ctx: StageContext) -> int:
    """The corpus's padding id: ``pad_id`` in its manifest when prepare recorded one (tokenized
    corpora), else grasp's byte corpus pad 256."""
    manifest = require(ctx.layout, "corpus", ctx.config, force=ctx.force)
    return int(manifest.extra.get("pad_id", PAD_ID))


def stage_data_shape(
    ctx: StageContext, corpus: Examples | Corpus, tasks: dict[str, Examples] | None = None
) -> DataShape:
    """``data_shape_of`` the corpus and tasks with the corpus's own pad id."""
    pad_id = corpus_pad_id(ctx) if "tokens" in corpus.row_shapes() else PAD_ID
    return data_shape_of(corpus, pad_id, tasks)


def reference_steps(config: GraspConfig) -> int:
    """``reference.steps`` with -1 ("the kind's default") resolved: 0 for kind = 'hf', else 300."""
    steps = config.reference.steps
    if steps == AUTO_STEPS:
        return 0 if config.model.kind == "hf" else DEFAULT_REFERENCE_STEPS
    return steps


def new_bundle(ctx: StageContext, shape: DataShape) -> ModelBundle:
    """A freshly initialized model of the configured kind (seeded from run.seed)."""
    return build_model(ctx.config.model, shape, ctx.config.seed("model-init"))


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
        first = first_line(exc)
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
    steps = reference_steps(ctx.config)
    existing = read_manifest_or_none(folder, force=ctx.force)
    sweep_debris(folder.parent, [folder.name])  # under the lock: no one else writes it now
    recorded = existing.extra.get("origin") if existing is not None else None
    origin = model_origin(ctx, recorded if isinstance(recorded, dict) else None)
    if existing is not None and existing.complete and not rebuild:
        reason = staleness(ctx.layout, "reference", ctx.config)
        if reason is None and not _same_origin(recorded, origin):
            reason = f"the model at {ctx.config.model.path} changed since θ0 was recorded"
        if reason is None and checkpoint:
            if existing.extra.get("checkpoint_digest") != _digest_of(checkpoint):
                reason = f"θ0 was not made from the checkpoint {checkpoint}"
        if reason is not None:  # θ0 is never rebuilt behind the user's back
            raise StaleError(
                f"stale: {reason}; {folder} holds the θ0 this run's sketches and retraining "
                "started from: use the run's own config (RUN/config.toml), or rebuild θ0 with "
                "`grasp sketch --force` (every later artifact then becomes stale)"
            )
        if checkpoint:
            return load_state_dict(str(folder / STATE_FILE), bundle)
        if existing.extra.get("source") == INITIAL and not (folder / STATE_FILE).exists():
            return _initial_state(bundle)
        return load_state_dict(str(folder / STATE_FILE), bundle)
    extra: dict[str, object] = {}
    seed = ctx.config.seed("reference")
    if checkpoint:
        if Path(checkpoint).is_dir():
            raise InputError(
                f"{checkpoint}: a folder, not a state dict; for a Hugging Face checkpoint set "
                "model.kind = 'hf' and model.path to it"
            )
        state = load_state_dict(checkpoint, bundle)
        extra = {"source": f"checkpoint {checkpoint}", "checkpoint_digest": _digest_of(checkpoint)}
    elif steps == 0:
        state = _initial_state(bundle)
        extra = {"source": INITIAL, "steps": 0}
    else:
        from grasp_cli.train import TrainRecipe, train

        rng = np.random.default_rng(seed)
        size = max(1, int(round(ctx.config.reference.slice_fraction * len(corpus))))
        rows = np.sort(rng.choice(len(corpus), size=size, replace=False))
        recipe = dataclasses.replace(TrainRecipe.from_section(ctx.config.reference), steps=steps)
        result = train(
            bundle,
            corpus.to_torch(),
            rows,
            recipe,
            seed,
            init_state=None,  # the bundle's own initial weights (the checkpoint for kind = 'hf')
            progress=ctx.progress,
            device=ctx.device,
        )
        state = {k: v.detach().cpu() for k, v in result.state_dict.items()}
        extra = {
            "source": "trained",
            "steps": steps,
            "slice_rows": size,
            "final_loss": result.final_loss,
            "wall_s": result.wall_s,
        }
    if origin is not None:
        extra["origin"] = origin
    # A checkpoint used as it is stays where it is (no copy of possibly many GB of weights).
    as_is = origin is not None and extra["source"] == INITIAL
    with atomic_dir(folder) as tmp:
        if not as_is:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            (tmp / STATE_FILE).write_bytes(buffer.getvalue())
        manifest = build_manifest(
            ctx.layout,
            "reference",
            ctx.config,
            seeds={"reference": seed},
            content=origin_digest(origin) if as_is else folder_digest(tmp),
            extra=extra,
        )
        write_manifest(tmp, manifest)
    return state


def _initial_state(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The bundle's current weights (no copy): θ0 when it is the initial weights as they are."""
    return {key: value.detach() for key, value in bundle.module.state_dict().items()}


def model_origin(
    ctx: StageContext, recorded: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Where kind = 'hf' weights come from: folder, file stats, weight and config digests.

    Digests are reused from ``recorded`` (the previous manifest's origin) when the folder and
    every file's size and mtime are unchanged, else recomputed (sha256 over the bytes). None
    for the other kinds.
    """
    if ctx.config.model.kind != "hf":
        return None
    from grasp_cli.models.hf import checkpoint_files

    folder = Path(ctx.config.model.path)
    config_file, weights = checkpoint_files(folder)
    stats = {}
    for path in [config_file, *weights]:
        info = path.stat()
        stats[path.name] = [info.st_size, info.st_mtime_ns]
    resolved = os.path.realpath(folder)
    if recorded and recorded.get("resolved") == resolved and recorded.get("files") == stats:
        weights_digest, config_digest = recorded["weights_digest"], recorded["config_digest"]
    else:
        weights_digest, config_digest = file_digest(weights), file_digest([config_file])
    return {
        "kind": "hf",
        "path": str(folder),
        "resolved": resolved,
        "files": stats,
        "weights_digest": weights_digest,
        "config_digest": config_digest,
    }


def origin_digest(origin: dict[str, Any]) -> str:
    """One digest of a checkpoint's weights and config (the content of an as-is θ0)."""
    return f"{origin['weights_digest']}+{origin['config_digest']}"


def _same_origin(recorded: Any, current: dict[str, Any] | None) -> bool:
    if current is None:
        return True
    return isinstance(recorded, dict) and all(
        recorded.get(key) == current[key] for key in ("weights_digest", "config_digest")
    )


def reference_damage(folder: Path, manifest: Manifest) -> str | None:
    """Why a complete reference's bytes differ from what was written (None when intact).

    An as-is Hugging Face θ0 is checked by re-reading the checkpoint folder it names (every
    byte, no stat shortcut); a saved ``model.pt`` by the folder's own digest.
    """
    origin = manifest.extra.get("origin")
    if manifest.extra.get("source") == INITIAL and isinstance(origin, dict):
        from grasp_cli.models.hf import checkpoint_files

        config_file, weights = checkpoint_files(Path(origin["path"]))
        current = {
            "weights_digest": file_digest(weights),
            "config_digest": file_digest([config_file]),
        }
        if origin_digest(current) != manifest.content:
            return (
                f"the checkpoint {origin['path']} changed since θ0 was recorded; rerun "
                "`grasp sketch --force`"
            )
        return None
    if manifest.content and folder_digest(folder) != manifest.content:
        return f"its files changed since they were written; rerun `grasp {manifest.stage} --force`"
    return None


def _digest_of(path: str) -> str:
    from pathlib import Path

    try:
        return file_digest([Path(path)])
    except OSError:
        return ""
