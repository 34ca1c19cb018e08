"""Our BERT encoder equals Hugging Face transformers on the same weights."""

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.encoders.bert_checkpoint import load_bert_encoder

from .bert_utils import write_tiny_bert

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
    _, ours = load_bert_encoder(model_dir)
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
    _, ours = load_bert_encoder(tiny_bert_dir)
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


def test_minilm_token_vectors_match_hf_pooled_by_word_ids(minilm):
    """Real all-MiniLM-L6-v2: spaCy-token vectors equal HF outputs pooled by word_ids()."""
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(minilm)}, "store": "all"})
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    hf = transformers.AutoModel.from_pretrained(str(minilm), attn_implementation="eager")
    hf.eval()
    for text in WORDS_TEXTS:
        doc = nlp(text)
        words = [t.text for t in doc]
        enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            hidden = hf(**enc, output_hidden_states=True).hidden_states
        word_ids = enc.word_ids()
        for layer_index, layer in enumerate(hidden):
            expected = np.zeros((len(words), layer.shape[-1]), dtype=np.float32)
            counts = np.zeros(len(words))
            for position, word in enumerate(word_ids):
                if word is not None:
                    expected[word] += layer[0, position].numpy()
                    counts[word] += 1
            assert (counts == doc._.ctx.piece_counts).all()
            expected /= np.maximum(counts, 1)[:, None]
            np.testing.assert_allclose(
                doc._.ctx.layers[layer_index], expected, atol=1e-4, rtol=0,
                err_msg=f"{text!r} layer {layer_index}",
            )
