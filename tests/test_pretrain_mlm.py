"""MLM/NSP/causal-LM pretraining (issue 9 parts 1-3): the loop, the config, the output
folders and the CLI, on tiny random checkpoints.

The outputs are checked against ``transformers``: ``AutoModelForMaskedLM`` (and
``BertForPreTraining``, ``AutoModelForCausalLM``) load them with no missing or
unexpected keys and give our model's logits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from spacy_ctx.cli import main
from spacy_ctx.errors import ConfigError, SpacyCtxError
from spacy_ctx.training.optim import make_optimizer, parameter_groups
from spacy_ctx.training.pretrain import ResumeError, pretrain, read_metrics

from .tiny_models import write_tiny_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain_mlm.cfg"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
WORDS = (
    "the cat sat on the mat . a dog ran in the park . the bank raised rates . "
    "we sat on the river bank . she ate an apple and a banana ."
).split()


def _write_text(path: Path, n_docs: int, seed: int, sentences: int = 1) -> Path:
    """Random word salad from a small vocabulary: learnable unigram statistics."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_docs):
        parts = [" ".join(rng.choice(WORDS[:-1]) for _ in range(rng.randint(4, 12))) for _ in range(sentences)]
        lines.append(" . ".join(p.capitalize() for p in parts) + " .")
    path.write_text("\n".join(lines) + "\n", encoding="utf8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return {
        "train": _write_text(root / "train.txt", 240, seed=0),
        "heldout": _write_text(root / "heldout.txt", 30, seed=1),
        "pairs": _write_text(root / "pairs.txt", 120, seed=2, sentences=4),
    }


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_model("bert", tmp_path_factory.mktemp("bert_mlm"), head="mlm", **TINY)


def _overrides(corpus, encoder: Path, **pretraining: Any) -> Dict[str, Any]:
    settings = {
        "seq_len": 32,
        "batch_size": 8,
        "max_steps": 200,
        "eval_frequency": 50,
        "checkpoint_frequency": 100,
        "learn_rate": 0.003,
        "warmup_steps": 10,
        **pretraining,
    }
    out = {"paths.raw_text": str(corpus["train"]), "paths.encoder": str(encoder),
           "paths.heldout": str(corpus["heldout"])}
    out.update({f"pretraining.{key}": value for key, value in settings.items()})
    return out


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, corpus, bert_dir):
    output = tmp_path_factory.mktemp("bert_run") / "out"
    result = pretrain(CONFIG, output, overrides=_overrides(corpus, bert_dir), progress=False)
    return output, result


def _hf_parity(model_dir: Path, auto_class, model_type: str) -> None:
    """transformers loads the folder strictly and gives our logits (padded batch)."""
    from spacy_ctx.encoders.pretraining_checkpoint import load_pretraining_model

    hf, info = auto_class.from_pretrained(str(model_dir), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ours = load_pretraining_model(model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine, _ = ours(ids, mask)
    real = mask.bool()
    assert (theirs[real] - mine[real]).abs().max().item() <= 1e-4


# -- BERT MLM --------------------------------------------------------------------------------------
def test_bert_heldout_loss_drops_and_metrics_rows(bert_run):
    output, result = bert_run
    rows = read_metrics(output)
    assert [row["step"] for row in rows] == [0, 50, 100, 150, 200]
    for key in ("loss", "accuracy", "nsp_accuracy", "pieces_per_second", "heldout_loss", "heldout_accuracy",
                "heldout_perplexity", "learn_rate", "epoch"):
        assert key in rows[0]
    assert rows[0]["loss"] is None and rows[0]["heldout_loss"] > 0  # before any update
    assert rows[-1]["heldout_loss"] < 0.7 * rows[0]["heldout_loss"]
    assert all(0 <= row["accuracy"] <= 1 and row["pieces_per_second"] > 0 for row in rows[1:])
    assert all(row["nsp_accuracy"] is None for row in rows)
    best = min(rows, key=lambda row: row["heldout_loss"])
    assert result["best_step"] == best["step"] and result["best_loss"] == pytest.approx(best["heldout_loss"])
    assert result["finished"] and result["step"] == 200
    assert (output / "checkpoint" / "state.pt").is_file() and (output / "config.cfg").is_file()
    assert not list(output.glob("*.tmp")) and not list((output / "checkpoint").glob("*.tmp"))


@pytest.mark.parametrize("folder", ["model-last", "model-best"])
def test_bert_output_loads_in_transformers(bert_run, folder):
    output, _ = bert_run
    config = json.loads((output / folder / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    _hf_parity(output / folder, transformers.AutoModelForMaskedLM, "bert")


def test_ctx_bert_loads_output(bert_run):
    import spacy

    output, _ = bert_run
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(output / "model-best")}})
    doc = nlp("The cat sat on the river bank.")
    assert doc._.ctx.layers.shape[-2] == len(doc)


def test_evaluate_lm_and_fill_mask_cli_on_output(bert_run, corpus, capsys):
    output, _ = bert_run
    assert main(["evaluate-lm", str(output / "model-best"), str(corpus["heldout"]), "--seq-len", "32"]) == 0
    assert main(["fill-mask", str(output / "model-best"), "the cat [MASK] on the mat .", "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "masked LM" in printed
    assert "the cat" in printed and printed.count("\n") >= 4
    assert main(["fill-mask", str(output / "model-best"), "no mask here"]) == 1
    assert "mask" in capsys.readouterr().err


# -- other families ----------------------------------------------------------------------------------
def test_roberta_mlm(tmp_path, corpus):
    encoder = write_tiny_model("roberta", tmp_path / "roberta", head="mlm", **TINY)
    output = tmp_path / "out"
    pretrain(CONFIG, output, progress=False, overrides=_overrides(
        corpus, encoder, max_steps=120, eval_frequency=60, checkpoint_frequency=120, masking="word"))
    rows = read_metrics(output)
    assert rows[-1]["heldout_loss"] < 0.7 * rows[0]["heldout_loss"]
    assert json.loads((output / "model-last" / "config.json").read_text())["architectures"] == ["RobertaForMaskedLM"]
    _hf_parity(output / "model-last", transformers.AutoModelForMaskedLM, "roberta")


def test_bert_with_nsp(tmp_path, corpus, capsys):
    encoder = write_tiny_model("bert", tmp_path / "bert_pt", head="pretraining", **TINY)
    output = tmp_path / "out"
    overrides = _overrides(corpus, encoder, max_steps=30, eval_frequency=15, checkpoint_frequency=30,
                           nsp=True, masking="span", seq_len=48)
    overrides["paths.raw_text"] = str(corpus["pairs"])
    overrides["paths.heldout"] = None
    overrides["pretraining.heldout_fraction"] = 0.2
    pretrain(CONFIG, output, overrides=overrides, progress=False)
    rows = read_metrics(output)
    assert all(0 <= row["nsp_accuracy"] <= 1 for row in rows[1:])
    assert all(0 <= row["heldout_nsp_accuracy"] <= 1 for row in rows)
    model_dir = output / "model-last"
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    hf, info = transformers.BertForPreTraining.from_pretrained(str(model_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    capsys.readouterr()
    assert main(["next-sentence", str(model_dir), "The cat sat.", "The dog ran."]) == 0
    probability = float(capsys.readouterr().out.strip().split("=")[-1])
    assert 0.0 < probability < 1.0


def test_gpt2_causal_lm(tmp_path, corpus):
    encoder = write_tiny_model("gpt2", tmp_path / "gpt2", head="lm", n_embd=32, n_layer=2)
    output = tmp_path / "out"
    with pytest.raises(ConfigError, match='objective = "clm"'):
        pretrain(CONFIG, output, overrides=_overrides(corpus, encoder), progress=False)
    pretrain(CONFIG, output, progress=False, overrides=_overrides(
        corpus, encoder, objective="clm", max_steps=60, eval_frequency=30, checkpoint_frequency=60))
    rows = read_metrics(output)
    assert rows[-1]["heldout_loss"] < 0.7 * rows[0]["heldout_loss"]
    _hf_parity(output / "model-last", transformers.AutoModelForCausalLM, "gpt2")


# -- resume ------------------------------------------------------------------------------------------
def _tensors(folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_gives_the_uninterrupted_run(tmp_path, corpus, bert_dir):
    # Dropout on, grad accumulation, whole-word masks, epochs wrapping: every
    # piece of state (RNGs, optimizer, schedule, data position) must come back.
    overrides = _overrides(corpus, bert_dir, max_steps=12, eval_frequency=3, checkpoint_frequency=4,
                           batch_size=16, grad_accumulation=2, masking="word")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    pretrain(CONFIG, whole, overrides=overrides, progress=False)
    # "Killed" at step 7: the checkpoint is from step 4, the row of step 6 is written
    # again, and the row of step 6 averages steps 4-6 across the resumption.
    stopped = pretrain(CONFIG, parts, overrides=overrides, progress=False, stop_at=7)
    assert stopped["step"] == 7 and not stopped["finished"]
    assert [row["step"] for row in read_metrics(parts)] == [0, 3, 6]
    with pytest.raises(ResumeError, match="--resume"):
        pretrain(CONFIG, parts, overrides=overrides, progress=False)
    changed = {**overrides, "pretraining.learn_rate": 0.001}
    with pytest.raises(ResumeError, match="learn_rate"):
        pretrain(CONFIG, parts, overrides=changed, progress=False, resume=True)
    resumed = pretrain(CONFIG, parts, overrides=overrides, progress=False, resume=True)
    assert resumed["finished"]
    for folder in ("model-last", "model-best"):
        a, b = _tensors(whole / folder), _tensors(parts / folder)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    drop = ("pieces_per_second",)
    rows_a = [{k: v for k, v in row.items() if k not in drop} for row in read_metrics(whole)]
    rows_b = [{k: v for k, v in row.items() if k not in drop} for row in read_metrics(parts)]
    assert rows_a == rows_b and [row["step"] for row in rows_a] == [0, 3, 6, 9, 12]
    assert rows_a[-1]["epoch"] >= 1  # the data wrapped into a second epoch


def test_resume_needs_a_checkpoint(tmp_path, corpus, bert_dir):
    with pytest.raises(ResumeError, match="does not exist"):
        pretrain(CONFIG, tmp_path / "new", overrides=_overrides(corpus, bert_dir), resume=True, progress=False)


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"pretraining.masking": "token"}, "masking"),
        ({"pretraining.mask_probability": 1.5}, "mask_probability"),
        ({"pretraining.warmup_steps": 50, "pretraining.max_steps": 10}, "warmup_steps"),
        ({"pretraining.batch_size": 0}, "batch_size"),
        ({"pretraining.max_steps": 2.5}, "max_steps must be an integer"),
        ({"pretraining.nsp": "yes"}, "nsp"),
        ({"pretraining.seq_len": 1000}, "seq_len = 1000"),
        ({"pretraining.lang": "qq"}, "lang"),
        ({"pretraining.objective": "gan"}, "objective"),
        ({"pretraining.objective": "clm"}, "clm"),
        ({"pretraining.nsp": True, "pretraining.objective": "clm"}, "clm"),
        ({"pretraining.colour": 1}, "unknown keys"),
        ({"pretraining.dropout": 1.0}, "dropout"),
        ({"paths.raw_text": None}, "raw_text is not set"),
        ({"paths.raw_text": "/no/such/file.txt"}, "does not exist"),
        ({"paths.encoder": None}, "encoder is not set"),
        ({"nosection.key": 1}, "overrides"),
    ],
)
def test_config_errors(tmp_path, corpus, bert_dir, changes, message):
    overrides = {**_overrides(corpus, bert_dir), **changes}
    with pytest.raises(ConfigError, match=message):
        pretrain(CONFIG, tmp_path / "out", overrides=overrides, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_nsp_needs_a_bert_checkpoint(tmp_path, corpus):
    encoder = write_tiny_model("roberta", tmp_path / "roberta", head="mlm", **TINY)
    with pytest.raises(ConfigError, match="nsp = true needs"):
        pretrain(CONFIG, tmp_path / "out", overrides=_overrides(corpus, encoder, nsp=True), progress=False)


def test_optimizer_groups_and_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model.named_parameters(), 0.01)
    assert [p.shape for p in decay["params"]] == [(4, 4)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    optimizer, scheduler = make_optimizer(model, learn_rate=1.0, weight_decay=0.01, warmup_steps=4, max_steps=12)
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4:] == pytest.approx([1.0 - k / 8 for k in range(8)])
    with pytest.raises(ConfigError, match="warmup_steps"):
        make_optimizer(model, learn_rate=1.0, weight_decay=0.0, warmup_steps=20, max_steps=12)


# -- the command line ---------------------------------------------------------------------------------
def test_cli_pretrain_end_to_end(tmp_path, corpus, bert_dir, capsys):
    output = tmp_path / "cli"
    args = ["pretrain", str(CONFIG), str(output), "--paths.raw_text", str(corpus["train"]),
            "--paths.encoder", str(bert_dir), "--paths.heldout", str(corpus["heldout"]),
            "--pretraining.seq_len", "32", "--pretraining.batch_size", "4", "--pretraining.max_steps", "6",
            "--pretraining.eval_frequency=3", "--pretraining.warmup_steps", "1", "--gpu-id", "-1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Held-out loss" in printed and "done: step 6" in printed
    assert [row["step"] for row in read_metrics(output)] == [0, 3, 6]
    assert (output / "model-last" / "model.safetensors").is_file()
    # The same output again: refused with a clear message, exit code 1.
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err
    # --resume on a finished run: nothing left to do, still fine.
    assert main(args + ["--resume"]) == 0
    bad = args[:3] + ["--paths.raw_text", str(tmp_path / "missing.txt"), "--paths.encoder", str(bert_dir)]
    assert main(bad) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(args[:3] + ["--steps", "5"]) == 1
    assert "--section.key" in capsys.readouterr().err


def test_cli_gpu_without_cuda(tmp_path, corpus, bert_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    args = ["pretrain", str(CONFIG), str(tmp_path / "gpu"), "--paths.raw_text", str(corpus["train"]),
            "--paths.encoder", str(bert_dir), "--pretraining.seq_len", "32", "--gpu-id", "0"]
    assert main(args) == 1
    assert "CUDA" in capsys.readouterr().err


def test_library_errors_are_spacy_ctx_errors():
    assert issubclass(ResumeError, SpacyCtxError) and issubclass(ConfigError, SpacyCtxError)


def test_cli_elmo_objective_and_evaluate_lm(tmp_path, corpus, capsys):
    # objective = "elmo" is handed to the ELMo trainer; evaluate-lm reads its folder.
    output = tmp_path / "elmo"
    args = ["pretrain", str(REPO / "configs" / "pretrain_elmo.cfg"), str(output), "--paths.raw_text",
            str(corpus["train"]), "--paths.heldout", str(corpus["heldout"]), "--pretraining.preset", "tiny",
            "--pretraining.max_steps", "4", "--pretraining.eval_frequency", "2", "--pretraining.batch_tokens", "512"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["evaluate-lm", str(output / "model-last"), str(corpus["heldout"])]) == 0
    printed = capsys.readouterr().out
    assert "forward perplexity" in printed and "backward perplexity" in printed


def test_bad_raw_text(tmp_path, corpus, bert_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf8")
    overrides = {**_overrides(corpus, bert_dir, max_steps=2, warmup_steps=1), "paths.raw_text": str(empty)}
    with pytest.raises(ConfigError, match="no document"):
        pretrain(CONFIG, tmp_path / "out", overrides=overrides, progress=False)
    # A line that is not UTF-8 is skipped and reported; the run goes on.
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(corpus["train"].read_bytes() + b"caf\xe9 au lait\n")
    overrides["paths.raw_text"] = str(mixed)
    capsys.readouterr()
    pretrain(CONFIG, tmp_path / "out2", overrides=overrides, progress=False)
    printed = capsys.readouterr().out
    assert "1 line(s) skipped" in printed and "UTF-8" in printed


def test_dropout_settings(tmp_path, corpus, bert_dir):
    # dropout = 0.0 (every rate set to zero, train mode) trains exactly like
    # dropout = false (eval mode); the checkpoint's own dropout (true) differs.
    runs = {}
    for dropout in (False, 0.0, True):
        output = tmp_path / f"dropout_{dropout}"
        pretrain(CONFIG, output, progress=False, overrides=_overrides(
            corpus, bert_dir, max_steps=3, warmup_steps=1, eval_frequency=3, checkpoint_frequency=3, dropout=dropout))
        runs[repr(dropout)] = _tensors(output / "model-last")
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(runs["False"][key], runs["0.0"][key])
    assert not torch.equal(runs["False"][key], runs["True"][key])


@pytest.mark.gpu
def test_pretrain_on_cuda_with_bf16_autocast(tmp_path, corpus, bert_dir):
    output = tmp_path / "cuda"
    result = pretrain(CONFIG, output, gpu_id=0, progress=False, overrides=_overrides(
        corpus, bert_dir, max_steps=100, eval_frequency=50, checkpoint_frequency=50))
    rows = read_metrics(output)
    assert result["finished"] and rows[-1]["heldout_loss"] < 0.7 * rows[0]["heldout_loss"]
    _hf_parity(output / "model-best", transformers.AutoModelForMaskedLM, "bert")  # saved as fp32 on the CPU
    # Resuming on the GPU continues from the checkpoint (CUDA RNG state included).
    stopped = tmp_path / "stopped"
    pretrain(CONFIG, stopped, gpu_id=0, progress=False, stop_at=50, overrides=_overrides(
        corpus, bert_dir, max_steps=100, eval_frequency=50, checkpoint_frequency=50))
    resumed = pretrain(CONFIG, stopped, gpu_id=0, progress=False, resume=True, overrides=_overrides(
        corpus, bert_dir, max_steps=100, eval_frequency=50, checkpoint_frequency=50))
    assert resumed["finished"] and resumed["step"] == 100
