"""Long documents: windows in piece space, stitching, batching."""

import warnings

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.backends.bert import TransformerBackend
from spacy_ctx.backends.batching import pack_by_length
from spacy_ctx.backends.windows import plan_windows


@pytest.mark.parametrize("n", [0, 1, 10, 62, 63, 100, 1000])
@pytest.mark.parametrize("window,stride", [(62, 46), (10, 10), (10, 3), (7, 1)])
@pytest.mark.parametrize("overlap", ["best", "mean"])
def test_plan_covers_every_piece_once(n, window, stride, overlap):
    plan = plan_windows(n, window, stride, overlap)
    assert all(0 <= s < e <= n and e - s <= window for s, e in plan.spans)
    totals = np.zeros(n)
    np.add.at(totals, plan.destination(), plan.weights)
    np.testing.assert_allclose(totals, 1.0, rtol=1e-6)
    if overlap == "best":
        assert set(np.unique(plan.weights)) <= {0.0, 1.0}


def test_best_window_maximises_context():
    plan = plan_windows(100, 20, 10)
    destination = plan.destination()
    offsets = np.concatenate([np.arange(e - s) for s, e in plan.spans])
    chosen = plan.weights == 1
    for piece in range(100):
        options = [min(o, 19 - o) for o, d in zip(offsets, destination) if d == piece]
        got = [min(o, 19 - o) for o, d, c in zip(offsets, destination, chosen) if d == piece and c]
        assert got == [max(options)]


@pytest.mark.parametrize("n,window,stride", [(100, 20, 10), (57, 10, 3), (30, 7, 7), (5, 10, 5)])
def test_causal_best_window_maximises_left_context(n, window, stride):
    """For a causal model a piece's context is what lies to its left in the window."""
    plan = plan_windows(n, window, stride, causal=True)
    destination = plan.destination()
    offsets = np.concatenate([np.arange(e - s) for s, e in plan.spans]) if plan.spans else []
    totals = np.zeros(n)
    np.add.at(totals, destination, plan.weights)
    np.testing.assert_array_equal(totals, 1.0)
    for piece in range(n):
        options = [o for o, d in zip(offsets, destination) if d == piece]
        got = [o for o, d, w in zip(offsets, destination, plan.weights) if d == piece and w == 1]
        assert got == [max(options)]
    if len(plan.spans) > 1:
        # Non-causal planning would pick a window with less left context for some piece.
        symmetric = plan_windows(n, window, stride)
        assert not np.array_equal(symmetric.weights, plan.weights)


def test_pack_by_length_respects_budget():
    lengths = [5, 50, 7, 64, 3, 64, 20, 1, 200]
    batches = pack_by_length(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 128 or len(batch) == 1


def _backend(nlp):
    return nlp.get_pipe("ctx_bert").model.shims[0]._model


def _long_text(n_words, seed=0):
    rng = np.random.default_rng(seed)
    vocab = "the bank raised rates we sat on river apple buying startup london paris".split()
    return " ".join(rng.choice(vocab, n_words))


@pytest.mark.parametrize("overlap", ["best", "mean"])
def test_long_doc_equals_its_windows(tiny_bert_dir, overlap):
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "ctx_bert",
        config={"model": {"name": str(tiny_bert_dir), "window": 20, "stride": 12, "overlap": overlap},
                "store": "all"},
    )
    text = _long_text(90)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation (or other) warning
        doc = nlp(text)
    assert doc._.ctx.layers.shape[:2] == (3, len(doc))
    backend: TransformerBackend = _backend(nlp)
    [(ids, counts, index)] = backend.pieces.encode_docs([doc])
    assert index.tolist() == list(range(len(ids)))  # simple words: pieces partition tokens
    plan = plan_windows(len(ids), 20, 12, overlap)
    assert len(plan.spans) > 3
    # Recompute every window independently with the raw encoder.
    window_out = []
    for s, e in plan.spans:
        seq = torch.tensor([[*backend.pieces.prefix_ids, *ids[s:e], *backend.pieces.suffix_ids]])
        with torch.no_grad():
            window_out.append(torch.stack(backend.encoder(seq))[:, 0, 1:-1].numpy())
    flat = np.concatenate(window_out, axis=1)
    pieces = np.zeros((3, len(ids), flat.shape[2]), dtype=np.float32)
    np.add.at(pieces, (slice(None), plan.destination()), flat * plan.weights[None, :, None])
    token_of_piece = np.repeat(np.arange(len(doc)), counts)
    expected = np.zeros_like(doc._.ctx.layers)
    np.add.at(expected, (slice(None), token_of_piece), pieces)
    expected /= np.maximum(counts, 1)[None, :, None]
    np.testing.assert_allclose(doc._.ctx.layers, expected, atol=1e-5, rtol=0)


def test_piece_far_from_edges_equals_single_window(tiny_bert_dir):
    """A doc that fits one window gives the same vectors when cut into overlapping
    windows, for pieces whose chosen window covers the whole doc."""
    nlp_one = spacy.blank("en")
    nlp_one.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "all"})
    nlp_cut = spacy.blank("en")
    nlp_cut.add_pipe(
        "ctx_bert",
        config={"model": {"name": str(tiny_bert_dir), "window": 30, "stride": 5}, "store": "all"},
    )
    # 40 single-piece words; the window [5, 35) is central for the middle words.
    words = ("the bank rates we sat on river apple " * 5).split()
    text = " ".join(words)
    long_doc = nlp_cut(text)
    assert long_doc._.ctx.piece_counts.tolist() == [1] * 40
    middle = nlp_one(" ".join(words[5:35]))  # the window holding words 5..34, alone
    np.testing.assert_allclose(
        long_doc._.ctx.layers[:, 18:22], middle._.ctx.layers[:, 13:17], atol=1e-5, rtol=0
    )


def test_hundred_thousand_token_doc(tiny_bert_dir):
    nlp = spacy.blank("en")
    nlp.max_length = 2_000_000
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "max_batch_tokens": 8192})
    text = _long_text(100_000, seed=1)
    doc = nlp(text)
    assert len(doc) == 100_000
    vectors = doc._.ctx.layers[-1]
    assert vectors.shape == (100_000, 32)
    assert np.isfinite(vectors).all()
    assert (np.abs(vectors).sum(axis=1) > 0).all()  # every token got a vector


def test_many_docs_batched_equal_alone(tiny_bert_dir):
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "max_batch_tokens": 128})
    texts = [_long_text(n, seed=n) for n in (3, 50, 7, 120, 1, 33)]
    batched = list(nlp.pipe(texts, batch_size=6))
    for text, doc in zip(texts, batched):
        alone = nlp(text)
        np.testing.assert_allclose(doc._.ctx.layers, alone._.ctx.layers, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [0, 5, 100])
def test_plan_windows_yields_each_windows_weights(n):
    plan = plan_windows(n, 20, 12, "mean")
    parts = list(plan.windows())
    assert [(s, e) for s, e, _ in parts] == plan.spans
    assert all(len(w) == e - s for s, e, w in parts)
    flat = np.concatenate([w for _, _, w in parts]) if parts else np.zeros(0, np.float32)
    np.testing.assert_array_equal(flat, plan.weights)
