"""``annotate`` with the local engine (issue 11): inputs, shards, manifest, resume, errors.

Every run here uses the tiny random BERT (hidden 32) on a few hundred short
documents. Runs that fork (``--n-process 2``) or crash on purpose happen in a
subprocess with a timeout, so a hang fails the test instead of pytest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import spacy
from spacy.tokens import DocBin

import spacy_ctx
from spacy_ctx.annotate.inputs import InputStats, iter_records
from spacy_ctx.annotate.local import annotate_corpus, annotate_local
from spacy_ctx.annotate.shards import EXIT_AFTER_ENV, ManifestError, ShardError, read_shards
from spacy_ctx.annotate.worker import Annotator, records_to_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 120
WORDS = "the bank raised interest rates again we sat on river and watched boats apple is a company".split()
N_DOCS = 300
SHARD = 64  # 300 documents: shards of 64, 64, 64, 64, 44


def make_texts(n: int, seed: int = 0) -> List[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 12))).tolist()
        texts.append(" ".join(words).capitalize() + f" {i}.")
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, object]:
    """A JSONL file of N_DOCS documents with ids and meta."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = make_texts(N_DOCS)
    path = folder / "corpus.jsonl"
    with path.open("w", encoding="utf8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "meta": {"n": i, "tag": "x"}, "id": f"doc-{i}"}) + "\n")
    return {"path": path, "texts": texts}


@pytest.fixture(scope="module")
def reference_run(tiny_bert_dir, corpus, tmp_path_factory) -> Path:
    """One uninterrupted in-process run (the reference for the other runs)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = annotate_local(
        str(tiny_bert_dir), [corpus["path"]], out, shard_size=SHARD, batch_size=32, id_key="id",
        progress=False,
    )
    assert summary["documents"] == N_DOCS and summary["shards_written"] == 5
    return out


def run_cli(args: List[str], env_extra: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "spacy_ctx", "annotate", *args, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )


def shard_bytes(out: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.spacy"))}


def assert_same_output(out: Path, reference: Path) -> None:
    """Same shard files, same Docs in the same order; vectors equal up to float noise
    (a different batching pads differently, which moves the last bits)."""
    assert sorted(shard_bytes(out)) == sorted(shard_bytes(reference))
    docs, expected = list(read_shards(out)), list(read_shards(reference))
    assert len(docs) == len(expected)
    for doc, ref in zip(docs, expected):
        assert doc.text == ref.text and [t.text for t in doc] == [t.text for t in ref]
        assert doc.user_data["id"] == ref.user_data["id"] and doc.user_data["meta"] == ref.user_data["meta"]
        np.testing.assert_allclose(doc._.ctx.layers, ref._.ctx.layers, atol=1e-6, rtol=0)


# -- output = nlp(text), in order; shards and manifest ----------------------------------------
def test_local_engine_equals_nlp_in_input_order(tiny_bert_dir, corpus, reference_run) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}})
    docs = list(spacy_ctx.read_shards(reference_run))
    assert [d.text for d in docs] == corpus["texts"]
    for i, doc in enumerate(docs):
        assert doc.user_data["id"] == f"doc-{i}"
        assert doc.user_data["meta"] == {"n": i, "tag": "x"}
        expected = nlp(doc.text)
        assert [t.text for t in doc] == [t.text for t in expected]
        np.testing.assert_allclose(doc._.ctx.layers, expected._.ctx.layers, atol=1e-5, rtol=0)
        assert doc._.ctx.layer_names == expected._.ctx.layer_names
    # read_shards installs the vector hooks again
    assert docs[0][0].vector.shape == (32,) and np.allclose(docs[0][0].vector, docs[0]._.ctx.vectors[0])


def test_shards_and_manifest(reference_run, corpus, tiny_bert_dir) -> None:
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["documents"] == N_DOCS
    assert manifest["settings"]["model"] == str(Path(tiny_bert_dir).resolve())
    assert manifest["settings"]["inputs"] == [
        {"path": str(corpus["path"].resolve()), "bytes": corpus["path"].stat().st_size}
    ]
    assert manifest["pipeline"]["ctx_components"]["ctx_bert"]["store"] == "last"
    shards = [manifest["shards"][str(k)] for k in range(5)]
    assert sorted(p.name for p in reference_run.glob("shard-*.spacy")) == [s["file"] for s in shards]
    assert [(s["first"], s["end"], s["docs"]) for s in shards] == [
        (0, 64, 64), (64, 128, 64), (128, 192, 64), (192, 256, 64), (256, 300, 44)
    ]
    import hashlib

    for info in shards:
        data = (reference_run / info["file"]).read_bytes()
        assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
        # a shard is a plain DocBin: spaCy alone reads it, in order
        docs = list(DocBin().from_bytes(data).get_docs(spacy.blank("en").vocab))
        assert [d.text for d in docs] == corpus["texts"][info["first"]:info["end"]]
        assert info["words"] == sum(len(d) for d in docs)
    assert manifest["skipped"] == [] and manifest["inputs_read"]["skipped"] == 0
    assert manifest["runs"][-1]["engine"] == "local" and manifest["runs"][-1]["documents"] == N_DOCS
    assert not list(reference_run.glob(".*tmp"))  # no temporary files left


def test_annotator_batch_interface(tiny_bert_dir, corpus) -> None:
    """The Ray-style call: a columnar batch in, one DocBin (bytes) per row out."""
    records = list(iter_records([corpus["path"]], id_key="id"))[:5]
    annotator = Annotator(str(tiny_bert_dir), overrides={"store": "all", "store_dtype": "float16"})
    out = annotator(records_to_batch(records))
    assert out["index"].tolist() == [0, 1, 2, 3, 4] and out["docbin"].dtype == object
    vocab = spacy.blank("en").vocab
    for record, data, n_words in zip(records, out["docbin"], out["n_words"]):
        (doc,) = DocBin().from_bytes(data).get_docs(vocab)
        assert doc.text == record.text and len(doc) == n_words
        assert doc.user_data["id"] == record.id and doc.user_data["meta"] == record.meta
        assert doc._.ctx.layers.dtype == np.float16 and len(doc._.ctx.layer_names) == 3


# -- forked workers and crashes, in subprocesses -------------------------------------------
def test_n_process_two_gives_the_same_shards(tiny_bert_dir, corpus, reference_run, tmp_path) -> None:
    out = tmp_path / "out"
    proc = run_cli([str(tiny_bert_dir), str(corpus["path"]), str(out), "--shard-size", str(SHARD),
                    "--batch-size", "16", "--id-key", "id", "--n-process", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_output(out, reference_run)


def test_resume_after_a_crash(tiny_bert_dir, corpus, reference_run, tmp_path) -> None:
    out = tmp_path / "out"
    args = [str(tiny_bert_dir), str(corpus["path"]), str(out), "--shard-size", str(SHARD),
            "--batch-size", "32", "--id-key", "id"]
    crashed = run_cli(args, {EXIT_AFTER_ENV: "2"})  # dies abruptly after its 2nd shard
    assert crashed.returncode == 75, crashed.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and sorted(manifest["shards"]) == ["0", "1"]
    with pytest.raises(ShardError, match="not finished"):
        next(read_shards(out))
    assert len(list(read_shards(out, partial=True))) == 2 * SHARD
    # What a crash between writing a shard and recording it leaves: an unlisted shard
    # file with garbage and a temporary file. Both must be redone/cleaned, not trusted.
    (out / "shard-00002.spacy").write_bytes(b"half-written")
    (out / ".shard-00003.spacy.abc.tmp").write_bytes(b"partial")
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 written now, 2 already done" in resumed.stdout
    assert shard_bytes(out) == shard_bytes(reference_run)  # identical output, no shard twice
    assert not list(out.glob(".*tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 5
    assert [r["shards_written"] for r in manifest["runs"] if "shards_written" in r] == [3]
    docs = list(read_shards(out))
    assert [d.user_data["id"] for d in docs] == [f"doc-{i}" for i in range(N_DOCS)]


# -- bad input --------------------------------------------------------------------------------------
def test_bad_input_lines_are_skipped_and_listed(tiny_bert_dir, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "The bank raised rates.", "id": 1}).encode(),  # 1 good
        b'{"text": "unterminated',  # 2 invalid JSON
        json.dumps({"body": "no text key"}).encode(),  # 3 missing key
        b"",  # 4 empty line
        b'{"text": "caf\xe9 latin-1"}',  # 5 not UTF-8
        json.dumps({"text": "   "}).encode(),  # 6 whitespace-only text
        json.dumps({"text": 42}).encode(),  # 7 not a string
        json.dumps(["a list"]).encode(),  # 8 not an object
        b'{"text": "cut emoji \\ud83d"}',  # 9 lone surrogate
        json.dumps({"text": "We sat on the river bank.", "id": 2}).encode(),  # 10 good
    ]
    bad.write_bytes(b"\n".join(lines) + b"\n")
    txt = tmp_path / "plain.txt"
    txt.write_bytes(b"Apple is a company.\n\nbad \xff byte\nThe boats again.")  # 2 good, empty, bad
    out = tmp_path / "out"
    summary = annotate_local(str(tiny_bert_dir), [bad, txt], out, shard_size=3, id_key="id", progress=False)
    assert summary["documents"] == 4 and summary["skipped_inputs"] == 10
    docs = list(read_shards(out))
    assert [d.text for d in docs] == [
        "The bank raised rates.", "We sat on the river bank.", "Apple is a company.", "The boats again."
    ]
    assert [d.user_data.get("id") for d in docs] == ["1", "2", None, None]
    assert all(d._.ctx is not None for d in docs)
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = [(Path(s["file"]).name, s["line"], s["reason"].split(" (")[0]) for s in manifest["skipped"]]
    assert skipped == [
        ("bad.jsonl", 2, "invalid JSON"),
        ("bad.jsonl", 3, "missing text key"),
        ("bad.jsonl", 4, "empty line"),
        ("bad.jsonl", 5, "not UTF-8"),
        ("bad.jsonl", 6, "empty text"),
        ("bad.jsonl", 7, "text is not a string"),
        ("bad.jsonl", 8, "not a JSON object"),
        ("bad.jsonl", 9, "invalid Unicode"),
        ("plain.txt", 2, "empty text"),
        ("plain.txt", 3, "not UTF-8"),
    ]
    assert manifest["inputs_read"]["skipped"] == 10
    assert manifest["inputs_read"]["per_file"] == {str(bad): 2, str(txt): 2}


def test_parquet_input(tiny_bert_dir, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    table = pa.table({"body": ["The bank.", None, "", "River boats."], "key": ["a", "b", "c", "d"]})
    pq.write_table(table, path)
    stats = InputStats()
    records = list(iter_records([path], text_key="body", id_key="key", stats=stats))
    assert [(r.index, r.text, r.id) for r in records] == [(0, "The bank.", "a"), (1, "River boats.", "d")]
    assert [(s.line, s.reason.split(" (")[0]) for s in stats.skipped_lines] == [
        (2, "missing text key"), (3, "empty text")
    ]


def test_inputs_in_order_over_files_and_globs(tmp_path) -> None:
    for name, text in [("b.txt", "second\n"), ("a.txt", "first\n"), ("c.jsonl", '{"text": "third"}\n')]:
        (tmp_path / name).write_text(text)
    records = list(iter_records([str(tmp_path / "*.txt"), tmp_path / "c.jsonl"]))
    assert [(r.index, r.text) for r in records] == [(0, "first"), (1, "second"), (2, "third")]
    with pytest.raises(spacy_ctx.ConfigError, match="matches no file"):
        list(iter_records([str(tmp_path / "*.nothing")]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(spacy_ctx.ConfigError, match="unknown input format"):
        list(iter_records([tmp_path / "x.csv"]))


# -- manifest mismatch, overwrite, corruption ---------------------------------------------------------
def test_manifest_mismatch_is_an_error_unless_overwrite(tiny_bert_dir, corpus, reference_run, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    other_model = tmp_path / "other_bert"
    shutil.copytree(tiny_bert_dir, other_model)
    proc = run_cli([str(other_model), str(corpus["path"]), str(out), "--shard-size", str(SHARD), "--id-key", "id"])
    assert proc.returncode == 1
    assert "written with other settings" in proc.stderr and "model" in proc.stderr and "--overwrite" in proc.stderr
    with pytest.raises(ManifestError, match=r"store: None -> 'all'"):
        annotate_local(str(tiny_bert_dir), [corpus["path"]], out, shard_size=SHARD, id_key="id",
                       store="all", progress=False)
    assert shard_bytes(out) == shard_bytes(reference_run)  # nothing touched
    summary = annotate_local(str(other_model), [corpus["path"]], out, shard_size=100, id_key="id",
                             store="all", overwrite=True, progress=False)
    assert summary["shards_written"] == 3 and sorted(shard_bytes(out)) == [
        "shard-00000.spacy", "shard-00001.spacy", "shard-00002.spacy"
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["model"] == str(other_model.resolve())
    docs = list(read_shards(out))
    assert len(docs) == N_DOCS and len(docs[0]._.ctx.layer_names) == 3


def test_read_shards_detects_a_corrupted_shard(reference_run, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    path = out / "shard-00003.spacy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    docs = read_shards(out)
    with pytest.raises(ShardError, match="shard-00003.spacy: corrupted shard"):
        for _ in docs:
            pass
    path.unlink()
    with pytest.raises(ShardError, match="cannot read a shard"):
        list(read_shards(out))


def test_pipeline_dir_with_overrides(tiny_bert_dir, tmp_path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}})
    nlp.initialize()
    nlp.to_disk(tmp_path / "pipeline")
    texts = make_texts(20, seed=1)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out"
    annotate_corpus(str(tmp_path / "pipeline"), [tmp_path / "in.txt"], out, store="all",
                    store_dtype="float16", gpu_id=-1, shard_size=8, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["pipeline"] == ["sentencizer", "ctx_bert"]
    assert manifest["pipeline"]["ctx_components"]["ctx_bert"]["store_dtype"] == "float16"
    assert manifest["pipeline"]["ctx_components"]["ctx_bert"]["device"] == "cpu"
    reference = spacy.load(tmp_path / "pipeline", config={"components.ctx_bert.store": "all"})
    docs = list(read_shards(out))
    assert [d.text for d in docs] == texts
    for doc in docs:
        assert doc._.ctx.layers.dtype == np.float16 and doc.has_annotation("SENT_START")
        expected = reference(doc.text)._.ctx.layers
        np.testing.assert_allclose(doc._.ctx.layers.astype(np.float32), expected, atol=2e-3, rtol=1e-2)


def test_bad_model_and_settings_are_clear_errors(tmp_path, corpus) -> None:
    with pytest.raises(spacy_ctx.ConfigError, match="not a model directory"):
        annotate_local(str(tmp_path), [corpus["path"]], tmp_path / "out", progress=False)
    with pytest.raises(spacy_ctx.ConfigError, match="no such directory or installed pipeline"):
        annotate_local("no_such_model_xyz", [corpus["path"]], tmp_path / "out", progress=False)
    with pytest.raises(spacy_ctx.ConfigError, match="--store-dtype must be one of"):
        annotate_local(str(tmp_path), [corpus["path"]], tmp_path / "out", store_dtype="float8", progress=False)
    assert not (tmp_path / "out").exists()  # refused before any manifest is written


def test_import_spacy_ctx_stays_cheap() -> None:
    code = (
        "import sys, spacy_ctx, spacy_ctx.annotate, spacy_ctx.annotate.inputs, spacy_ctx.annotate.shards; "
        "assert 'read_shards' in spacy_ctx.__all__; "
        "print('spacy' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_resume_after_sigkill_mid_run(tiny_bert_dir, corpus, reference_run, tmp_path) -> None:
    """A real kill (SIGKILL, whenever it lands), then a rerun: every document exactly once."""
    import signal
    import time

    out = tmp_path / "out"
    args = [sys.executable, "-m", "spacy_ctx", "annotate", str(tiny_bert_dir), str(corpus["path"]), str(out),
            "--shard-size", "4", "--batch-size", "16", "--id-key", "id", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest_path = out / "manifest.json"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest_path.exists() and len(json.loads(manifest_path.read_text())["shards"]) >= 3:
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
    killed_after = len(json.loads(manifest_path.read_text())["shards"])
    resumed = run_cli(args[4:-1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{75 - killed_after} written now, {killed_after} already done" in resumed.stdout
    docs, expected = list(read_shards(out)), list(read_shards(reference_run))
    assert [d.user_data["id"] for d in docs] == [f"doc-{i}" for i in range(N_DOCS)]
    for doc, ref in zip(docs, expected):
        assert doc.text == ref.text
        np.testing.assert_allclose(doc._.ctx.layers, ref._.ctx.layers, atol=1e-6, rtol=0)
    assert len(list(out.glob("shard-*.spacy"))) == 75


def test_elmo_checkpoint_dir(tiny_elmo_files, tmp_path) -> None:
    """options.json + weights.hdf5: a blank pipeline with a sentencizer and ctx_elmo."""
    options, weights = tiny_elmo_files
    assert options.parent == weights.parent and options.name == "options.json"
    texts = ["The bank raised rates. We sat on the bank.", "Apple is a company."]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out"
    annotate_local(str(options.parent), [tmp_path / "in.txt"], out, progress=False)
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.add_pipe("ctx_elmo", config={"model": {"options": str(options), "weights": str(weights)}})
    docs = list(read_shards(out))
    assert [d.text for d in docs] == texts
    for doc in docs:
        np.testing.assert_allclose(doc._.ctx.layers, nlp(doc.text)._.ctx.layers, atol=1e-5, rtol=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["kind"] == "elmo" and manifest["pipeline"]["pipeline"] == ["sentencizer", "ctx_elmo"]
