"""spacy-ctx: pretrained contextual encoders (BERT-family, ELMo) inside spaCy pipelines.

Importing the package is cheap and imports neither spaCy nor torch: srsly loads
our msgpack codec (``spacy_ctx.ctx_data``) through entry points while spaCy
itself is being imported. Public names are resolved lazily.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CtxData": "spacy_ctx.ctx_data",
    "install_vector_hooks": "spacy_ctx.doc_data",
    "CtxComponent": "spacy_ctx.pipeline.component",
    "CheckpointError": "spacy_ctx.errors",
    "ConfigError": "spacy_ctx.errors",
    "SpacyCtxError": "spacy_ctx.errors",
    "StaleCtxError": "spacy_ctx.errors",
    "AssetNotFoundError": "spacy_ctx.errors",
    "read_shards": "spacy_ctx.annotate.shards",
}

# Old public names that still work, with a warning.
_DEPRECATED = {"ContextualEncoder": "CtxComponent"}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        import warnings

        new = _DEPRECATED[name]
        warnings.warn(
            f"spacy_ctx.{name} is deprecated; use spacy_ctx.{new}", DeprecationWarning, stacklevel=2
        )
        return __getattr__(new)
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spacy_ctx' has no attribute {name!r}")
