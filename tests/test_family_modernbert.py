"""ModernBERT (``spacy_ctx/encoders/modernbert.py``) against Hugging Face.

Every hidden state of ours equals HF ``output_hidden_states`` on a padded batch
of inputs longer than the local attention window, for the published layout (no
biases) and with every bias switched on; padding never changes real rows; the
sliding window reaches exactly ``local_attention // 2`` pieces; both config
formats (transformers 4.x ``global_rope_theta``/``global_attn_every_n_layers``
and 5.x ``rope_parameters``/``layer_types``) are read. Bad configs are tested in
``test_family_configs.py``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch import nn

from spacy_ctx.encoders.family import family_for
from spacy_ctx.encoders.modernbert import (
    GLOBAL,
    LOCAL,
    MODERNBERT,
    ModernBertConfig,
    ModernBertEncoder,
)

from . import tiny_modernbert

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4
BIASES = dict(norm_bias=True, attention_bias=True, mlp_bias=True)

# answerdotai/ModernBERT-base's config.json (written by transformers 4.47).
MODERNBERT_BASE = {
    "architectures": ["ModernBertForMaskedLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 50281,
    "classifier_activation": "gelu",
    "classifier_bias": False,
    "classifier_dropout": 0.0,
    "classifier_pooling": "mean",
    "cls_token_id": 50281,
    "decoder_bias": True,
    "deterministic_flash_attn": False,
    "embedding_dropout": 0.0,
    "eos_token_id": 50282,
    "global_attn_every_n_layers": 3,
    "global_rope_theta": 160000.0,
    "gradient_checkpointing": False,
    "hidden_activation": "gelu",
    "hidden_size": 768,
    "initializer_cutoff_factor": 2.0,
    "initializer_range": 0.02,
    "intermediate_size": 1152,
    "layer_norm_eps": 1e-05,
    "local_attention": 128,
    "local_rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "mlp_dropout": 0.0,
    "model_type": "modernbert",
    "norm_bias": False,
    "norm_eps": 1e-05,
    "num_attention_heads": 12,
    "num_hidden_layers": 22,
    "pad_token_id": 50283,
    "position_embedding_type": "absolute",
    "sep_token_id": 50282,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0",
    "vocab_size": 50368,
}


# -- helpers --------------------------------------------------------------------------------
def _batch(lengths: List[int], seed: int = 0):
    """Random ids with [CLS] ... [SEP], right-padded; (ids, mask)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), tiny_modernbert.PAD_ID)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, tiny_modernbert.VOCAB_SIZE, (n,), generator=generator)
        ids[row, 0], ids[row, n - 1] = tiny_modernbert.CLS_ID, tiny_modernbert.SEP_ID
        mask[row, :n] = 1
    return ids, mask


def _our_state(hf_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map an HF state dict to our names through the Family: heads skipped, the
    first matching prefix removed, every remaining name mapped."""
    ours = {}
    for name, tensor in hf_state.items():
        if MODERNBERT.is_head(name):
            continue
        prefix = next(p for p in MODERNBERT.prefixes if name.startswith(p))
        inner = name[len(prefix):]
        if MODERNBERT.is_skipped(inner):
            continue
        mapped = MODERNBERT.to_ours(inner)
        assert mapped is not None, f"no rule for {name}"
        assert MODERNBERT.to_checkpoint(mapped) == inner
        ours[mapped] = tensor
    return ours


def _hf_model(model_dir: Path, attn: str = "eager") -> nn.Module:
    return transformers.AutoModel.from_pretrained(model_dir, attn_implementation=attn).eval()


def _ours_from_hf(model_dir: Path, hf_state: Dict[str, torch.Tensor]) -> ModernBertEncoder:
    config = MODERNBERT.read_config(json.loads((model_dir / "config.json").read_text()), "config.json")
    encoder = MODERNBERT.build(config)
    encoder.load_state_dict(_our_state(hf_state), strict=True)
    return encoder.eval()


def _max_diff(ours: List[torch.Tensor], theirs, mask: torch.Tensor) -> List[float]:
    real = mask.bool()[..., None]
    return [float(((a - b).abs() * real).max()) for a, b in zip(ours, theirs)]


@pytest.fixture(scope="module", params=["published", "biases"])
def model_dir(request, tmp_path_factory) -> Path:
    """Tiny MLM checkpoints: without biases (as published) and with every bias."""
    overrides = BIASES if request.param == "biases" else {}
    return tiny_modernbert.write(
        tmp_path_factory.mktemp(f"modernbert_{request.param}"), head="mlm", **overrides
    )


# -- parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_layer_equals_hf_on_a_padded_batch(model_dir, attn):
    hf = _hf_model(model_dir, attn)
    ours = _ours_from_hf(model_dir, hf.state_dict())
    # 37 pieces > the 8-piece window; padding on the shorter rows.
    ids, mask = _batch([37, 20, 5, 37])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        outputs = ours(ids, mask)
    assert len(outputs) == len(theirs) == ours.n_layers == 4
    diffs = _max_diff(outputs, theirs, mask)
    assert max(diffs) <= TOLERANCE, diffs
    assert all(torch.isfinite(o).all() for o in outputs)


def test_biases_and_norms_are_exercised(tmp_path):
    """The biased checkpoint really has non-trivial biases and norm weights."""
    hf = _hf_model(tiny_modernbert.write(tmp_path, **BIASES))
    state = hf.state_dict()
    assert "layers.1.attn.Wqkv.bias" in state and "embeddings.norm.bias" in state
    assert "layers.0.attn_norm.weight" not in state  # layer 0 has no attention norm
    for name, tensor in state.items():
        if name.endswith(".bias"):
            assert tensor.abs().max() > 0, name
        if "norm" in name and name.endswith(".weight"):
            assert (tensor - 1).abs().max() > 0, name


def test_padding_does_not_change_real_rows(model_dir):
    ours = _ours_from_hf(model_dir, _hf_model(model_dir).state_dict())
    ids, mask = _batch([9, 40, 33], seed=3)
    with torch.no_grad():
        batched = ours(ids, mask)
        for row, n in enumerate(mask.sum(1).tolist()):
            alone = ours(ids[row : row + 1, :n], mask[row : row + 1, :n])
            for layer, (a, b) in enumerate(zip(alone, batched)):
                diff = float((a[0] - b[row, :n]).abs().max())
                assert diff <= 1e-5, (row, layer, diff)


def test_a_bare_model_checkpoint_loads_too(tmp_path):
    """ModernBertModel saves its names without the ``model.`` prefix."""
    model_dir = tiny_modernbert.write(tmp_path, seed=1)
    hf = _hf_model(model_dir)
    assert not any(name.startswith("model.") for name in hf.state_dict())
    ours = _ours_from_hf(model_dir, hf.state_dict())
    ids, mask = _batch([30, 12], seed=1)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        diffs = _max_diff(ours(ids, mask), theirs, mask)
    assert max(diffs) <= TOLERANCE, diffs


# -- the sliding window -----------------------------------------------------------------------
def test_local_layers_see_exactly_the_window(tmp_path):
    """With two local layers first (radius 4 each), a change at piece 0 reaches
    piece 4 after one layer and piece 8 after two, no further; the global layer
    then carries it everywhere. HF agrees on the same layout."""
    layer_types = [LOCAL, LOCAL, GLOBAL]
    model_dir = tiny_modernbert.write(tmp_path, seed=2, layer_types=layer_types)
    hf = _hf_model(model_dir)
    ours = _ours_from_hf(model_dir, hf.state_dict())
    assert ours.config.layer_types == tuple(layer_types)
    ids, mask = _batch([36], seed=5)
    changed = ids.clone()
    changed[0, 0] = 7 if int(ids[0, 0]) != 7 else 8
    with torch.no_grad():
        before, after = ours(ids, mask), ours(changed, mask)
        theirs = hf(input_ids=changed, attention_mask=mask, output_hidden_states=True).hidden_states
    assert max(_max_diff(after, theirs, mask)) <= TOLERANCE
    moved = [(a - b).abs().amax(-1)[0] > 1e-6 for a, b in zip(before, after)]
    radius = ours.config.window_radius
    assert radius == 4
    for layer in (1, 2):
        reach = layer * radius
        assert moved[layer][: reach + 1].all(), layer
        assert not moved[layer][reach + 1 :].any(), layer
    assert moved[3].all()


def test_window_size_changes_the_result(tmp_path):
    """The same weights with a window covering the whole input give other local
    layers (so the parity tests do exercise the window)."""
    model_dir = tiny_modernbert.write(tmp_path)
    state = _hf_model(model_dir).state_dict()
    raw = json.loads((model_dir / "config.json").read_text())
    narrow = _ours_from_hf(model_dir, state)
    wide = MODERNBERT.build(MODERNBERT.read_config({**raw, "local_attention": 512}, "x"))
    wide.load_state_dict(_our_state(state), strict=True)
    ids, mask = _batch([36])
    with torch.no_grad():
        a, b = narrow(ids, mask), wide.eval()(ids, mask)
    assert torch.equal(a[1], b[1])  # layer 0 is global
    assert (a[2] - b[2]).abs().max() > 1e-3  # layer 1 is local


# -- checkpoint loader (when present) -------------------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("spacy_ctx.encoders.checkpoint") is None,
    reason="spacy_ctx/encoders/checkpoint.py is not there yet",
)
def test_load_encoder_from_the_saved_dir(model_dir):
    from spacy_ctx.encoders import checkpoint

    encoder = checkpoint.load_encoder(model_dir).encoder
    assert isinstance(encoder, ModernBertEncoder)
    encoder.eval()
    hf = _hf_model(model_dir)
    ids, mask = _batch([37, 11], seed=4)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        diffs = _max_diff(encoder(ids, mask), theirs, mask)
    assert max(diffs) <= TOLERANCE, diffs


# -- family and config ------------------------------------------------------------------------
def test_family_is_registered():
    assert family_for("modernbert") is MODERNBERT
    assert MODERNBERT.tokenizer_kind == "bpe" and not MODERNBERT.causal
    assert MODERNBERT.is_head("head.dense.weight") and MODERNBERT.is_head("decoder.bias")
    assert MODERNBERT.is_head("classifier.weight")
    assert not MODERNBERT.is_head("model.layers.0.mlp.Wi.weight")


def test_state_shapes_match_the_module():
    config = ModernBertConfig.from_dict(
        {**MODERNBERT_BASE, "num_hidden_layers": 4, "vocab_size": 50368}
    )
    module = ModernBertEncoder(config)
    assert MODERNBERT.state_shapes(config) == {
        name: tuple(t.shape) for name, t in module.state_dict().items()
    }


def test_modernbert_base_config():
    config = MODERNBERT.read_config(MODERNBERT_BASE, "ModernBERT-base/config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 22, 12)
    assert (config.vocab_size, config.pad_token_id, config.model_type) == (50368, 50283, "modernbert")
    assert config.rope_theta == {GLOBAL: 160000.0, LOCAL: 10000.0}
    assert config.window_radius == 64
    assert config.layer_types == tuple(GLOBAL if i % 3 == 0 else LOCAL for i in range(22))
    assert MODERNBERT.usable_positions(config) == 8192
    assert config.raw == MODERNBERT_BASE
    shapes = MODERNBERT.state_shapes(config)
    assert "layers.0.attention_norm.weight" not in shapes
    assert shapes["layers.1.attention_norm.weight"] == (768,)
    assert shapes["layers.0.ffn.inner.weight"] == (2 * 1152, 768)
    assert shapes["layers.0.attention.qkv.weight"] == (3 * 768, 768)
    assert not any(name.endswith(".bias") for name in shapes)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    assert 148_000_000 < n_params < 151_000_000  # "149M" in the model card


def test_transformers_5_config_format_reads_the_same():
    """What transformers 5.x writes (``rope_parameters``, ``layer_types``) gives the
    same config as the 4.x keys of the same model."""
    hf_config = transformers.ModernBertConfig(
        **{k: v for k, v in MODERNBERT_BASE.items() if k not in ("architectures", "transformers_version")}
    )
    written = hf_config.to_dict()
    assert "rope_parameters" in written and "layer_types" in written
    new = MODERNBERT.read_config(written, "new")
    old = MODERNBERT.read_config(MODERNBERT_BASE, "old")
    assert new == old
    # rope_parameters wins over the legacy keys, as in transformers.
    custom = {
        **MODERNBERT_BASE,
        "rope_parameters": {
            GLOBAL: {"rope_type": "default", "rope_theta": 5e5},
            LOCAL: {"rope_type": "default", "rope_theta": 2e4},
        },
    }
    assert MODERNBERT.read_config(custom, "x").rope_theta == {GLOBAL: 5e5, LOCAL: 2e4}


def test_input_longer_than_the_positions_is_refused():
    config = ModernBertConfig.from_dict(
        {**MODERNBERT_BASE, "num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
         "intermediate_size": 8, "vocab_size": 60000, "max_position_embeddings": 16}
    )
    with pytest.raises(ValueError, match="supports 16"):
        ModernBertEncoder(config)(torch.zeros((1, 17), dtype=torch.long))


def test_every_query_sees_a_key_with_padding(model_dir, monkeypatch):
    """No attention row is fully masked, even for padding far from any real piece
    (some GPU kernels give NaN there, which would reach real rows)."""
    from spacy_ctx.encoders import blocks

    ours = _ours_from_hf(model_dir, _hf_model(model_dir).state_dict())
    sdpa = blocks.F.scaled_dot_product_attention
    seen = []

    def checked(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is not None:
            rows = attn_mask.expand(query.shape[0], 1, query.shape[2], key.shape[2])
            seen.append(bool(rows.any(-1).all()))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", checked)
    ids, mask = _batch([3, 40])  # row 0: padding at 30 is 27 pieces from real ones
    with torch.no_grad():
        ours(ids, mask)
    assert len(seen) == ours.config.num_hidden_layers and all(seen), seen
