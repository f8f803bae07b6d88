import json
import os

import numpy as np
import pytest

from grasp_cli.artifacts.atomic import atomic_dir, atomic_path, sweep_debris
from grasp_cli.artifacts.examples import Examples, read_examples, write_examples
from grasp_cli.artifacts.layout import RunLayout
from grasp_cli.artifacts.manifest import build_manifest, read_manifest, require, write_manifest
from grasp_cli.artifacts.shards import ShardSpec, UnitMarkers, owned_units, resolve_shard
from grasp_cli.artifacts.tables import read_table
from grasp_cli.config import load_config
from grasp_cli.errors import InputError, StaleError, UsageError


def _examples(n: int) -> Examples:
    tokens = np.arange(n * 5, dtype=np.int32).reshape(n, 5) % 256
    return Examples(
        np.arange(n),
        np.array(["a", "b"] * (n // 2), dtype=object),
        np.array([f"d{i}" for i in range(n)], dtype=object),
        {"tokens": tokens},
    )


def test_atomic_dir_crash_leaves_nothing_complete(tmp_path):
    target = tmp_path / "corpus"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as folder:
            (folder / "part-00000.parquet").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_crash_keeps_old_version(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    debris = tmp_path / ".x.txt.tmp-deadbeef"
    debris.write_text("left by kill -9")
    sweep_debris(tmp_path)
    assert not debris.exists() and target.exists()


def test_examples_round_trip_and_shards(tmp_path):
    examples = _examples(10)
    paths = write_examples(tmp_path / "c", examples, shard_rows=4, row_group_rows=2)
    assert [p.name for p in paths] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    back = read_examples(tmp_path / "c")
    np.testing.assert_array_equal(back.fields["tokens"], examples.fields["tokens"])
    np.testing.assert_array_equal(back.ids, examples.ids)
    assert read_table(paths[0]).schema.field("tokens").type.value_type.bit_width == 32


def test_corrupt_parquet_names_file(tmp_path):
    write_examples(tmp_path / "c", _examples(4), shard_rows=10, row_group_rows=10)
    path = tmp_path / "c" / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match="part-00000.parquet: not a readable Parquet"):
        read_examples(tmp_path / "c")


def test_stale_detection_by_inputs_and_config(tmp_path):
    layout = RunLayout(tmp_path)
    config = load_config(None)
    for name in ("corpus", "tasks"):
        (tmp_path / name).mkdir()
        write_manifest(tmp_path / name, build_manifest(layout, name, config, content=f"{name}-v1"))
    (tmp_path / "reference").mkdir()
    write_manifest(tmp_path / "reference", build_manifest(layout, "reference", config, content="w"))
    (tmp_path / "sketches.zarr").mkdir()
    write_manifest(tmp_path / "sketches.zarr", build_manifest(layout, "sketches", config))
    assert require(layout, "sketches", config).complete

    changed = load_config(None, ["sketch.k=64", "surrogate.k_grid=[32]"])
    with pytest.raises(StaleError, match=r"stale: .*sketch\.k: 256 -> 64"):
        require(layout, "sketches", changed)
    assert require(layout, "sketches", changed, force=True)

    write_manifest(
        tmp_path / "corpus", build_manifest(layout, "corpus", config, content="corpus-v2")
    )
    with pytest.raises(StaleError, match="made from an older corpus"):
        require(layout, "reference", config)


def test_a_setting_the_record_lacks_counts_at_its_default(tmp_path):
    """An artifact made before a setting existed stays fresh while the setting holds its
    default, and is stale once it is set otherwise."""
    import json

    from grasp_cli.artifacts.manifest import MANIFEST_NAME

    layout = RunLayout(tmp_path)
    config = load_config(None)
    (tmp_path / "corpus").mkdir()
    write_manifest(tmp_path / "corpus", build_manifest(layout, "corpus", config, content="c"))
    path = tmp_path / "corpus" / MANIFEST_NAME
    record = json.loads(path.read_text())
    del record["config"]["prepare"]["demo_repeat_fraction"]  # as an older grasp wrote it
    path.write_text(json.dumps(record))
    assert require(layout, "corpus", config).complete
    changed = load_config(None, ["prepare.demo_repeat_fraction=0.2"])
    with pytest.raises(StaleError, match=r"demo_repeat_fraction: 0\.0 -> 0\.2"):
        require(layout, "corpus", changed)


def test_missing_and_incomplete_are_errors(tmp_path):
    layout = RunLayout(tmp_path)
    config = load_config(None)
    with pytest.raises(InputError, match="run `grasp sketch` first"):
        require(layout, "sketches", config)
    (tmp_path / "sketches.zarr").mkdir()
    write_manifest(
        tmp_path / "sketches.zarr", build_manifest(layout, "sketches", config, complete=False)
    )
    with pytest.raises(InputError, match="incomplete"):
        require(layout, "sketches", config)
    assert read_manifest(tmp_path / "sketches.zarr").complete is False


def test_shard_partition_covers_every_unit_once():
    for units in (0, 1, 7, 100):
        for count in (1, 3, 8):
            owned = [u for i in range(count) for u in owned_units(units, ShardSpec(i, count))]
            assert owned == list(range(units))


def test_shard_from_slurm_env(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert resolve_shard(None, None) == ShardSpec(2, 4)
    assert resolve_shard(0, 2) == ShardSpec(0, 2)  # flags win
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")  # --array=0-6:2 -> tasks 0, 2, 4, 6
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    assert resolve_shard(None, None) == ShardSpec(3, 4)
    with pytest.raises(UsageError):
        resolve_shard(4, 4)


def test_unit_markers(tmp_path):
    markers = UnitMarkers(tmp_path)
    markers.mark_done(2, rows=10)
    assert markers.is_done(2) and not markers.is_done(1)
    assert markers.missing(4) == [0, 1, 3]
    assert json.loads((tmp_path / "_grasp" / "done" / "000002.json").read_text())["rows"] == 10
    assert not any(name.startswith(".") for name in os.listdir(tmp_path / "_grasp" / "done"))


def test_open_sharded_reuses_matching_plan_and_replaces_stale_one(tmp_path):
    from grasp_cli.artifacts.sharded import open_sharded

    def ctx(overrides, index):  # what shard ``index`` of 2 passes: the run and its config
        return RunLayout(tmp_path), load_config(None, overrides)

    def skeleton(folder):
        (folder / "payload.txt").write_text("fresh")

    first = open_sharded(*ctx([], 0), "scores", skeleton, units=3)
    (tmp_path / "scores" / "payload.txt").write_text("shard 0 wrote this")
    again = open_sharded(*ctx([], 1), "scores", skeleton, units=3)
    assert again.fingerprint == first.fingerprint
    assert (
        tmp_path / "scores" / "payload.txt"
    ).read_text() == "shard 0 wrote this"  # reused, not rebuilt

    changed = ["score.reference='selection'"]
    new = open_sharded(*ctx(changed, 1), "scores", skeleton, units=3)
    assert new.fingerprint != first.fingerprint
    assert (
        tmp_path / "scores" / "payload.txt"
    ).read_text() == "fresh"  # the stale folder was replaced
    (tmp_path / "scores" / "payload.txt").write_text("shard 1 wrote this")
    assert (
        open_sharded(*ctx(changed, 0), "scores", skeleton, units=3).fingerprint == new.fingerprint
    )
    assert (tmp_path / "scores" / "payload.txt").read_text() == "shard 1 wrote this"


def test_cost_balanced_shards_are_contiguous_cover_every_unit_and_split_the_cost():
    costs = [512.0] * 4 + [352.0, 2048.0, 3424.0]  # sketch: row chunks, the task unit, traker
    for count in (1, 2, 3, 4, 7, 9):
        owned = [list(owned_units(len(costs), ShardSpec(i, count), costs)) for i in range(count)]
        assert [u for run in owned for u in run] == list(range(len(costs)))  # contiguous, once
    two = [sum(costs[u] for u in owned_units(len(costs), ShardSpec(i, 2), costs)) for i in (0, 1)]
    even = [sum(costs[u] for u in owned_units(len(costs), ShardSpec(i, 2))) for i in (0, 1)]
    # the expensive last units no longer land on one shard: the larger share shrinks
    assert max(two) < max(even)
    assert max(two) <= sum(costs) / 2 + max(costs) / 2
    with pytest.raises(ValueError):
        owned_units(3, ShardSpec(0, 2), [1.0, -1.0, 1.0])


# ---------------------------------------------------------------- reading only what is needed


def _written_corpus(tmp_path, n: int = 23):
    from grasp_cli.artifacts.examples import PartWriter

    examples = _examples(n + n % 2)
    examples.ids = examples.ids * 7 + 3  # ids are not row numbers
    writer = PartWriter(tmp_path / "run" / "corpus", shard_rows=10, row_group_rows=4)
    for start in range(0, len(examples), 3):  # rows arrive in small blocks
        writer.write(examples.take(np.arange(start, min(start + 3, len(examples)))))
    return examples, writer.close()


def test_part_writer_fills_parts_and_row_groups_as_rows_arrive(tmp_path):
    import pyarrow.parquet as pq

    examples, paths = _written_corpus(tmp_path)
    assert [p.name for p in paths] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    groups = [
        [
            pq.read_metadata(p).row_group(g).num_rows
            for g in range(pq.read_metadata(p).num_row_groups)
        ]
        for p in paths
    ]
    assert groups == [[4, 4, 2], [4, 4, 2], [4]]
    back = read_examples(tmp_path / "run" / "corpus")
    np.testing.assert_array_equal(back.ids, examples.ids)
    np.testing.assert_array_equal(back.fields["tokens"], examples.fields["tokens"])
    assert not [p for p in (tmp_path / "run" / "corpus").iterdir() if p.name.startswith(".")]


def test_domain_codes_index_sorted_names_when_shards_see_domains_in_other_orders(tmp_path):
    from grasp_cli.artifacts.examples import PartWriter, open_corpus

    examples = _examples(24)
    # the first shard meets "zeta" then "mid", a later one "alpha" only: first appearance
    # order is not the sorted order, and shards have different dictionaries
    examples.domains = np.array(["zeta", "mid"] * 6 + ["alpha"] * 8 + ["mid"] * 4, dtype=object)
    writer = PartWriter(tmp_path / "corpus", shard_rows=10, row_group_rows=4)
    writer.write(examples)
    writer.close()
    codes, names = open_corpus(tmp_path / "corpus").domain_codes()
    assert names == ["alpha", "mid", "zeta"] and codes.dtype == np.int8
    assert [names[c] for c in codes] == examples.domains.tolist()


def test_corpus_reads_columns_rows_and_a_row_store_like_the_whole(tmp_path):
    import torch

    from grasp_cli.artifacts.examples import open_corpus

    examples, _ = _written_corpus(tmp_path)
    corpus = open_corpus(tmp_path / "run" / "corpus")
    assert len(corpus) == len(examples) and corpus.row_shapes() == {"tokens": (5,)}
    np.testing.assert_array_equal(corpus.ids, examples.ids)
    codes, names = corpus.domain_codes()
    expected_codes, expected_names = examples.domain_codes()
    assert names == expected_names and codes.tolist() == expected_codes.tolist()
    rows = np.array([0, 1, 9, 10, 11, 23])
    blocks = list(corpus.iter_rows(rows, block_rows=4))
    np.testing.assert_array_equal(np.concatenate([b.ids for b in blocks]), examples.ids[rows])
    where, known = corpus.positions(np.array([examples.ids[5], 4, examples.ids[0]]))
    assert known.tolist() == [True, False, True] and where[[0, 2]].tolist() == [5, 0]
    data = corpus.to_torch()  # a row store: batches of any shape, like Examples.to_torch
    index = torch.tensor([[3, 4, 23], [0, 0, 10]])
    batch = data["tokens"][index]
    assert batch.dtype == torch.int64 and batch.shape == (2, 3, 5)
    np.testing.assert_array_equal(batch.numpy(), examples.fields["tokens"][index.numpy()])
    assert data["tokens"].shape[0] == len(examples)
    stores = list((tmp_path / "run" / "_grasp").glob("rows-*"))
    assert len(stores) == 1  # built once beside the run, reused while the corpus is unchanged
    open_corpus(tmp_path / "run" / "corpus").to_torch()
    assert list((tmp_path / "run" / "_grasp").glob("rows-*")) == stores


def test_a_changed_shard_rebuilds_the_row_store_and_names_a_ragged_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grasp_cli.artifacts.examples import open_corpus

    _written_corpus(tmp_path)
    open_corpus(tmp_path / "run" / "corpus").to_torch()
    path = tmp_path / "run" / "corpus" / "part-00001.parquet"
    table = pq.read_table(path)
    tokens = table.column("tokens").to_pylist()
    tokens[6] = tokens[6][:3]
    pq.write_table(
        table.set_column(3, "tokens", pa.array(tokens, pa.list_(pa.int32()))),
        path,
        row_group_size=4,
    )
    with pytest.raises(
        InputError, match="part-00001.parquet: row 6: tokens has 3 entries, expected 5"
    ):
        open_corpus(tmp_path / "run" / "corpus").to_torch()


def test_row_file_reads_runs_of_rows_by_offset(tmp_path):
    from grasp_cli.artifacts.examples import RowFile

    values = np.arange(200 * 3, dtype=np.uint16).reshape(200, 3)
    np.save(tmp_path / "x.npy", values)
    store = RowFile(tmp_path / "x.npy")
    rows = np.array([[7, 8, 9, 9], [199, 0, 1, 150]])
    np.testing.assert_array_equal(store.take(rows), values[rows])
    with pytest.raises(IndexError):
        store.take(np.array([200]))


def test_lazy_column_reads_like_the_whole_array_one_block_at_a_time():
    from grasp_cli.artifacts.sketches import LazyColumn

    class Counting:  # an on-disk array: records every read
        def __init__(self, values):
            self.values, self.shape, self.reads = values, values.shape, []

        def __getitem__(self, index):
            self.reads.append((index.start, index.stop))
            return self.values[index]

    values = np.arange(1000, dtype=np.int64) * 3 + 1
    source = Counting(values)
    column = LazyColumn(source, np.int64, block_rows=64)
    assert len(column) == 1000 and column[5] == values[5] and column[-1] == values[-1]
    for lo, hi in [(0, 10), (60, 70), (0, 1000), (990, 1000), (130, 128)]:
        np.testing.assert_array_equal(column[lo:hi], values[lo:hi])
    rows = np.random.default_rng(0).integers(0, 1000, 300)  # any order, repeats
    np.testing.assert_array_equal(column.take(rows), values[rows])
    np.testing.assert_array_equal(column[rows], values[rows])
    assert max(stop - start for start, stop in source.reads[-16:]) <= 64  # take: block reads
    with pytest.raises(IndexError):
        column.take(np.array([1000]))
