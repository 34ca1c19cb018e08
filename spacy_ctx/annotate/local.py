"""The local engine: one process, or ``n_process`` forked CPU workers via ``nlp.pipe``.

The inputs are streamed: records of finished shards are read (to keep the
numbering) but not annotated, the others go through the pipeline lazily, and at
most one shard's serialized Docs are held at a time, so memory stays flat however
long the corpus is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from ..errors import ConfigError
from .inputs import InputStats, count_rows, expand_inputs, iter_records
from .shards import (
    ShardCollector,
    ShardWriter,
    load_or_create_manifest,
    make_settings,
    pending_records,
)
from .worker import Annotator, resolve_model

__all__ = ["Progress", "annotate_corpus", "annotate_local"]


class Progress:
    """A tqdm bar in documents (docs/s, ETA) with words/s in its postfix."""

    def __init__(self, total: Optional[int], initial: int = 0, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="doc", dynamic_ncols=True,
                        disable=not enabled, smoothing=0.1, desc="annotate")
        self.t0 = time.perf_counter()
        self.words = 0
        self._last_postfix = 0.0

    def update(self, docs: int, words: int) -> None:
        self.words += words
        self.bar.update(docs)
        now = time.perf_counter()
        if now - self._last_postfix > 0.5:
            self._last_postfix = now
            self.bar.set_postfix_str(f"{self.words / max(now - self.t0, 1e-9):,.0f} words/s", refresh=False)

    def close(self, final: bool = False) -> None:
        """Close the bar; ``final``: the total was an upper bound, show the real count."""
        if final and self.bar.total is not None and self.bar.n < self.bar.total:
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


def annotate_corpus(
    model: str,
    inputs: Union[str, Path, Sequence[Union[str, Path]]],
    output: Union[str, Path],
    *,
    engine: str = "local",
    n_process: int = 1,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    address: Optional[str] = None,
    batch_size: int = 64,
    shard_size: int = 1000,
    store: Optional[str] = None,
    store_dtype: Optional[str] = None,
    gpu_id: Optional[int] = None,
    lang: Optional[str] = None,
    text_key: str = "text",
    id_key: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Annotate ``inputs`` with ``model`` into DocBin shards in ``output`` (resumable).

    engine: ``"local"`` (this process, or ``n_process`` forked CPU workers) or
    ``"ray"`` (:func:`spacy_ctx.annotate.ray_engine.annotate_ray` with ``workers``
    actors, ``gpus_per_worker``, ``address``). Both share the input reader, the
    manifest and the shard writer, so their outputs are identical.

    Returns a summary: documents, shards (written now / already there), skipped
    input lines, seconds, docs/s and words/s of this run.
    """
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine must be 'local' or 'ray'; got {engine!r}.")
    if n_process < 1 or batch_size < 1 or workers < 1:
        raise ConfigError(
            f"--n-process, --workers and --batch-size must be at least 1; got {n_process}, {workers}, {batch_size}."
        )
    if n_process > 1 and engine == "ray":
        raise ConfigError("--n-process is for the local engine; with --engine ray use --workers.")
    if n_process > 1 and gpu_id is not None and gpu_id >= 0:
        raise ConfigError(
            "--n-process > 1 runs forked CPU workers; CUDA does not survive fork. Use --n-process 1 "
            "with --gpu-id, or --engine ray with --gpus-per-worker."
        )
    _check_store(store, store_dtype)
    if engine == "ray":  # the Ray driver shares the reader, manifest and writer (ray_engine.py)
        try:
            from .ray_engine import annotate_ray
        except ImportError as err:
            raise ConfigError(f"the Ray engine is not available ({err}).") from err
        return annotate_ray(
            model, inputs, output, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
            batch_size=batch_size, shard_size=shard_size, store=store, store_dtype=store_dtype,
            gpu_id=gpu_id, lang=lang, text_key=text_key, id_key=id_key, overwrite=overwrite,
            progress=progress,
        )
    overrides = {"store": store, "store_dtype": store_dtype, "gpu_id": gpu_id, "lang": lang}
    files = expand_inputs(inputs)
    source = resolve_model(model)
    settings = make_settings(source.identity, files, overrides=overrides, text_key=text_key,
                             id_key=id_key, shard_size=shard_size)
    # The manifest is checked before the model is loaded: a mismatch fails fast.
    manifest = load_or_create_manifest(output, settings, overwrite=overwrite)
    finished = manifest.finished_shards()
    annotator = Annotator(model, overrides={k: v for k, v in overrides.items() if v is not None})
    manifest.data["pipeline"] = annotator.describe()
    run = manifest.start_run(engine="local", n_process=n_process, batch_size=batch_size)

    done_docs = sum(manifest.data["shards"][str(k)]["docs"] for k in finished)
    bar = Progress(count_rows(files), initial=done_docs, enabled=progress)
    stats = InputStats()
    records = iter_records(files, text_key=text_key, id_key=id_key, stats=stats)
    writer = ShardWriter(output, manifest)
    t0 = time.perf_counter()
    try:
        collector = ShardCollector(writer)
        for index, data, n_words in annotator.annotate(
            pending_records(records, finished, shard_size), n_process=n_process, batch_size=batch_size
        ):
            collector.add(index, data, n_words)
            bar.update(1, n_words)
        collector.close(stats.documents)
        docs, words = collector.docs, collector.words
        bar.close(final=True)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    manifest.finish(stats.documents, stats.to_dict())
    manifest.end_run(run, documents=docs, words=words, shards_written=writer.written)
    return {
        "output": str(output),
        "engine": engine,
        "documents": stats.documents,
        "shards": len(manifest.data["shards"]),
        "shards_written": writer.written,
        "shards_skipped": len(finished),
        "skipped_inputs": stats.skipped,
        "annotated": docs,
        "seconds": seconds,
        "docs_per_s": docs / seconds if seconds > 0 else 0.0,
        "words_per_s": words / seconds if seconds > 0 else 0.0,
    }


def _check_store(store: Optional[str], store_dtype: Optional[str]) -> None:
    """Refuse a bad --store/--store-dtype before a manifest records it."""
    from ..pipeline.component import STORE_DTYPES, STORE_MODES

    if store is not None and store not in STORE_MODES:
        raise ConfigError(f"--store must be one of {STORE_MODES}; got {store!r}.")
    if store_dtype is not None and store_dtype not in STORE_DTYPES:
        raise ConfigError(f"--store-dtype must be one of {STORE_DTYPES}; got {store_dtype!r}.")


def annotate_local(
    model: str,
    inputs: Union[str, Path, Sequence[Union[str, Path]]],
    output: Union[str, Path],
    **settings: Any,
) -> Dict[str, Any]:
    """:func:`annotate_corpus` with the local engine (same keyword settings)."""
    if settings.pop("engine", "local") != "local":
        raise ConfigError("annotate_local runs the local engine; use annotate_corpus(engine='ray').")
    return annotate_corpus(model, inputs, output, engine="local", **settings)
