import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grasp_cli.artifacts.examples import read_examples, read_tasks
from grasp_cli.artifacts.manifest import read_manifest
from tests.conftest import CODE, ENGLISH


def test_prepare_demo_builds_real_corpus(cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli(
        "prepare",
        "--demo",
        "--run",
        run,
        "--set",
        "prepare.max_seqs_per_domain=50",
        "--set",
        "prepare.max_task_seqs=40",
    )
    assert code == 0, err
    corpus = read_examples(run / "corpus")
    domains = set(corpus.domains.tolist())
    assert {"docs", "asyncio", "email", "json", "xml"} <= domains
    assert corpus.fields["tokens"].shape[1] == 65
    assert len(np.unique(corpus.ids)) == len(corpus)
    prose = corpus.fields["tokens"][corpus.domains == "docs"][0]
    text = bytes(prose[prose < 256].astype(np.uint8)).decode("utf-8", "replace")
    assert sum(ch.isalpha() or ch == " " for ch in text) > 0.8 * len(
        text
    )  # English prose, not code
    tasks = read_tasks(run / "tasks")
    assert sorted(tasks) == ["asyncio", "docs", "email", "xml"]
    # document-level split: no task document appears in the corpus
    for task in tasks.values():
        assert not set(task.docs.tolist()) & set(corpus.docs.tolist())
    manifest = read_manifest(run / "corpus")
    assert manifest.complete and manifest.stage == "prepare" and manifest.extra["seq_len"] == 64


def test_demo_repeats_copy_documents_with_their_own_ids_and_the_originals_split(cli, tmp_path):
    """``prepare.demo_repeat_fraction`` repeats a seeded share of documents ``copies`` times;
    each copy has its own id and lands where its original does (never a task document in the
    corpus); fraction 0 is the plain demo corpus, row for row."""
    common = ["--set", "prepare.max_seqs_per_domain=60", "--set", "prepare.max_task_seqs=40"]
    common += ["--set", "prepare.demo_domains=['docs','json','email']"]
    common += ["--holdout-domains", "docs,email"]
    plain, repeated = tmp_path / "plain", tmp_path / "repeated"
    assert cli("prepare", "--demo", "--run", plain, *common)[0] == 0
    zero = tmp_path / "zero"
    assert (
        cli("prepare", "--demo", "--run", zero, *common, "--set", "prepare.demo_repeat_fraction=0")[
            0
        ]
        == 0
    )
    extra = ["--set", "prepare.demo_repeat_fraction=0.3", "--set", "prepare.demo_repeat_copies=2"]
    code, _, err = cli("prepare", "--demo", "--run", repeated, *common, *extra)
    assert code == 0, err
    a, z = read_examples(plain / "corpus"), read_examples(zero / "corpus")
    np.testing.assert_array_equal(a.fields["tokens"], z.fields["tokens"])
    corpus = read_examples(repeated / "corpus")
    docs = corpus.docs.tolist()
    copies = [d for d in docs if "~copy" in d]
    assert copies and set(docs) >= {d.split("~copy")[0] for d in copies}
    for copy in copies:  # a copy's rows are its original's rows, in the same domain
        original = copy.split("~copy")[0]
        rows_c = corpus.fields["tokens"][corpus.docs == copy]
        rows_o = corpus.fields["tokens"][corpus.docs == original]
        assert {r.tobytes() for r in rows_c} <= {r.tobytes() for r in rows_o}
        assert set(corpus.domains[corpus.docs == copy]) == set(
            corpus.domains[corpus.docs == original]
        )
    for task in read_tasks(repeated / "tasks").values():
        originals = {d.split("~copy")[0] for d in task.docs.tolist()}
        assert not originals & {d.split("~copy")[0] for d in docs}
    share = len(copies) / len({d.split("~copy")[0] for d in docs})
    assert 0.05 < share < 2 * 0.3 * 2  # about fraction x copies of the documents
    code, _, err = cli(
        "prepare", "--demo", "--run", tmp_path / "bad", "--set", "prepare.demo_repeat_fraction=1.5"
    )
    assert code == 2 and "demo_repeat_fraction" in err


def test_prepare_jsonl_with_holdout(cli, tmp_path, text_corpus):
    run = tmp_path / "run"
    code, _, err = cli(
        "prepare",
        text_corpus,
        "--run",
        run,
        "--holdout-domains",
        "prose,code",
        "--set",
        "prepare.seq_len=32",
    )
    assert code == 0, err
    corpus = read_examples(run / "corpus")
    assert set(corpus.domains.tolist()) == {"prose", "code", "numbers"}
    assert sorted(read_tasks(run / "tasks")) == ["code", "prose"]
    assert corpus.fields["tokens"].shape[1] == 33


def test_prepare_txt_folder_and_parquet_task(cli, tmp_path):
    for domain, text in (("prose", ENGLISH), ("code", CODE)):
        (tmp_path / "in" / domain).mkdir(parents=True)
        for index in range(3):
            (tmp_path / "in" / domain / f"{index}.txt").write_text(text * (index + 2))
    pq.write_table(pa.table({"text": [ENGLISH * 3, CODE * 3]}), tmp_path / "target.parquet")
    run = tmp_path / "run"
    code, _, err = cli(
        "prepare", tmp_path / "in", "--run", run, "--task", f"mine={tmp_path / 'target.parquet'}"
    )
    assert code == 0, err
    assert set(read_examples(run / "corpus").domains.tolist()) == {"prose", "code"}
    assert list(read_tasks(run / "tasks")) == ["mine"]


def _bad(cli, tmp_path, name: str, content: bytes, *extra: str) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    run = tmp_path / "run"
    code, out, err = cli("prepare", path, "--run", run, "--holdout-domains", "x", *extra)
    assert code == 2, (out, err)
    assert not (run / "corpus").exists(), "a failed prepare must leave nothing that looks complete"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs_exit_2_naming_file_and_line(cli, tmp_path):
    rows = [{"text": "fine " * 10, "domain": "x"}, {"domain": "x"}]
    err = _bad(cli, tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    assert "a.jsonl:2: missing field 'text'" in err
    rows = [{"id": 1, "text": "one " * 10}, {"id": 1, "text": "two " * 10}]
    err = _bad(cli, tmp_path, "b.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    assert "b.jsonl:2: duplicate id '1'" in err
    err = _bad(cli, tmp_path, "c.txt", b"caf\xe9 au lait\n")
    assert "c.txt:1: not valid UTF-8" in err
    err = _bad(cli, tmp_path, "d.jsonl", b"")
    assert "no non-empty documents" in err
    err = _bad(cli, tmp_path, "e.jsonl", b'{"text": "ok"\n')
    assert "e.jsonl:1: invalid JSON" in err
    err = _bad(cli, tmp_path, "f.parquet", b"PAR1 not really")
    assert "f.parquet: not a readable Parquet file" in err


def test_missing_input_and_unknown_holdout(cli, tmp_path, text_corpus):
    code, _, err = cli(
        "prepare", tmp_path / "nope", "--run", tmp_path / "r", "--holdout-domains", "x"
    )
    assert code == 2 and "no input files found" in err
    code, _, err = cli(
        "prepare", text_corpus, "--run", tmp_path / "r", "--holdout-domains", "poetry"
    )
    assert code == 2 and "no documents in domain 'poetry'" in err


def test_dry_run_prints_config_and_artifacts(cli, tmp_path):
    code, out, _ = cli("prepare", "--demo", "--run", tmp_path / "r", "--dry-run")
    assert code == 0
    assert "[prepare]" in out and "demo = true" in out
    assert f"writes: {tmp_path / 'r' / 'corpus'}" in out
    assert not (tmp_path / "r").exists()


def test_version_and_help(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("grasp ")
    code, out, _ = cli("--help")
    for stage in (
        "prepare",
        "sketch",
        "retrain-subsets",
        "fit-surrogate",
        "score",
        "select",
        "report",
    ):
        assert stage in out


def test_bad_config_key_exits_2(cli, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[prepare]\nseqlen = 3\n")
    code, _, err = cli("prepare", "--demo", "--run", tmp_path / "r", "--config", path)
    assert code == 2 and "prepare.seqlen" in err and "c.toml" in err
