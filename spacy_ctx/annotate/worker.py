"""The annotating worker: loads a pipeline once, turns texts into serialized Docs.

:class:`Annotator` is plain data in, plain data out, so Ray Data can use it as
a ``map_batches`` callable class (each actor builds it once in ``__init__``; the
pipeline never travels through the object store) and the local engine uses the
very same code. A batch is columnar (Ray Data's ``batch_format="numpy"``)::

    {"index": int64 array, "text": object array of str,
     "meta": object array of JSON strings or None (optional),
     "id": object array of str or None (optional)}

and the result is ``{"index": int64, "docbin": object array of bytes, "n_words":
int64}``, where each ``docbin`` row is ONE Doc as a ``DocBin(store_user_data=True)``
(so ``doc._.ctx`` travels), with ``doc.user_data["id"]`` and ``["meta"]`` set when
the record has them. :func:`records_to_batch` builds such a batch from
:class:`~spacy_ctx.annotate.inputs.Record` objects.

Models (:func:`resolve_model`): a spaCy pipeline directory (``config.cfg``), an
installed pipeline package, a transformer checkpoint directory (``config.json``:
a blank pipeline with ``ctx_bert``) or an ELMo directory (``options.json`` +
``weights.hdf5``: a blank pipeline with a sentencizer and ``ctx_elmo``).
Overrides (None = keep the pipeline's setting): ``store``, ``store_dtype``,
``gpu_id`` (-1: CPU; N: ``cuda:N`` for the ctx components, and spaCy's GPU for
the others when cupy is installed), ``lang`` (blank pipelines only; default from
the checkpoint's ``model_type``: ``xx`` for xlm-roberta, ``fr`` for camembert,
else ``en``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from .inputs import Record

__all__ = [
    "Annotator",
    "CTX_FACTORIES",
    "ModelSource",
    "OVERRIDE_KEYS",
    "describe_source",
    "doc_to_bytes",
    "records_to_batch",
    "resolve_model",
]

CTX_FACTORIES = ("ctx_bert", "ctx_elmo")
OVERRIDE_KEYS = ("store", "store_dtype", "gpu_id", "lang")
# Language of a blank pipeline for checkpoint families that are not English.
_FAMILY_LANG = {"xlm-roberta": "xx", "camembert": "fr"}


@dataclass(frozen=True)
class ModelSource:
    """What ``MODEL`` names: ``kind`` is pipeline, package, transformer or elmo."""

    kind: str
    name: str
    path: Optional[Path]

    @property
    def identity(self) -> str:
        """The name recorded in the manifest (an absolute path for local models)."""
        return str(self.path.resolve()) if self.path is not None else self.name


def resolve_model(model: str) -> ModelSource:
    """Classify ``model`` without loading it (clear error if it is none of the kinds)."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        if (path / "config.cfg").is_file():
            return ModelSource("pipeline", str(model), path)
        if (path / "config.json").is_file():
            return ModelSource("transformer", str(model), path)
        if (path / "options.json").is_file() and (path / "weights.hdf5").is_file():
            return ModelSource("elmo", str(model), path)
        raise ConfigError(
            f"{path}: not a model directory: expected config.cfg (a spaCy pipeline), config.json "
            "(a transformer checkpoint) or options.json + weights.hdf5 (ELMo)."
        )
    import spacy

    if spacy.util.is_package(str(model)):
        return ModelSource("package", str(model), None)
    raise ConfigError(
        f"{model}: no such directory or installed pipeline package; pass a spaCy pipeline "
        "directory, an installed package, or a transformer/ELMo checkpoint directory."
    )


def describe_source(source: ModelSource, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Kind and language of a model without loading it (the manifest's ``pipeline``
    entry when the driver does not load the model itself, as with Ray)."""
    overrides = overrides or {}
    if source.kind in ("pipeline", "package"):
        import spacy

        config = spacy.util.load_config(_pipeline_config_path(source), interpolate=False)
        lang = config.get("nlp", {}).get("lang")
        pipeline = list(config.get("nlp", {}).get("pipeline", []))
    elif source.kind == "transformer":
        model_type = json.loads((source.path / "config.json").read_text()).get("model_type")
        lang = overrides.get("lang") or _FAMILY_LANG.get(model_type, "en")
        pipeline = ["ctx_bert"]
    else:
        lang = overrides.get("lang") or "en"
        pipeline = ["sentencizer", "ctx_elmo"]
    return {"kind": source.kind, "lang": lang, "pipeline": pipeline}


def _pipeline_config_path(source: ModelSource) -> Path:
    import spacy

    if source.path is not None:
        return source.path / "config.cfg"
    root = Path(spacy.util.get_package_path(source.name))
    for candidate in [root / "config.cfg", *sorted(root.glob("*/config.cfg"))]:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{source.name}: installed package without a config.cfg under {root}.")


def _device(gpu_id: Optional[int]) -> Optional[str]:
    if gpu_id is None:
        return None
    if gpu_id < 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available() or gpu_id >= torch.cuda.device_count():
        raise ConfigError(
            f"--gpu-id {gpu_id}: no such CUDA device here ({torch.cuda.device_count()} visible); "
            "use --gpu-id -1 for the CPU."
        )
    try:  # the other components (ner, textcat) follow spaCy's ops: GPU if cupy is installed
        import spacy

        spacy.prefer_gpu(gpu_id)
    except Exception:  # no cupy: they stay on the CPU, the encoder still runs on the GPU
        pass
    return f"cuda:{gpu_id}"


def doc_to_bytes(doc: Any) -> bytes:
    """One Doc as ``DocBin(store_user_data=True)`` bytes (``doc._.ctx`` included)."""
    from spacy.tokens import DocBin

    doc_bin = DocBin(store_user_data=True)
    doc_bin.add(doc)
    return doc_bin.to_bytes()


def records_to_batch(records: Sequence[Record]) -> Dict[str, np.ndarray]:
    """The columnar batch of :class:`Annotator` (``meta`` as JSON strings) for records."""
    n = len(records)
    texts = np.empty(n, dtype=object)
    metas = np.empty(n, dtype=object)
    ids = np.empty(n, dtype=object)
    for i, record in enumerate(records):
        texts[i] = record.text
        metas[i] = None if record.meta is None else json.dumps(record.meta)
        ids[i] = record.id
    return {
        "index": np.asarray([r.index for r in records], dtype=np.int64),
        "text": texts,
        "meta": metas,
        "id": ids,
    }


def _column(batch: Mapping[str, Any], key: str, n: int) -> List[Any]:
    values = batch.get(key)
    if values is None:
        return [None] * n
    return [None if _is_missing(v) else v for v in list(values)]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN (pandas)


class Annotator:
    """A loaded pipeline that annotates batches of records into serialized Docs.

    ``overrides``: ``store``, ``store_dtype``, ``gpu_id``, ``lang`` (see the module
    docstring); unknown keys are an error.
    """

    def __init__(self, model: str, *, overrides: Optional[Mapping[str, Any]] = None) -> None:
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
        if unknown:
            raise ConfigError(f"unknown annotate override(s) {unknown}; known: {list(OVERRIDE_KEYS)}")
        self.model = str(model)
        self.overrides = overrides
        self.source = resolve_model(self.model)
        self.nlp = self._load(self.source, overrides)
        self.ctx_names = [n for n, p in self.nlp.pipeline if _is_ctx(p)]
        for name in self.ctx_names:  # load the weights now: a bad checkpoint fails here
            self.nlp.get_pipe(name).backend

    # -- loading -----------------------------------------------------------------------------------
    @staticmethod
    def _component_settings(overrides: Mapping[str, Any]) -> Dict[str, Any]:
        settings: Dict[str, Any] = {}
        for key in ("store", "store_dtype"):
            if overrides.get(key) is not None:
                settings[key] = overrides[key]
        if overrides.get("store") == "none":
            settings["vector_hooks"] = False  # hooks need stored vectors
        return settings

    def _load(self, source: ModelSource, overrides: Mapping[str, Any]):
        import spacy

        from ..pipeline import factories  # noqa: F401  (registers them even without entry points)

        device = _device(overrides.get("gpu_id"))
        settings = self._component_settings(overrides)
        if source.kind in ("pipeline", "package"):
            if overrides.get("lang") is not None:
                raise ConfigError("--lang applies to checkpoint directories only; a pipeline has its language.")
            config = spacy.util.load_config(_pipeline_config_path(source), interpolate=False)
            dotted: Dict[str, Any] = {}
            for name, block in config.get("components", {}).items():
                if block.get("factory") not in CTX_FACTORIES:
                    continue
                for key, value in settings.items():
                    dotted[f"components.{name}.{key}"] = value
                if device is not None:
                    dotted[f"components.{name}.model.device"] = device
            return spacy.load(source.path if source.path is not None else source.name, config=dotted)
        lang = overrides.get("lang")
        if source.kind == "transformer":
            if lang is None:
                model_type = json.loads((source.path / "config.json").read_text()).get("model_type")
                lang = _FAMILY_LANG.get(model_type, "en")
            nlp = spacy.blank(lang)
            nlp.add_pipe(
                "ctx_bert",
                config={"model": {"name": str(source.path), "device": device}, **settings},
            )
            return nlp
        nlp = spacy.blank(lang or "en")
        nlp.add_pipe("sentencizer")  # the biLM was trained on sentences
        nlp.add_pipe(
            "ctx_elmo",
            config={
                "model": {
                    "options": str(source.path / "options.json"),
                    "weights": str(source.path / "weights.hdf5"),
                    "device": device,
                },
                **settings,
            },
        )
        return nlp

    def describe(self) -> Dict[str, Any]:
        """What was loaded, for the manifest: language, pipes, ctx component settings."""
        ctx = {}
        for name in self.ctx_names:
            pipe = self.nlp.get_pipe(name)
            ctx[name] = {
                "model_name": pipe.backend.name,
                "store": pipe.cfg["store"],
                "store_dtype": pipe.cfg["store_dtype"],
                "device": str(pipe.backend.device),
            }
        return {
            "kind": self.source.kind,
            "lang": self.nlp.lang,
            "pipeline": list(self.nlp.pipe_names),
            "ctx_components": ctx,
        }

    # -- annotating --------------------------------------------------------------------------------
    def annotate(
        self, records: Iterable[Record], *, n_process: int = 1, batch_size: int = 64
    ) -> Iterator[Tuple[int, bytes, int]]:
        """``(index, docbin bytes, n_words)`` per record, in the order given.

        ``n_process > 1`` uses spaCy's ``nlp.pipe(n_process=...)`` (CPU only: forked
        workers; spacy-ctx makes them fork-safe by giving torch one thread there).
        """
        pairs = ((r.text, (r.index, r.meta, r.id)) for r in records)
        with warnings.catch_warnings():
            # W109: the workers' Docs travel without their vector hooks; we serialize them anyway.
            warnings.filterwarnings("ignore", message=r"\[W109\]")
            docs = self.nlp.pipe(pairs, as_tuples=True, n_process=n_process, batch_size=batch_size)
            for doc, (index, meta, ident) in docs:
                if ident is not None:
                    doc.user_data["id"] = ident
                if meta is not None:
                    doc.user_data["meta"] = meta
                yield index, doc_to_bytes(doc), len(doc)

    def __call__(self, batch: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """Annotate one columnar batch (see the module docstring)."""
        indices = np.asarray(batch["index"], dtype=np.int64)
        n = len(indices)
        texts = list(batch["text"])
        metas = [None if m is None else json.loads(m) if isinstance(m, str) else m
                 for m in _column(batch, "meta", n)]
        ids = [None if i is None else str(i) for i in _column(batch, "id", n)]
        records = [Record(int(k), str(t), m, i) for k, t, m, i in zip(indices, texts, metas, ids)]
        rows = np.empty(n, dtype=object)
        words = np.zeros(n, dtype=np.int64)
        for j, (_, data, n_words) in enumerate(self.annotate(records, batch_size=max(n, 1))):
            rows[j] = data
            words[j] = n_words
        return {"index": indices, "docbin": rows, "n_words": words}


def _is_ctx(pipe: Any) -> bool:
    from ..pipeline.component import CtxComponent

    return isinstance(pipe, CtxComponent)
