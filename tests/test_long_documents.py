"""Long documents through the BERT backend (issue 7, 2.4) and TransformerBackend.window_stats.

Windows are added into one preallocated output per Doc as soon as their batch is
encoded: no output may keep a padded batch alive, peak memory stays a small
multiple of the output, and gradients flow through the stitched windows exactly as
through the windows computed one by one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.backends.bert import TransformerBackend
from spacy_ctx.backends.windows import plan_windows

from .bert_utils import write_tiny_bert

REPO = Path(__file__).resolve().parents[1]
SINGLE_PIECE_WORDS = "the bank rates we sat on river apple".split()  # one piece each


def words(n: int, seed: int = 0) -> str:
    return " ".join(np.random.default_rng(seed).choice(SINGLE_PIECE_WORDS, n))


@pytest.fixture(scope="module")
def make_doc():
    return spacy.blank("en").make_doc


def test_outputs_own_their_storage(tiny_bert_dir: Path, make_doc) -> None:
    """No output is a view into a padded batch (which would keep the batch alive)."""
    backend = TransformerBackend.from_pretrained(tiny_bert_dir, name="tiny")
    docs = [make_doc(words(n, seed=n)) for n in (5, 12, 300, 1, 40, 7)]
    with torch.inference_mode():
        outputs = backend.encode_docs(docs, max_batch_tokens=512)
    for doc, out in zip(docs, outputs):
        layers = out.layers
        assert layers.shape == (3, len(doc), 32)
        assert layers.is_contiguous()
        own = layers.numel() * layers.element_size()
        assert layers.untyped_storage().nbytes() == own, (
            f"a {len(doc)}-piece output keeps a {layers.untyped_storage().nbytes()}-byte "
            f"storage alive for its {own} bytes"
        )


# Peak RSS is read from VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
# across fork+exec, so a child of a big pytest process would report the parent's RSS.
_PEAK_SCRIPT = r"""
import json, sys
import spacy, torch
from spacy_ctx.backends.bert import TransformerBackend

torch.set_num_threads(1)
model_dir, n_words = sys.argv[1], int(sys.argv[2])

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

backend = TransformerBackend.from_pretrained(model_dir, name="tiny")
make_doc = spacy.blank("en").make_doc
doc = make_doc(" ".join(["the bank rates we sat on river apple"] * (n_words // 8)))
with torch.inference_mode():
    backend.encode_docs([make_doc("warm up the allocator " * 50)], max_batch_tokens=4096)
    before = status("VmRSS")
    [out] = backend.encode_docs([doc], max_batch_tokens=4096)
peak = status("VmHWM")
print(json.dumps({"output": out.layers.numel() * 4, "before": before, "peak": peak}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_long_doc_peak_memory_is_a_small_multiple_of_the_output(tmp_path: Path) -> None:
    """A 64,000-piece doc whose output (3 layers x 128 wide, ~98 MB) dwarfs the tiny
    model: the process grows by at most 2.5x the output while encoding it. Before
    outputs were stitched in place (views of padded batches, concatenated, weighted,
    index_add'ed out of place) it grew by ~5x."""
    model_dir = write_tiny_bert(
        tmp_path / "wide", hidden_size=128, num_attention_heads=4, intermediate_size=64
    )
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(model_dir), "64000"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    output, growth = measured["output"], measured["peak"] - measured["before"]
    assert output >= 90e6
    assert growth <= 2.5 * output, (
        f"encoding grew RSS by {growth / 1e6:.0f} MB for a {output / 1e6:.0f} MB output ({measured})"
    )


def _reference_layers(backend: TransformerBackend, ids: np.ndarray, overlap: str) -> torch.Tensor:
    """Every window encoded alone, stitched with out-of-place ops."""
    plan = plan_windows(len(ids), backend.window, backend.stride, overlap)
    pieces = backend.pieces
    windows = []
    for start, end in plan.spans:
        seq = torch.tensor([[*pieces.prefix_ids, *ids[start:end], *pieces.suffix_ids]])
        n_prefix = len(pieces.prefix_ids)
        windows.append(torch.stack(backend.encoder(seq))[:, 0, n_prefix : n_prefix + end - start])
    flat = torch.cat(windows, dim=1)
    weights = torch.from_numpy(plan.weights)[None, :, None]
    destination = torch.from_numpy(plan.destination())
    return flat.new_zeros((flat.shape[0], len(ids), flat.shape[2])).index_add(
        1, destination, flat * weights
    )


@pytest.mark.parametrize("overlap", ["best", "mean"])
def test_gradients_through_stitched_windows(tiny_bert_dir: Path, make_doc, overlap: str) -> None:
    backend = TransformerBackend.from_pretrained(
        tiny_bert_dir, name="tiny", window=20, stride=12, overlap=overlap
    )
    backend.eval()  # no dropout: both passes must be deterministic
    doc = make_doc(words(90, seed=3))
    [(ids, _, _)] = backend.pieces.encode_docs([doc])
    probe = torch.randn((3, len(ids), 32), generator=torch.Generator().manual_seed(0))
    params = dict(backend.encoder.named_parameters())

    def grads(layers: torch.Tensor) -> dict:
        backend.encoder.zero_grad()
        (layers * probe).sum().backward()
        return {name: p.grad.clone() for name, p in params.items()}

    with torch.enable_grad():
        [out] = backend.encode_docs([doc], max_batch_tokens=64)  # several batches
        assert out.layers.requires_grad
        ours = grads(out.layers)
        reference = _reference_layers(backend, ids, overlap)
        torch.testing.assert_close(out.layers, reference, atol=1e-5, rtol=0)
        theirs = grads(reference)
    for name in params:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    assert ours["embeddings.word.weight"].abs().sum() > 0


# --------------------------------------------------------------------------
# window_stats: what encode_docs feeds the encoder, without running it
# --------------------------------------------------------------------------


def _record_encoder_calls(backend: TransformerBackend, monkeypatch) -> List[tuple]:
    calls: List[tuple] = []
    original = backend.encoder.forward

    def recording(input_ids, attention_mask=None, **kwargs):
        calls.append((tuple(input_ids.shape), int(attention_mask.sum())))
        return original(input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(backend.encoder, "forward", recording)
    return calls


@pytest.mark.parametrize("overlap", ["best", "mean"])
def test_window_stats_match_what_is_encoded(tiny_bert_dir: Path, make_doc, monkeypatch, overlap) -> None:
    backend = TransformerBackend.from_pretrained(
        tiny_bert_dir, name="tiny", window=20, stride=15, overlap=overlap
    )
    docs = [make_doc(t) for t in [words(90, 1), "a", words(20, 2), "   ", "", words(21, 3), words(300, 4)]]
    calls = _record_encoder_calls(backend, monkeypatch)
    stats = backend.window_stats(docs, max_batch_tokens=128)
    assert calls == [], "window_stats ran the encoder"
    with torch.inference_mode():
        backend.encode_docs(docs, max_batch_tokens=128)
    n_pieces = sum(len(ids) for ids, _, _ in backend.pieces.encode_docs(docs))
    n_windows = sum(batch for (batch, _), _ in calls)
    n_positions = sum(real for _, real in calls)
    assert stats == {
        "n_docs": len(docs),
        "n_pieces": n_pieces,
        "n_windows": n_windows,
        "n_window_pieces": n_positions - backend.pieces.n_specials * n_windows,
        "n_positions": n_positions,
        "n_batches": len(calls),
        "n_padded_positions": sum(batch * length for (batch, length), _ in calls),
    }
    assert stats["n_window_pieces"] > stats["n_pieces"]  # windows overlap
    # Without a batch budget: the same counts, no batch figures.
    plain = backend.window_stats(docs)
    assert plain == {k: v for k, v in stats.items() if k not in ("n_batches", "n_padded_positions")}


def test_window_stats_of_nothing(tiny_bert_dir: Path) -> None:
    backend = TransformerBackend.from_pretrained(tiny_bert_dir, name="tiny")
    assert backend.window_stats([], max_batch_tokens=64) == {
        "n_docs": 0, "n_pieces": 0, "n_windows": 0, "n_window_pieces": 0, "n_positions": 0,
        "n_batches": 0, "n_padded_positions": 0,
    }
