"""Bad ``config.json`` settings of every family fail on reading, with a
:class:`CheckpointError` that names the file and the key (and what is wrong),
before any module is built.

One table of cases per family (DeBERTa-v2 and ModernBERT start from their
published base configs, GPT-2 from the tiny test config); the BERT-shaped
families' load-path checks (settings against the weight file) are in
``test_family_parity_bert.py``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
from torch import nn

from spacy_ctx.encoders.family import family_for, supported_model_types
from spacy_ctx.encoders.modernbert import GLOBAL, LOCAL
from spacy_ctx.errors import CheckpointError

from . import tiny_gpt2
from .test_family_deberta import DEBERTA_V3_BASE
from .test_family_modernbert import MODERNBERT_BASE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DELETE = object()  # a change that removes the key
BASES: Dict[str, Dict[str, Any]] = {
    "deberta-v2": DEBERTA_V3_BASE,
    "modernbert": MODERNBERT_BASE,
    "gpt2": tiny_gpt2.config(),
}
# model_type -> [(changes, words the message must contain)].
CASES: Dict[str, List[Tuple[Dict[str, Any], List[str]]]] = {
    "deberta-v2": [
        ({"hidden_size": "768"}, ["hidden_size"]),
        ({"num_hidden_layers": 0}, ["num_hidden_layers"]),
        ({"num_attention_heads": 7}, ["num_attention_heads"]),
        ({"intermediate_size": 1.5}, ["intermediate_size"]),
        ({"max_position_embeddings": True}, ["max_position_embeddings"]),
        ({"type_vocab_size": -1}, ["type_vocab_size"]),
        ({"pad_token_id": 128100}, ["pad_token_id"]),
        ({"position_buckets": 2.5}, ["position_buckets"]),
        ({"position_buckets": 1}, ["position_buckets"]),
        ({"max_relative_positions": 100, "position_buckets": 256}, ["max_relative_positions"]),
        ({"max_relative_positions": "-1"}, ["max_relative_positions"]),
        ({"embedding_size": 0}, ["embedding_size"]),
        ({"layer_norm_eps": 0}, ["layer_norm_eps"]),
        ({"hidden_dropout_prob": 1.0}, ["hidden_dropout_prob"]),
        ({"attention_probs_dropout_prob": -0.1}, ["attention_probs_dropout_prob"]),
        ({"hidden_act": "swoosh"}, ["hidden_act"]),
        ({"relative_attention": "yes"}, ["relative_attention"]),
        ({"share_att_key": 1}, ["share_att_key"]),
        ({"position_biased_input": None, "relative_attention": 0}, ["relative_attention"]),
        ({"pos_att_type": "p2c|p2p"}, ["pos_att_type"]),
        ({"pos_att_type": ["c2p", 3]}, ["pos_att_type"]),
        ({"pos_att_type": {"c2p": True}}, ["pos_att_type"]),
        ({"norm_rel_ebd": "batch_norm"}, ["norm_rel_ebd"]),
        ({"norm_rel_ebd": 1}, ["norm_rel_ebd"]),
        ({"conv_kernel_size": 4}, ["conv_kernel_size"]),
        ({"conv_kernel_size": 3, "conv_groups": 5}, ["conv_groups"]),
        ({"conv_kernel_size": 3, "conv_act": "swoosh"}, ["conv_act"]),
        ({"attention_head_size": 32}, ["attention_head_size"]),
        ({"model_type": 2}, ["model_type"]),
        ({"vocab_size": DELETE}, ["vocab_size"]),
    ],
    "modernbert": [
        ({"hidden_size": "768"}, ["hidden_size"]),
        ({"num_hidden_layers": 0}, ["num_hidden_layers"]),
        ({"num_attention_heads": 7}, ["num_attention_heads"]),
        ({"intermediate_size": 1.5}, ["intermediate_size"]),
        ({"local_attention": -2}, ["local_attention"]),
        ({"global_attn_every_n_layers": 0}, ["global_attn_every_n_layers"]),
        ({"max_position_embeddings": True}, ["max_position_embeddings"]),
        ({"pad_token_id": 50368}, ["pad_token_id"]),
        ({"norm_eps": 0}, ["norm_eps"]),
        ({"norm_bias": "no"}, ["norm_bias"]),
        ({"mlp_bias": 1}, ["mlp_bias"]),
        ({"attention_dropout": 1.0}, ["attention_dropout"]),
        ({"embedding_dropout": -0.1}, ["embedding_dropout"]),
        ({"hidden_activation": "swoosh"}, ["hidden_activation"]),
        ({"global_rope_theta": "big"}, ["global_rope_theta"]),
        ({"local_rope_theta": float("inf")}, ["local_rope_theta"]),
        ({"layer_types": ["full_attention"]}, ["layer_types"]),
        ({"rope_parameters": {LOCAL: {"rope_type": "yarn", "factor": 2.0}}}, ["rope_type"]),
        ({"rope_parameters": {GLOBAL: {"rope_theta": 0}}}, ["rope_theta"]),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_scaling"]),
        ({"vocab_size": DELETE}, ["vocab_size"]),
    ],
    "gpt2": [
        ({"n_embd": "64"}, ["n_embd", "integer"]),
        ({"n_embd": 1.5}, ["n_embd", "integer"]),
        ({"n_layer": 0}, ["n_layer", "between"]),
        ({"n_head": 5}, ["n_embd=64", "n_head=5", "divisible"]),
        ({"n_positions": True}, ["n_positions", "integer"]),
        ({"n_inner": -4}, ["n_inner", "between"]),
        ({"vocab_size": 1 << 30}, ["vocab_size", "between"]),
        ({"resid_pdrop": 1.0}, ["resid_pdrop", "[0, 1)"]),
        ({"attn_pdrop": "0.1"}, ["attn_pdrop"]),
        ({"embd_pdrop": -0.1}, ["embd_pdrop"]),
        ({"layer_norm_epsilon": 0}, ["layer_norm_epsilon"]),
        ({"layer_norm_epsilon": float("nan")}, ["layer_norm_epsilon"]),
        ({"activation_function": "swiglu"}, ["activation_function", "swiglu", "gelu_new"]),
        ({"scale_attn_weights": "yes"}, ["scale_attn_weights"]),
        ({"pad_token_id": 96}, ["pad_token_id=96", "vocab_size=96"]),
        ({"pad_token_id": "0"}, ["pad_token_id", "integer"]),
        ({"model_type": 3}, ["model_type"]),
        ({"scale_attn_by_inverse_layer_idx": True}, ["scale_attn_by_inverse_layer_idx", "not supported"]),
        ({"reorder_and_upcast_attn": True}, ["reorder_and_upcast_attn", "not supported"]),
        ({"add_cross_attention": True}, ["add_cross_attention", "not supported"]),
    ],
}


@pytest.mark.parametrize(
    "model_type, changes, words",
    [
        pytest.param(model_type, changes, words, id=f"{model_type}-{i}-{'-'.join(changes)}")
        for model_type, cases in CASES.items()
        for i, (changes, words) in enumerate(cases)
    ],
)
def test_bad_config_fails_before_any_module_is_built(monkeypatch, model_type, changes, words):
    def no_modules(self, *args, **kwargs):
        raise AssertionError("a module was built before the config was validated")

    monkeypatch.setattr(nn.Module, "__init__", no_modules)
    data = {**BASES[model_type], **changes}
    for key, value in changes.items():
        if value is DELETE:
            del data[key]
    with pytest.raises(CheckpointError) as err:
        family_for(model_type).read_config(data, "bad/config.json")
    message = str(err.value)
    assert message.startswith("bad/config.json: "), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("model_type", supported_model_types())
def test_config_must_be_an_object(model_type):
    with pytest.raises(CheckpointError, match=r"x\.json: must hold a JSON object"):
        family_for(model_type).read_config([1, 2], "x.json")
