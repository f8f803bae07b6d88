"""prepare with a tokenizer and with pre-tokenized inputs: rows decode back to the documents
(EOS-separated), Parquet ``input_ids`` / ``.bin`` / ``.npy`` give the text path's corpus, the
``doc``/``offset`` columns locate every row, sharding changes nothing, the manifest records the
token space, a tiny GPT-2 runs on it end to end, and bad input exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grasp_cli.artifacts.examples import open_corpus, read_examples, read_tasks
from grasp_cli.artifacts.manifest import read_manifest
from grasp_cli.prepare.tokens import MIN_TAIL_TOKENS
from tests.conftest import CODE, ENGLISH, grasp_ok, one_line_error
from tests.conftest import run_grasp as grasp
from tests.hf_checkpoints import save, train_tokenizer

SEQ_LEN = 32
VOCAB = 300
EOS = "<|endoftext|>"
TINY = Path(__file__).with_name("tiny.toml")


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("GRASP_PROGRESS", "0")
    monkeypatch.delenv("GRASP_DEBUG", raising=False)
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)


def _documents() -> list[dict]:
    docs = []
    for i in range(12):
        docs.append({"id": f"p{i}", "domain": "prose", "text": ENGLISH * (1 + i % 3)})
        docs.append({"id": f"c{i}", "domain": "code", "text": CODE * (1 + i % 4)})
        numbers = " ".join(str(k * (i + 1)) for k in range(10 + 7 * i))
        docs.append({"id": f"n{i}", "domain": "numbers", "text": numbers})
    return docs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Documents as .jsonl, their BPE tokenizer (trained here, offline), and the documents'
    ids in every pre-tokenized format."""
    root = tmp_path_factory.mktemp("tok")
    docs = _documents()
    (root / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    tokenizer = train_tokenizer([d["text"] for d in docs], VOCAB)
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)
    ids = [tokenizer.encode(d["text"], add_special_tokens=False).ids for d in docs]
    pq.write_table(
        pa.table(
            {
                "input_ids": pa.array(ids, pa.list_(pa.int64())),
                "domain": [d["domain"] for d in docs],
                "id": [d["id"] for d in docs],
            }
        ),
        root / "docs.parquet",
        row_group_size=5,
    )
    flat = np.concatenate([np.append(np.asarray(x), eos) for x in ids])
    flat.astype("<u2").tofile(root / "docs.bin")
    np.save(root / "docs.npy", flat.astype(np.uint32))
    sidecar = "\n".join(json.dumps({"domain": d["domain"], "id": d["id"]}) for d in docs) + "\n"
    for name in ("docs.bin", "docs.npy"):
        (root / f"{name}.domains.jsonl").write_text(sidecar)
    return {"root": root, "docs": docs, "tokenizer": tokenizer, "eos": eos, "ids": ids}


def _prepare(run: Path, inputs: Path | str, *more: str) -> str:
    args = [
        "prepare", "--run", run,
        "--set", f"prepare.inputs=['{inputs}']",
        "--set", "prepare.holdout_domains=['prose']",
        "--set", f"prepare.seq_len={SEQ_LEN}",
    ]  # fmt: skip
    for item in more:
        args += ["--set", item]
    return grasp_ok(*args)


def _tokenized(world: dict) -> str:
    return f"prepare.tokenizer='{world['root'] / 'tok'}'"


PRETOKENIZED = ("prepare.eos_id=0", f"prepare.vocab_size={VOCAB}")


def _table(folder: Path) -> dict:
    examples = read_examples(folder)
    return {
        "id": examples.ids.tolist(),
        "domain": examples.domains.tolist(),
        "doc": examples.docs.tolist(),
        "tokens": examples.fields["tokens"].tolist(),
        "offset": examples.fields["offset"].tolist(),
    }


def _same_prepared(one: Path, two: Path) -> None:
    assert _table(one / "corpus") == _table(two / "corpus")
    for name in ("prose",):
        a, b = one / "tasks" / f"{name}.parquet", two / "tasks" / f"{name}.parquet"
        assert _table(a) == _table(b)


def _documents_of(examples) -> dict[str, list[int]]:
    """Each document's token stream rebuilt from its rows: ordered by ``offset``, each row
    after the first adding the ``seq_len`` tokens past the one it shares, padding dropped."""
    rebuilt: dict[str, list[int]] = {}
    order = np.lexsort((examples.fields["offset"], examples.docs.astype(str)))
    for row in order:
        doc, offset = str(examples.docs[row]), int(examples.fields["offset"][row])
        tokens = examples.fields["tokens"][row].tolist()
        stream = rebuilt.setdefault(doc, [])
        assert offset == max(0, len(stream) - 1), (doc, offset, len(stream))
        stream[offset:] = tokens
    return rebuilt


def test_tokenizer_rows_decode_back_to_the_documents_with_eos_between(world, tmp_path):
    run = tmp_path / "run"
    _prepare(run, world["root"] / "docs.jsonl", _tokenized(world))
    tokenizer, eos = world["tokenizer"], world["eos"]
    manifest = read_manifest(run / "corpus").extra
    pad = manifest["pad_id"]
    assert (manifest["eos_id"], pad, manifest["vocab_size"]) == (eos, VOCAB, VOCAB)
    assert manifest["tokenizer"].endswith("tokenizer.json")
    corpus, tasks = read_examples(run / "corpus"), read_tasks(run / "tasks")
    streams = _documents_of(corpus) | _documents_of(tasks["prose"])
    texts = {d["id"]: d["text"] for d in world["docs"]}
    assert set(streams) <= set(texts) and len(streams) >= len(texts) - 2
    complete = []
    for doc, stream in streams.items():
        stream = [t for t in stream if t != pad]
        expected = tokenizer.encode(texts[doc], add_special_tokens=False).ids + [eos]
        assert stream == expected[: len(stream)]  # only a short tail may be dropped
        assert len(expected) - len(stream) < MIN_TAIL_TOKENS
        if stream == expected:
            complete.append(doc)
    assert len(complete) >= 10  # a tail of MIN_TAIL_TOKENS or more is kept whole
    joined = [t for doc in complete for t in streams[doc] if t != pad]
    decoded = tokenizer.decode(joined, skip_special_tokens=False)
    assert decoded == "".join(texts[doc] + EOS for doc in complete)
    every = np.concatenate(
        [corpus.fields["tokens"].ravel(), tasks["prose"].fields["tokens"].ravel()]
    )
    assert manifest["max_token_id"] == int(every[every != pad].max())
    assert open_corpus(run / "corpus").max_token_id(pad) == manifest["max_token_id"]


@pytest.mark.parametrize("kind", ["parquet", "bin", "npy"])
def test_pretokenized_inputs_give_the_text_paths_corpus(world, tmp_path, kind):
    text = tmp_path / "text"
    _prepare(text, world["root"] / "docs.jsonl", _tokenized(world))
    pre = tmp_path / kind
    more = [*PRETOKENIZED, "prepare.token_dtype='uint16'"] if kind == "bin" else PRETOKENIZED
    _prepare(pre, world["root"] / f"docs.{kind}", *more)
    _same_prepared(text, pre)
    extra = read_manifest(pre / "corpus").extra
    assert (extra["eos_id"], extra["pad_id"], extra["vocab_size"]) == (0, VOCAB, VOCAB)
    assert extra["max_token_id"] == read_manifest(text / "corpus").extra["max_token_id"]


def test_a_pretokenized_parquet_read_with_its_tokenizer_is_the_same_corpus(world, tmp_path):
    """prepare.tokenizer also gives the token space of pre-tokenized inputs."""
    one, two = tmp_path / "one", tmp_path / "two"
    _prepare(one, world["root"] / "docs.parquet", *PRETOKENIZED)
    _prepare(two, world["root"] / "docs.parquet", _tokenized(world))
    _same_prepared(one, two)


def test_without_a_sidecar_a_flat_file_is_one_domain_numbered_by_document(world, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    flat = np.load(world["root"] / "docs.npy")
    np.save(folder / "shard.npy", flat)
    run = tmp_path / "run"
    _prepare(run, folder / "shard.npy", *PRETOKENIZED, "prepare.holdout_domains=['shard']")
    corpus, task = read_examples(run / "corpus"), read_tasks(run / "tasks")["shard"]
    assert set(corpus.domains.tolist()) == set(task.domains.tolist()) == {"shard"}
    streams = _documents_of(corpus) | _documents_of(task)
    assert len(streams) >= len(world["docs"]) - 2
    for doc, stream in streams.items():
        number = int(doc.removeprefix("shard-"))
        expected = [*world["ids"][number], world["eos"]]
        assert [t for t in stream if t != VOCAB] == expected[: len(stream)]


def test_sharded_prepare_with_a_tokenizer_equals_one_process(world, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    docs = world["docs"]
    for part in range(3):
        chunk = docs[part::3]
        (inputs / f"part{part}.jsonl").write_text("\n".join(json.dumps(d) for d in chunk) + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    _prepare(one, inputs, _tokenized(world))
    args = [_tokenized(world)]
    out = _prepare_shard(two, inputs, 0, args)
    assert "waiting for 1 more" in out
    assert _prepare_shard(two, inputs, 1, args).startswith("corpus: ")
    _same_prepared(one, two)


def _prepare_shard(run: Path, inputs: Path, shard: int, more: list[str]) -> str:
    args = [
        "prepare", "--run", run, "--shard", shard, "--num-shards", 2,
        "--set", f"prepare.inputs=['{inputs}']",
        "--set", "prepare.holdout_domains=['prose']",
        "--set", f"prepare.seq_len={SEQ_LEN}",
    ]  # fmt: skip
    for item in more:
        args += ["--set", item]
    return grasp_ok(*args)


def test_a_tiny_gpt2_runs_on_the_tokenized_corpus_and_a_smaller_vocab_is_refused(world, tmp_path):
    run = tmp_path / "run"
    tiny = ["-c", TINY, "--set", f"prepare.inputs=['{world['root'] / 'docs.jsonl'}']"]
    tiny += ["--set", "prepare.demo=false", "--set", "prepare.demo_domains=[]"]
    tiny += ["--set", "prepare.holdout_domains=['prose']", "--set", _tokenized(world)]
    model = save("gpt2", tmp_path / "gpt2", vocab_size=VOCAB, pad_token_id=None)
    hf = [*tiny, "--set", "model.kind='hf'", "--set", f"model.path='{model}'"]
    hf += ["--set", "reference.steps=-1"]
    grasp_ok("prepare", *hf, "--run", run)
    grasp_ok("sketch", *hf, "--run", run)
    grasp_ok("retrain-subsets", *hf, "--run", run, "--shard", 0, "--num-shards", 8)
    parts = sorted((run / "retrain").glob("part-*.parquet"))
    assert parts and pq.read_table(parts[0]).num_rows > 0
    values = pq.read_table(parts[0]).column("value").to_numpy()
    assert np.isfinite(values).all() and (values > 0).all()

    small = save("gpt2", tmp_path / "small", vocab_size=200, pad_token_id=None)
    hf_small = [*tiny, "--set", "model.kind='hf'", "--set", f"model.path='{small}'"]
    code, _, err = grasp("sketch", *hf_small, "--set", "reference.steps=-1", "--run", run)
    line = one_line_error(err)
    assert code == 2 and str(small) in line and "token id 299" in line
    byte_model = ["--set", "model.kind='transformer'", "--set", "model.path=''"]
    code, _, err = grasp("sketch", *tiny, *byte_model, "--run", run)  # nor can the byte model
    assert code == 2 and "pad id 300" in one_line_error(err)


# ---------------------------------------------------------------- bad input: exit 2, one line


def _fails(run: Path, inputs: Path | str, *more: str) -> str:
    args = [
        "prepare", "--run", run,
        "--set", f"prepare.inputs=['{inputs}']",
        "--set", "prepare.holdout_domains=['prose']",
        "--set", f"prepare.seq_len={SEQ_LEN}",
    ]  # fmt: skip
    for item in more:
        args += ["--set", item]
    code, _, err = grasp(*args)
    assert code == 2, err
    return one_line_error(err)


def test_a_tokenizer_folder_without_tokenizer_json_is_named(world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _fails(tmp_path / "run", world["root"] / "docs.jsonl", f"prepare.tokenizer='{empty}'")
    assert str(empty) in line and "tokenizer.json" in line


def test_a_tokenizer_without_an_eos_token_is_named(world, tmp_path):
    tokenizer = train_tokenizer([d["text"] for d in world["docs"]], VOCAB, specials=("<unk>",))
    path = tmp_path / "noeos.json"
    tokenizer.save(str(path))
    line = _fails(tmp_path / "run", world["root"] / "docs.jsonl", f"prepare.tokenizer='{path}'")
    assert str(path) in line and "end-of-document" in line and "prepare.eos_token" in line
    ok = tmp_path / "ok"  # naming one of its tokens as the EOS works
    _prepare(
        ok, world["root"] / "docs.jsonl", f"prepare.tokenizer='{path}'", "prepare.eos_token='<unk>'"
    )
    assert read_manifest(ok / "corpus").extra["eos_id"] == tokenizer.token_to_id("<unk>")


def test_token_ids_outside_the_vocabulary_are_named_with_their_position(world, tmp_path):
    flat = np.load(world["root"] / "docs.npy")
    flat[7] = VOCAB + 5
    path = tmp_path / "big.npy"
    np.save(path, flat)
    line = _fails(tmp_path / "run", path, *PRETOKENIZED)
    assert f"{path}:token 7" in line and f"token id {VOCAB + 5}" in line
    line = _fails(
        tmp_path / "run2", world["root"] / "docs.npy", "prepare.eos_id=0", "prepare.vocab_size=100"
    )
    assert "docs.npy:token" in line and "outside the vocabulary 0..99" in line


def test_a_bin_file_of_odd_size_or_without_a_dtype_is_named(world, tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes((world["root"] / "docs.bin").read_bytes() + b"\x01")
    line = _fails(tmp_path / "run", path, *PRETOKENIZED, "prepare.token_dtype='uint16'")
    assert str(path) in line and "not a whole number of uint16 tokens" in line
    line = _fails(tmp_path / "run", world["root"] / "docs.bin", *PRETOKENIZED)
    assert "docs.bin" in line and "prepare.token_dtype" in line


def test_an_input_ids_column_of_the_wrong_type_is_named(world, tmp_path):
    path = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"input_ids": [["a", "b"], ["c"]], "domain": ["prose", "code"]}), path)
    line = _fails(tmp_path / "run", path, *PRETOKENIZED)
    assert str(path) in line and "'input_ids'" in line and "list of integer" in line


def test_pretokenized_input_without_a_token_space_is_named(world, tmp_path):
    line = _fails(tmp_path / "run", world["root"] / "docs.npy")
    assert "docs.npy" in line and "prepare.eos_id" in line


def test_a_sidecar_with_too_few_lines_is_named(world, tmp_path):
    np.save(tmp_path / "few.npy", np.load(world["root"] / "docs.npy"))
    (tmp_path / "few.npy.domains.jsonl").write_text('{"domain": "prose"}\n')
    line = _fails(tmp_path / "run", tmp_path / "few.npy", *PRETOKENIZED)
    assert "few.npy.domains.jsonl" in line and "fewer lines" in line
