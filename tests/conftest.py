"""Shared fixtures: small real inputs and a way to run the real CLI in-process."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from grasp_cli.cli import main

TINY = Path(__file__).with_name("tiny.toml")
# every result column but wall_s (the one non-deterministic column)
RESULT_KEYS = ["subset_id", "role", "task", "metric", "value", "utility", "seed", "steps"]

ENGLISH = (
    "The quick brown fox jumps over the lazy dog while the river keeps flowing to the sea. "
    "Every morning the baker opens the shop and the smell of bread fills the narrow street. "
)
CODE = "def add(a, b):\n    return a + b\n\nclass Box:\n    def __init__(self, x):\n        self.x = x\n"


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def run_grasp(*args: object) -> tuple[int, str, str]:
    """Run `grasp ARGS...` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def grasp_ok(*args: object) -> str:
    """Run `grasp ARGS...` and insist it exits 0; returns stdout."""
    code, out, err = run_grasp(*args)
    assert code == 0, f"grasp {' '.join(map(str, args))} -> {code}\n{out}\n{err}"
    return out


def build_run(root: Path, stages: list[list[str]] | tuple, config: Path = TINY) -> Path:
    """Run each stage of ``stages`` (``["retrain-subsets", "--curation"]``...) on ``root``."""
    for stage in stages:
        grasp_ok(*stage, "-c", config, "--run", root)
    return root


def copy_run(src: Path, dst: Path, names: tuple[str, ...] | list[str]) -> Path:
    """A copy of the named artifact folders of run ``src`` in ``dst`` (created), with the
    run's recorded configuration (``config.toml``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(src / name, dst / name)
    if (src / "config.toml").is_file():
        shutil.copy2(src / "config.toml", dst / "config.toml")
    return dst


def result_rows(folder: Path) -> list[tuple]:
    """Training results as sorted tuples, ``wall_s`` left out (the one non-deterministic column)."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    return sorted(zip(*(table.column(c).to_pylist() for c in RESULT_KEYS), strict=True))


def one_line_error(err: str) -> str:
    """The one ``error: ...`` line a failed command must print (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def assert_same_sketches(a: Path, b: Path) -> None:
    """Two ``sketches.zarr`` hold bit-identical arrays."""
    one, two = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ("train", "train_ids", "tasks"):
        x, y = np.asarray(one[name][:]), np.asarray(two[name][:])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


@pytest.fixture
def cli(capsys):
    """Run `grasp ARGS...` in-process; returns (exit_code, stdout, stderr)."""

    def invoke(*args: str) -> tuple[int, str, str]:
        code = run_cli(*args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A small jsonl corpus with three domains (prose, code, numbers), 12 documents each."""
    path = tmp_path / "docs.jsonl"
    lines = []
    for index in range(12):
        lines.append({"id": f"p{index}", "domain": "prose", "text": ENGLISH * (2 + index % 3)})
        lines.append({"id": f"c{index}", "domain": "code", "text": CODE * (2 + index % 3)})
        numbers = " ".join(str(i * (index + 1)) for i in range(80))
        lines.append({"id": f"n{index}", "domain": "numbers", "text": numbers})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``{"gpt2": DIR, "llama": DIR}``: tiny save_pretrained folders (see tests/hf_checkpoints.py)."""
    from tests.hf_checkpoints import ARCHITECTURES, save

    root = tmp_path_factory.mktemp("hf")
    return {arch: save(arch, root / arch) for arch in ARCHITECTURES}
