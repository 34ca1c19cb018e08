"""Exceptions raised by spacy-ctx, so callers can catch our failures by type."""


class SpacyCtxError(Exception):
    """Base class of every error raised on purpose by spacy-ctx."""


class CheckpointError(SpacyCtxError, ValueError):
    """A weight or config file is missing, unreadable, or does not fit the model.

    Messages always name the file, and where relevant the key/dataset and the
    expected and found shapes, and say how to fix it.
    """


class ConfigError(SpacyCtxError, ValueError):
    """A component or encoder setting is invalid."""


class AssetNotFoundError(SpacyCtxError):
    """An asset package (the embedded default model, a data set) is not installed.

    The message gives the ``pip install`` command that fixes it.
    """


class StaleCtxError(SpacyCtxError, ValueError):
    """``doc._.ctx`` cannot be matched to the Doc's tokens (it was computed for a
    different text, or it predates token spans and the token count has changed)."""
