"""One description per encoder family, for the parametrized component suite.

``tests/test_component.py`` runs every behaviour test of the component once per
family through the ``family`` fixture (``tests/conftest.py``): a :class:`Family`
knows its tiny random checkpoint files and what its Docs must look like, and
:meth:`Family.make_nlp` builds a pipeline with any component settings. Also
:func:`first_use_raises`, the shared check that a broken checkpoint or setting
fails with our own error at ``nlp.initialize()`` and at the first call.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import spacy
from spacy.language import Language
from spacy.tokens import Doc

FAMILIES = ("bert", "elmo")

BANK_TEXT = "The bank raised rates. We sat on the river bank."
#: More pieces than one BERT window holds.
LONG_TEXT = "the company said that the startup would buy the bank in new york " * 6
#: Several sentences per Doc, and very different lengths (for batching).
BATCH_TEXTS = [
    BANK_TEXT,
    "Hello world!",
    "A much longer document. It has several sentences, some of them longer than others. "
    "Short one. And then a final sentence with quite a few more words in it than the rest.",
    "Crème brûlée über 東京 🙂 naïve.",
    "x",
]


@dataclass(frozen=True)
class Family:
    """An encoder family with a tiny random checkpoint.

    ``source``: the files named in the component config: ``(checkpoint_dir,)`` for
    BERT, ``(options.json, weights.hdf5)`` for ELMo.
    """

    name: str
    source: Tuple[Path, ...]

    # -- what the tiny checkpoints look like ---------------------------------------------
    @property
    def pipe(self) -> str:
        return f"ctx_{self.name}"

    @property
    def width(self) -> int:
        return 32 if self.name == "bert" else 16  # hidden_size / 2 * projection_dim

    @property
    def layer_names(self) -> List[str]:
        """All layers, as stored with ``store="all"``."""
        if self.name == "bert":
            return ["embeddings", "layer_1", "layer_2"]
        return ["token", "lstm_1", "lstm_2"]

    @property
    def vector_mode(self) -> str:
        """``token.vector``: the last stored layer (BERT) or the mean of them (ELMo)."""
        return "last" if self.name == "bert" else "mean"

    @property
    def model_name(self) -> str:
        """``doc._.ctx.model_name``: the configured directory, or the weights file name."""
        return str(self.source[0]) if self.name == "bert" else self.source[1].name

    @property
    def weights_file(self) -> Path:
        return self.source[0] / "model.safetensors" if self.name == "bert" else self.source[1]

    @property
    def exact(self) -> bool:
        """Whether batching is bitwise reproducible.

        The ELMo encoder is (each sentence runs alone through the LSTM, and its
        word embeddings do not depend on the batch); BERT's padded batches and
        attention masks only promise float32 rounding.
        """
        return self.name == "elmo"

    @property
    def batch_tol(self) -> float:
        """rtol and atol for "the same vectors" from other batch compositions."""
        return 0.0 if self.exact else 1e-5

    @property
    def rerun_tol(self) -> float:
        """atol for "the same vectors" from the same weights in another pipeline
        (reloaded, other layers stored, ...)."""
        return 0.0 if self.exact else 1e-6

    @property
    def chunk_setting(self) -> Tuple[str, int]:
        """A non-default model setting that changes the results: how Docs are cut."""
        return ("window", 16) if self.name == "bert" else ("chunk_size", 4)

    # -- pipelines -----------------------------------------------------------------------
    def model_config(self, **model: object) -> Dict:
        if self.name == "bert":
            return {"name": str(self.source[0]), **model}
        return {"options": str(self.source[0]), "weights": str(self.source[1]), **model}

    def make_nlp(
        self,
        *,
        model: Optional[Dict] = None,
        sentencizer: Optional[bool] = None,
        store: str = "all",
        **component: object,
    ) -> Language:
        """A blank English pipeline with this family's component (``store="all"``).

        ``sentencizer``: add one before the encoder; None = only for ELMo, which
        encodes by sentence (BERT ignores sentences).
        """
        nlp = spacy.blank("en")
        if self.name == "elmo" if sentencizer is None else sentencizer:
            nlp.add_pipe("sentencizer")
        config = {"model": self.model_config(**(model or {})), "store": store, **component}
        nlp.add_pipe(self.pipe, config=config)
        return nlp

    def component(self, nlp: Language):
        return nlp.get_pipe(self.pipe)

    # -- checkpoint files ----------------------------------------------------------------
    def copy_to(self, directory: Path) -> "Family":
        """The same family with a private copy of the checkpoint, which a test may break."""
        directory = Path(directory)
        if self.name == "bert":
            return replace(self, source=(Path(shutil.copytree(self.source[0], directory)),))
        directory.mkdir(parents=True)
        return replace(self, source=tuple(Path(shutil.copy(p, directory)) for p in self.source))

    def delete_source(self) -> None:
        for path in self.source:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def write_other(self, directory: Path, seed: int) -> "Family":
        """The same family with another random checkpoint of the same shape."""
        if self.name == "bert":
            from .bert_utils import write_tiny_bert

            return replace(self, source=(write_tiny_bert(directory, seed=seed),))
        from .elmo_utils import write_random_elmo

        return replace(self, source=write_random_elmo(directory, seed=seed))

    def forbid_loading(self, monkeypatch: pytest.MonkeyPatch) -> List[str]:
        """From now on, fail loudly if anything reads a checkpoint by its configured name."""
        import spacy_ctx.loaders
        from spacy_ctx.backends.bert import TransformerBackend
        from spacy_ctx.backends.elmo import ElmoBackend

        calls: List[str] = []

        def forbidden(*args, **kwargs):
            calls.append(repr(args))
            raise AssertionError(f"the configured checkpoint was read: {args!r}")

        for name in ("resolve_bert_dir", "download_from_hub", "resolve_elmo_files"):
            monkeypatch.setattr(spacy_ctx.loaders, name, forbidden)
        for backend in (TransformerBackend, ElmoBackend):
            monkeypatch.setattr(backend, "from_pretrained", classmethod(forbidden))
        return calls

    # -- expectations --------------------------------------------------------------------
    def expected_piece_counts(self, doc: Doc) -> Optional[List[int]]:
        """ELMo: one "piece" per non-whitespace token. BERT: depends on the vocabulary."""
        if self.name == "elmo":
            return [0 if token.is_space else 1 for token in doc]
        return None

    def token_vectors(self, layers: np.ndarray) -> np.ndarray:
        """(n_tokens, width) token vectors implied by the stored layers."""
        layers = layers.astype(np.float32)
        return layers[-1] if self.vector_mode == "last" else layers.mean(axis=0)


def first_use_raises(nlp: Language, error: type, *needles: str) -> List[str]:
    """``nlp.initialize()`` and the first call both raise ``error`` naming ``needles``.

    The error is raised on purpose by spacy-ctx (the innermost frame is ours),
    nothing is half-loaded, and building the pipeline did not load anything.
    """
    component = nlp.get_pipe(nlp.pipe_names[-1])
    assert not component.is_loaded, "add_pipe must not load anything"
    messages = []
    actions: List[Callable[[], object]] = [nlp.initialize, lambda: nlp("Some text .")]
    for action in actions:
        with pytest.raises(error) as info:
            action()
        message = str(info.value)
        for needle in needles:
            assert needle in message, f"{needle!r} not in {message!r}"
        # Raised on purpose by spacy-ctx, before anything reached torch.
        assert "spacy_ctx" in str(info.traceback[-1].path), info.traceback[-1]
        assert not component.is_loaded
        messages.append(message)
    return messages


def check_doc(family: Family, doc: Doc, layer_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """One finite row per token; tokens without pieces have zero rows and no vector.

    ``layer_names``: the stored layers (default: all of them, ``store="all"``).
    Returns ``doc._.ctx.layers``.
    """
    layer_names = family.layer_names if layer_names is None else list(layer_names)
    ctx = doc._.ctx
    assert ctx is not None, f"{family.pipe} left no doc._.ctx"
    assert ctx.layers.shape == (len(layer_names), len(doc), family.width)
    assert ctx.layer_names == layer_names
    assert np.all(np.isfinite(ctx.layers))
    assert ctx.piece_counts.shape == (len(doc),)
    assert ctx.piece_counts.dtype == np.int32
    assert np.all(ctx.piece_counts >= 0)
    expected_counts = family.expected_piece_counts(doc)
    if expected_counts is not None:
        assert ctx.piece_counts.tolist() == expected_counts
    for token in doc:
        vector = token.vector
        assert vector.shape == (family.width,) and vector.dtype == np.float32
        assert np.all(np.isfinite(vector))
        np.testing.assert_array_equal(token._.ctx_vector, vector)
        if ctx.piece_counts[token.i] == 0:
            assert not token.has_vector, f"token {token.i} {token.text!r} has no pieces"
            assert not ctx.layers[:, token.i].any(), f"token {token.i} has a non-zero row"
            assert not vector.any()
            assert token.vector_norm == 0.0
        else:
            assert token.has_vector
            assert ctx.layers[:, token.i].any()
    assert doc.vector.shape == (family.width,) and np.all(np.isfinite(doc.vector))
    assert doc.has_vector == bool((ctx.piece_counts > 0).any())
    return ctx.layers
