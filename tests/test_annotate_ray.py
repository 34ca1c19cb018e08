"""The Ray engine of ``annotate`` (issue 11 part 6) against the local engine.

One local Ray (``ray.init(num_cpus=2)``) for the module. The same 2,000 short
documents go through the local engine and through Ray with 2 actors: the shards
must hold the same Docs in input order, and the vectors must equal ``nlp(text)``.
Fault test: an actor process is SIGKILLed after its first batch; Ray restarts it
and retries its batches, and the output still has every document exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from spacy_ctx.annotate.local import annotate_local  # noqa: E402
from spacy_ctx.annotate.ray_engine import ShardAssembler, annotate_ray  # noqa: E402
from spacy_ctx.annotate.shards import load_manifest, read_shards  # noqa: E402
from spacy_ctx.annotate.worker import Annotator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_DOCS = 2000
SHARD_SIZE = 300
WORDS = "the quick brown fox jumps over a lazy dog near river bank".split()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for this module; shut down after it."""
    if ray.is_initialized():
        ray.shutdown()
    # The test module's Annotator subclasses travel by value (workers cannot import tests/).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """2,000 short JSONL documents (some with meta and an id), plus the list of texts."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    texts = []
    with path.open("w", encoding="utf8") as f:
        for i in range(N_DOCS):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + f" {i}."
            texts.append(text)
            row = {"text": text, "id": f"doc{i}"}
            if i % 7 == 0:
                row["meta"] = {"n": i}
            f.write(json.dumps(row) + "\n")
    return path, texts


@pytest.fixture(scope="module")
def local_out(tiny_bert_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    annotate_local(str(tiny_bert_dir), corpus[0], out, shard_size=SHARD_SIZE, batch_size=64,
                   id_key="id", progress=False)
    return out


def _docs(out):
    return list(read_shards(out))


def test_ray_equals_local(ray_local, tiny_bert_dir, corpus, local_out, tmp_path):
    path, texts = corpus
    summary = annotate_ray(str(tiny_bert_dir), path, tmp_path, workers=2, shard_size=SHARD_SIZE,
                           batch_size=64, id_key="id", progress=False)
    assert summary["documents"] == summary["annotated"] == N_DOCS
    assert summary["duplicates"] == 0
    local_manifest, ray_manifest = load_manifest(local_out), load_manifest(tmp_path)
    assert ray_manifest.complete
    assert ray_manifest.data["pipeline"] == local_manifest.data["pipeline"]
    assert [(s["first"], s["end"]) for s in ray_manifest.shards] == [
        (s["first"], s["end"]) for s in local_manifest.shards
    ]
    local_docs, ray_docs = _docs(local_out), _docs(tmp_path)
    assert [d.text for d in ray_docs] == texts  # input order kept
    identical_shards = 0
    for a, b in zip(local_manifest.shards, ray_manifest.shards):
        identical_shards += a["sha256"] == b["sha256"]
    for i, (a, b) in enumerate(zip(local_docs, ray_docs)):
        assert [t.text for t in a] == [t.text for t in b]
        assert b.user_data["id"] == f"doc{i}"
        assert b.user_data.get("meta") == ({"n": i} if i % 7 == 0 else None)
        np.testing.assert_allclose(b._.ctx.vectors, a._.ctx.vectors, atol=1e-5, rtol=0)
    # The same batches (64 documents; blocks are whole batches): byte-identical DocBins.
    assert identical_shards == len(local_manifest.shards)
    # Vectors equal those of nlp(text) on one document at a time.
    nlp = Annotator(str(tiny_bert_dir)).nlp
    for i in range(0, N_DOCS, 97):
        np.testing.assert_allclose(ray_docs[i]._.ctx.vectors, nlp(texts[i])._.ctx.vectors, atol=1e-5, rtol=0)


class SlowAnnotator(Annotator):
    """Records each actor's start (``<pid>.started``) and each batch (``<pid>.pid``) in
    ``pid_dir``, and sleeps a little per batch, so that a kill lands while batches are in
    flight."""

    def __init__(self, model, *, overrides=None, pid_dir):
        super().__init__(model, overrides=overrides)
        self.pid_dir = Path(pid_dir)
        if ray.get_runtime_context().get_actor_id() is not None:  # not the describe task
            (self.pid_dir / f"{os.getpid()}.started").write_text("")

    def __call__(self, batch):
        (self.pid_dir / f"{os.getpid()}.pid").write_text(str(int(batch["index"][0])))
        time.sleep(0.1)
        return super().__call__(batch)


def test_worker_killed_mid_run(ray_local, tiny_bert_dir, corpus, local_out, tmp_path):
    path, texts = corpus
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    killed = []

    def kill_first_worker():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = [p for p in pid_dir.glob("*.pid")]
            if pids:
                pid = int(pids[0].stem)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    out = tmp_path / "out"
    summary = annotate_ray(str(tiny_bert_dir), path, out, workers=2, shard_size=SHARD_SIZE,
                           batch_size=64, id_key="id", progress=False, annotator_cls=SlowAnnotator,
                           annotator_kwargs={"pid_dir": str(pid_dir)})
    killer.join()
    assert killed, "no actor was killed"
    assert len({int(p.stem) for p in pid_dir.glob("*.pid")}) >= 2  # the blocks were spread
    started = {int(p.stem) for p in pid_dir.glob("*.started")}
    assert killed[0] in started
    assert len(started) >= 3, f"the killed actor was not restarted: {started}"  # 2 actors + 1
    assert summary["annotated"] == N_DOCS
    docs = _docs(out)
    assert [d.text for d in docs] == texts  # every document exactly once, in input order
    assert [d.user_data["id"] for d in docs] == [f"doc{i}" for i in range(N_DOCS)]
    local_docs = _docs(local_out)
    for a, b in zip(local_docs[::50], docs[::50]):
        np.testing.assert_allclose(b._.ctx.vectors, a._.ctx.vectors, atol=1e-5, rtol=0)


def test_resume_skips_finished_shards(ray_local, tiny_bert_dir, corpus, local_out, tmp_path):
    """A folder half-written by the local engine is finished by Ray: only the missing shards
    are annotated, and the result equals the local output."""
    path, texts = corpus
    out = tmp_path / "out"
    annotate_local(str(tiny_bert_dir), path, out, shard_size=SHARD_SIZE, batch_size=64, id_key="id",
                   progress=False)
    manifest = load_manifest(out)
    for k in (1, 4, 6):  # forget three shards, as if the run had crashed before them
        (out / manifest.data["shards"].pop(str(k))["file"]).unlink()
    manifest.data["complete"] = False
    manifest.save()
    summary = annotate_ray(str(tiny_bert_dir), path, out, workers=2, shard_size=SHARD_SIZE,
                           batch_size=64, id_key="id", progress=False)
    assert summary["shards_written"] == 3 and summary["shards_skipped"] == 4
    assert summary["annotated"] == SHARD_SIZE * 2 + (N_DOCS - 6 * SHARD_SIZE)
    docs = _docs(out)
    assert [d.text for d in docs] == texts
    # Other batches than the local run's (only the missing shards): equal within float noise.
    for a, b in zip(_docs(local_out), docs):
        np.testing.assert_allclose(b._.ctx.vectors, a._.ctx.vectors, atol=1e-5, rtol=0)


def test_shard_assembler_out_of_order_and_duplicates():
    assembler = ShardAssembler({0: 3, 2: 2}, shard_size=3)
    assert assembler.add(7, b"7") is None
    assert assembler.add(1, b"1") is None
    assert assembler.add(1, b"x") is None  # a retried batch's row: dropped
    assert assembler.add(0, b"0") is None
    k, indices, rows, _ = assembler.add(2, b"2")
    assert (k, indices, rows) == (0, [0, 1, 2], [b"0", b"1", b"2"])
    assert assembler.add(2, b"again") is None  # after the shard was written
    assert assembler.missing() == {2: 1}
    k, indices, rows, _ = assembler.add(6, b"6")
    assert (k, indices, rows) == (2, [6, 7], [b"6", b"7"])
    assert assembler.duplicates == 2 and assembler.missing() == {}
    with pytest.raises(ValueError):
        assembler.add(3, b"3")  # shard 1 is not part of this run (finished before)


def test_scale_benchmark_rows_and_efficiency():
    """benchmarks/scale.py's row specs, scaling efficiency and table (no run: that is the
    benchmark's job)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("scale_benchmark", path)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    assert scale.parse_row("local") == ("local", 1, 0)
    assert scale.parse_row("ray:2") == ("ray", 2, 0)
    assert scale.parse_row("ray:1:gpu") == ("ray", 1, 1)
    with pytest.raises(SystemExit):
        scale.parse_row("ray:0")

    def row(name, engine, workers, docs_per_s, gpus=0):
        return {"row": name, "engine": engine, "workers": workers, "gpus_per_worker": gpus, "docs": 10,
                "seconds": 1.0, "startup_s": 0.5, "wall_s": 2.0, "docs_per_s": docs_per_s,
                "words_per_s": 10 * docs_per_s, "steady_docs_per_s": docs_per_s,
                "steady_words_per_s": 10 * docs_per_s}

    rows = [row("local", "local", 1, 5.0), row("ray:1", "ray", 1, 4.0), row("ray:2", "ray", 2, 6.0),
            row("ray:1:gpu", "ray", 1, 40.0, gpus=1), {"row": "ray:4", "error": "boom"}]
    scale.add_efficiency(rows)
    assert rows[1]["efficiency"] == 1.0 and rows[2]["efficiency"] == pytest.approx(6.0 / (2 * 4.0))
    assert "efficiency" not in rows[3] and rows[3]["vs_local"] == pytest.approx(8.0)
    table = scale.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "failed: boom" in table
