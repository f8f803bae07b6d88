"""The fitted surrogate on disk: ``params.json`` (human-readable) + ``model.npz`` (arrays, no pickle)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grasp_cli.artifacts.atomic import atomic_write_bytes
from grasp_cli.errors import InputError
from grasp_cli.surrogate.model import GraspSurrogate


@dataclass
class StoredSurrogate:
    model: GraspSurrogate
    params: dict[str, Any]  # the whole params.json
    utility_std: np.ndarray  # [T] std of measured fit utilities (selection's task scale)
    bootstrap: dict[str, np.ndarray] | None  # linear [R,T,k'], curvature [R,T], intercepts [R,T]
    baselines: dict[str, np.ndarray]  # mixture_coef [D,T], trak_directions [T,k'], trak_slope [T]


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as handle:
            return {name: handle[name] for name in handle.files}
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}: unreadable array file ({exc}); rerun `grasp fit-surrogate`"
        ) from None


def load_surrogate(folder: Path) -> StoredSurrogate:
    params_path = folder / "params.json"
    try:
        params = json.loads(params_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(
            f"{params_path}: unreadable ({exc}); rerun `grasp fit-surrogate`"
        ) from None
    arrays = load_arrays(folder / "model.npz")
    model = GraspSurrogate.from_arrays(params["grasp"], arrays)
    bootstrap = (
        load_arrays(folder / "bootstrap.npz") if (folder / "bootstrap.npz").exists() else None
    )
    baselines = load_arrays(folder / "baselines.npz") if (folder / "baselines.npz").exists() else {}
    return StoredSurrogate(
        model, params, np.asarray(params["utility_std"], dtype=np.float64), bootstrap, baselines
    )
