"""Running an encoder over spaCy Docs: inputs, windows, batching, outputs.

A backend is a ``torch.nn.Module`` that owns a pure encoder (``spacy_ctx.encoders``)
and its input preparation (``spacy_ctx.pieces``), and turns a list of Docs into
one :class:`~spacy_ctx.backends.base.CtxOutput` per Doc. It knows nothing of
Thinc; the Thinc layer in ``spacy_ctx.thinc_layers.backend_layer`` wraps it.
"""

from .base import CtxOutput, Backend, load_backend, register_backend

__all__ = ["CtxOutput", "Backend", "load_backend", "register_backend"]
