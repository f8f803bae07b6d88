"""Streaming, shardable prepare: the corpus and tasks equal an in-memory reference of the
documented rules, whatever the number of shards; a killed shard or final step reruns to the
same result; duplicate ids across shards and degenerate holdouts are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grasp_cli.artifacts.examples import read_examples, read_tasks
from grasp_cli.artifacts.manifest import read_manifest
from grasp_cli.config import load_config
from grasp_cli.prepare.documents import expand_inputs, read_documents
from grasp_cli.prepare.split import is_held, row_keys, unit_key
from grasp_cli.prepare.tokens import byte_sequences
from tests.conftest import CODE, ENGLISH
from tests.conftest import grasp_ok as ok
from tests.conftest import run_grasp as grasp
from tests.test_faults import kill_when, spawn

SEQ_LEN = 16


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("GRASP_PROGRESS", "0")
    monkeypatch.delenv("GRASP_DEBUG", raising=False)
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)


def _inputs(root: Path) -> Path:
    """Five files of three kinds and three domains, documents of very different lengths."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in range(3):
        lines = []
        for i in range(40):
            domain = ["prose", "code", "numbers"][(i + f) % 3]
            text = {"prose": ENGLISH, "code": CODE, "numbers": " ".join(map(str, range(i)))}[domain]
            lines.append(
                {"id": f"f{f}-{i}", "domain": domain, "text": text * int(rng.integers(1, 5))}
            )
        (root / f"part{f}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    texts = [CODE * int(k) for k in rng.integers(1, 6, size=30)]
    pq.write_table(
        pa.table({"text": texts, "domain": ["code"] * 30, "id": [f"pq-{i}" for i in range(30)]}),
        root / "table.parquet",
        row_group_size=7,
    )
    (root / "prose").mkdir()
    (root / "prose" / "book.txt").write_text(ENGLISH * 200)  # one long document
    return root


def _reference(inputs: Path, holdout: list[str], fraction: float, caps: dict) -> tuple:
    """The documented rules applied in memory: ids, holdout by hash, bottom-k caps."""
    seed = load_config(None).derived_seed(-1, "prepare")
    rows = []  # (id, domain, doc, tokens, unit_key, unit_no, row_key, held)
    names = {}  # what the rules hash: the id, or a .txt's path below the folder named
    for input_no, path in enumerate(expand_inputs([str(inputs)])):
        next_row = 0
        for unit_index, document in enumerate(read_documents(path)):
            if not document.text.strip():
                continue
            name = path.relative_to(inputs).as_posix() if path.suffix == ".txt" else document.doc_id
            names[document.doc_id] = name
            tokens = byte_sequences(document.text, SEQ_LEN)
            held = document.domain in holdout and is_held(seed, name, fraction)
            keys = row_keys(seed, name, 0, len(tokens))
            ukey = unit_key(seed, "unit-cap", name)
            for j in range(len(tokens)):
                row_id = (input_no << 32) + next_row + j
                unit_no = (input_no << 32) + unit_index
                rows.append(
                    (
                        row_id,
                        document.domain,
                        document.doc_id,
                        tokens[j],
                        ukey,
                        unit_no,
                        int(keys[j]),
                        held,
                    )
                )
            next_row += len(tokens)
            if not len(tokens):  # a unit without rows still counts for the unit cap
                rows.append((None, document.domain, document.doc_id, None, ukey, unit_no, 0, held))
    if caps.get("unit", 0):
        keep_units = set()
        for domain in {r[1] for r in rows}:
            units = sorted({(r[4], r[5]) for r in rows if r[1] == domain})
            keep_units |= set(units[: caps["unit"]])
        rows = [r for r in rows if (r[4], r[5]) in keep_units]
    for domain in holdout:  # at least one unit held out, never all
        docs = {r[2]: r[7] for r in rows if r[1] == domain}
        if all(docs.values()) or not any(docs.values()):
            rank = sorted(docs, key=lambda d: unit_key(seed, "holdout", names[d]))
            flip = rank[0] if not any(docs.values()) else rank[-1]
            rows = [(*r[:7], not r[7]) if r[2] == flip else r for r in rows]
    rows = [r for r in rows if r[0] is not None]
    corpus = [r for r in rows if not r[7]]
    if caps.get("row", 0):
        kept = set()
        for domain in {r[1] for r in corpus}:
            ranked = sorted((r[6], r[0]) for r in corpus if r[1] == domain)
            kept |= {i for _, i in ranked[: caps["row"]]}
        corpus = [r for r in corpus if r[0] in kept]
    tasks = {}
    for domain in holdout:
        task = [r for r in rows if r[7] and r[1] == domain]
        if caps.get("task", 0):
            kept = {i for _, i in sorted((r[6], r[0]) for r in task)[: caps["task"]]}
            task = [r for r in task if r[0] in kept]
        tasks[domain] = sorted(task, key=lambda r: r[0])
    return sorted(corpus, key=lambda r: r[0]), tasks


def _assert_matches(run: Path, expected_corpus: list, expected_tasks: dict) -> None:
    corpus = read_examples(run / "corpus")
    assert corpus.ids.tolist() == [r[0] for r in expected_corpus]
    assert corpus.domains.tolist() == [r[1] for r in expected_corpus]
    assert corpus.docs.tolist() == [r[2] for r in expected_corpus]
    np.testing.assert_array_equal(
        corpus.fields["tokens"], np.stack([r[3] for r in expected_corpus])
    )
    tasks = read_tasks(run / "tasks")
    assert sorted(tasks) == sorted(expected_tasks)
    for name, rows in expected_tasks.items():
        assert tasks[name].ids.tolist() == list(range(len(rows)))  # tasks are numbered 0..n-1
        assert tasks[name].docs.tolist() == [r[2] for r in rows]
        np.testing.assert_array_equal(tasks[name].fields["tokens"], np.stack([r[3] for r in rows]))


CASES = {
    "plain": {},
    "row-and-task-caps": {"row": 25, "task": 9},
    "unit-cap": {"unit": 9, "row": 40, "task": 12},
}
CAP_KEYS = {"unit": "max_docs_per_domain", "row": "max_seqs_per_domain", "task": "max_task_seqs"}


def _prepare_args(inputs: Path, run: Path, caps: dict) -> list[object]:
    args: list[object] = [inputs, "--run", run, "--holdout-domains", "prose,numbers"]
    args += ["--set", f"prepare.seq_len={SEQ_LEN}", "--set", "prepare.shard_rows=50"]
    args += ["--set", "prepare.row_group_rows=8", "--set", "prepare.holdout_fraction=0.3"]
    for name, value in caps.items():
        args += ["--set", f"prepare.{CAP_KEYS[name]}={value}"]
    return args


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_prepare_equals_the_in_memory_rules(tmp_path, case):
    inputs = _inputs(tmp_path / "in")
    caps = CASES[case]
    run = tmp_path / "run"
    ok("prepare", *_prepare_args(inputs, run, caps))
    expected_corpus, expected_tasks = _reference(inputs, ["prose", "numbers"], 0.3, caps)
    _assert_matches(run, expected_corpus, expected_tasks)
    manifest = read_manifest(run / "corpus")
    assert manifest.extra["rows"] == len(expected_corpus)
    assert sum(manifest.extra["domains"].values()) == len(expected_corpus)
    assert not (run / "_grasp").exists()  # the staging folder is gone after the commit


@pytest.mark.parametrize("case", sorted(CASES))
def test_three_shards_give_the_same_corpus_as_one(tmp_path, case, monkeypatch):
    inputs = _inputs(tmp_path / "in")
    one, three = tmp_path / "one", tmp_path / "three"
    ok("prepare", *_prepare_args(inputs, one, CASES[case]))
    outputs = []
    for index in range(3):  # as a SLURM array would run them
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(index))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
        outputs.append(ok("prepare", *_prepare_args(inputs, three, CASES[case])))
    assert "waiting for 2 more (--shard 1, 2 of 3" in outputs[0] and outputs[2].startswith(
        "corpus: "
    )
    _assert_same_prepared(one, three)
    parts = sorted((three / "corpus").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(len(parts))]


def _assert_same_prepared(a: Path, b: Path) -> None:
    for name in ("corpus",):
        x, y = read_examples(a / name), read_examples(b / name)
        assert x.ids.tolist() == y.ids.tolist() and x.docs.tolist() == y.docs.tolist()
        assert x.domains.tolist() == y.domains.tolist()
        np.testing.assert_array_equal(x.fields["tokens"], y.fields["tokens"])
    ta, tb = read_tasks(a / "tasks"), read_tasks(b / "tasks")
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].docs.tolist() == tb[name].docs.tolist()
        np.testing.assert_array_equal(ta[name].fields["tokens"], tb[name].fields["tokens"])
    ma, mb = read_manifest(a / "corpus"), read_manifest(b / "corpus")
    assert ma.extra["rows"] == mb.extra["rows"] and ma.extra["domains"] == mb.extra["domains"]


def test_rerun_is_a_no_op_and_force_rebuilds(tmp_path):
    inputs = _inputs(tmp_path / "in")
    run = tmp_path / "run"
    ok("prepare", *_prepare_args(inputs, run, {}))
    before = read_manifest(run / "corpus")
    assert "(up to date)" in ok("prepare", *_prepare_args(inputs, run, {}))
    assert read_manifest(run / "corpus").created == before.created
    ok("prepare", *_prepare_args(inputs, run, {}), "--force")
    after = read_manifest(run / "corpus")
    assert after.extra["prepare_id"] == before.extra["prepare_id"]  # same bytes, rebuilt
    (inputs / "part0.jsonl").write_text(json.dumps({"text": ENGLISH * 3, "domain": "prose"}) + "\n")
    out = ok("prepare", *_prepare_args(inputs, run, {}))  # a changed input: a new plan
    assert "up to date" not in out
    assert read_manifest(run / "corpus").extra["plan"] != before.extra["plan"]


def test_killed_shard_and_killed_final_step_rerun_to_the_same_corpus(tmp_path):
    inputs = _inputs(tmp_path / "in")
    one, run = tmp_path / "one", tmp_path / "run"
    caps = CASES["row-and-task-caps"]
    ok("prepare", *_prepare_args(inputs, one, caps))
    args = ["prepare", *_prepare_args(inputs, run, caps), "--num-shards", "3"]
    # shard 0 is killed after its first corpus part, with its staging folder half written
    flag = tmp_path / "flag"
    proc = spawn([*args, "--shard", "0"], flag, stop_in_replace="part-00000.parquet")
    kill_when(proc, flag.exists)
    staging = next((run / "_grasp").glob("prepare-*"))
    assert not (staging / "shard-00000-of-00003" / "done.json").exists()
    assert not (run / "corpus").exists()
    ok(*args, "--shard", "1")
    # shard 2 finishes its part, then is killed inside the final step's corpus swap
    flag2 = tmp_path / "flag2"
    ok(*args, "--shard", "0")  # the rerun of the killed shard: now all but shard 2 are done
    proc = spawn([*args, "--shard", "2"], flag2, stop_in_replace=f"{run.name}/corpus")
    kill_when(proc, flag2.exists)
    assert not (run / "corpus" / "_grasp" / "manifest.json").exists()
    code, _, err = grasp("sketch", "--run", run)
    assert code == 2 and "corpus" in err  # nothing that looks complete
    out = ok(*args, "--shard", "2")  # its rerun finds every shard done and commits
    assert out.startswith("corpus: ")
    _assert_same_prepared(one, run)
    assert not (run / "_grasp").exists()
    leftovers = [p.name for p in run.iterdir() if p.name not in ("corpus", "tasks", "config.toml")]
    assert all(name.endswith(".lock") for name in leftovers), leftovers


def test_duplicate_ids_in_two_shards_name_both_places(tmp_path):
    inputs = _inputs(tmp_path / "in")
    rows = [{"id": "f0-3", "domain": "code", "text": CODE * 2}]
    (inputs / "zz-late.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    args = _prepare_args(inputs, run, {})
    for index in range(2):
        code, out, err = grasp("prepare", *args, "--shard", index, "--num-shards", "2")
    assert code == 2 and "Traceback" not in err
    assert f"{inputs / 'zz-late.jsonl'}:1: duplicate id 'f0-3'" in err
    assert f"first seen at {inputs / 'part0.jsonl'}:4" in err
    assert not (run / "corpus").exists() and not (run / "_grasp").exists()


@pytest.mark.parametrize("shards", [1, 2])
def test_a_holdout_always_holds_out_one_unit_and_keeps_one(tmp_path, shards):
    path = tmp_path / "docs.jsonl"
    docs = [{"id": f"d{i}", "domain": "rare", "text": ENGLISH * (i + 1)} for i in range(4)]
    docs += [{"id": f"c{i}", "domain": "common", "text": CODE * 3} for i in range(5)]
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    seed = load_config(None).derived_seed(-1, "prepare")
    rank = sorted((f"d{i}" for i in range(4)), key=lambda d: unit_key(seed, "holdout", d))
    for fraction, expected in ((1e-9, {rank[0]}), (1 - 1e-9, set(rank[:-1]))):
        run = tmp_path / f"run-{fraction}"
        args = [path, "--run", run, "--holdout-domains", "rare", "--set"]
        args += [f"prepare.holdout_fraction={fraction}", "--num-shards", shards]
        for index in range(shards):
            ok("prepare", *args, "--shard", index)
        task = read_tasks(run / "tasks")["rare"]
        assert set(task.docs.tolist()) == expected  # the smallest key held / the largest kept
        corpus = read_examples(run / "corpus")
        assert set(corpus.docs[corpus.domains == "rare"].tolist()) == set(rank) - expected
        assert np.all(np.diff(corpus.ids) > 0)


def test_a_long_txt_document_is_streamed_in_pieces(tmp_path, monkeypatch):
    import grasp_cli.prepare.documents as documents
    import grasp_cli.prepare.tokens as tokens

    monkeypatch.setattr(documents, "TXT_CHUNK_BYTES", 1000)  # many reads ...
    monkeypatch.setattr(tokens, "CHUNK_ROWS", 7)  # ... and many row pieces
    text = "".join(ENGLISH[(i * 7) % 50 :] + "é€\n" for i in range(300))
    (tmp_path / "in" / "book").mkdir(parents=True)
    (tmp_path / "in" / "book" / "long.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "in" / "other").mkdir()
    (tmp_path / "in" / "other" / "blank.txt").write_text("   \n\t  " * 100)  # not a document
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "short.txt").write_text(CODE * 5)
    run = tmp_path / "run"
    ok("prepare", tmp_path / "in", "--run", run, "--task", f"t={tmp_path / 'task'}",
       "--set", "prepare.seq_len=32")  # fmt: skip
    corpus = read_examples(run / "corpus")
    assert set(corpus.domains.tolist()) == {"book"}  # blank.txt is no document
    np.testing.assert_array_equal(corpus.fields["tokens"], byte_sequences(text, 32))
    assert read_tasks(run / "tasks")["t"].docs.tolist()[0] == str(tmp_path / "task" / "short.txt")


def test_invalid_utf8_in_a_streamed_txt_names_line_and_byte(tmp_path, monkeypatch):
    import grasp_cli.prepare.documents as documents

    monkeypatch.setattr(documents, "TXT_CHUNK_BYTES", 64)
    path = tmp_path / "d" / "bad.txt"
    path.parent.mkdir()
    good = ("line of fine text\n" * 20).encode()
    path.write_bytes(good + b"caf\xe9\n")
    code, _, err = grasp("prepare", path, "--run", tmp_path / "r", "--holdout-domains", "d")
    assert code == 2 and f"{path}:21: not valid UTF-8 (byte {len(good) + 3})" in err


def test_two_workers_on_one_prepare_shard_build_one_corpus(tmp_path):
    inputs = _inputs(tmp_path / "in")
    run, one = tmp_path / "run", tmp_path / "one"
    procs = [spawn(["prepare", *_prepare_args(inputs, run, {})]) for _ in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outputs.append(out)
    assert any("up to date" in out or "finished by another" in out for out in outputs) or all(
        out.startswith("corpus: ") for out in outputs
    )
    ok("prepare", *_prepare_args(inputs, one, {}))
    _assert_same_prepared(one, run)
    assert not (run / "_grasp").exists()
