"""Image corpora: the readers (PNG folder trees, .npz, .parquet), their bad-input errors, the
digits demo, and the whole pipeline on configs/vision-ci.toml through the real CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grasp_cli.artifacts.examples import IMAGE_SHAPE_KEY, read_examples, read_tasks
from grasp_cli.artifacts.manifest import read_manifest
from grasp_cli.config import load_config
from grasp_cli.errors import InputError
from grasp_cli.prepare.split import is_held, unit_key

ROOT = Path(__file__).resolve().parent.parent
VISION_CI = ROOT / "configs" / "vision-ci.toml"


def _digit_like(label: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """A uint8 image whose pixels encode its label (row ``label % size`` is bright)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, size=(size, size), dtype=np.uint8)
    image[label % size] = 200 + label
    return image


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(array))


def _png_tree(
    root: Path, domains=("paper", "screen"), labels=(0, 1, 2), per_class: int = 3
) -> None:
    for d, domain in enumerate(domains):
        for label in labels:
            for index in range(per_class):
                _write_png(
                    root / domain / str(label) / f"{index}.png",
                    _digit_like(label, seed=100 * d + 10 * label + index),
                )


def _held(names: list[str], fraction: float) -> set[str]:
    """The images prepare holds out of one domain: those whose seeded hash falls below
    ``fraction``; at least one (the smallest hash), never all (the largest stays)."""
    seed = load_config(None).derived_seed(-1, "prepare")
    held = {name for name in names if is_held(seed, name, fraction)}
    rank = sorted(names, key=lambda name: unit_key(seed, "holdout", name))
    if not held:
        held = {rank[0]}
    elif len(held) == len(names):
        held.discard(rank[-1])
    return held


def _bad(cli, tmp_path: Path, *args) -> str:
    """Run `grasp prepare ARGS` that must fail with exit 2, one line, and no corpus left behind."""
    run = tmp_path / "run-bad"
    code, out, err = cli("prepare", *args, "--run", run)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (run / "corpus").exists(), "a failed prepare must leave nothing that looks complete"
    return err


# ---------------------------------------------------------------- readers


def test_png_folder_tree_gives_domains_labels_and_pixels(cli, tmp_path):
    pytest.importorskip("PIL")
    _png_tree(tmp_path / "imgs")
    run = tmp_path / "run"
    code, _, err = cli("prepare", tmp_path / "imgs", "--run", run, "--holdout-domains", "screen")
    assert code == 0, err
    corpus = read_examples(run / "corpus")
    tasks = read_tasks(run / "tasks")
    # 18 images; the seeded hash of each image's path below imgs/ decides whether it is held out
    screen = sorted((tmp_path / "imgs" / "screen").rglob("*.png"))
    held = _held([p.relative_to(tmp_path / "imgs").as_posix() for p in screen], 0.25)
    held = {str(tmp_path / "imgs" / name) for name in held}
    assert corpus.fields["image"].shape == (18 - len(held), 8, 8)
    assert corpus.fields["image"].dtype == np.uint8
    assert list(tasks) == ["screen"] and set(tasks["screen"].domains.tolist()) == {"screen"}
    assert set(tasks["screen"].docs.tolist()) == held
    assert len(tasks["screen"]) + (corpus.domains == "screen").sum() == 9
    # every image's bright row is its label: the label came from its class folder, pixels intact
    for examples in (corpus, tasks["screen"]):
        for image, label in zip(examples.fields["image"], examples.fields["label"], strict=True):
            assert image[label].min() == 200 + label
    assert not set(tasks["screen"].docs.tolist()) & set(corpus.docs.tolist())
    manifest = read_manifest(run / "corpus")
    assert manifest.extra["kind"] == "image" and manifest.extra["image_shape"] == [8, 8]
    assert manifest.extra["num_classes"] == 3 and "class_names" not in manifest.extra


def test_named_classes_colour_promotion_and_resize(cli, tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "pets"
    for index in range(3):
        _write_png(root / "cat" / f"{index}.png", np.full((8, 8), 10 * index, np.uint8))
        colour = np.zeros((12, 12, 3), np.uint8)
        colour[..., 0] = 255  # pure red
        _write_png(root / "dog" / f"{index}.png", colour)
    _write_png(tmp_path / "target" / "dog" / "t.png", np.full((6, 6, 3), 255, np.uint8))
    run = tmp_path / "run"
    code, _, err = cli(
        "prepare", root, "--run", run, "--task", f"t={tmp_path / 'target'}",
        "--set", "prepare.image_size=4",
    )  # fmt: skip
    assert code == 0, err
    corpus = read_examples(run / "corpus")
    assert corpus.fields["image"].shape[1:] == (4, 4, 3)  # gray promoted to RGB, all resized
    assert set(corpus.domains.tolist()) == {"pets"}  # ROOT/CLASS/*.png: domain is ROOT's name
    assert read_manifest(run / "corpus").extra["class_names"] == ["cat", "dog"]
    dogs = corpus.fields["image"][corpus.fields["label"] == 1]
    assert (dogs[..., 0] == 255).all() and (dogs[..., 1:] == 0).all()
    task = read_tasks(run / "tasks")["t"]
    assert task.fields["label"].tolist() == [1] and (task.fields["image"] == 255).all()


def test_npz_corpus_with_npz_task(cli, tmp_path):
    labels = np.arange(40) % 4
    images = np.stack([_digit_like(int(v), seed=i) for i, v in enumerate(labels)])
    floats = images.astype(np.float32) / 255.0  # float input in [0, 1] is scaled back exactly
    domains = np.array(["a", "b"] * 20)
    np.savez(tmp_path / "corpus.npz", images=floats, labels=labels, domains=domains)
    np.savez(tmp_path / "task.npz", images=images[:6, :, :, None], labels=labels[:6])
    run = tmp_path / "run"
    code, _, err = cli(
        "prepare", tmp_path / "corpus.npz", "--run", run, "--task", f"mine={tmp_path / 'task.npz'}"
    )
    assert code == 0, err
    corpus = read_examples(run / "corpus")
    np.testing.assert_array_equal(corpus.fields["image"], images)
    np.testing.assert_array_equal(corpus.fields["label"], labels)
    assert corpus.domains.tolist() == domains.tolist()
    task = read_tasks(run / "tasks")["mine"]
    assert task.fields["image"].shape == (6, 8, 8) and set(task.domains.tolist()) == {"task"}


def test_inputs_on_the_command_line_replace_the_image_demo(cli, tmp_path):
    np.savez(tmp_path / "c.npz", images=np.zeros((6, 8, 8), np.uint8), labels=[0, 1, 2] * 2)
    run = tmp_path / "run"
    code, out, err = cli(
        "prepare", tmp_path / "c.npz", "--config", VISION_CI, "--run", run,
        "--holdout-domains", "c",
    )  # fmt: skip
    assert code == 0, err
    held = len(_held([f"c.npz#{i}" for i in range(6)], 0.5))  # decided per image by its hash
    assert out.startswith(f"corpus: {6 - held} images in 1 domains")
    assert read_examples(run / "corpus").fields["image"].shape == (6 - held, 8, 8)


def test_parquet_png_bytes_hf_struct_and_raw_pixels(cli, tmp_path):
    pytest.importorskip("PIL")
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    arrays = [_digit_like(v, seed=i) for i, v in enumerate(labels)]
    pq.write_table(
        pa.table(
            {
                "image": [_png_bytes(a) for a in arrays],
                "label": labels,
                "domain": ["x", "y"] * 4,
            }
        ),
        tmp_path / "png.parquet",
    )
    struct = pa.array(
        [{"bytes": _png_bytes(a), "path": f"{i}.png"} for i, a in enumerate(arrays)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": struct, "label": labels}), tmp_path / "hf.parquet")
    raw = pa.table({"image": [a.tobytes() for a in arrays], "label": labels})
    raw = raw.replace_schema_metadata({IMAGE_SHAPE_KEY: json.dumps([8, 8]).encode()})
    pq.write_table(raw, tmp_path / "raw.parquet")
    run = tmp_path / "run"
    code, _, err = cli(
        "prepare", tmp_path / "png.parquet", tmp_path / "hf.parquet", "--run", run,
        "--task", f"raw={tmp_path / 'raw.parquet'}",
    )  # fmt: skip
    assert code == 0, err
    corpus = read_examples(run / "corpus")
    np.testing.assert_array_equal(corpus.fields["image"], np.stack(arrays + arrays))
    assert corpus.domains.tolist() == ["x", "y"] * 4 + ["hf"] * 8
    task = read_tasks(run / "tasks")["raw"]
    np.testing.assert_array_equal(task.fields["image"], np.stack(arrays))
    np.testing.assert_array_equal(task.fields["label"], labels)


# ---------------------------------------------------------------- bad inputs


def test_mixed_image_shapes_name_both_files(cli, tmp_path):
    pytest.importorskip("PIL")
    _write_png(tmp_path / "in" / "d" / "0" / "small.png", np.zeros((8, 8), np.uint8))
    _write_png(tmp_path / "in" / "d" / "1" / "large.png", np.zeros((10, 10), np.uint8))
    err = _bad(cli, tmp_path, tmp_path / "in", "--holdout-domains", "d")
    assert "large.png: image shape [10, 10] differs from [8, 8]" in err and "small.png" in err
    assert "prepare.image_size" in err
    np.savez(tmp_path / "a.npz", images=np.zeros((3, 8, 8), np.uint8), labels=[0, 1, 2])
    np.savez(tmp_path / "b.npz", images=np.zeros((3, 6, 6), np.uint8), labels=[0, 1, 2])
    err = _bad(cli, tmp_path, tmp_path / "a.npz", tmp_path / "b.npz", "--holdout-domains", "a")
    assert "b.npz:image 0: image shape [6, 6] differs" in err and "a.npz:image 0" in err


def test_unreadable_images_name_the_file(cli, tmp_path):
    pytest.importorskip("PIL")
    _png_tree(tmp_path / "in", domains=("d",), labels=(0, 1))
    (tmp_path / "in" / "d" / "1" / "broken.png").write_bytes(b"\x89PNG not really an image")
    err = _bad(cli, tmp_path, tmp_path / "in", "--holdout-domains", "d")
    assert "broken.png: unreadable image" in err
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated zip")
    err = _bad(cli, tmp_path, tmp_path / "bad.npz", "--holdout-domains", "bad")
    assert "bad.npz: not a readable .npz file" in err
    pq.write_table(pa.table({"image": [b"junk"], "label": [0]}), tmp_path / "junk.parquet")
    err = _bad(cli, tmp_path, tmp_path / "junk.parquet", "--holdout-domains", "junk")
    assert "junk.parquet:row 0: unreadable image" in err


def test_missing_labels_name_the_file(cli, tmp_path):
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((4, 8, 8), np.uint8))
    err = _bad(cli, tmp_path, tmp_path / "nolabels.npz", "--holdout-domains", "nolabels")
    assert "nolabels.npz: missing labels" in err
    raw = pa.table({"image": [bytes(64)] * 3}).replace_schema_metadata({IMAGE_SHAPE_KEY: b"[8, 8]"})
    pq.write_table(raw, tmp_path / "nolabel.parquet")
    err = _bad(cli, tmp_path, tmp_path / "nolabel.parquet", "--holdout-domains", "x")
    assert "nolabel.parquet: missing labels: no column 'label'" in err
    np.savez(tmp_path / "short.npz", images=np.zeros((4, 8, 8), np.uint8), labels=[0, 1])
    err = _bad(cli, tmp_path, tmp_path / "short.npz", "--holdout-domains", "short")
    assert "short.npz: 'labels' has shape [2], expected [4]" in err


def test_png_without_class_folder_is_missing_label(cli, tmp_path):
    pytest.importorskip("PIL")
    _write_png(tmp_path / "flat" / "lonely.png", np.zeros((8, 8), np.uint8))
    err = _bad(cli, tmp_path, tmp_path / "flat", "--holdout-domains", "flat")
    assert "lonely.png: missing label" in err


def test_empty_inputs_name_the_file(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no images here")
    np.savez(tmp_path / "void.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, int))
    err = _bad(cli, tmp_path, tmp_path / "void.npz", "--holdout-domains", "void")
    assert "void.npz: no images" in err
    # an empty folder among image inputs: the folder is named
    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 8, 8), np.uint8), labels=[0, 1, 0, 1])
    err = _bad(cli, tmp_path, tmp_path / "ok.npz", tmp_path / "empty", "--holdout-domains", "ok")
    assert f"{tmp_path / 'empty'}: no image files found" in err
    pq.write_table(
        pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}),
        tmp_path / "none.parquet",
    )
    err = _bad(cli, tmp_path, tmp_path / "none.parquet", "--holdout-domains", "none")
    assert "none.parquet: no images" in err


def test_other_bad_image_inputs(cli, tmp_path):
    np.savez(tmp_path / "chw.npz", images=np.zeros((4, 3, 8, 8), np.uint8), labels=[0] * 4)
    err = _bad(cli, tmp_path, tmp_path / "chw.npz", "--holdout-domains", "chw")
    assert "chw.npz: images have shape [4, 3, 8, 8], which looks channel-first" in err
    np.savez(tmp_path / "big.npz", images=np.full((4, 8, 8), 2.0), labels=[0] * 4)
    err = _bad(cli, tmp_path, tmp_path / "big.npz", "--holdout-domains", "big")
    assert "big.npz: float pixels must lie in [0, 1]" in err
    np.savez(tmp_path / "c.npz", images=np.zeros((4, 8, 8), np.uint8), labels=[0, 1, 0, 1])
    np.savez(tmp_path / "t.npz", images=np.zeros((2, 8, 8), np.uint8), labels=[0, 7])
    err = _bad(cli, tmp_path, tmp_path / "c.npz", "--task", f"t={tmp_path / 't.npz'}")
    assert "task 't' has label 7 but the corpus only has labels 0..1" in err
    err = _bad(cli, tmp_path, tmp_path / "c.npz", "--holdout-domains", "nope")
    assert "no images in domain 'nope'" in err


def test_optional_extras_named_when_missing(monkeypatch):
    from grasp_cli.prepare import digits, images

    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    with pytest.raises(InputError, match=r"pip install grasp-cli\[vision\]"):
        images.decode_image(b"\x89PNG", "x.png")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(InputError, match=r"scikit-learn .*pip install grasp-cli\[vision\]"):
        digits.digits_demo({}, 0, 0)


def test_npz_prepare_needs_neither_pillow_nor_sklearn(tmp_path):
    """The base install (no [vision] extra) prepares .npz corpora; nothing imports PIL/sklearn."""
    np.savez(tmp_path / "c.npz", images=np.zeros((6, 8, 8), np.uint8), labels=[0, 1, 2] * 2)
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("PIL", "sklearn"):
                    raise ImportError(name + " blocked")
        sys.meta_path.insert(0, Block())
        from grasp_cli.cli import main
        code = main(["prepare", {str(tmp_path / "c.npz")!r}, "--run", {str(tmp_path / "run")!r},
                     "--holdout-domains", "c"])
        assert code == 0, code
        assert "PIL" not in sys.modules and "sklearn" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "corpus" / "_grasp" / "manifest.json").is_file()


# ---------------------------------------------------------------- the digits demo


def test_digits_demo_domains_are_deterministic_and_distinct():
    pytest.importorskip("sklearn")
    from grasp_cli.prepare.digits import DIGIT_DOMAIN_SHARES, digits_demo

    first = digits_demo({}, 0, seed=3)
    again = digits_demo({}, 0, seed=3)
    np.testing.assert_array_equal(first.fields["image"], again.fields["image"])
    assert first.fields["image"].shape == (1797, 16, 16) and first.fields["image"].dtype == np.uint8
    counts = {d: int((first.domains == d).sum()) for d in DIGIT_DOMAIN_SHARES}
    assert counts == {  # shares × 1797, rounded by largest remainder
        "original": 539, "thick": 359, "noisy": 270, "shifted": 269, "rotated": 180, "inverted": 180,
    }  # fmt: skip
    assert len(set(first.docs.tolist())) == 1797  # every digit in exactly one domain
    mean = {d: first.fields["image"][first.domains == d].astype(float).mean() for d in counts}
    assert mean["inverted"] > 150 > 3 * mean["original"]  # dark strokes on white
    assert mean["thick"] > 1.3 * mean["original"]  # dilated strokes cover more pixels
    border = lambda d: first.fields["image"][first.domains == d][:, [0, -1]].mean()  # noqa: E731
    assert border("original") == 0 and border("noisy") > 5
    small = digits_demo({"original": 1, "rotated": 1}, 8, seed=3)
    assert small.fields["image"].shape == (1797, 8, 8)
    assert set(small.domains.tolist()) == {"original", "rotated"}


# ---------------------------------------------------------------- the whole pipeline


def test_vision_ci_pipeline_end_to_end(cli, tmp_path):
    pytest.importorskip("sklearn")
    run = tmp_path / "run"
    base = ("--config", VISION_CI, "--run", run)
    code, out, err = cli("prepare", *base)
    assert code == 0, err

    corpus_files = sorted((run / "corpus").glob("part-*.parquet"))
    schema = pq.read_schema(corpus_files[0])
    assert schema.field("id").type == pa.int64() and schema.field("label").type == pa.int64()
    assert (
        schema.field("image").type == pa.binary(64) and schema.field("domain").type == pa.string()
    )
    assert json.loads(schema.metadata[IMAGE_SHAPE_KEY]) == [8, 8]
    corpus = read_examples(run / "corpus")
    n = len(corpus)
    assert corpus.fields["image"].shape == (n, 8, 8) and corpus.fields["image"].dtype == np.uint8
    labels = corpus.fields["label"]
    assert labels.min() >= 0 and labels.max() <= 9 and len(np.unique(labels)) == 10
    domain_counts = {d: int((corpus.domains == d).sum()) for d in set(corpus.domains.tolist())}
    tasks = read_tasks(run / "tasks")
    # 60 images per domain (the unit cap); about half of each held-out domain is held out,
    # each image by its seeded hash
    assert domain_counts == {
        "original": 60, "thick": 60, "noisy": 60, "shifted": 60,
        "rotated": 60 - len(tasks["rotated"]), "inverted": 60 - len(tasks["inverted"]),
    }  # fmt: skip
    assert sorted(tasks) == ["inverted", "rotated"]
    for name, task in tasks.items():
        assert set(task.domains.tolist()) == {name} and 15 <= len(task) <= 45
        assert not set(task.docs.tolist()) & set(corpus.docs.tolist())
        assert task.fields["image"].shape == (len(task), 8, 8)

    for stage in ("sketch", "retrain-subsets"):
        for shard in ("0", "1"):  # two shards, as two array tasks would run them
            code, _, err = cli(stage, *base, "--shard", shard, "--num-shards", "2", "--quiet")
            assert code == 0, err
    import zarr

    sketches = zarr.open_group(str(run / "sketches.zarr"), mode="r")
    train = np.asarray(sketches["train"][:])
    assert train.shape == (n, 32) and np.isfinite(train).all() and np.abs(train).sum(1).min() > 0
    np.testing.assert_array_equal(np.asarray(sketches["train_ids"][:]), corpus.ids)
    assert np.isfinite(np.asarray(sketches["tasks"][:])).all()

    for stage in ("fit-surrogate", "score", "select"):
        code, out, err = cli(stage, *base, "--quiet")
        assert code == 0, err
    evaluation = pq.read_table(run / "surrogate" / "evaluation.parquet").to_pylist()
    methods = {row["method"] for row in evaluation if row["task"] == "mean"}
    assert {"grasp", "additive", "trak", "cosine", "datamodels", "regmix"} <= methods
    assert all(np.isfinite(row["spearman"]) for row in evaluation if row["method"] == "grasp")
    selected = pq.read_table(run / "selection" / "selected.parquet").to_pylist()
    assert len(selected) == 40 and len({row["id"] for row in selected}) == 40
    assert {row["id"] for row in selected} <= set(corpus.ids.tolist())

    code, _, err = cli("retrain-subsets", *base, "--curation", "--quiet")
    assert code == 0, err
    for folder in ("retrain", "curation"):
        rows = pa.concat_tables(
            [pq.read_table(p) for p in sorted((run / folder).glob("part-*.parquet"))]
        ).to_pylist()
        accuracy = [row["value"] for row in rows if row["metric"] == "accuracy"]
        loss = [row["value"] for row in rows if row["metric"] == "loss"]
        assert accuracy and all(0.0 <= value <= 1.0 for value in accuracy)
        assert loss and all(np.isfinite(value) and value > 0 for value in loss)
        assert {row["task"] for row in rows} == {"inverted", "rotated"}
    curation = {row["role"] for row in rows}
    assert {"grasp", "random"} <= curation
