"""Tests of the pure-PyTorch ELMo biLM, its char ids and its checkpoint files.

Parity tests use AllenNLP's ELMo fixture (see its README.md) and skip when it is
absent; everything else runs on tiny random checkpoints from ``write_random_elmo``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Dict, List, Sequence

import h5py
import numpy as np
import pytest
import torch

from spacy_ctx.encoders.elmo import ElmoBiLM, ElmoOptions, WordEmbeddingCache, embed_words
from spacy_ctx.encoders.elmo_checkpoint import (
    elmo_from_bytes,
    elmo_to_bytes,
    expected_hdf5_shapes,
    load_elmo,
    load_elmo_safetensors,
    save_elmo_hdf5,
    save_elmo_options,
    save_elmo_safetensors,
)
from spacy_ctx.errors import CheckpointError
from spacy_ctx.pieces.chars import BOS_CHAR_IDS, EOS_CHAR_IDS, elmo_char_ids

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
    ids, lengths = batch_char_ids(sentences)
    with torch.no_grad():
        return model(ids, lengths)


SENTENCES = [
    ["The", "cat", "sat", "on", "the", "mat", "."],
    ["Hello"],
    ["Crème", "brûlée", "über", "東京", "🙂", "naïve"],
    ["a", "b", "c", "d"],
    "An extraordinarily long sentence with more tokens than the others here".split(),
]


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


def test_fixture_all_layers_match_allennlp_fresh_state(
    fixture_dir: Path, fixture_model: ElmoBiLM
) -> None:
    reference = np.load(fixture_dir / "allennlp_outputs.npz")
    worst = np.zeros(3)
    for i, batch in enumerate(fixture_batches(fixture_dir)):
        ours = run(fixture_model, batch).numpy()
        expected = reference[f"batch{i}_activations_fresh"]
        assert ours.shape == (3, 3, expected.shape[2] - 2, 32)
        for row, sentence in enumerate(batch):
            n = len(sentence)
            # AllenNLP includes <S> at 0 and </S> at n + 1; we return tokens only.
            diff = np.abs(ours[:, row, :n] - expected[:, row, 1 : n + 1]).max(axis=(1, 2))
            worst = np.maximum(worst, diff)
            assert not ours[:, row, n:].any(), "positions past the sentence must be zero"
    assert worst.max() < 1e-5, f"max abs difference per layer: {worst}"


def test_fixture_top_layer_matches_tensorflow(fixture_dir: Path, fixture_model: ElmoBiLM) -> None:
    groups = json.loads((fixture_dir / "sentences.json").read_text(encoding="utf-8"))
    for k in range(3):
        # Only sentence 0 of each file: TF carried LSTM state across the later ones.
        sentence = groups[k][0].split()
        with h5py.File(fixture_dir / f"lm_embeddings_{k}.hdf5", "r") as handle:
            tf_output = handle["0"][...]
        expected = np.concatenate([tf_output[0], tf_output[1]], axis=-1)
        ours = run(fixture_model, [sentence])[2, 0].numpy()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


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
    for name in ("elmo.py", "elmo_checkpoint.py"):
        imported = _imported_top_level_modules(REPO_ROOT / "spacy_ctx/encoders" / name)
        assert not imported & {"spacy", "thinc"}, (name, imported)
    assert "h5py" not in _imported_top_level_modules(REPO_ROOT / "spacy_ctx/encoders/elmo.py")


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
        via_embeddings = tiny_model(None, lengths, token_embeddings=embeddings)
        via_method = tiny_model.forward_from_embeddings(embeddings, lengths)
    assert torch.equal(direct, via_embeddings)
    assert torch.equal(direct, via_method)


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
    return 1.0 / (1.0 + np.exp(-x))


def reference_bilm(weights_path: Path, options: Dict, words: Sequence[str]) -> np.ndarray:
    """bilm-tf's maths for one sentence in float64: (n_layers + 1, len(words), 2 * proj)."""
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
                    state_c = np.clip(state_c, -cell_clip, cell_clip)
                state_m = (_sigmoid(o_g) * np.tanh(state_c)) @ w[f"{prefix}/W_P_0"]
                if proj_clip:
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
    out = run(model, sentences).numpy()
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

    clipped.lstm.clip_counts = {}
    free.lstm.clip_counts = {}
    out_clipped = run(clipped, SENTENCES)
    out_free = run(free, SENTENCES)
    counts = {key: int(value) for key, value in clipped.lstm.clip_counts.items()}
    assert counts["cell"] > 0 and counts["projection"] > 0, counts
    assert free.lstm.clip_counts == {}  # no clip, nothing counted
    clipped.lstm.clip_counts = None

    # lstm_1 has no skip connection: bounded by proj_clip; lstm_2 adds its input.
    assert out_clipped[1].abs().max() <= 3.0
    assert out_clipped[2].abs().max() <= 6.0
    assert out_free[1].abs().max() > 3.0
    assert not torch.allclose(out_clipped[1:], out_free[1:])
    assert torch.equal(out_clipped[0], out_free[0])  # token layer is not clipped


def test_clip_counter_is_zero_on_small_weights(tiny_model: ElmoBiLM) -> None:
    tiny_model.lstm.clip_counts = {}
    try:
        run(tiny_model, [["small"]])
        assert int(tiny_model.lstm.clip_counts["cell"]) == 0
    finally:
        tiny_model.lstm.clip_counts = None


# --------------------------------------------------------------------------
# word cache
# --------------------------------------------------------------------------


def test_word_cache_counts_and_matches_uncached(tiny_model: ElmoBiLM) -> None:
    cache = WordEmbeddingCache(max_entries=1000)
    with torch.no_grad():
        first, lengths = tiny_model.encode_words(SENTENCES, cache)
        n_distinct = len({w for s in SENTENCES for w in s})
        assert (cache.hits, cache.misses, len(cache)) == (0, n_distinct, n_distinct)
        second, _ = tiny_model.encode_words(SENTENCES, cache)
        assert cache.hits == n_distinct and cache.misses == n_distinct
        uncached, _ = tiny_model.encode_words(SENTENCES)
    assert torch.equal(first, second)
    assert torch.equal(first, uncached)
    assert torch.equal(first, run(tiny_model, SENTENCES))
    assert lengths.tolist() == [len(s) for s in SENTENCES]


def test_embed_words_only_runs_cnn_on_unseen_words(tiny_model: ElmoBiLM) -> None:
    cache = WordEmbeddingCache()
    calls: List[int] = []
    handle = tiny_model.char_encoder.register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0])
    )
    try:
        with torch.no_grad():
            embed_words(tiny_model, ["a", "b", "a"], cache)
            result = embed_words(tiny_model, ["b", "c", "a", "c"], cache)
            embed_words(tiny_model, ["a", "c"], cache)
    finally:
        handle.remove()
    assert calls == [2, 1]  # {"a", "b"}, then only "c"; the last call is all hits
    with torch.no_grad():
        expected = tiny_model.token_embeddings(torch.from_numpy(elmo_char_ids(["b", "c", "a", "c"])))
    assert torch.equal(result, expected)
    # one lookup per distinct word per call: misses a, b | hit b, a, miss c | hit a, c
    assert cache.stats == {"hits": 4, "misses": 3, "size": 3, "max_entries": 100_000}


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
    from_bytes = elmo_from_bytes(elmo_to_bytes(tiny_model))
    expected = run(tiny_model, SENTENCES)
    assert torch.equal(run(from_file, SENTENCES), expected)
    assert torch.equal(run(from_bytes, SENTENCES), expected)


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
