"""Packing windows into batches: the greedy fill and the padding-aware split
(``pack_by_length(..., overhead=...)``) against a brute-force optimum."""

import random

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.backends.batching import batch_overhead, batch_stats, pack_by_length

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cost(lengths, batches, overhead):
    return sum(len(b) * max(max(lengths[i], 1) for i in b) + overhead for b in batches)


def _best_cost(lengths, budget, overhead):
    """Brute force over every partition of the sorted sequences into runs."""
    sizes = sorted((max(n, 1) for n in lengths), reverse=True)
    n = len(sizes)
    best = None
    for cuts in range(1 << max(n - 1, 0)):
        bounds = [0] + [k for k in range(1, n) if cuts >> (k - 1) & 1] + [n]
        runs = list(zip(bounds, bounds[1:]))
        if any(e - s > 1 and (e - s) * sizes[s] > budget for s, e in runs):
            continue
        cost = sum((e - s) * sizes[s] + overhead for s, e in runs)
        best = cost if best is None else min(best, cost)
    return best


def _check_partition(lengths, batches, budget):
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(max(lengths[i], 1) for i in batch) <= budget or len(batch) == 1
    # Longest first, and every batch a run of the length-sorted order.
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


@pytest.mark.parametrize("seed", range(40))
def test_split_is_optimal_and_never_worse_than_greedy(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(0, 60) for _ in range(rng.randint(1, 10))]
    budget = rng.randint(1, 200)
    overhead = rng.choice([0, 1, 8, 30, 500])
    batches = pack_by_length(lengths, budget, overhead=overhead)
    _check_partition(lengths, batches, budget)
    assert _cost(lengths, batches, overhead) == _best_cost(lengths, budget, overhead)
    greedy = pack_by_length(lengths, budget)
    _check_partition(lengths, greedy, budget)
    assert _cost(lengths, batches, overhead) <= _cost(lengths, greedy, overhead)


def test_split_removes_padding_of_short_documents():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(8, 60, size=64)]  # tweets, in pieces
    greedy = batch_stats(lengths, 4096)
    split = batch_stats(lengths, 4096, overhead=64)
    assert greedy["n_batches"] == 1 and greedy["n_padded_positions"] == 64 * max(lengths)
    assert split["n_padded_positions"] < 0.7 * greedy["n_padded_positions"]
    assert split["n_padded_positions"] + 64 * split["n_batches"] < greedy["n_padded_positions"] + 64
    # Without an overhead, every batch holds one length only: no padding at all.
    assert batch_stats(lengths, 4096, overhead=0)["n_padded_positions"] == sum(lengths)


def test_equal_lengths_fill_the_budget():
    batches = pack_by_length([512] * 20, 4096, overhead=64)
    assert [len(b) for b in batches] == [8, 8, 4]
    assert pack_by_length([], 4096, overhead=64) == []
    assert pack_by_length([5000, 3], 4096, overhead=64) == [[0], [1]]


def test_batch_overhead_by_device():
    threads = torch.get_num_threads()
    assert batch_overhead(torch.device("cpu")) == 64 * threads
    assert batch_overhead(torch.device("cuda", 0)) == 4096  # no GPU needed to ask
    with pytest.raises(ValueError):
        pack_by_length([3, 2], 10, overhead=-1)


def test_backend_splits_mixed_lengths_and_outputs_match_alone(tiny_bert_dir):
    """Documents of mixed lengths run in several length groups on the CPU, and each
    gets the vectors it gets alone."""
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "all"})
    nlp.initialize()
    backend = nlp.get_pipe("ctx_bert").backend
    rng = random.Random(1)
    vocab = "the bank raised rates we sat on river apple buying startup london".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 40))) for _ in range(24)]
    docs = [nlp.make_doc(t) for t in texts]
    shapes = backend.batch_shapes(docs, max_batch_tokens=4096)
    lengths = [len(ids) + backend.pieces.n_specials for ids, _, _ in backend.pieces.encode_docs(docs)]
    assert len(shapes) > 1 and sum(r * n for r, n in shapes) < len(lengths) * max(lengths)
    stats = backend.window_stats(docs, max_batch_tokens=4096)
    assert stats["n_batches"] == len(shapes)
    assert stats["n_padded_positions"] == sum(r * n for r, n in shapes)
    rows = []
    hook = backend.encoder.register_forward_pre_hook(lambda m, inputs: rows.append(inputs[0].shape))
    try:
        batched = list(nlp.pipe(texts, batch_size=len(texts)))
    finally:
        hook.remove()
    assert [tuple(s) for s in rows] == shapes
    for text, doc in zip(texts, batched):
        np.testing.assert_allclose(doc._.ctx.layers, nlp(text)._.ctx.layers, atol=1e-5, rtol=0)
