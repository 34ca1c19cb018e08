"""DeBERTa-v2/v3 (``spacy_ctx/encoders/deberta.py``) against Hugging Face.

Every hidden state of ours equals HF ``output_hidden_states`` at the real
positions of a padded batch (40-piece rows, so the log buckets and the clipping
of the relative table are used), for DeBERTa-v3's settings and for the other
layouts ``deberta-v2`` configs describe: separate position projections, c2p or
p2c alone, absolute positions with token types and a narrow embedding, no
buckets, no relative attention, v2-xlarge's convolution. Padding never changes
real rows; the relative index is built once per forward; weights load by
mapping HF names through the Family (and through ``load_encoder`` when it
exists). Bad configs are tested in ``test_family_configs.py``.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, List

import pytest
import torch
from torch import nn

from spacy_ctx.encoders import deberta
from spacy_ctx.encoders.deberta import (
    DEBERTA_V2,
    DebertaV2Config,
    DebertaV2Encoder,
    log_bucket,
    relative_index,
)
from spacy_ctx.encoders.family import family_for

from . import tiny_deberta

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4

# microsoft/deberta-v3-base's config.json.
DEBERTA_V3_BASE = {
    "model_type": "deberta-v2",
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": "p2c|c2p",
    "layer_norm_eps": 1e-7,
    "max_relative_positions": -1,
    "position_biased_input": False,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "type_vocab_size": 0,
    "vocab_size": 128100,
}

VARIANTS = {
    "v3": {},
    "separate-position-projections": dict(share_att_key=False),
    "c2p-only": dict(pos_att_type=["c2p"], share_att_key=False),
    "p2c-only": dict(pos_att_type=["p2c"]),
    "absolute-positions": dict(position_biased_input=True, type_vocab_size=2, embedding_size=24),
    "no-buckets": dict(position_buckets=-1, max_relative_positions=12, norm_rel_ebd="none"),
    "no-relative-attention": dict(relative_attention=False, pos_att_type=None),
    "conv": dict(conv_kernel_size=3, conv_act="gelu"),
}


# -- helpers --------------------------------------------------------------------------------
def _batch(lengths: List[int], seed: int = 0):
    """Random ids with [CLS] ... [SEP], right-padded; (ids, mask)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), tiny_deberta.PAD_ID)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, tiny_deberta.VOCAB_SIZE - 1, (n,), generator=generator)
        ids[row, 0], ids[row, n - 1] = tiny_deberta.CLS_ID, tiny_deberta.SEP_ID
        mask[row, :n] = 1
    return ids, mask


def _our_state(hf_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map an HF state dict to our names through the Family: heads skipped, the
    first matching prefix removed, every remaining name mapped (and back)."""
    ours = {}
    for name, tensor in hf_state.items():
        if DEBERTA_V2.is_head(name):
            continue
        prefix = next(p for p in DEBERTA_V2.prefixes if name.startswith(p))
        inner = name[len(prefix):]
        if DEBERTA_V2.is_skipped(inner):
            continue
        mapped = DEBERTA_V2.to_ours(inner)
        assert mapped is not None, f"no rule for {name}"
        assert DEBERTA_V2.to_checkpoint(mapped) == inner
        ours[mapped] = tensor
    return ours


def _ours_from_hf(hf: nn.Module) -> DebertaV2Encoder:
    config = DEBERTA_V2.read_config(hf.config.to_dict(), "tiny/config.json")
    ours = DEBERTA_V2.build(config)
    ours.load_state_dict(_our_state(hf.state_dict()), strict=True)
    return ours.eval()


def _hf_hidden(hf: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    base = hf.deberta if hasattr(hf, "deberta") else hf
    with torch.no_grad():
        return base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


def _max_diff(ours, theirs, mask) -> List[float]:
    """Largest difference per layer over the real (unpadded) positions."""
    assert len(ours) == len(theirs)
    real = mask.bool()
    return [float((a - b)[real].abs().max()) for a, b in zip(ours, theirs)]


@pytest.fixture(scope="module")
def hf_v3() -> nn.Module:
    return tiny_deberta.build()


# -- parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layer_equals_hf_on_a_padded_batch(variant):
    hf = tiny_deberta.build(seed=1, **VARIANTS[variant])
    ours = _ours_from_hf(hf)
    ids, mask = _batch([40, 17, 3], seed=2)
    with torch.no_grad():
        mine = ours(ids, mask)
    diffs = _max_diff(mine, _hf_hidden(hf, ids, mask), mask)
    assert len(diffs) == ours.n_layers == 3
    assert max(diffs) <= TOLERANCE, (variant, diffs)


def test_v3_settings_are_what_the_module_uses(hf_v3):
    ours = _ours_from_hf(hf_v3)
    config = ours.config
    assert config.pos_att_type == ("p2c", "c2p") and config.share_att_key
    assert config.relative_span == 8 and config.max_relative_span == 16
    assert ours.embeddings.position is None and ours.embeddings.token_type is None
    assert ours.rel_norm is not None and ours.rel_embeddings.weight.shape == (16, 32)
    assert not hasattr(ours.layers[0].attention, "pos_key")
    shapes = DEBERTA_V2.state_shapes(config)
    assert shapes == {name: tuple(t.shape) for name, t in ours.state_dict().items()}


def test_padding_does_not_change_real_positions(hf_v3):
    ours = _ours_from_hf(hf_v3)
    ids, mask = _batch([40, 23, 5], seed=3)
    with torch.no_grad():
        batched = ours(ids, mask)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = ours(ids[row : row + 1, :n], mask[row : row + 1, :n])
            for layer, (a, b) in enumerate(zip(alone, batched)):
                diff = float((a[0] - b[row, :n]).abs().max())
                assert diff <= 1e-5, (row, layer, diff)


def test_relative_terms_matter(hf_v3):
    """Changing the relative table changes the output, so the parity tests do
    check the c2p/p2c terms."""
    ours = _ours_from_hf(hf_v3)
    ids, mask = _batch([40], seed=4)
    with torch.no_grad():
        before = ours(ids, mask)[-1]
        ours.rel_embeddings.weight.mul_(-1.0)
        after = ours(ids, mask)[-1]
    assert float((before - after).abs().max()) > 1e-2


def test_relative_index_is_built_once_per_forward(hf_v3, monkeypatch):
    ours = _ours_from_hf(hf_v3)
    calls = []
    original = deberta.relative_index

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(deberta, "relative_index", counted)
    ids, mask = _batch([40, 9])
    with torch.no_grad():
        ours(ids, mask)
    assert calls == [40]


def test_log_buckets_and_clipping_are_exercised():
    """A 40-piece input with 8 buckets and max distance 16: distances up to 4 keep
    their value, longer ones are log-spaced (sign kept) and the far ones clip at
    both ends of the 16-row table."""
    config = DebertaV2Config.from_dict(tiny_deberta.CONFIG)
    distance = torch.arange(-39, 40)
    bucketed = log_bucket(distance, 8, 16)
    near = distance.abs() <= 4
    assert torch.equal(bucketed[near], distance[near])
    assert torch.equal(bucketed, -bucketed.flip(0))  # odd
    assert (bucketed[~near].abs() <= distance[~near].abs()).all()
    assert int(bucketed.max()) == 10  # distance 39 shares a row with 37 and 38
    assert bucketed.diff().ge(0).all()  # monotone
    index = relative_index(40, config, torch.device("cpu"))
    assert int(index.c2p.min()) == 0 and int(index.c2p.max()) == 15
    assert int(index.p2c.min()) == 0 and int(index.p2c.max()) == 15
    assert torch.equal(index.c2p[5, 2], torch.tensor(8 + 3))


def test_relative_only_model_takes_inputs_beyond_max_position_embeddings(hf_v3):
    """Without absolute positions, nothing bounds the length (HF agrees); with
    them, a longer input is refused."""
    ours = _ours_from_hf(hf_v3)
    n = hf_v3.config.max_position_embeddings + 6
    ids, mask = _batch([n, 30], seed=5)
    with torch.no_grad():
        diffs = _max_diff(ours(ids, mask), _hf_hidden(hf_v3, ids, mask), mask)
    assert max(diffs) <= TOLERANCE, diffs
    absolute = _ours_from_hf(tiny_deberta.build(position_biased_input=True))
    with pytest.raises(ValueError, match="supports 64"):
        absolute(ids, mask)


def test_mlm_checkpoints_map_with_their_heads_skipped():
    for legacy in (True, False):
        hf = tiny_deberta.build(seed=2, head="mlm", legacy=legacy)
        names = list(hf.state_dict())
        head = "cls." if legacy else "lm_predictions."
        assert any(name.startswith(head) for name in names)
        ours = _ours_from_hf(hf)
        ids, mask = _batch([33, 12], seed=6)
        with torch.no_grad():
            diffs = _max_diff(ours(ids, mask), _hf_hidden(hf, ids, mask), mask)
        assert max(diffs) <= TOLERANCE, (legacy, diffs)


# -- checkpoint loader (when present) -------------------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("spacy_ctx.encoders.checkpoint") is None,
    reason="spacy_ctx/encoders/checkpoint.py is not there yet",
)
@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(head="mlm"),
        dict(head="mlm", legacy=False),
        dict(conv_kernel_size=3, share_att_key=False),
    ],
    ids=["bare", "mlm-legacy", "mlm", "conv"],
)
def test_load_encoder_from_the_saved_dir(tmp_path, settings):
    from spacy_ctx.encoders import checkpoint

    if not hasattr(checkpoint, "load_encoder"):
        pytest.skip("checkpoint.load_encoder is not there yet")
    model_dir = tiny_deberta.write(tmp_path, seed=3, **settings)
    loaded = checkpoint.load_encoder(model_dir)
    encoder = loaded[-1] if isinstance(loaded, tuple) else loaded
    assert isinstance(encoder, DebertaV2Encoder)
    hf = transformers.AutoModel.from_pretrained(model_dir).eval()
    ids, mask = _batch([40, 11], seed=4)
    with torch.no_grad():
        diffs = _max_diff(encoder(ids, mask), _hf_hidden(hf, ids, mask), mask)
    assert max(diffs) <= TOLERANCE, diffs


# -- family and config ------------------------------------------------------------------------
def test_family_is_registered():
    assert family_for("deberta-v2") is DEBERTA_V2
    assert DEBERTA_V2.tokenizer_kind == "unigram" and not DEBERTA_V2.causal
    assert DEBERTA_V2.prefixes == ("deberta.", "")
    for head in (
        "cls.predictions.transform.dense.weight",
        "lm_predictions.lm_head.dense.weight",
        "mask_predictions.classifier.weight",
        "pooler.dense.weight",
        "classifier.weight",
        "qa_outputs.bias",
    ):
        assert DEBERTA_V2.is_head(head), head
    assert not DEBERTA_V2.is_head("deberta.encoder.layer.0.attention.self.query_proj.weight")
    assert DEBERTA_V2.is_skipped("embeddings.position_ids")


def test_deberta_v3_base_config():
    config = DEBERTA_V2.read_config(DEBERTA_V3_BASE, "deberta-v3-base/config.json")
    layout = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    assert layout == (768, 12, 12)
    assert (config.vocab_size, config.pad_token_id, config.model_type) == (128100, 0, "deberta-v2")
    assert config.pos_att_type == ("p2c", "c2p")
    assert config.max_relative_span == 512 and config.relative_span == 256
    assert config.score_scale == pytest.approx((64 * 3) ** 0.5)
    assert DEBERTA_V2.usable_positions(config) == 512
    assert config.raw == DEBERTA_V3_BASE and config.to_dict() == DEBERTA_V3_BASE
    shapes = DEBERTA_V2.state_shapes(config)
    assert shapes["rel_embeddings.weight"] == (512, 768)
    assert shapes["rel_norm.weight"] == (768,)
    assert "embeddings.position.weight" not in shapes
    assert "embeddings.token_type.weight" not in shapes
    assert not any("pos_key" in name or "pos_query" in name for name in shapes)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    assert 183_000_000 < n_params < 185_000_000  # "86M backbone + 98M embeddings"


def test_string_and_list_pos_att_type_read_the_same():
    as_list = {**DEBERTA_V3_BASE, "pos_att_type": ["P2C", " c2p"]}
    assert DEBERTA_V2.read_config(as_list, "x") == DEBERTA_V2.read_config(DEBERTA_V3_BASE, "y")
    none = DEBERTA_V2.read_config({**DEBERTA_V3_BASE, "pos_att_type": None}, "x")
    assert none.pos_att_type == () and none.score_scale == pytest.approx(8.0)


def test_hf_defaults_fill_missing_keys():
    config = DEBERTA_V2.read_config({"vocab_size": 100, "model_type": "deberta-v2"}, "x")
    reference = transformers.DebertaV2Config(vocab_size=100)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "layer_norm_eps",
                "relative_attention", "position_biased_input", "type_vocab_size",
                "max_relative_positions", "pad_token_id"):
        assert getattr(config, key) == getattr(reference, key), key
    assert config.pos_att_type == () and config.embedding_size == config.hidden_size
