"""spaCy components."""

from .component import ContextualEncoder

__all__ = ["ContextualEncoder"]
