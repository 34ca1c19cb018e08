"""The GPT-2 family: config reading, weight names, and every hidden state equal to
Hugging Face's ``GPT2Model`` on a right-padded batch (HF state dicts mapped through
the Family, and checkpoints loaded with ``checkpoint.load_encoder``: bare, with an
LM head whose tied weight is absent or present, with old mask buffers); causality.
Bad configs are tested in ``test_family_configs.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from spacy_ctx.encoders import gpt2
from spacy_ctx.encoders.family import Family, family_for
from spacy_ctx.errors import CheckpointError

from . import tiny_gpt2

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4
LENGTHS = (17, 9, 2)  # a right-padded batch: full, half, nearly empty


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory) -> Path:
    return tiny_gpt2.write(tmp_path_factory.mktemp("gpt2_bare"))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return tiny_gpt2.write(tmp_path_factory.mktemp("gpt2_lm"), seed=1, head="lm")


# -- helpers ------------------------------------------------------------------------------
def _batch(vocab_size: int, lengths=LENGTHS, seed: int = 0):
    """Random ids, right-padded with 0, and the matching 1/0 attention mask."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.zeros((len(lengths), length), dtype=torch.long)
    mask = torch.zeros((len(lengths), length), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(0, vocab_size, (n,), generator=generator)
        mask[row, :n] = 1
    return ids, mask


def _hf(path: Path, head: str = None):
    cls = transformers.GPT2Model if head is None else transformers.GPT2LMHeadModel
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def _ours_from_hf(state: Dict[str, torch.Tensor], config_dict: dict) -> gpt2.Gpt2Encoder:
    """Our encoder with an HF state dict mapped through the family's names, the way
    the generic loader does: find the prefix, skip heads and skipped buffers,
    rename, transpose Conv1D weights, load strictly."""
    family = family_for("gpt2")
    config = family.read_config(config_dict, "config.json")
    encoder = family.build(config).eval()
    prefix = next(p for p in family.prefixes if any(k.startswith(p + "wte.") for k in state))
    ours = {}
    for name, tensor in state.items():
        if not name.startswith(prefix):
            assert family.is_head(name), name
            continue
        inner = name[len(prefix):]
        if family.is_skipped(inner):
            continue
        our_name = family.to_ours(inner)
        assert our_name is not None, f"no rule for {inner}"
        ours[our_name] = tensor.t() if family.is_transposed(our_name) else tensor
    encoder.load_state_dict(ours, strict=True)
    return encoder


def _assert_layers_equal(ours: List[torch.Tensor], theirs, mask: torch.Tensor) -> None:
    assert len(ours) == len(theirs)
    real = mask.bool()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        diff = (a[real] - b[real]).abs().max().item()
        assert diff <= TOLERANCE, f"layer {i}: max abs diff {diff}"


def _parity(path: Path, head: str = None) -> None:
    hf = _hf(path, head)
    config_dict = json.loads((path / "config.json").read_text())
    ours = _ours_from_hf(hf.state_dict(), config_dict)
    ids, mask = _batch(config_dict["vocab_size"])
    with torch.no_grad():
        base = hf if head is None else hf.transformer
        theirs = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        _assert_layers_equal(ours(ids, mask), theirs, mask)


# -- config -----------------------------------------------------------------------------------
def test_config_maps_gpt2_keys():
    raw = tiny_gpt2.config(n_inner=None)
    config = gpt2.read_config(raw, "m/config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 3, 4)
    assert config.max_position_embeddings == 64
    assert config.intermediate_size == 4 * 64
    assert config.activation_function == "gelu_new"
    assert config.pad_token_id == raw["eos_token_id"]  # no pad id: eos stands in
    assert config.raw == raw
    assert gpt2.read_config(tiny_gpt2.config(n_inner=80), "c").intermediate_size == 80
    # An eos id outside the vocabulary is not used for padding.
    assert gpt2.read_config(tiny_gpt2.config(eos_token_id=50256), "c").pad_token_id == 0


# -- family ---------------------------------------------------------------------------------
def test_family_registered():
    family = family_for("gpt2")
    assert isinstance(family, Family) and family is gpt2.GPT2
    assert family.name == "gpt2" and family.causal and family.tokenizer_kind == "bpe"
    config = gpt2.read_config(tiny_gpt2.config(), "c")
    assert family.usable_positions(config) == 64
    assert family.prefixes == ("transformer.", "")
    assert family.is_skipped("h.3.attn.bias") and family.is_skipped("h.0.attn.masked_bias")
    assert not family.is_skipped("h.3.attn.c_attn.bias")
    for head in ("lm_head.weight", "score.weight", "multiple_choice_head.summary.weight"):
        assert family.is_head(head)
    assert not family.is_head("transformer.wte.weight")


def test_names_cover_the_module_both_ways(bare_dir):
    """Every tensor of ours has a checkpoint name that maps back to it, the meta-device
    shapes equal the real module's, and the transposed ones are the Conv1D weights."""
    family = family_for("gpt2")
    config = family.read_config(json.loads((bare_dir / "config.json").read_text()), "c")
    module = family.build(config)
    state = module.state_dict()
    assert family.state_shapes(config) == {k: tuple(v.shape) for k, v in state.items()}
    hf_state = _hf(bare_dir).state_dict()
    mapped = {}
    for ours, tensor in state.items():
        theirs = family.to_checkpoint(ours)
        assert theirs in hf_state, (ours, theirs)
        assert family.to_ours(theirs) == ours
        shape = tuple(hf_state[theirs].shape)
        mapped[theirs] = shape[::-1] if family.is_transposed(ours) else shape
        assert mapped[theirs] == tuple(tensor.shape), ours
    assert sorted(mapped) == sorted(k for k in hf_state if not family.is_skipped(k))
    transposed = sorted(k for k in state if family.is_transposed(k))
    assert len(transposed) == 4 * config.num_hidden_layers
    assert all(k.endswith(".weight") for k in transposed)


# -- parity ---------------------------------------------------------------------------------
def test_every_layer_equals_hf(bare_dir):
    _parity(bare_dir)


def test_every_layer_equals_hf_lm_head_checkpoint(lm_dir):
    _parity(lm_dir, head="lm")


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_inner": 80, "activation_function": "gelu", "layer_norm_epsilon": 1e-3},
        {"scale_attn_weights": False, "n_layer": 2},
    ],
    ids=["inner-gelu-eps", "unscaled"],
)
def test_variants_equal_hf(tmp_path, overrides):
    _parity(tiny_gpt2.write(tmp_path, seed=2, **overrides))


def test_last_layer_is_after_final_norm(bare_dir):
    """HF's last hidden state is ``ln_f`` of the last block; ours too."""
    config_dict = json.loads((bare_dir / "config.json").read_text())
    encoder = _ours_from_hf(_hf(bare_dir).state_dict(), config_dict)
    ids, mask = _batch(config_dict["vocab_size"])
    with torch.no_grad():
        outputs = encoder(ids, mask)
        hidden = outputs[-2]
        for layer in encoder.layers[-1:]:
            hidden = layer(hidden, gpt2.causal_mask(mask, ids.shape[1], ids.device))
        torch.testing.assert_close(outputs[-1], encoder.final_norm(hidden))
    assert len(outputs) == encoder.n_layers == config_dict["n_layer"] + 1


def test_causal_and_padding_independent(bare_dir):
    config_dict = json.loads((bare_dir / "config.json").read_text())
    encoder = _ours_from_hf(_hf(bare_dir).state_dict(), config_dict)
    ids, mask = _batch(config_dict["vocab_size"])
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % config_dict["vocab_size"]
    with torch.no_grad():
        before = encoder(ids, mask)
        after = encoder(changed, mask)
        alone = encoder(ids[1:2, : LENGTHS[1]], mask[1:2, : LENGTHS[1]])
        all_padding = encoder(ids, torch.zeros_like(mask))
    for a, b in zip(before, after):
        torch.testing.assert_close(a[0, :10], b[0, :10], rtol=0, atol=1e-6)
        assert not torch.allclose(a[0, 10:], b[0, 10:])  # later pieces do change
        torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)
    for a, b in zip(before, alone):
        torch.testing.assert_close(a[1:2, : LENGTHS[1]], b, rtol=0, atol=1e-5)
    assert all(torch.isfinite(t).all() for t in all_padding)


def test_too_long_input_is_refused(bare_dir):
    config = gpt2.read_config(tiny_gpt2.config(), "c")
    encoder = gpt2.Gpt2Encoder(config)
    with pytest.raises(ValueError, match="65 positions but the model supports 64"):
        encoder(torch.zeros((1, 65), dtype=torch.long))


# -- through the checkpoint loader, where it exists --------------------------------------
def _load_encoder():
    if importlib.util.find_spec("spacy_ctx.encoders.checkpoint") is None:
        pytest.skip("spacy_ctx.encoders.checkpoint is not there yet")
    from spacy_ctx.encoders import checkpoint

    if not hasattr(checkpoint, "load_encoder"):
        pytest.skip("spacy_ctx.encoders.checkpoint has no load_encoder yet")
    return checkpoint.load_encoder


def _rewrite_weights(path: Path, add: Dict[str, torch.Tensor]) -> None:
    """Add tensors to a saved checkpoint's model.safetensors (a tied ``lm_head.weight``
    written out, old causal-mask buffers)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    state = load_file(str(file))
    state.update(add)
    save_file(state, str(file), metadata={"format": "pt"})


def _assert_loaded_equals_hf(path: Path, head: str = None) -> None:
    loaded = _load_encoder()(path)
    assert loaded.family is gpt2.GPT2 and isinstance(loaded.encoder, gpt2.Gpt2Encoder)
    assert loaded.config.raw == json.loads((path / "config.json").read_text())
    hf = _hf(path, head)
    base = hf if head is None else hf.transformer
    ids, mask = _batch(loaded.config.vocab_size, seed=3)
    with torch.no_grad():
        theirs = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        _assert_layers_equal(loaded.encoder(ids, mask), theirs, mask)


def test_load_encoder_bare(bare_dir):
    _assert_loaded_equals_hf(bare_dir)


@pytest.mark.parametrize("tied_head", ["absent", "present"])
def test_load_encoder_lm_head_checkpoint(tmp_path, tied_head):
    path = tiny_gpt2.write(tmp_path, seed=1, head="lm")
    if tied_head == "present":
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as handle:
            wte = handle.get_tensor("transformer.wte.weight")
        _rewrite_weights(path, {"lm_head.weight": wte.clone()})
    _assert_loaded_equals_hf(path, head="lm")


def test_load_encoder_skips_old_mask_buffers(tmp_path):
    path = tiny_gpt2.write(tmp_path, seed=3)
    causal = torch.ones((64, 64), dtype=torch.bool).tril()[None, None]
    buffers = {}
    for n in range(3):
        buffers[f"h.{n}.attn.bias"] = causal.clone()
        buffers[f"h.{n}.attn.masked_bias"] = torch.tensor(-1e4)
    _rewrite_weights(path, buffers)
    _assert_loaded_equals_hf(path)


def test_load_encoder_round_trips_and_exports(tmp_path, bare_dir):
    """save_encoder -> load_encoder gives the same outputs; export_state_dict gives
    HF names and Conv1D layout that GPT2Model loads strictly."""
    from spacy_ctx.encoders import checkpoint

    load_encoder = _load_encoder()
    loaded = load_encoder(bare_dir)
    checkpoint.save_encoder(loaded.encoder, loaded.family, loaded.config, tmp_path / "saved")
    again = load_encoder(tmp_path / "saved")
    ids, mask = _batch(loaded.config.vocab_size, seed=5)
    with torch.no_grad():
        for a, b in zip(loaded.encoder(ids, mask), again.encoder(ids, mask)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    hf = _hf(bare_dir)
    exported = checkpoint.export_state_dict(loaded.encoder, loaded.family)
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)


def test_load_encoder_bad_config_fails_before_building(tmp_path, bare_dir, monkeypatch):
    load_encoder = _load_encoder()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((bare_dir / name).read_bytes())
    raw = json.loads((bare_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "n_head": 5}))

    def no_build(*args, **kwargs):
        raise AssertionError("a module was built from an invalid config")

    monkeypatch.setattr(gpt2.Gpt2Encoder, "__init__", no_build)
    with pytest.raises(CheckpointError, match=r"config\.json: n_embd=64 is not divisible by n_head=5"):
        load_encoder(tmp_path)
    # A config whose n_embd does not fit the weights fails on the weight file's header
    # (compared with the module built on the meta device).
    monkeypatch.undo()
    (tmp_path / "config.json").write_text(json.dumps({**raw, "n_embd": 32}))
    with pytest.raises(CheckpointError, match="wte.weight"):
        load_encoder(tmp_path)
