"""spaCy components."""

from .component import CtxComponent

__all__ = ["CtxComponent"]
