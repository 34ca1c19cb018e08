"""Tests of the ELMo stack: char ids, the pure-PyTorch biLM, its checkpoint files, and
the backend that turns Docs into encoder inputs (sentences, chunks, word cache).

Parity tests use AllenNLP's ELMo fixture (see its README.md) and skip when it is
absent; everything else runs on tiny random checkpoints from ``write_random_elmo``.
"""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import pytest
import spacy
import torch
from spacy.tokens import Doc
from torch.nn import functional as F

from spacy_ctx.backends.elmo import ElmoBackend
from spacy_ctx.backends.word_cache import WordEmbeddingCache, embed_distinct_words
from spacy_ctx.encoders import elmo as elmo_module
from spacy_ctx.encoders.elmo import ElmoBiLM, ProjectionLstmLayer
from spacy_ctx.encoders.elmo_checkpoint import (
    expected_hdf5_shapes,
    expected_state_shapes,
    load_elmo,
    load_elmo_safetensors,
    save_elmo_hdf5,
    save_elmo_options,
    save_elmo_safetensors,
)
from spacy_ctx.encoders.elmo_options import CHARS_PER_TOKEN, MAX_PARAMETERS, ElmoOptions
from spacy_ctx.errors import CheckpointError
from spacy_ctx.pieces.chars import BOS_CHAR_IDS, EOS_CHAR_IDS, MAX_WORD_LENGTH, elmo_char_ids

from .elmo_utils import REPO_ROOT, write_random_elmo

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def batch_char_ids(sentences: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, T, 50) char ids (zero rows as padding) and (B,) lengths."""
    n_tokens = max((len(s) for s in sentences), default=0)
    ids = np.zeros((len(sentences), n_tokens, 50), dtype=np.int64)
    for row, sentence in enumerate(sentences):
        if sentence:
            ids[row, : len(sentence)] = elmo_char_ids(sentence)
    return torch.from_numpy(ids), torch.tensor([len(s) for s in sentences], dtype=torch.long)


def run(model: ElmoBiLM, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
    """The plain biLM over the given sequences (no boundary tokens added)."""
    ids, lengths = batch_char_ids(sentences)
    with torch.no_grad():
        return model(ids, lengths)


def run_framed(model: ElmoBiLM, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
    """ELMo as trained: each sentence framed by <S> ... </S>; all positions returned."""
    return run(model, [["<S>", *s, "</S>"] for s in sentences])


def run_sentences(model: ElmoBiLM, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
    """Framed, then the boundary rows dropped: (n_layers + 1, B, longest, width)."""
    framed = run_framed(model, sentences)
    longest = max((len(s) for s in sentences), default=0)
    return framed[:, :, 1 : longest + 1]


SENTENCES = [
    ["The", "cat", "sat", "on", "the", "mat", "."],
    ["Hello"],
    ["Crème", "brûlée", "über", "東京", "🙂", "naïve"],
    ["a", "b", "c", "d"],
    "An extraordinarily long sentence with more tokens than the others here".split(),
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on one thread: every LSTM step is a few tiny matmuls, and with
    several OpenMP threads each pays a thread sync (minutes on a busy 2-core machine).
    Results are bitwise the same with any thread count on CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_random_elmo(tmp_path_factory.mktemp("tiny_elmo"), seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_files: tuple[Path, Path]) -> ElmoBiLM:
    return load_elmo(*tiny_files)


@pytest.fixture(scope="module")
def fixture_model(fixture_dir: Path) -> ElmoBiLM:
    return load_elmo(fixture_dir / "options.json", fixture_dir / "lm_weights.hdf5")


# --------------------------------------------------------------------------
# parity with AllenNLP / bilm-tf on the real fixture
# --------------------------------------------------------------------------


def fixture_batches(fixture_dir: Path) -> List[List[List[str]]]:
    groups = json.loads((fixture_dir / "sentences.json").read_text(encoding="utf-8"))
    return [[groups[k][i].split() for k in range(3)] for i in range(10)]


def test_fixture_char_ids_match_allennlp(fixture_dir: Path) -> None:
    reference = np.load(fixture_dir / "allennlp_outputs.npz")
    for i, batch in enumerate(fixture_batches(fixture_dir)):
        ids, _ = batch_char_ids(batch)
        np.testing.assert_array_equal(ids.numpy(), reference[f"batch{i}_char_ids"])
        # AllenNLP's mask with <S>/</S> covers exactly length + 2 positions per row.
        mask = reference[f"batch{i}_mask_with_bos_eos"]
        assert mask.sum(axis=1).tolist() == [len(s) + 2 for s in batch]


@pytest.mark.parametrize("loop", ["default", "per_direction", "stacked", "plain"])
def test_fixture_all_layers_match_allennlp_fresh_state(
    fixture_dir: Path, fixture_model: ElmoBiLM, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """The biLM over <S> sentence </S> equals AllenNLP at every position, boundaries
    included, with every inference loop (see ``use_loop``)."""
    if loop != "default":
        use_loop(monkeypatch, loop)
    reference = np.load(fixture_dir / "allennlp_outputs.npz")
    worst = np.zeros(3)
    for i, batch in enumerate(fixture_batches(fixture_dir)):
        ours = run_framed(fixture_model, batch).numpy()
        expected = reference[f"batch{i}_activations_fresh"]
        assert ours.shape == (3, 3, expected.shape[2], 32)
        for row, sentence in enumerate(batch):
            n = len(sentence) + 2  # AllenNLP includes <S> at 0 and </S> at n + 1
            diff = np.abs(ours[:, row, :n] - expected[:, row, :n]).max(axis=(1, 2))
            worst = np.maximum(worst, diff)
            assert not ours[:, row, n:].any(), "positions past the sequence must be zero"
    assert worst.max() < 1e-5, f"max abs difference per layer: {worst}"


def test_fixture_top_layer_matches_tensorflow(fixture_dir: Path, fixture_model: ElmoBiLM) -> None:
    groups = json.loads((fixture_dir / "sentences.json").read_text(encoding="utf-8"))
    for k in range(3):
        # Only sentence 0 of each file: TF carried LSTM state across the later ones.
        sentence = groups[k][0].split()
        with h5py.File(fixture_dir / f"lm_embeddings_{k}.hdf5", "r") as handle:
            tf_output = handle["0"][...]
        expected = np.concatenate([tf_output[0], tf_output[1]], axis=-1)
        ours = run_sentences(fixture_model, [sentence])[2, 0].numpy()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_fixture_through_backend(fixture_dir: Path, fixture_model: ElmoBiLM) -> None:
    """Docs -> backend -> encoder: the same rows as AllenNLP (boundaries dropped)."""
    backend = ElmoBackend(fixture_model, name="fixture")
    vocab = spacy.blank("en").vocab
    reference = np.load(fixture_dir / "allennlp_outputs.npz")
    for i, batch in enumerate(fixture_batches(fixture_dir)):
        docs = [Doc(vocab, words=words) for words in batch]
        with torch.no_grad():
            outputs = backend.encode_docs(docs, max_batch_tokens=4096)
        expected = reference[f"batch{i}_activations_fresh"]
        for row, (output, words) in enumerate(zip(outputs, batch)):
            n = len(words)
            np.testing.assert_allclose(
                output.layers.numpy(), expected[:, row, 1 : n + 1], rtol=0, atol=1e-5
            )


def test_fixture_vocab_token_embeddings(fixture_dir: Path, fixture_model: ElmoBiLM) -> None:
    words = (fixture_dir / "vocab_test.txt").read_text(encoding="utf-8").split("\n")
    assert len(words) == 458
    with torch.no_grad():
        ours = fixture_model.token_embeddings(torch.from_numpy(elmo_char_ids(words))).numpy()
    with h5py.File(fixture_dir / "elmo_token_embeddings.hdf5", "r") as handle:
        tf_embeddings = handle["embedding"][...]
    reference = np.load(fixture_dir / "allennlp_outputs.npz")
    np.testing.assert_allclose(ours, tf_embeddings, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours, reference["vocab_token_embeddings"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# char ids
# --------------------------------------------------------------------------


def expected_ids(payload: Sequence[int]) -> List[int]:
    """Shifted ids of a word whose raw bytes are ``payload``."""
    row = [261] * 50
    row[0] = 259
    for k, byte in enumerate(payload, start=1):
        row[k] = byte + 1
    row[len(payload) + 1] = 260
    return row


def test_char_ids_layout_and_boundary_tokens() -> None:
    ids = elmo_char_ids(["ab", "<S>", "</S>"])
    assert ids.dtype == np.int64 and ids.shape == (3, 50)
    assert ids[0].tolist() == expected_ids(b"ab")
    assert ids[1].tolist() == BOS_CHAR_IDS.tolist() == [259, 257, 260] + [261] * 47
    assert ids[2].tolist() == EOS_CHAR_IDS.tolist() == [259, 258, 260] + [261] * 47
    assert elmo_char_ids([]).shape == (0, 50)


@pytest.mark.parametrize("word", ["é", "ü", "東京", "🙂", "naïve"])
def test_char_ids_non_ascii_are_utf8_bytes(word: str) -> None:
    assert elmo_char_ids([word])[0].tolist() == expected_ids(word.encode("utf-8"))


def test_char_ids_long_word_cut_inside_multibyte_char() -> None:
    word = "a" * 47 + "é" + "xyz"  # "é" is 2 bytes: byte 48 is its first half
    ids = elmo_char_ids([word])[0]
    assert ids[1:48].tolist() == [ord("a") + 1] * 47
    assert ids[48] == 0xC3 + 1  # the lone lead byte of "é" is kept
    assert ids[49] == 260  # end of word right after the 48 bytes
    assert ids.tolist() == expected_ids(word.encode("utf-8")[:48])


def test_char_ids_unencodable_characters_are_dropped() -> None:
    assert elmo_char_ids(["a\ud800b"])[0].tolist() == expected_ids(b"ab")


def _imported_top_level_modules(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_modules_import_only_allowed_libraries() -> None:
    chars = _imported_top_level_modules(REPO_ROOT / "spacy_ctx/pieces/chars.py")
    assert chars <= {"__future__", "typing", "numpy"}, chars
    for path in sorted((REPO_ROOT / "spacy_ctx/encoders").glob("elmo*.py")):
        imported = _imported_top_level_modules(path)
        assert not imported & {"spacy", "thinc"}, (path.name, imported)
        # Encoders take tensors: char ids come from the backend, never from pieces/.
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert "pieces" not in (node.module or ""), (path.name, node.module)
    assert "h5py" not in _imported_top_level_modules(REPO_ROOT / "spacy_ctx/encoders/elmo.py")
    assert "torch" not in _imported_top_level_modules(REPO_ROOT / "spacy_ctx/encoders/elmo_options.py")


def test_char_id_width_agrees_with_encoder() -> None:
    assert MAX_WORD_LENGTH == CHARS_PER_TOKEN == 50


# --------------------------------------------------------------------------
# behaviour on tiny random weights
# --------------------------------------------------------------------------


def test_output_shape_and_layer_names(tiny_model: ElmoBiLM) -> None:
    out = run(tiny_model, SENTENCES)
    assert out.shape == (3, len(SENTENCES), max(map(len, SENTENCES)), 16)
    assert tiny_model.layer_names == ["token", "lstm_1", "lstm_2"]
    # Token layer: the embedding concatenated with itself.
    assert torch.equal(out[0, :, :, :8], out[0, :, :, 8:])


def test_one_token_sentence(tiny_model: ElmoBiLM) -> None:
    alone = run(tiny_model, [["Hello"]])
    assert alone.shape == (3, 1, 1, 16)
    assert alone.abs().sum() > 0
    assert torch.equal(run(tiny_model, SENTENCES)[:, 1, :1], alone[:, 0])


def test_batch_equals_single_sentences_bitwise(tiny_model: ElmoBiLM) -> None:
    batch = run(tiny_model, SENTENCES)
    for row, sentence in enumerate(SENTENCES):
        single = run(tiny_model, [sentence])[:, 0]
        assert torch.equal(batch[:, row, : len(sentence)], single), f"sentence {row} differs"
        assert not batch[:, row, len(sentence) :].any(), "padding positions must be zero"


def test_same_sentence_in_different_batches_is_identical(tiny_model: ElmoBiLM) -> None:
    target = SENTENCES[2]
    others = [["x"] * 3, ["Different", "words", "entirely"], ["y"] * 30, ["z"]]
    results = [run(tiny_model, [target])[:, 0]]
    results.append(run(tiny_model, [others[0], target, others[1]])[:, 1, : len(target)])
    results.append(run(tiny_model, others + [target] + others * 5)[:, 4, : len(target)])
    for result in results[1:]:
        assert torch.equal(result, results[0])


def test_padding_content_is_ignored(tiny_model: ElmoBiLM) -> None:
    ids, lengths = batch_char_ids(SENTENCES)
    garbage = ids.clone()
    generator = torch.Generator().manual_seed(0)
    for row, length in enumerate(lengths.tolist()):
        garbage[row, length:] = torch.randint(1, 262, garbage[row, length:].shape, generator=generator)
    more_garbage = torch.randint(1, 262, (len(SENTENCES), 3, 50), generator=generator)
    extra = torch.cat([garbage, more_garbage], dim=1)
    with torch.no_grad():
        clean = tiny_model(ids, lengths)
        noisy = tiny_model(garbage, lengths)
        longer = tiny_model(extra, lengths)
    assert torch.equal(clean, noisy)
    assert longer.shape[2] == clean.shape[2] + 3
    assert torch.equal(longer[:, :, : clean.shape[2]], clean)
    assert not longer[:, :, clean.shape[2] :].any()


def test_empty_sentence_in_middle_of_batch(tiny_model: ElmoBiLM) -> None:
    batch = [SENTENCES[0], [], SENTENCES[3]]
    out = run(tiny_model, batch)
    assert out.shape == (3, 3, 7, 16)
    assert not out[:, 1].any()
    assert torch.equal(out[:, 0], run(tiny_model, [SENTENCES[0]])[:, 0])
    assert torch.equal(out[:, 2, :4], run(tiny_model, [SENTENCES[3]])[:, 0])


def test_only_empty_sentences_and_empty_batch(tiny_model: ElmoBiLM) -> None:
    assert run(tiny_model, [[], []]).shape == (3, 2, 0, 16)
    ids = torch.zeros(2, 4, 50, dtype=torch.long)
    with torch.no_grad():
        out = tiny_model(ids, torch.tensor([0, 0]))
    assert out.shape == (3, 2, 4, 16) and not out.any()
    assert run(tiny_model, []).shape == (3, 0, 0, 16)


def test_invalid_lengths_raise(tiny_model: ElmoBiLM) -> None:
    ids, _ = batch_char_ids([["a", "b"]])
    with pytest.raises(ValueError):
        tiny_model(ids, torch.tensor([3]))
    with pytest.raises(ValueError):
        tiny_model(ids, torch.tensor([-1]))


def test_precomputed_token_embeddings_give_same_output(tiny_model: ElmoBiLM) -> None:
    ids, lengths = batch_char_ids(SENTENCES)
    with torch.no_grad():
        direct = tiny_model(ids, lengths)
        embeddings = tiny_model.token_embeddings(ids.view(-1, 50)).view(*ids.shape[:2], -1)
        via_embeddings = tiny_model.forward_from_embeddings(embeddings, lengths)
    assert torch.equal(direct, via_embeddings)


def test_gradients_flow(tiny_files: tuple[Path, Path]) -> None:
    model = load_elmo(*tiny_files)
    ids, lengths = batch_char_ids(SENTENCES[:2])
    model(ids, lengths).sum().backward()
    assert model.char_encoder.char_embedding.weight.grad is not None
    assert model.lstm.layers[1].recurrent_weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------
# an independent numpy reference, straight from the TF layout
# --------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def reference_bilm(
    weights_path: Path, options: Dict, words: Sequence[str], clip_counts: Optional[Dict[str, int]] = None
) -> np.ndarray:
    """bilm-tf's maths for one sentence in float64: (n_layers + 1, len(words), 2 * proj).

    ``clip_counts``, when given, receives the number of values beyond the clips
    (``"cell"``, ``"projection"``) before clipping.
    """
    counts = clip_counts if clip_counts is not None else {}
    counts.setdefault("cell", 0)
    counts.setdefault("projection", 0)
    w: Dict[str, np.ndarray] = {}

    def collect(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            w[name] = obj[...].astype(np.float64)

    with h5py.File(weights_path, "r") as handle:
        handle.visititems(collect)
    cnn, lstm = options["char_cnn"], options["lstm"]
    act = np.tanh if cnn["activation"] == "tanh" else (lambda v: np.maximum(v, 0.0))
    ids = elmo_char_ids(["<S>", *words, "</S>"])
    table = np.vstack([np.zeros((1, w["char_embed"].shape[1])), w["char_embed"]])
    chars = table[ids]  # (n, 50, char_dim)
    pooled = []
    for i, (width, _) in enumerate(cnn["filters"]):
        kernel, bias = w[f"CNN/W_cnn_{i}"][0], w[f"CNN/b_cnn_{i}"]
        positions = range(50 - width + 1)
        conv = np.stack(
            [sum(chars[:, p + k] @ kernel[k] for k in range(width)) + bias for p in positions], axis=1
        )
        pooled.append(act(conv.max(axis=1)))
    h = np.concatenate(pooled, axis=-1)
    for k in range(cnn["n_highway"]):
        gate = _sigmoid(h @ w[f"CNN_high_{k}/W_carry"] + w[f"CNN_high_{k}/b_carry"])
        transform = h @ w[f"CNN_high_{k}/W_transform"] + w[f"CNN_high_{k}/b_transform"]
        h = gate * np.maximum(transform, 0) + (1 - gate) * h
    if "CNN_proj/W_proj" in w:
        h = h @ w["CNN_proj/W_proj"] + w["CNN_proj/b_proj"]
    cell_clip, proj_clip = lstm["cell_clip"], lstm["proj_clip"]
    directions = []
    for d in (0, 1):
        x = h if d == 0 else h[::-1]
        outs = []
        for layer in range(lstm["n_layers"]):
            prefix = f"RNN_{d}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
            state_m, state_c, seq = np.zeros(lstm["projection_dim"]), np.zeros(lstm["dim"]), []
            for x_t in x:
                z = np.concatenate([x_t, state_m]) @ w[f"{prefix}/W_0"] + w[f"{prefix}/B"]
                i_g, j_g, f_g, o_g = np.split(z, 4)  # TF LSTMCell order
                state_c = _sigmoid(f_g + 1.0) * state_c + _sigmoid(i_g) * np.tanh(j_g)
                if cell_clip:
                    counts["cell"] += int((np.abs(state_c) > cell_clip).sum())
                    state_c = np.clip(state_c, -cell_clip, cell_clip)
                state_m = (_sigmoid(o_g) * np.tanh(state_c)) @ w[f"{prefix}/W_P_0"]
                if proj_clip:
                    counts["projection"] += int((np.abs(state_m) > proj_clip).sum())
                    state_m = np.clip(state_m, -proj_clip, proj_clip)
                seq.append(state_m)
            y = np.stack(seq) + (x if layer > 0 else 0)
            outs.append(y if d == 0 else y[::-1])
            x = y
        directions.append(outs)
    layers = [np.concatenate([h, h], -1)] + [np.concatenate([f, b], -1) for f, b in zip(*directions)]
    return np.stack(layers)[:, 1:-1]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"activation": "tanh", "n_highway": 2, "n_layers": 3},
        # filters sum to proj: bilm-tf writes no CNN_proj then.
        {"filters": ((1, 2), (2, 6)), "proj": 8, "cell_clip": None, "proj_clip": None},
    ],
    ids=["default", "tanh-3layers", "no-char-projection"],
)
def test_matches_numpy_reference(tmp_path: Path, settings: Dict) -> None:
    options_path, weights_path = write_random_elmo(tmp_path, seed=3, **settings)
    model = load_elmo(options_path, weights_path)
    options = json.loads(options_path.read_text())
    sentences = [SENTENCES[0], SENTENCES[2], ["<S>", "x"]]
    out = run_sentences(model, sentences).numpy()
    for row, sentence in enumerate(sentences):
        expected = reference_bilm(weights_path, options, sentence)
        np.testing.assert_allclose(out[:, row, : len(sentence)], expected, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------
# clipping
# --------------------------------------------------------------------------


def test_clipping_triggers_and_bounds_outputs(tmp_path: Path) -> None:
    clipped_files = write_random_elmo(tmp_path / "clip", seed=1, weight_scale=3.0)
    free_files = write_random_elmo(
        tmp_path / "free", seed=1, weight_scale=3.0, cell_clip=None, proj_clip=None
    )
    clipped, free = load_elmo(*clipped_files), load_elmo(*free_files)
    assert clipped.options.cell_clip == 3.0 and free.options.cell_clip is None

    # The float64 reference counts the values beyond the clips: both clips do trigger...
    counts: Dict[str, int] = {}
    options = json.loads(clipped_files[0].read_text())
    for sentence in SENTENCES:
        expected = reference_bilm(clipped_files[1], options, sentence, counts)
        # ...and the model clips exactly where the reference does.
        np.testing.assert_allclose(
            run_sentences(clipped, [sentence])[:, 0].numpy(), expected, rtol=1e-5, atol=1e-4
        )
    assert counts["cell"] > 0 and counts["projection"] > 0, counts

    out_clipped = run_sentences(clipped, SENTENCES)
    out_free = run_sentences(free, SENTENCES)
    # lstm_1 has no skip connection: bounded by proj_clip; lstm_2 adds its input.
    assert out_clipped[1].abs().max() <= 3.0
    assert out_clipped[2].abs().max() <= 6.0
    assert out_free[1].abs().max() > 3.0
    assert not torch.allclose(out_clipped[1:], out_free[1:])
    assert torch.equal(out_clipped[0], out_free[0])  # token layer is not clipped


def test_no_clipping_on_small_weights(tiny_files: tuple[Path, Path]) -> None:
    counts: Dict[str, int] = {}
    reference_bilm(tiny_files[1], json.loads(tiny_files[0].read_text()), ["small"], counts)
    assert counts == {"cell": 0, "projection": 0}


# --------------------------------------------------------------------------
# memory bounds (issue 7, 2.7): time blocks for the input gates, chunks for the CNN
# --------------------------------------------------------------------------


def test_inference_input_gates_are_computed_in_bounded_blocks_of_active_rows(
    tiny_model: ElmoBiLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inference loop's input-gate matmuls stay within INFERENCE_GATE_BUDGET (blocks
    of steps times the rows active at the block's start, or one step), cover every
    step with rows, and give bitwise the unbounded result."""
    long_sentence = [f"w{k % 7}" for k in range(150)]
    batches = [[long_sentence], [long_sentence, *SENTENCES], [long_sentence, [], ["a"]]]
    unbounded = [run_framed(tiny_model, batch) for batch in batches]
    calls: List[Tuple[List[int], List[Tuple[int, int]]]] = []
    original = elmo_module._gate_blocks

    def recording(counts: Sequence[int], max_rows: int) -> List[Tuple[int, int]]:
        calls.append((list(counts), original(counts, max_rows)))
        return calls[-1][1]

    monkeypatch.setattr(elmo_module, "_gate_blocks", recording)
    gate_width = 4 * tiny_model.options.lstm_dim
    max_rows = 24
    monkeypatch.setattr(elmo_module, "INFERENCE_GATE_BUDGET", max_rows * gate_width)
    for batch, expected in zip(batches, unbounded):
        calls.clear()
        assert torch.equal(run_framed(tiny_model, batch), expected)
        assert len(calls) == tiny_model.options.n_layers
        for counts, blocks in calls:
            # Sorted rows: the counts of active rows per step never grow, and are all > 0.
            assert counts == sorted(counts, reverse=True) and counts[-1] > 0
            assert len(counts) == len(long_sentence) + 2
            assert blocks[0][0] == 0 and blocks[-1][1] == len(counts)
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            for start, end in blocks:
                assert (end - start) * counts[start] <= max_rows or end - start == 1
            assert len(blocks) > 1


def test_gate_blocks() -> None:
    assert elmo_module._gate_blocks([], 10) == []
    assert elmo_module._gate_blocks([3, 3, 3, 2, 1], 6) == [(0, 2), (2, 4), (4, 5)]
    assert elmo_module._gate_blocks([20, 20, 5], 6) == [(0, 1), (1, 2), (2, 3)]
    assert elmo_module._gate_blocks([1] * 5, 100) == [(0, 5)]


def test_autograd_input_gates_are_computed_in_bounded_blocks_of_real_rows(
    tiny_model: ElmoBiLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With autograd, the input-gate precompute stays within the budget (in time blocks,
    with the real rows only, not ROW_MULTIPLE padded ones) and gives bitwise the
    unbounded result."""
    long_sentence = [f"w{k % 7}" for k in range(150)]
    batches = [[long_sentence], [long_sentence, *SENTENCES]]

    def run_framed(model: ElmoBiLM, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
        ids, lengths = batch_char_ids([["<S>", *s, "</S>"] for s in sentences])
        with torch.enable_grad():
            return model(ids, lengths).detach()

    unbounded = [run_framed(tiny_model, batch) for batch in batches]

    blocks: List[Tuple[int, ...]] = []
    original = ProjectionLstmLayer.input_gates

    def recording(self: ProjectionLstmLayer, block: torch.Tensor) -> torch.Tensor:
        blocks.append(tuple(block.shape))
        return original(self, block)

    monkeypatch.setattr(ProjectionLstmLayer, "input_gates", recording)
    gate_width = 4 * tiny_model.options.lstm_dim
    budget = 2 * 32 * gate_width  # 32 (step, row) pairs of both directions
    monkeypatch.setattr(elmo_module, "INPUT_GATE_BUDGET", budget)
    for batch, expected in zip(batches, unbounded):
        blocks.clear()
        bounded = run_framed(tiny_model, batch)
        assert torch.equal(bounded, expected)
        n_layers, batch_size, n_steps = tiny_model.options.n_layers, len(batch), len(long_sentence) + 2
        # Real rows only: all of them in the first block, then the unfinished ones.
        assert blocks[0][2] == batch_size and all(1 <= shape[2] <= batch_size for shape in blocks)
        for _, steps, rows, _ in blocks:
            assert steps % elmo_module.ROW_MULTIPLE == 0
            # Within the budget, or the smallest block (ROW_MULTIPLE steps) if that is larger.
            assert 2 * steps * rows * gate_width <= max(budget, 2 * 16 * rows * gate_width)
        assert len(blocks) > n_layers  # really cut into several blocks per layer
        assert sum(shape[1] for shape in blocks) >= n_layers * n_steps


def test_char_cnn_runs_in_bounded_chunks(tiny_model: ElmoBiLM, monkeypatch: pytest.MonkeyPatch) -> None:
    words = [f"word{k}" for k in range(100)]
    ids = torch.from_numpy(elmo_char_ids(words))
    with torch.no_grad():
        whole = tiny_model.token_embeddings(ids)
        sizes: List[int] = []
        original = tiny_model.char_encoder._embed_chunk
        monkeypatch.setattr(
            tiny_model.char_encoder, "_embed_chunk", lambda chunk: sizes.append(len(chunk)) or original(chunk)
        )
        monkeypatch.setattr(elmo_module, "CHAR_CNN_BUDGET", 1)
        chunked = tiny_model.token_embeddings(ids)
    assert sizes == [16] * 6 + [4]
    assert torch.equal(chunked, whole)


def test_padding_char_id_agrees_with_chars_module() -> None:
    from spacy_ctx.pieces import chars

    assert elmo_module.PADDING_CHAR_ID == chars.PADDING_CHAR + 1
    assert elmo_char_ids(["a"])[0, -1] == elmo_module.PADDING_CHAR_ID


def test_trimmed_char_cnn_equals_full_width(tiny_model: ElmoBiLM) -> None:
    """Inference convolves only a word's own positions (plus one padding window): the
    same embeddings as the full 50 positions (the autograd path), and a word's row
    does not depend on how long the other words of its batch are."""
    words = ["a", "cat", "extraordinarily", "東京", "🙂", "x" * 60, "naïve", "of"]
    words += [f"w{k}" for k in range(30)]
    ids = torch.from_numpy(elmo_char_ids(words))
    ids = torch.cat([ids, torch.zeros(1, CHARS_PER_TOKEN, dtype=torch.long)])  # a padding token
    with torch.enable_grad():
        full = tiny_model.token_embeddings(ids).detach()
    with torch.no_grad():
        trimmed = tiny_model.token_embeddings(ids)
        alone = [tiny_model.token_embeddings(ids[i : i + 1]) for i in range(len(words))]
        short_only = tiny_model.token_embeddings(ids[:2])
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)
    for i, row in enumerate(alone):
        assert torch.equal(row[0], trimmed[i]), words[i]
    assert torch.equal(short_only, trimmed[:2])


def test_char_cnn_trims_positions(tiny_model: ElmoBiLM, monkeypatch: pytest.MonkeyPatch) -> None:
    widths: List[int] = []
    original = tiny_model.char_encoder._embed_chunk
    monkeypatch.setattr(
        tiny_model.char_encoder,
        "_embed_chunk",
        lambda chunk: widths.append(chunk.shape[1]) or original(chunk),
    )
    with torch.no_grad():
        tiny_model.token_embeddings(torch.from_numpy(elmo_char_ids(["a", "ab", "x" * 60])))
    widest = max(width for width, _ in tiny_model.options.filters)
    # "a" and "ab" (<= 4 ids with the word markers) share one trimmed width; the
    # 60-char word keeps all 50 positions.
    assert sorted(widths) == [elmo_module.TRIM_STEP + widest, CHARS_PER_TOKEN]


def test_lstm_inference_loop_matches_autograd_loop(tiny_model: ElmoBiLM) -> None:
    """The in-place, active-rows-only inference loop equals the autograd loop to float32
    rounding, for sorted and unsorted batches, and restores the thread count."""
    ids, lengths = batch_char_ids(SENTENCES)  # unsorted lengths
    with torch.enable_grad():
        reference = tiny_model(ids, lengths).detach()
    threads = torch.get_num_threads()
    with torch.no_grad():
        fast = tiny_model(ids, lengths)
        order = torch.argsort(lengths, descending=True, stable=True)
        sorted_fast = tiny_model(ids[order], lengths[order])
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(fast, reference, rtol=0, atol=2e-6)
    assert torch.equal(sorted_fast, fast[:, order])


def test_step_threads_limits_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: List[int] = []
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with elmo_module._step_threads(16 * 16):
            seen.append(torch.get_num_threads())
        monkeypatch.setattr(elmo_module, "STEP_ELEMENTS_PER_THREAD", 1)
        with elmo_module._step_threads(16 * 16):
            seen.append(torch.get_num_threads())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
    assert seen == [1, 2]


def ragged_sentences(n: int, seed: int) -> List[List[str]]:
    """``n`` sentences of random lengths 0-40 (empty and one-word ones included)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 41, size=n).tolist() + [0, 1, 1, 2]
    return [[f"w{int(k)}" for k in rng.integers(0, 60, size=length)] for length in lengths]


def use_loop(monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    """Select the inference LSTM loop: ``per_direction`` (oneDNN, each direction alone,
    as the published models run on CPU), ``stacked`` (both directions, batched
    matmuls: small layers) or ``plain`` (no oneDNN anywhere)."""
    if loop != "plain" and not elmo_module._has_onednn_linear():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(elmo_module, "USE_ONEDNN_LINEAR", loop != "plain")
    monkeypatch.setattr(elmo_module, "ONEDNN_MIN_CELL_DIM", 1 if loop == "per_direction" else 1 << 30)


@pytest.mark.parametrize("loop", ["per_direction", "stacked", "plain"])
def test_ragged_batch_alone_equals_batched_and_autograd(
    tiny_model: ElmoBiLM, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """More than ROW_MULTIPLE rows of ragged lengths (the active count crosses several
    multiples of 16 as rows finish), empty and one-word sentences: each sentence alone
    equals its row of the batch bitwise, in any order, with oneDNN or F.linear matmuls;
    and the inference path is as close to a float64 run of the autograd path as the
    float32 autograd path is (rounding over 40 steps and 2 layers: a few 1e-6)."""
    import copy

    use_loop(monkeypatch, loop)
    sentences = ragged_sentences(40, seed=1)
    ids, lengths = batch_char_ids(sentences)
    with torch.no_grad():
        batch = tiny_model(ids, lengths)
        order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))
        shuffled = tiny_model(ids[order], lengths[order])
    with torch.enable_grad():
        reference = tiny_model(ids, lengths).detach().double()
        exact = copy.deepcopy(tiny_model).double()(ids, lengths).detach()
    error = (batch.double() - exact).abs().max().item()
    assert error < max(1e-5, 2 * (reference - exact).abs().max().item())
    assert torch.equal(shuffled, batch[:, order])
    for row, sentence in enumerate(sentences):
        if row % 3 and len(sentence) > 1:
            continue  # a third of them, and every short one, keep the test fast
        alone = run(tiny_model, [sentence])[:, 0]
        assert torch.equal(batch[:, row, : len(sentence)], alone), f"sentence {row} ({len(sentence)} words)"
        assert not batch[:, row, len(sentence) :].any()


def test_inference_loops_agree(tiny_model: ElmoBiLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-direction oneDNN loop, the stacked loop and the no-oneDNN path give the
    same vectors to float32 rounding (char CNN and LSTM; the AllenNLP parity bound is
    1e-5)."""
    sentences = ragged_sentences(12, seed=2)
    results = {}
    for loop in ("per_direction", "stacked", "plain"):
        use_loop(monkeypatch, loop)
        results[loop] = run(tiny_model, sentences)
    torch.testing.assert_close(results["per_direction"], results["plain"], rtol=0, atol=1e-5)
    torch.testing.assert_close(results["stacked"], results["plain"], rtol=0, atol=1e-5)


def test_fast_linear_matches_f_linear() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 24, generator=generator)
    weight = torch.randn(40, 24, generator=generator)
    bias = torch.randn(40, generator=generator)
    with torch.no_grad():
        for w in (weight, elmo_module._prepacked(weight, 16)):
            torch.testing.assert_close(elmo_module.fast_linear(x, w, bias), F.linear(x, weight, bias))
            # Row independence: a row's result does not depend on the other rows.
            first = elmo_module.fast_linear(x[:16], w, bias)
            assert torch.equal(first, elmo_module.fast_linear(x, w, bias)[:16])


def test_inference_weights_follow_weight_changes(tiny_files: tuple[Path, Path]) -> None:
    """The inference loop's derived (transposed, prepacked) weights are rebuilt after an
    in-place change of the parameters, and never copied or pickled with the model."""
    import copy
    import pickle

    model = load_elmo(*tiny_files)
    ids, lengths = batch_char_ids(SENTENCES)
    with torch.no_grad():
        before = model(ids, lengths)
        copied = copy.deepcopy(model)
        pickled = pickle.loads(pickle.dumps(model))
        assert torch.equal(copied(ids, lengths), before) and torch.equal(pickled(ids, lengths), before)
        assert hasattr(model.lstm.layers[0], "_inference_cache")
        model.lstm.layers[0].recurrent_weight.mul_(0.5)
        model.char_encoder.convolutions[0].weight.mul_(0.5)
        after = model(ids, lengths)
    with torch.enable_grad():
        reference = model(ids, lengths).detach()
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, reference, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------
# the backend: Docs -> <S> sentence </S> char ids -> encoder -> rows per token
# --------------------------------------------------------------------------

WORDS = "The bank raised rates . We sat on the river bank . Then we left .".split()
SENT_STARTS = [0, 5, 12]  # three sentences


@pytest.fixture(scope="module")
def vocab():
    return spacy.blank("en").vocab


@pytest.fixture
def backend(tiny_model: ElmoBiLM) -> ElmoBackend:
    return ElmoBackend(tiny_model, name="tiny", chunk_size=100)


def encode(backend: ElmoBackend, docs: Sequence[Doc], max_batch_tokens: int = 4096) -> List[np.ndarray]:
    with torch.no_grad():
        return [out.layers.numpy() for out in backend.encode_docs(docs, max_batch_tokens=max_batch_tokens)]


def sentence_doc(vocab, words: Sequence[str], starts: Sequence[int]) -> Doc:
    return Doc(vocab, words=list(words), sent_starts=[i in starts for i in range(len(words))])


def test_backend_frames_each_sentence(backend: ElmoBackend, tiny_model: ElmoBiLM, vocab) -> None:
    doc = sentence_doc(vocab, WORDS, SENT_STARTS)
    [layers] = encode(backend, [doc])
    bounds = [*SENT_STARTS, len(WORDS)]
    sentences = [WORDS[a:b] for a, b in zip(bounds, bounds[1:])]
    expected = run_sentences(tiny_model, sentences).numpy()
    for row, (start, end) in enumerate(zip(bounds, bounds[1:])):
        np.testing.assert_array_equal(layers[:, start:end], expected[:, row, : end - start])


def test_backend_from_pretrained(tiny_files: tuple[Path, Path], tiny_model: ElmoBiLM, vocab) -> None:
    loaded = ElmoBackend.from_pretrained(*tiny_files, name="tiny", chunk_size=3, cache_size=7)
    assert (loaded.chunk_size, loaded.cache_size, loaded.word_cache.max_entries) == (3, 7, 7)
    assert loaded.settings() == {"name": "tiny", "mixed_precision": None, "chunk_size": 3, "cache_size": 7}
    doc = Doc(vocab, words=WORDS[:5])
    [layers] = encode(loaded, [doc])
    expected = run_sentences(tiny_model, [WORDS[:3], WORDS[3:5]]).numpy()
    np.testing.assert_array_equal(layers[:, :3], expected[:, 0, :3])
    np.testing.assert_array_equal(layers[:, 3:5], expected[:, 1, :2])


def test_backend_keep_layers_and_gradient_path(backend: ElmoBackend, vocab) -> None:
    docs = [sentence_doc(vocab, WORDS, SENT_STARTS), Doc(vocab, words=["  "]), Doc(vocab, words=[])]
    [full, space, empty] = encode(backend, docs, max_batch_tokens=8)
    assert space.shape == (3, 0, 16) and empty.shape == (3, 0, 16)
    with torch.no_grad():
        last = backend.encode_docs(docs, max_batch_tokens=8, keep_layers=[2])
    np.testing.assert_array_equal(last[0].layers.numpy(), full[[2]])
    # With autograd (fine-tuning), rows are concatenated instead of copied, and the
    # LSTM runs its autograd-friendly loop instead of the in-place inference one:
    # the same values up to float32 rounding.
    with torch.enable_grad():
        graded = backend.encode_docs(docs, max_batch_tokens=8, keep_layers=[0, 2])
    assert graded[0].layers.requires_grad
    # The token layer too: inference runs the char CNN's dense layers through oneDNN
    # (encoders.elmo.fast_linear), autograd through F.linear.
    np.testing.assert_allclose(graded[0].layers.detach().numpy()[0], full[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(graded[0].layers.detach().numpy(), full[[0, 2]], rtol=0, atol=2e-6)
    assert graded[1].layers.shape == (2, 0, 16)


def test_backend_word_cache(backend: ElmoBackend, vocab) -> None:
    cache = backend.word_cache
    docs = [sentence_doc(vocab, WORDS, SENT_STARTS)]
    first = encode(backend, docs)
    n_distinct = len(set(WORDS)) + 2  # and <S>, </S>
    assert (cache.hits, cache.misses, len(cache)) == (0, n_distinct, n_distinct)
    second = encode(backend, docs)
    assert (cache.hits, cache.misses) == (n_distinct, n_distinct)
    uncached = ElmoBackend(backend.bilm, name="tiny", cache_size=0)
    third = encode(uncached, docs)
    assert len(uncached.word_cache) == 0
    for a, b, c in zip(first, second, third):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    backend.weights_changed()
    assert len(cache) == 0


def test_embed_distinct_words_only_embeds_unseen_words() -> None:
    cache = WordEmbeddingCache()
    calls: List[List[str]] = []

    def embed(words: List[str]) -> torch.Tensor:
        calls.append(list(words))
        return torch.tensor([[float(ord(w[0])), float(len(w))] for w in words]).reshape(-1, 2)

    embed_distinct_words(["a", "b", "a"], embed, cache)
    table, index = embed_distinct_words(["b", "c", "a", "c"], embed, cache)
    embed_distinct_words(["a", "c"], embed, cache)
    assert calls == [["a", "b"], ["c"]]  # the last call is all hits
    assert index.tolist() == [0, 1, 2, 1]
    assert table[index].tolist() == [[98.0, 1.0], [99.0, 1.0], [97.0, 1.0], [99.0, 1.0]]
    # one lookup per distinct word per call: misses a, b | hit b, a, miss c | hit a, c
    assert cache.stats == {"hits": 4, "misses": 3, "size": 3, "max_entries": 100_000}
    table, index = embed_distinct_words(["x", "x"], embed, None)  # no cache: computed every time
    assert calls[-1] == ["x"] and index.tolist() == [0, 0]


def test_word_cache_evicts_least_recently_used() -> None:
    cache = WordEmbeddingCache(max_entries=2)
    cache.put("a", torch.zeros(2))
    cache.put("b", torch.ones(2))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", torch.ones(2))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.hits == 0 and cache.misses == 0


def _spans_hook(spans: Sequence[Tuple[int, int]]):
    return lambda doc: [doc[start:end] for start, end in spans]


@pytest.mark.parametrize(
    "spans",
    [
        [(5, 12), (0, 5), (12, 16)],  # out of order
        [(0, 7), (5, 12), (12, 16)],  # overlapping
        [(0, 4), (5, 12), (12, 16)],  # a gap (token 4 in no sentence)
        [(0, 5), (5, 12)],  # the end is not covered
    ],
    ids=["out-of-order", "overlap", "gap", "short"],
)
def test_untrustworthy_sentences_fall_back_to_chunks(
    tiny_model: ElmoBiLM, vocab, spans: List[Tuple[int, int]]
) -> None:
    """Sentences from a custom hook that are not ordered, disjoint and covering are
    ignored: the Doc is chunked (one warning per call) and every row is its token's."""
    backend = ElmoBackend(tiny_model, name="tiny", chunk_size=4)
    chunked = encode(backend, [Doc(vocab, words=WORDS)])[0]
    docs = []
    for _ in range(3):
        doc = sentence_doc(vocab, WORDS, SENT_STARTS)
        doc.user_hooks["sents"] = _spans_hook(spans)
        docs.append(doc)
    with pytest.warns(UserWarning, match="3 of 4 Docs have sentences") as record:
        outputs = encode(backend, [*docs, sentence_doc(vocab, WORDS, SENT_STARTS)])
    assert len(record) == 1
    for layers in outputs[:3]:
        np.testing.assert_array_equal(layers, chunked)
    # Every token has its own row: the context-free layer is its word's embedding.
    with torch.no_grad():
        embeddings = tiny_model.token_embeddings(torch.from_numpy(elmo_char_ids(WORDS))).numpy()
    np.testing.assert_array_equal(outputs[0][0, :, :8], embeddings)
    # The Doc with trustworthy sentences is still encoded by sentence.
    assert not np.array_equal(outputs[3], chunked)


def test_valid_sentences_from_a_hook_are_used(backend: ElmoBackend, vocab) -> None:
    doc = Doc(vocab, words=WORDS, sent_starts=[i == 0 for i in range(len(WORDS))])
    doc.user_hooks["sents"] = _spans_hook([(0, 5), (5, 12), (12, 16)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [layers] = encode(backend, [doc])
    np.testing.assert_array_equal(layers, encode(backend, [sentence_doc(vocab, WORDS, SENT_STARTS)])[0])


def test_long_lone_segment_is_not_padded_to_row_multiple(
    tiny_model: ElmoBiLM, vocab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone long segment runs with 1 row in the big tensors, in bounded time blocks."""
    words = [f"w{k % 50}" for k in range(3000)]
    backend = ElmoBackend(tiny_model, name="tiny", chunk_size=len(words))
    blocks: List[List[Tuple[int, int]]] = []
    original = elmo_module._gate_blocks
    monkeypatch.setattr(
        elmo_module, "_gate_blocks", lambda counts, rows: blocks.append(original(counts, rows)) or blocks[-1]
    )
    monkeypatch.setattr(elmo_module, "INFERENCE_GATE_BUDGET", 1024 * 4 * tiny_model.options.lstm_dim)
    [layers] = encode(backend, [Doc(vocab, words=words)])
    assert layers.shape == (3, 3000, 16) and np.all(np.isfinite(layers))
    # One row, so blocks of 1,024 steps (the budget's rows), covering all 3,002 steps.
    assert len(blocks) == tiny_model.options.n_layers
    for layer_blocks in blocks:
        assert max(end - start for start, end in layer_blocks) == 1024
        assert layer_blocks[0][0] == 0 and layer_blocks[-1][1] == 3002


# --------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------


def test_hdf5_round_trip_is_exact(
    tmp_path: Path, tiny_files: tuple[Path, Path], tiny_model: ElmoBiLM
) -> None:
    save_elmo_options(tiny_model, tmp_path / "options.json")
    save_elmo_hdf5(tiny_model, tmp_path / "weights.hdf5")
    with h5py.File(tiny_files[1], "r") as original, h5py.File(tmp_path / "weights.hdf5", "r") as saved:
        for name in expected_hdf5_shapes(tiny_model.options):
            np.testing.assert_array_equal(saved[name][...], original[name][...], err_msg=name)
    reloaded = load_elmo(tmp_path / "options.json", tmp_path / "weights.hdf5")
    assert reloaded.options == tiny_model.options
    assert torch.equal(run(reloaded, SENTENCES), run(tiny_model, SENTENCES))


def test_safetensors_round_trip(tmp_path: Path, tiny_model: ElmoBiLM) -> None:
    save_elmo_safetensors(tiny_model, tmp_path / "elmo.safetensors")
    from_file = load_elmo_safetensors(tmp_path / "elmo.safetensors")
    assert from_file.options == tiny_model.options
    assert torch.equal(run(from_file, SENTENCES), run(tiny_model, SENTENCES))


def test_expected_state_shapes_match_the_model(tiny_model: ElmoBiLM) -> None:
    expected = expected_state_shapes(tiny_model.options)
    assert expected == {name: tuple(t.shape) for name, t in tiny_model.state_dict().items()}


def test_options_round_trip(tiny_files: tuple[Path, Path]) -> None:
    options = ElmoOptions.from_file(tiny_files[0])
    assert ElmoOptions.from_dict(options.to_dict()) == options
    assert options.filters == ((1, 4), (2, 8), (3, 16)) and options.n_filters_total == 28


# --------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------


def _rewrite_dataset(path: Path, name: str, value: np.ndarray | None) -> None:
    with h5py.File(path, "a") as handle:
        del handle[name]
        if value is not None:
            handle[name] = value


def test_missing_weights_file(tmp_path: Path, tiny_files: tuple[Path, Path]) -> None:
    with pytest.raises(CheckpointError, match="no_such_weights.hdf5"):
        load_elmo(tiny_files[0], tmp_path / "no_such_weights.hdf5")


def test_missing_options_file(tmp_path: Path, tiny_files: tuple[Path, Path]) -> None:
    with pytest.raises(CheckpointError, match="missing_options.json"):
        load_elmo(tmp_path / "missing_options.json", tiny_files[1])


def test_corrupt_hdf5(tmp_path: Path, tiny_files: tuple[Path, Path]) -> None:
    bad = tmp_path / "corrupt_weights.hdf5"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="corrupt_weights.hdf5") as info:
        load_elmo(tiny_files[0], bad)
    assert "HDF5" in str(info.value)


def test_missing_dataset(tmp_path: Path) -> None:
    options_path, weights_path = write_random_elmo(tmp_path)
    _rewrite_dataset(weights_path, "CNN_high_0/W_carry", None)
    with pytest.raises(CheckpointError) as info:
        load_elmo(options_path, weights_path)
    message = str(info.value)
    assert "weights.hdf5" in message and "CNN_high_0/W_carry" in message and "missing" in message


def test_missing_lstm_layer(tmp_path: Path) -> None:
    options_path, weights_path = write_random_elmo(tmp_path, n_layers=1)
    options = json.loads(options_path.read_text())
    options["lstm"]["n_layers"] = 2
    options_path.write_text(json.dumps(options))
    with pytest.raises(CheckpointError, match=r"RNN_0/RNN/MultiRNNCell/Cell1/LSTMCell/W_0"):
        load_elmo(options_path, weights_path)


def test_shape_mismatch(tmp_path: Path) -> None:
    options_path, weights_path = write_random_elmo(tmp_path)
    _rewrite_dataset(weights_path, "CNN_proj/W_proj", np.zeros((28, 9), dtype=np.float32))
    with pytest.raises(CheckpointError) as info:
        load_elmo(options_path, weights_path)
    message = str(info.value)
    for part in ("weights.hdf5", "CNN_proj/W_proj", "(28, 9)", "(28, 8)", "options.json"):
        assert part in message, (part, message)


def test_non_finite_weights(tmp_path: Path) -> None:
    options_path, weights_path = write_random_elmo(tmp_path)
    _rewrite_dataset(weights_path, "char_embed", np.full((261, 4), np.nan, dtype=np.float32))
    with pytest.raises(CheckpointError, match="char_embed"):
        load_elmo(options_path, weights_path)


@pytest.mark.parametrize(
    ("section", "key", "value", "setting"),
    [
        ("lstm", "use_skip_connections", False, "use_skip_connections"),
        ("char_cnn", "activation", "gelu", "activation"),
        ("lstm", "dim", 0, "lstm.dim"),
        ("lstm", "cell_clip", "three", "cell_clip"),
        ("char_cnn", "filters", [[1, 4], [2]], "filters"),
        ("char_cnn", "max_characters_per_token", 20, "max_characters_per_token"),
    ],
)
def test_invalid_options(tmp_path: Path, section: str, key: str, value: object, setting: str) -> None:
    options_path, weights_path = write_random_elmo(tmp_path)
    options = json.loads(options_path.read_text())
    options[section][key] = value
    options_path.write_text(json.dumps(options))
    with pytest.raises(CheckpointError) as info:
        load_elmo(options_path, weights_path)
    message = str(info.value)
    assert "options.json" in message and setting in message, message


def test_options_not_json(tmp_path: Path, tiny_files: tuple[Path, Path]) -> None:
    bad = tmp_path / "broken_options.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="broken_options.json"):
        load_elmo(bad, tiny_files[1])


# --------------------------------------------------------------------------
# settings and shapes are checked before anything is allocated (issue 7, 2.2)
# --------------------------------------------------------------------------


@pytest.fixture
def no_model_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if an ElmoBiLM is built with real storage (the ``meta`` device allocates nothing)."""
    original = ElmoBiLM.__init__

    def guarded(self: ElmoBiLM, options: ElmoOptions) -> None:
        if torch.empty(0).device.type != "meta":
            raise AssertionError("the model was built before the checkpoint was checked")
        original(self, options)

    monkeypatch.setattr(ElmoBiLM, "__init__", guarded)


def _with_options(options_path: Path, section: str, key: str, value: object) -> None:
    options = json.loads(options_path.read_text())
    target = options[section]
    for part in key.split(".")[:-1]:
        target = target[part]
    target[key.split(".")[-1]] = value
    options_path.write_text(json.dumps(options))


@pytest.mark.parametrize(
    ("section", "key", "value", "setting"),
    [
        ("lstm", "dim", 2_000_000, "lstm.dim"),
        ("lstm", "dim", 2e6, "lstm.dim"),
        ("lstm", "dim", "4096", "lstm.dim"),
        ("lstm", "dim", True, "lstm.dim"),
        ("lstm", "dim", -5, "lstm.dim"),
        ("lstm", "projection_dim", 10**30, "lstm.projection_dim"),
        ("lstm", "n_layers", 10_000, "lstm.n_layers"),
        ("lstm", "n_layers", 2.5, "lstm.n_layers"),
        ("char_cnn", "n_highway", 1_000_000, "char_cnn.n_highway"),
        ("char_cnn", "embedding.dim", 10**9, "char_cnn.embedding.dim"),
        ("char_cnn", "filters", [[1, 10**9]], "char_cnn.filters"),
        ("char_cnn", "filters", [[1, 60_000], [2, 60_000]], "char_cnn.filters"),
        ("char_cnn", "filters", [[1, 1]] * 1000, "char_cnn.filters"),
        ("char_cnn", "n_characters", [262], "char_cnn.n_characters"),
        ("char_cnn", "activation", ["relu"], "char_cnn.activation"),
    ],
)
def test_absurd_options_fail_before_allocation(
    tmp_path: Path, no_model_built: None, section: str, key: str, value: object, setting: str
) -> None:
    options_path, weights_path = write_random_elmo(tmp_path)
    _with_options(options_path, section, key, value)
    with pytest.raises(CheckpointError) as info:
        load_elmo(options_path, weights_path)
    message = str(info.value)
    assert str(options_path) in message and setting in message, message


def test_options_describing_a_giant_model_fail(tmp_path: Path, no_model_built: None) -> None:
    """Every setting in range, but together 17 G parameters: rejected by the total."""
    options_path, weights_path = write_random_elmo(tmp_path)
    _with_options(options_path, "lstm", "dim", 32_768)
    _with_options(options_path, "lstm", "projection_dim", 16_384)
    with pytest.raises(CheckpointError, match=f"limit of {MAX_PARAMETERS:,}") as info:
        load_elmo(options_path, weights_path)
    assert str(options_path) in str(info.value) and "lstm.dim=32768" in str(info.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "dataset"),
    [
        ("lstm", "dim", 4096, "RNN_0/RNN/MultiRNNCell/Cell0/LSTMCell/W_0"),
        ("lstm", "projection_dim", 2048, "CNN_proj/W_proj"),
        ("char_cnn", "filters", [[1, 4], [2, 8], [3, 4096]], "CNN/W_cnn_2"),
        ("char_cnn", "n_highway", 64, "CNN_high_1/W_transform"),
    ],
)
def test_weights_that_do_not_fit_the_options_fail_before_allocation(
    tmp_path: Path, no_model_built: None, monkeypatch: pytest.MonkeyPatch,
    section: str, key: str, value: object, dataset: str,
) -> None:
    """Options in range but larger than the weights: the hdf5 header shapes are compared
    with the options first; no weight is read and no model is built."""
    options_path, weights_path = write_random_elmo(tmp_path)
    _with_options(options_path, section, key, value)
    reads: List[str] = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, k: reads.append(self.name) or original(self, k))
    with pytest.raises(CheckpointError) as info:
        load_elmo(options_path, weights_path)
    message = str(info.value)
    assert str(weights_path) in message and dataset in message and str(options_path) in message, message
    assert reads == []


def _write_safetensors(path: Path, model: ElmoBiLM, options: Dict, extra: Optional[Dict] = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update(extra or {})
    metadata = {"format": "spacy_ctx.elmo.v1", "options": json.dumps(options)}
    save_file(state, str(path), metadata=metadata)


def test_safetensors_header_checked_before_allocation(
    tmp_path: Path, tiny_model: ElmoBiLM, no_model_built: None
) -> None:
    path = tmp_path / "model.safetensors"
    big = tiny_model.options.to_dict()
    big["lstm"]["dim"] = 8192  # in range, 300 M parameters if it were built
    big["lstm"]["projection_dim"] = 1024
    _write_safetensors(path, tiny_model, big)
    with pytest.raises(CheckpointError, match="has shape") as info:
        load_elmo_safetensors(path)
    assert str(path) in str(info.value)

    absurd = tiny_model.options.to_dict()
    absurd["char_cnn"]["n_highway"] = 1_000_000
    _write_safetensors(path, tiny_model, absurd)
    with pytest.raises(CheckpointError, match="char_cnn.n_highway") as info:
        load_elmo_safetensors(path)
    assert str(path) in str(info.value)

    _write_safetensors(path, tiny_model, tiny_model.options.to_dict(), {"extra": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra'"):
        load_elmo_safetensors(path)


def test_safetensors_non_finite_weights(tmp_path: Path, tiny_files: tuple[Path, Path]) -> None:
    model = load_elmo(*tiny_files)
    with torch.no_grad():
        model.lstm.layers[0].bias[0, 3] = float("nan")
    path = tmp_path / "model.safetensors"
    save_elmo_safetensors(model, path)
    with pytest.raises(CheckpointError, match="lstm.layers.0.bias"):
        load_elmo_safetensors(path)


# --------------------------------------------------------------------------
# hdf5 links (issue 7, 2.8)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["external", "soft"])
def test_dangling_hdf5_link_is_a_checkpoint_error(tmp_path: Path, link: str) -> None:
    options_path, weights_path = write_random_elmo(tmp_path)
    name = "CNN_high_0/W_carry"
    with h5py.File(weights_path, "a") as handle:
        del handle[name]
        if link == "external":
            handle[name] = h5py.ExternalLink(str(tmp_path / "gone.hdf5"), "/W_carry")
        else:
            handle[name] = h5py.SoftLink("/nowhere")
    with pytest.raises(CheckpointError) as info:
        load_elmo(options_path, weights_path)
    message = str(info.value)
    assert str(weights_path) in message and name in message, message
    assert ("gone.hdf5" in message) if link == "external" else ("/nowhere" in message)


def test_working_external_link_is_followed(tmp_path: Path, tiny_model: ElmoBiLM) -> None:
    options_path, weights_path = write_random_elmo(tmp_path / "m", seed=0)
    name = "CNN_high_0/W_carry"
    with h5py.File(weights_path, "a") as handle:
        value = handle[name][...]
        del handle[name]
        handle[name] = h5py.ExternalLink(str(tmp_path / "part.hdf5"), "/W_carry")
    with h5py.File(tmp_path / "part.hdf5", "w") as part:
        part["W_carry"] = value
    assert torch.equal(run(load_elmo(options_path, weights_path), SENTENCES), run(tiny_model, SENTENCES))
