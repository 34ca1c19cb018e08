"""Every transformer family at base size: parity with Hugging Face and CPU words/s.

For each model type this writes a random Hugging Face checkpoint with the
family's base-size shape (hidden 768, 12 heads; layers as the published base
model) and a tokenizer of the family's kind trained on the fly
(``tests/tiny_tokenizers.py``; small vocabulary, so words split into more pieces
than with the real tokenizers), then measures:

* ``max_diff``: the largest absolute difference between every hidden state of
  our encoder and HF ``output_hidden_states`` on a padded batch of 8 documents
  (fp32; the target is <= 1e-4);
* ``words_per_s``: ``nlp.pipe`` over ``--docs`` documents (BBC News articles cut
  to ``--words`` words, see ``make_corpus.py``) with ``ctx_bert``, ``store =
  "last"``, median of ``--repeats`` runs after one warm-up run.

Prints a table and writes JSON. Run it on an otherwise idle machine::

    python benchmarks/families.py --docs 300 --words 60 --out benchmarks/results/families.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_corpus import build_corpus  # noqa: E402

# Base-size shapes (the published *-base checkpoints' layer counts).
BASE: Dict[str, Dict] = {
    "bert": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512},
    "roberta": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514},
    "xlm-roberta": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514},
    "camembert": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514},
    "distilbert": {"dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072, "max_position_embeddings": 512},
    "electra": {"embedding_size": 768, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512},
    "deberta-v2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512, "position_buckets": 256, "max_relative_positions": -1},
    "modernbert": {"hidden_size": 768, "num_hidden_layers": 22, "num_attention_heads": 12, "intermediate_size": 1152, "max_position_embeddings": 8192, "local_attention": 128, "global_attn_every_n_layers": 3},
    "gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
}


def parity(model_dir: Path, texts: List[str]) -> float:
    """Max |ours - HF| over every hidden state of a padded batch (real positions)."""
    import torch
    import transformers

    from spacy_ctx.encoders.checkpoint import load_encoder

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    ours = load_encoder(model_dir).encoder.eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True).hidden_states
        mine = ours(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    return max(float((a - b).abs()[real].max()) for a, b in zip(mine, theirs))


def words_per_second(model_dir: Path, texts: List[str], repeats: int) -> float:
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"store": "last", "model": {"name": str(model_dir)}})
    docs = [nlp.make_doc(t) for t in texts]
    n_words = sum(len(d) for d in docs)
    component = nlp.get_pipe("ctx_bert")
    list(component.pipe(docs[:50]))  # load and warm up
    rates = []
    for _ in range(repeats):
        fresh = [nlp.make_doc(t) for t in texts]
        start = time.perf_counter()
        for _doc in component.pipe(fresh, batch_size=64):
            pass
        rates.append(n_words / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--words", type=int, default=60, help="words per document (cut)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="*", default=list(BASE))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "families.json")
    args = parser.parse_args(argv)

    import torch

    from tests.tiny_models import write_tiny_model

    records, _source = build_corpus(args.docs)
    texts = [" ".join(r["text"].split()[: args.words]) for r in records]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in args.families:
            torch.manual_seed(0)
            model_dir = write_tiny_model(model_type, Path(tmp) / model_type, **BASE[model_type])
            diff = parity(model_dir, texts[:8])
            rate = words_per_second(model_dir, texts, args.repeats)
            rows.append({"model_type": model_type, "max_diff": diff, "words_per_s": rate})
            print(f"{model_type:<12} max diff {diff:.2e}   {rate:8.0f} words/s", flush=True)
    print("\n| family | parity max diff | words/s |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['model_type']} | {row['max_diff']:.1e} | {row['words_per_s']:,.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "docs": args.docs, "words_per_doc": args.words, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "rows": rows,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
