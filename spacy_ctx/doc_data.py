"""Contextual vectors on the Doc: ``CtxData``, extension attributes, vector hooks.

``doc._.ctx`` holds numpy arrays only (never GPU tensors), one row per spaCy
token. It is encoded by srsly's msgpack (registered through entry points), so
``doc.to_bytes()`` and ``DocBin(store_user_data=True)`` carry it; a stored dict
is turned back into :class:`CtxData` on access even if the decoder was not
loaded. Vector hooks are functions on one Doc, so they do not travel with
serialized Docs: call :func:`install_vector_hooks` after loading Docs.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
from spacy.tokens import Doc, Span, Token

from .ctx_data import CtxData, deserialize_ctx_data

# -- extension attributes ---------------------------------------------------------------
_USER_DATA_KEY = ("._.", "ctx", None, None)  # where Doc extensions with a default live


def _get_doc_ctx(doc: Doc) -> Optional[CtxData]:
    value = doc.user_data.get(_USER_DATA_KEY)
    if isinstance(value, dict):  # decoded without our msgpack hook
        value = deserialize_ctx_data(value)
        if isinstance(value, CtxData):
            doc.user_data[_USER_DATA_KEY] = value
    return value if isinstance(value, CtxData) else None


def _set_doc_ctx(doc: Doc, value: Optional[CtxData]) -> None:
    if value is not None and not isinstance(value, CtxData):
        raise TypeError(f"doc._.ctx must be a CtxData or None, not {type(value).__name__}")
    if value is not None and value.layers.shape[1] != len(doc):
        raise ValueError(
            f"CtxData has {value.layers.shape[1]} token rows but the Doc has {len(doc)} tokens"
        )
    doc.user_data[_USER_DATA_KEY] = value


def _token_ctx_vector(token: Token) -> Optional[np.ndarray]:
    ctx = _get_doc_ctx(token.doc)
    return None if ctx is None else ctx.vectors[token.i]


def _span_ctx_vector(span: Span) -> Optional[np.ndarray]:
    ctx = _get_doc_ctx(span.doc)
    return None if ctx is None else ctx.mean_vector(span.start, span.end)


def _doc_ctx_vector(doc: Doc) -> Optional[np.ndarray]:
    ctx = _get_doc_ctx(doc)
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
    ctx = _get_doc_ctx(doc)
    return ctx is not None and bool((ctx.piece_counts > 0).any())


def _doc_similarity(doc: Doc, other: Any) -> float:
    return _cosine(_doc_ctx_vector(doc), _other_vector(other))


def _span_vector(span: Span) -> np.ndarray:
    return _span_ctx_vector(span)


def _span_has_vector(span: Span) -> bool:
    ctx = _get_doc_ctx(span.doc)
    return ctx is not None and bool((ctx.piece_counts[span.start : span.end] > 0).any())


def _span_similarity(span: Span, other: Any) -> float:
    return _cosine(_span_ctx_vector(span), _other_vector(other))


def _token_vector(token: Token) -> np.ndarray:
    return _token_ctx_vector(token)


def _token_has_vector(token: Token) -> bool:
    ctx = _get_doc_ctx(token.doc)
    return ctx is not None and ctx.has_vector(token.i)


def _token_similarity(token: Token, other: Any) -> float:
    return _cosine(_token_ctx_vector(token), _other_vector(other))


def _vector_norm(obj: Union[Doc, Span, Token]) -> float:
    return float(np.linalg.norm(obj.vector))


def install_vector_hooks(doc: Doc) -> None:
    """Make ``.vector``, ``.has_vector``, ``.vector_norm`` and ``.similarity()`` of the
    Doc, its Spans and Tokens use ``doc._.ctx``. No effect on a Doc without it."""
    if _get_doc_ctx(doc) is None:
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
