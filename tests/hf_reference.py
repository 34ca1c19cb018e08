"""The alignment rule written as a plain loop over Hugging Face's own outputs: the
reference that ``ctx_bert``'s token vectors are compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def trimmed_spans(offsets, text):
    """Each piece's character span without surrounding whitespace; (s, s) if only space."""
    spans = []
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return spans


def hf_token_vectors(model_dir: Path, doc) -> list:
    """HF hidden states for ``doc.text`` (with the tokenizer's specials), pooled to
    spaCy tokens by the README's rule: a token's vector is the mean of every piece
    whose whitespace-trimmed character span overlaps it; whitespace tokens and
    tokens no piece overlaps get zeros. Written as a plain loop, independently of
    spacy_ctx's vectorised alignment."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    model.eval()
    enc = tokenizer(doc.text, return_offsets_mapping=True, return_special_tokens_mask=True,
                    return_tensors="pt")
    with torch.no_grad():
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        hidden = model(**kwargs, output_hidden_states=True).hidden_states
    special = enc["special_tokens_mask"][0].bool().tolist()
    offsets = [tuple(o) for o, s in zip(enc["offset_mapping"][0].tolist(), special) if not s]
    keep = [i for i, s in enumerate(special) if not s]
    spans = trimmed_spans(offsets, doc.text)
    layers = []
    for states in hidden:
        rows = states[0, keep]
        vectors = np.zeros((len(doc), rows.shape[-1]), dtype=np.float32)
        for t, token in enumerate(doc):
            if token.is_space:
                continue
            a, b = token.idx, token.idx + len(token.text)
            chosen = [p for p, (s, e) in enumerate(spans) if s < e and s < b and e > a]
            if chosen:
                vectors[t] = rows[chosen].mean(0).numpy()
        layers.append(vectors)
    return layers
