"""Our BERT encoder equals Hugging Face transformers on the same weights."""

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.encoders.checkpoint import load_encoder

from .bert_utils import write_tiny_bert
from .hf_reference import hf_token_vectors

transformers = pytest.importorskip("transformers")


def _hf_layers(model_dir, input_ids, mask):
    hf = transformers.BertModel.from_pretrained(str(model_dir), attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
@pytest.mark.parametrize("padded", [False, True])
def test_every_layer_matches_hf(tmp_path, head, padded):
    model_dir = write_tiny_bert(tmp_path / head, head=head, seed=3)
    ours = load_encoder(model_dir).encoder
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, ours.config.vocab_size, (3, 20), generator=generator)
    mask = torch.ones_like(input_ids)
    if padded:
        mask[1, 12:] = 0
        mask[2, 5:] = 0
        input_ids[mask == 0] = 0
    with torch.no_grad():
        mine = ours(input_ids, mask)
    theirs = _hf_layers(model_dir, input_ids, mask)
    assert len(mine) == len(theirs) == ours.config.num_hidden_layers + 1
    real = mask.bool()
    for layer, (a, b) in enumerate(zip(mine, theirs)):
        # Padding positions are undefined (and differ between implementations).
        torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0, msg=f"layer {layer}")


def test_padding_does_not_change_real_positions(tiny_bert_dir):
    ours = load_encoder(tiny_bert_dir).encoder
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    padded = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0]])
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        alone = ours(ids)[-1]
        batched = ours(padded, mask)[-1][:, :5]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)


WORDS_TEXTS = [
    "Apple is looking at buying U.K. startup for $1 billion",
    "The bank raised rates. We sat on the river bank.",
    "Ünïcödé naïve café résumé — “quotes” and emoji 😀🚀 at https://example.com/a?b=c",
    "東京は日本の首都です。 한국어 텍스트",
]


def test_minilm_token_vectors_match_hf_pooled(minilm):
    """Real all-MiniLM-L6-v2: spaCy-token vectors equal HF outputs on ``doc.text``
    pooled by the alignment rule (character offsets; tests/hf_reference.py)."""
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(minilm)}, "store": "all"})
    for text in WORDS_TEXTS:
        doc = nlp(text)
        for layer_index, expected in enumerate(hf_token_vectors(minilm, doc)):
            np.testing.assert_allclose(
                doc._.ctx.layers[layer_index], expected, atol=1e-4, rtol=0,
                err_msg=f"{text!r} layer {layer_index}",
            )