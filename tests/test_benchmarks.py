"""The throughput benchmark's parts (benchmarks/systems.py, worker.py, report.py and the
throughput.py command line), without timing anything."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import spacy

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import report  # noqa: E402
    import systems  # noqa: E402
finally:
    sys.path.remove(str(BENCHMARKS))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "throughput.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_throughput_cli_help_and_rows():
    help_ = _run("--help")
    assert help_.returncode == 0 and "--systems" in help_.stdout
    listed = _run("--list-systems")
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()[:5]]
    assert names == ["ctx_bert", "spacy_transformers", "hf_raw", "ctx_elmo_tiny", "ctx_elmo_small"]
    assert "ctx_bert[quantize=int8]" in listed.stdout
    bad = _run("--systems", "nope")
    assert bad.returncode == 2 and "unknown system" in bad.stderr
    bad = _run("--systems", "hf_raw[quantize=int8]")
    assert bad.returncode == 2 and "takes no settings" in bad.stderr


def test_row_specs_with_settings():
    assert systems.split_specs("ctx_bert,ctx_bert[mixed_precision=bf16,store_dtype=int8], hf_raw") == [
        "ctx_bert", "ctx_bert[mixed_precision=bf16,store_dtype=int8]", "hf_raw"]
    assert systems.parse_spec("ctx_bert") == ("ctx_bert", {})
    assert systems.parse_spec("ctx_bert[mixed_precision=null,max_batch_tokens=512,store_layers=[-1]]") == (
        "ctx_bert", {"mixed_precision": None, "max_batch_tokens": 512, "store_layers": [-1]})
    for bad in ("ctx_bert[quantize]", "ctx_bert[]", "ctx_bert[a=1", "nope[a=1]"):
        with pytest.raises(ValueError):
            systems.parse_spec(bad)
    component, model = systems.split_settings(
        "ctx_bert", {"store_dtype": "int8", "mixed_precision": "bf16", "model.window": 64})
    assert component == {"store_dtype": "int8"} and model == {"mixed_precision": "bf16", "window": 64}
    assert set(systems.DEFAULT_ROWS) >= {"ctx_bert", "ctx_bert[mixed_precision=bf16]", "ctx_bert[quantize=int8]",
                                         "ctx_bert[mixed_precision=auto]", "spacy_transformers", "hf_raw"}


def test_rejected_setting_skips_the_row(tiny_bert_dir):
    opts = systems.WorkerOptions(system="ctx_bert", model=str(tiny_bert_dir), texts_path="", n_warmup=0,
                                 batch_size=8, max_batch_tokens=512, device="cpu", threads=None, repeats=1,
                                 trf_window=128, trf_stride=96, hf_max_length=512,
                                 settings={"no_such_setting": 1}, payload_docs=2)
    with pytest.raises(systems.Skip, match="setting rejected"):
        systems.setup_ctx_bert(opts)
    opts.settings = {"store_dtype": "int8"}
    loaded = systems.setup_ctx_bert(opts)
    loaded.process(["hello world", "the bank rose by the river"])
    loaded.finish()
    assert loaded.info["settings"]["store_dtype"] == "int8" and loaded.info["docbin_bytes_per_doc"] > 0
    assert loaded.info["payload_docs"] == 2 and loaded.info["batches"] >= 1


def test_worker_script_usage():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "worker.py")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "usage: worker.py" in proc.stderr


def test_bert_window_stats_are_what_the_backend_encodes(tiny_bert_dir):
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "last"})
    nlp.initialize()
    backend = nlp.get_pipe("ctx_bert").backend
    texts = ["hello world", "", "the bank rose by the river . " * 30, "apple " * 62, "apple " * 63]
    docs = [nlp.make_doc(t) for t in texts]
    rows = positions = 0

    def count(module, inputs):  # every encoder call: (input ids, attention mask)
        nonlocal rows, positions
        rows += int(inputs[1].shape[0])
        positions += int(inputs[1].sum())

    hook = backend.encoder.register_forward_pre_hook(count)
    try:
        backend.encode_docs(docs, max_batch_tokens=4096)
    finally:
        hook.remove()
    n_pieces = sum(len(ids) for ids, _, _ in backend.pieces.encode_docs(docs))
    expected = {"pieces": n_pieces, "sequences": rows, "encoded_positions": positions}
    assert rows > len(texts)
    assert systems.bert_window_stats(backend, docs) == expected


def _ok_row(system, seconds, rss, **extra):
    return {"system": system, "device": "cpu", "status": "ok", "docs": 4, "seconds": seconds[0],
            "seconds_all": seconds, "cpu_seconds": 1.0, "cpu_seconds_all": [1.0] * len(seconds),
            "loadavg_1min_before_after": [0.1, 0.2], "load_seconds": 1.5, "warmup_docs": 1,
            "warmup_seconds": 0.5, "peak_rss_mib": rss, "torch_threads": 2, **extra}


def test_report_merges_rounds_and_formats_the_table():
    runs = [_ok_row("ctx_bert", [2.0], 500.0, sequences=6, encoded_positions=2556),
            _ok_row("ctx_bert", [4.0], 600.0, sequences=6, encoded_positions=2556)]
    row = report.finish_row(report.merge_rounds(runs), words=1000)
    assert row["seconds"] == 3.0 and row["seconds_best"] == 2.0 and row["rounds"] == 2
    assert row["peak_rss_mib"] == 600.0 and row["words_per_s_best"] == 500.0
    skipped = report.finish_row(report.merge_rounds(
        [{"system": "spacy_transformers", "device": "cpu", "status": "skipped: x not installed"}]), 1000)
    hf = report.finish_row(_ok_row("hf_raw", [4.0], 400.0), words=1000)
    report.add_ratios([row, skipped, hf])
    assert row["ratio_vs_hf_raw"] == pytest.approx(hf["seconds"] / row["seconds"])
    assert row["ratio_best_vs_hf_raw"] == pytest.approx(2.0) and "ratio_vs_spacy_transformers" not in row
    table = report.format_table([row, skipped])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["system", "docs", "words"]
    assert lines[2].split()[:4] == ["ctx_bert", "4", "1000", "3.00"]
    assert "spacy_transformers: skipped: x not installed" in table
    assert "ctx_bert: load 1.5 s, warm-up 1 docs 0.5 s, passes 2.0/4.0 s, 6 sequences, 2556 pieces" in table


def test_report_result_json_fields(tmp_path):
    args = argparse.Namespace(batch_size=8, max_batch_tokens=4096, device="cpu", repeats=1, rounds=1,
                              threads=None, trf_window=128, trf_stride=96, hf_max_length=512,
                              elmo_fixture=Path("f"), elmo_cache=Path("c"), elmo_seed=0)
    result = report.build_result(args, model=None, source="synthetic", n_docs=4, words=100,
                                 n_warmup=1, rows=[])
    assert result["benchmark"] == "throughput" and result["model"] is None
    assert result["corpus"] == {"source": "synthetic", "docs": 4, "words": 100,
                                "word_definition": "non-whitespace tokens of spacy.blank('en')"}
    assert result["settings"]["warmup_docs"] == 1 and "cpu_count" in result["machine"]
    report.write_result(result, tmp_path / "out" / "r.json")
    assert (tmp_path / "out" / "r.json").is_file()
    pytest.importorskip("matplotlib")
    result["rows"] = [report.finish_row(_ok_row("ctx_bert", [2.0], 500.0, docbin_bytes_per_doc=900.0), 100),
                      {"system": "spacy_transformers", "device": "cpu", "status": "skipped: x"}]
    report.add_ratios(result["rows"])
    png = report.write_chart(result, tmp_path / "out" / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["ctx_bert", "hf_raw", "ctx_elmo_tiny"])
def test_registered_rows(name):
    system = systems.SYSTEMS[name]
    assert callable(system.setup) and system.description
    assert system.uses_hf_model is (not name.startswith("ctx_elmo"))


def test_pretrain_benchmark_smoke(tmp_path):
    """benchmarks/pretrain.py on a tiny random BERT MLM: both MLM loops and ELMo tiny run
    and the JSON holds the medians, the ratio and the command line."""
    pytest.importorskip("transformers")
    import importlib.util
    import json

    import torch

    from .tiny_models import write_tiny_model

    model_dir = write_tiny_model("bert", tmp_path / "bert", head="mlm")
    spec = importlib.util.spec_from_file_location("bench_pretrain", BENCHMARKS / "pretrain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "pretrain.json"
    argv = ["--model", str(model_dir), "--seq-len", "32", "--batch-size", "2", "--steps", "2",
            "--repeats", "1", "--n-docs", "2", "--elmo-steps", "1", "--elmo-batch-tokens", "128",
            "--threads", "1", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text(encoding="utf8"))
    assert result["benchmark"] == "pretrain" and result["argv"] == argv
    assert result["command"].startswith("python ") and result["command"].endswith(str(out))
    assert result["settings"]["seq_len"] == 32 and result["settings"]["torch_threads"] == 1
    systems_ = result["mlm"]["systems"]
    assert set(systems_) == {"ours", "hf"}
    for row in systems_.values():
        assert row["status"] == "ok" and row["pieces_per_s"] > 0 and len(row["repeats"]) == 1
        # Same batches for both systems: the same pieces per repeat.
        assert row["repeats"][0]["pieces"] == result["mlm"]["data"]["pieces_per_repeat"]
        assert len(row["repeats"][0]["step_seconds"]) == 2
    assert "BertForMaskedLM" in systems_["hf"]["description"]
    assert result["mlm"]["ratio_ours_over_hf"] == pytest.approx(
        systems_["ours"]["pieces_per_s"] / systems_["hf"]["pieces_per_s"])
    assert result["mlm"]["order"] == ["ours", "hf"]
    (elmo,) = result["elmo"]
    assert elmo["preset"] == "tiny" and elmo["words_per_s"] > 0 and elmo["words"] > 0
    assert "cpu_count" in result["machine"]
