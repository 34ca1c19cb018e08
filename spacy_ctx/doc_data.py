"""Contextual vectors on the Doc: ``CtxData``, extension attributes, vector hooks.

``doc._.ctx`` holds numpy arrays only (never GPU tensors), one row per spaCy
token. It is encoded by srsly's msgpack (registered through entry points), so
``doc.to_bytes()`` and ``DocBin(store_user_data=True)`` carry it; a stored dict
is turned back into :class:`CtxData` on access even if the decoder was not
loaded. Vector hooks are functions on one Doc, so they do not travel with
serialized Docs: call :func:`install_vector_hooks` after loading Docs.

Retokenization. Setting ``doc._.ctx`` records each row's character span
(``token.idx``, ``token.idx + len(token)``) and a hash of the text. Every getter
checks that the Doc's tokens still have those spans; after ``doc.retokenize()``
(``merge_entities``, ``merge_noun_chunks``, splits) they do not, and the rows
are re-aligned by character offsets (:meth:`CtxData.realign`: a merged token
gets the mean of the rows it covers, each part of a split token the row it came
from) and the result is stored back on the Doc, so it is computed once per
change. Token getters check only their own token (O(1)); span getters their
span's tokens; Doc-level getters compare all spans at once (``doc.to_array``).

int8 payloads (``store_dtype = "int8"``) are dequantized by :class:`CtxData` on read,
so every getter and hook here sees float32 rows.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional, Union

import numpy as np
from spacy.attrs import IDX, LENGTH
from spacy.tokens import Doc, Span, Token

from .ctx_data import CtxData, deserialize_ctx_data
from .errors import StaleCtxError

# -- extension attributes ---------------------------------------------------------------
_USER_DATA_KEY = ("._.", "ctx", None, None)  # where Doc extensions with a default live
# Spans at most this long are checked token by token; longer ones with one doc.to_array.
_SPAN_LOOP_MAX = 32


def _text_hash(doc: Doc) -> int:
    return zlib.crc32(doc.text.encode("utf-8", "surrogatepass"))


def _doc_spans(doc: Doc) -> np.ndarray:
    """(len(doc), 2) int64 ``[token.idx, token.idx + len(token))`` of every token."""
    if len(doc) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    spans = doc.to_array([IDX, LENGTH]).astype(np.int64)
    spans[:, 1] += spans[:, 0]
    return spans


def _is_ordered(spans: np.ndarray) -> bool:
    return len(spans) < 2 or not (spans[1:, 0] < spans[:-1, 1]).any()


def _stored_ctx(doc: Doc) -> Optional[CtxData]:
    """The CtxData stored on the Doc, as stored (possibly for older tokens).

    A payload without token spans (written before they existed) is adopted for the
    Doc's current tokens if the counts agree; otherwise nothing can say which row
    belongs to which token, and :class:`StaleCtxError` is raised.
    """
    value = doc.user_data.get(_USER_DATA_KEY)
    if isinstance(value, dict):  # decoded without our msgpack hook
        value = deserialize_ctx_data(value)
        if isinstance(value, CtxData):
            doc.user_data[_USER_DATA_KEY] = value
    if not isinstance(value, CtxData):
        return None
    if value.token_spans is None:
        if value.n_rows != len(doc):
            raise StaleCtxError(
                f"doc._.ctx has {value.n_rows} rows for {len(doc)} tokens and no token "
                "spans to re-align them (it was saved by an older spacy-ctx and the Doc "
                "was retokenized since); run the encoder on the Doc again"
            )
        value.token_spans = _doc_spans(doc)
        if value.text_hash is None:
            value.text_hash = _text_hash(doc)
    return value


def _realigned(doc: Doc, ctx: CtxData, spans: np.ndarray) -> CtxData:
    """``ctx`` re-aligned to the tokens with character ``spans``, stored back on the Doc."""
    if not _is_ordered(spans):
        # Half-way through doc.retokenize() (spaCy asks for a merged span's vector
        # when the vocab has vectors) tokens overlap and doc.text is not the text:
        # answer from the stored rows, but keep nothing.
        return ctx.realign(spans)
    if ctx.text_hash is not None and ctx.text_hash != _text_hash(doc):
        raise StaleCtxError(
            "doc._.ctx was computed for a different text than this Doc's (copied from "
            "another Doc's user_data?); run the encoder on the Doc again"
        )
    aligned = ctx.realign(spans)
    doc.user_data[_USER_DATA_KEY] = aligned
    return aligned


def _aligned_ctx(doc: Doc) -> Optional[CtxData]:
    """``doc._.ctx`` with one row per current token, re-aligned if the tokens changed."""
    ctx = _stored_ctx(doc)
    if ctx is None:
        return None
    spans = _doc_spans(doc)
    if ctx.n_rows == len(doc) and np.array_equal(ctx.token_spans, spans):
        return ctx
    return _realigned(doc, ctx, spans)


def _ctx_for_token(token: Token) -> Optional[CtxData]:
    """CtxData whose row ``token.i`` belongs to ``token``: O(1) when it is unchanged."""
    doc = token.doc
    ctx = _stored_ctx(doc)
    if ctx is None:
        return None
    if ctx.n_rows == len(doc):
        start, end = ctx.token_spans[token.i]
        idx = token.idx
        if start == idx and end == idx + len(token):
            return ctx
    return _aligned_ctx(doc)


def _ctx_for_span(span: Span) -> Optional[CtxData]:
    """CtxData whose rows ``span.start:span.end`` belong to the span's tokens."""
    doc = span.doc
    if len(span) > _SPAN_LOOP_MAX:
        return _aligned_ctx(doc)
    ctx = _stored_ctx(doc)
    if ctx is None:
        return None
    if ctx.n_rows == len(doc):
        stored = ctx.token_spans[span.start : span.end]
        if all(
            s == t.idx and e == t.idx + len(t) for (s, e), t in zip(stored.tolist(), span)
        ):
            return ctx
    return _aligned_ctx(doc)


def _get_doc_ctx(doc: Doc) -> Optional[CtxData]:
    return _aligned_ctx(doc)


def _set_doc_ctx(doc: Doc, value: Optional[CtxData]) -> None:
    if value is not None and not isinstance(value, CtxData):
        raise TypeError(f"doc._.ctx must be a CtxData or None, not {type(value).__name__}")
    if value is not None:
        if value.token_spans is None:
            if value.n_rows != len(doc):
                raise ValueError(
                    f"CtxData has {value.n_rows} token rows but the Doc has {len(doc)} tokens"
                )
            value = value.replace(token_spans=_doc_spans(doc), text_hash=_text_hash(doc))
        elif value.text_hash is None:
            value = value.replace(text_hash=_text_hash(doc))
        elif value.text_hash != _text_hash(doc):
            raise ValueError("CtxData was computed for a different text than this Doc's")
    doc.user_data[_USER_DATA_KEY] = value


def _token_ctx_vector(token: Token) -> Optional[np.ndarray]:
    ctx = _ctx_for_token(token)
    return None if ctx is None else ctx.vectors[token.i]


def _span_ctx_vector(span: Span) -> Optional[np.ndarray]:
    ctx = _ctx_for_span(span)
    return None if ctx is None else ctx.mean_vector(span.start, span.end)


def _doc_ctx_vector(doc: Doc) -> Optional[np.ndarray]:
    ctx = _aligned_ctx(doc)
    return None if ctx is None else ctx.mean_vector()


def register_extensions() -> None:
    """Register ``ctx`` and ``ctx_vector`` extensions (idempotent)."""
    if not Doc.has_extension("ctx"):
        Doc.set_extension("ctx", getter=_get_doc_ctx, setter=_set_doc_ctx)
    if not Doc.has_extension("ctx_vector"):
        Doc.set_extension("ctx_vector", getter=_doc_ctx_vector)
    if not Span.has_extension("ctx_vector"):
        Span.set_extension("ctx_vector", getter=_span_ctx_vector)
    if not Token.has_extension("ctx_vector"):
        Token.set_extension("ctx_vector", getter=_token_ctx_vector)


# -- vector hooks ------------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 0.0 if norm == 0.0 else float(np.dot(a, b) / norm)


def _other_vector(other: Any) -> np.ndarray:
    vector = getattr(other._, "ctx_vector", None) if hasattr(other, "_") else None
    if vector is None:
        vector = other.vector
    return vector


def _doc_vector(doc: Doc) -> np.ndarray:
    return _doc_ctx_vector(doc)


def _doc_has_vector(doc: Doc) -> bool:
    ctx = _aligned_ctx(doc)
    return ctx is not None and bool((ctx.piece_counts > 0).any())


def _doc_similarity(doc: Doc, other: Any) -> float:
    return _cosine(_doc_ctx_vector(doc), _other_vector(other))


def _span_vector(span: Span) -> np.ndarray:
    return _span_ctx_vector(span)


def _span_has_vector(span: Span) -> bool:
    ctx = _ctx_for_span(span)
    return ctx is not None and bool((ctx.piece_counts[span.start : span.end] > 0).any())


def _span_similarity(span: Span, other: Any) -> float:
    return _cosine(_span_ctx_vector(span), _other_vector(other))


def _token_vector(token: Token) -> np.ndarray:
    return _token_ctx_vector(token)


def _token_has_vector(token: Token) -> bool:
    ctx = _ctx_for_token(token)
    return ctx is not None and ctx.has_vector(token.i)


def _token_similarity(token: Token, other: Any) -> float:
    return _cosine(_token_ctx_vector(token), _other_vector(other))


def _vector_norm(obj: Union[Doc, Span, Token]) -> float:
    return float(np.linalg.norm(obj.vector))


def install_vector_hooks(doc: Doc) -> None:
    """Make ``.vector``, ``.has_vector``, ``.vector_norm`` and ``.similarity()`` of the
    Doc, its Spans and Tokens use ``doc._.ctx``. No effect on a Doc without it."""
    value = doc.user_data.get(_USER_DATA_KEY)
    if isinstance(value, dict):  # decoded without our msgpack hook
        value = deserialize_ctx_data(value)
    if not isinstance(value, CtxData):
        return
    doc.user_hooks.update(
        vector=_doc_vector, has_vector=_doc_has_vector, similarity=_doc_similarity,
        vector_norm=_vector_norm,
    )
    doc.user_span_hooks.update(
        vector=_span_vector, has_vector=_span_has_vector, similarity=_span_similarity,
        vector_norm=_vector_norm,
    )
    doc.user_token_hooks.update(
        vector=_token_vector, has_vector=_token_has_vector, similarity=_token_similarity,
        vector_norm=_vector_norm,
    )


register_extensions()
