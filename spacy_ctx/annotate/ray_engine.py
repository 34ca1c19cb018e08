"""The Ray engine of ``annotate``: Ray Data with an actor pool of annotators.

Data flow (the pipeline never travels through the object store; only plain
data does):

1. The driver reads the inputs once with :func:`~.inputs.iter_records` (the same
   reader, numbering and skipped-line accounting as the local engine), keeps the
   records of the shards still to do and puts them into the object store in
   blocks of a few whole batches (pandas frames with the columns ``index``,
   ``text``, ``meta``, ``id``). Driver memory stays flat: a block is handed to
   Ray as soon as it is full, and Ray spills the object store to disk when it
   outgrows memory. On a cluster the blocks live in the distributed object
   store, so the input files need to be readable by the driver only.
2. ``Dataset.map_batches(Annotator, compute=ActorPoolStrategy(size=workers),
   num_gpus=gpus_per_worker, batch_size=batch_size, batch_format="numpy")``:
   each actor loads the pipeline once in ``Annotator.__init__`` and turns a
   batch of texts into one serialized Doc (bytes) per row.
3. The driver streams the results (``iter_batches``), buffers them per shard,
   and writes a shard through the :class:`~.shards.ShardWriter` as soon as all
   of its documents are back (shards complete out of order; each is written in
   index order). A shard is kept in memory only until it is complete.

Fault tolerance: the actors run with ``max_restarts=-1`` and
``max_task_retries=-1`` (Ray Data's defaults; ``ray_remote_args`` can change them): when an actor
process dies, Ray starts a new one (which loads the pipeline again) and resubmits
the batches it held. A batch whose first attempt delivered results before the
failure could come back twice, so results are de-duplicated by index: every
document is written exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ConfigError, SpacyCtxError
from .inputs import Record

__all__ = [
    "RayRunStats",
    "ShardAssembler",
    "annotate_ray",
    "annotate_records_ray",
    "ray_requirement_error",
]

# Batches per object-store block. A block is Ray Data's unit of work for an actor (one
# task, whose results come back together), so blocks must be small enough that every
# actor gets some and results stream back, and large enough that the per-object
# overhead of the object store stays small (one object per 4 batches).
DEFAULT_BLOCK_BATCHES = 4


def ray_requirement_error() -> str:
    """The message shown when Ray Data is not installed."""
    return 'the Ray engine needs Ray Data: pip install "spacy-ctx[ray]" (or pip install "ray[data]")'


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is an extra of ray)
    except ImportError as err:
        raise ConfigError(ray_requirement_error()) from err
    return ray


@dataclass
class RayRunStats:
    """What one Ray run did: documents, words and shards written, duplicates dropped, timings."""

    documents: int = 0
    words: int = 0
    shards: int = 0
    duplicates: int = 0
    workers: int = 0
    gpus_per_worker: float = 0.0
    read_seconds: float = 0.0
    annotate_seconds: float = 0.0
    # Time to the first result batch (the actors' start and pipeline load), and the
    # documents/words after it: throughput without the start-up cost.
    startup_seconds: float = 0.0
    steady_documents: int = 0
    steady_words: int = 0

    @property
    def steady_docs_per_s(self) -> float:
        """Documents per second after the first result batch."""
        span = self.annotate_seconds - self.startup_seconds
        return self.steady_documents / span if span > 0 else 0.0

    @property
    def steady_words_per_s(self) -> float:
        """Words per second after the first result batch."""
        span = self.annotate_seconds - self.startup_seconds
        return self.steady_words / span if span > 0 else 0.0

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary."""
        return {**self.__dict__, "steady_docs_per_s": self.steady_docs_per_s,
                "steady_words_per_s": self.steady_words_per_s}


class ShardAssembler:
    """Collects ``(index, row)`` results that arrive in any order and releases a shard
    once all of its documents are back.

    ``counts``: shard number -> number of documents this run must deliver for it
    (shard ``k`` holds the indices ``k * shard_size ...``). A repeated index (a
    retried batch) is dropped and counted in :attr:`duplicates`.
    """

    def __init__(self, counts: Dict[int, int], shard_size: int) -> None:
        self.counts = dict(counts)
        self.shard_size = shard_size
        self.duplicates = 0
        self._rows: Dict[int, Dict[int, Any]] = {}
        self._started: Dict[int, float] = {}
        self._done: set = set()

    def add(self, index: int, row: Any) -> Optional[Tuple[int, List[int], List[Any], float]]:
        """Record one result; returns ``(shard, indices, rows, seconds)`` in index order when
        that result completes its shard, else None."""
        k = int(index) // self.shard_size
        if k not in self.counts:
            raise ValueError(f"result for document {index}, whose shard {k} is not part of this run")
        if k in self._done:
            self.duplicates += 1
            return None
        rows = self._rows.setdefault(k, {})
        self._started.setdefault(k, time.perf_counter())
        if index in rows:
            self.duplicates += 1
            return None
        rows[int(index)] = row
        if len(rows) < self.counts[k]:
            return None
        del self._rows[k]
        self._done.add(k)
        indices = sorted(rows)
        return k, indices, [rows[i] for i in indices], time.perf_counter() - self._started.pop(k)

    def missing(self) -> Dict[int, int]:
        """Shard -> number of documents not back yet, for the shards not complete."""
        return {
            k: count - len(self._rows.get(k, ()))
            for k, count in sorted(self.counts.items())
            if k not in self._done
        }


def _blocks(records: Iterable[Record], block_size: int) -> Iterator[Any]:
    """pandas frames of ``block_size`` records in :class:`~.worker.Annotator`'s batch layout
    (:func:`~.worker.records_to_batch`: ``meta`` as JSON strings); object columns keep
    the strings as Python objects through Ray Data's numpy batches."""
    import pandas as pd

    from .worker import records_to_batch

    chunk: List[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= block_size:
            yield pd.DataFrame(records_to_batch(chunk))
            chunk = []
    if chunk:
        yield pd.DataFrame(records_to_batch(chunk))


def annotate_records_ray(
    model: Any,
    records: Iterable[Record],
    writer: Any,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    batch_size: int = 64,
    address: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    done_shards: Optional[Iterable[int]] = None,
    annotator_cls: Optional[type] = None,
    annotator_kwargs: Optional[Mapping[str, Any]] = None,
    block_size: Optional[int] = None,
    ray_remote_args: Optional[Mapping[str, Any]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> RayRunStats:
    """Annotate ``records`` with a pool of ``workers`` Ray actors and write the shards.

    ``records``: all valid input documents in input order (:func:`~.inputs.iter_records`;
    read in full here, so an :class:`~.inputs.InputStats` passed to it is complete on
    return). ``writer``: a :class:`~.shards.ShardWriter`; shard ``k`` holds the
    indices ``[k*S, (k+1)*S)`` with ``S = writer.manifest.shard_size``. The shards in
    ``done_shards`` (default: the manifest's finished shards) are skipped; every
    other shard is written once, as soon as all of its documents are back.

    ``model``/``overrides`` go to the annotator class (default
    :class:`~.worker.Annotator`), which every actor builds once. ``address``: None
    starts a local Ray unless one is running in this process; ``"auto"`` or
    ``"ray://host:port"`` joins an existing cluster. ``gpus_per_worker`` reserves
    GPUs per actor; Ray sets ``CUDA_VISIBLE_DEVICES``, so the actor's device is
    ``cuda:0`` (``gpu_id`` is set to 0 unless given). ``cpus_per_worker`` is the CPU
    reservation per actor (Ray also sets the actor's OpenMP threads to it).
    ``ray_remote_args``: extra actor options (e.g. ``{"max_restarts": 3}``).
    ``block_size``: rows per object-store block (rounded up to whole batches; default
    ``DEFAULT_BLOCK_BATCHES`` batches). ``progress(docs, words)`` is called after every
    result batch with the distinct documents and words back so far.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ray = _import_ray()
    from ray.data import ActorPoolStrategy

    if annotator_cls is None:
        from .worker import Annotator as annotator_cls  # type: ignore[no-redef]
    shard_size = int(writer.manifest.shard_size)
    done = set(writer.manifest.finished_shards() if done_shards is None else done_shards)
    overrides = dict(overrides or {})
    if gpus_per_worker and overrides.get("gpu_id") is None:
        overrides["gpu_id"] = 0  # Ray makes the actor's own GPU(s) visible as 0, 1, ...

    stats = RayRunStats(workers=workers, gpus_per_worker=gpus_per_worker)
    counts: Dict[int, int] = {}

    def todo() -> Iterator[Record]:
        for record in records:
            k = record.index // shard_size
            if k not in done:
                counts[k] = counts.get(k, 0) + 1
                yield record

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    # Whole batches per block: the actors then see the same batches as the local engine
    # (documents i*batch_size ... of the pending records), which gives identical vectors.
    block_size = DEFAULT_BLOCK_BATCHES * batch_size if block_size is None else block_size
    block_size = max(1, -(-block_size // batch_size)) * batch_size
    t0 = time.perf_counter()
    refs = [ray.put(frame) for frame in _blocks(todo(), block_size)]
    stats.read_seconds = time.perf_counter() - t0
    if not refs:
        return stats
    assembler = ShardAssembler(counts, shard_size)
    dataset = ray.data.from_pandas_refs(refs).map_batches(
        annotator_cls,
        fn_constructor_args=(str(model),),
        fn_constructor_kwargs={"overrides": overrides, **dict(annotator_kwargs or {})},
        compute=ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        batch_size=batch_size,
        batch_format="numpy",
        # Ray Data already gives its actors max_restarts=-1 and max_task_retries=-1 (a dead
        # actor is restarted and its batches retried); passing them again is deprecated.
        **dict(ray_remote_args or {}),
    )
    t0 = time.perf_counter()
    first = True
    received = 0  # distinct documents back (shards are written, and counted, when complete)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        words = batch.get("n_words")
        words = [0] * len(batch["index"]) if words is None else words.tolist()
        if first:
            stats.startup_seconds = time.perf_counter() - t0
            first_docs, first_words = len(words), sum(words)
            first = False
        for index, row, n_words in zip(batch["index"].tolist(), batch["docbin"], words):
            before = assembler.duplicates
            complete = assembler.add(index, row)
            if assembler.duplicates == before:
                stats.words += int(n_words)
                received += 1
            if complete is not None:
                k, indices, rows, seconds = complete
                writer.write(k, indices, rows, seconds=seconds)
                stats.shards += 1
                stats.documents += len(rows)
        if progress is not None:
            progress(received, stats.words)
    stats.annotate_seconds = time.perf_counter() - t0
    stats.duplicates = assembler.duplicates
    if not first:
        stats.steady_documents = max(stats.documents - first_docs, 0)
        stats.steady_words = max(stats.words - first_words, 0)
    missing = assembler.missing()
    if missing:  # never write a partial shard; a rerun redoes exactly these
        raise SpacyCtxError(
            f"the Ray run ended with {sum(missing.values())} documents of shards "
            f"{list(missing)[:10]} missing; rerun the same command to redo those shards"
        )
    return stats


def _describe_remote(ray: Any, annotator_cls: type, model: str, overrides: Mapping[str, Any],
                     kwargs: Mapping[str, Any], num_cpus: float, num_gpus: float) -> Dict[str, Any]:
    """The pipeline description for the manifest, from a Ray worker with the actors' resources.

    It also makes a bad model fail before the actor pool starts (with the worker's
    error), and keeps the driver free of the model (no weights, no GPU needed there).
    """

    def describe() -> Dict[str, Any]:
        return annotator_cls(model, overrides=dict(overrides), **kwargs).describe()

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus or 0, max_retries=0)(describe)
    try:
        return ray.get(task.remote())
    except ray.exceptions.RayTaskError as err:  # re-raise the worker's own error (ConfigError, ...)
        cause = err.as_instanceof_cause()
        raise cause from None


def annotate_ray(
    model: str,
    inputs: Union[str, Path, Sequence[Union[str, Path]]],
    output: Union[str, Path],
    *,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    batch_size: int = 64,
    shard_size: int = 1000,
    store: Optional[str] = None,
    store_dtype: Optional[str] = None,
    gpu_id: Optional[int] = None,
    lang: Optional[str] = None,
    text_key: str = "text",
    id_key: Optional[str] = None,
    overwrite: bool = False,
    address: Optional[str] = None,
    progress: bool = True,
    annotator_cls: Optional[type] = None,
    annotator_kwargs: Optional[Mapping[str, Any]] = None,
    ray_remote_args: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Annotate ``inputs`` with ``model`` into DocBin shards in ``output`` on Ray (resumable).

    The same folder layout, manifest and settings check as
    :func:`~.local.annotate_local` (so a run may be resumed by either engine); the
    documents are annotated by ``workers`` Ray actors (see
    :func:`annotate_records_ray`); ``annotator_cls(model, overrides=...,
    **annotator_kwargs)`` (default :class:`~.worker.Annotator`) is what each actor builds. Returns the same summary as the local engine,
    plus ``workers``, ``duplicates`` (results of retried batches dropped),
    ``startup_seconds`` (to the first result: actor start and pipeline load) and the
    ``steady_docs_per_s``/``steady_words_per_s`` after it.
    """
    from .inputs import InputStats, count_rows, expand_inputs, iter_records
    from .local import Progress
    from .shards import ShardWriter, load_or_create_manifest, make_settings
    from .worker import resolve_model

    if workers < 1 or batch_size < 1:
        raise ConfigError(f"--workers and --batch-size must be at least 1; got {workers}, {batch_size}.")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise ConfigError(
            f"--gpus-per-worker must be >= 0 and CPUs per worker > 0; got {gpus_per_worker}, {cpus_per_worker}."
        )
    ray = _import_ray()
    if annotator_cls is None:
        from .worker import Annotator as annotator_cls  # type: ignore[no-redef]
    overrides = {"store": store, "store_dtype": store_dtype, "gpu_id": gpu_id, "lang": lang}
    files = expand_inputs(inputs)
    source = resolve_model(model)
    settings = make_settings(source.identity, files, overrides=overrides, text_key=text_key,
                             id_key=id_key, shard_size=shard_size)
    manifest = load_or_create_manifest(output, settings, overwrite=overwrite)  # fails before Ray starts
    finished = manifest.finished_shards()
    actor_overrides = {k: v for k, v in overrides.items() if v is not None}
    if gpus_per_worker and actor_overrides.get("gpu_id") is None:
        actor_overrides["gpu_id"] = 0  # Ray makes the actor's own GPU(s) visible as 0, 1, ...
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    manifest.data["pipeline"] = _describe_remote(
        ray, annotator_cls, str(model), actor_overrides, dict(annotator_kwargs or {}), cpus_per_worker,
        gpus_per_worker,
    )
    run = manifest.start_run(engine="ray", workers=workers, gpus_per_worker=gpus_per_worker,
                             cpus_per_worker=cpus_per_worker, batch_size=batch_size)
    done_docs = sum(manifest.data["shards"][str(k)]["docs"] for k in finished)
    bar = Progress(count_rows(files), initial=done_docs, enabled=progress)
    shown = [0, 0]

    def on_progress(docs: int, words: int) -> None:
        bar.update(docs - shown[0], words - shown[1])
        shown[0], shown[1] = docs, words

    stats = InputStats()
    records = iter_records(files, text_key=text_key, id_key=id_key, stats=stats)
    writer = ShardWriter(output, manifest)
    t0 = time.perf_counter()
    try:
        result = annotate_records_ray(
            model, records, writer, workers=workers, gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker, batch_size=batch_size, overrides=actor_overrides,
            done_shards=finished, annotator_cls=annotator_cls, annotator_kwargs=annotator_kwargs,
            ray_remote_args=ray_remote_args,
            progress=on_progress,
        )
        bar.close(final=True)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    manifest.finish(stats.documents, stats.to_dict())
    manifest.end_run(run, documents=result.documents, words=result.words, shards_written=writer.written,
                     duplicates=result.duplicates, read_seconds=round(result.read_seconds, 3),
                     startup_seconds=round(result.startup_seconds, 3))
    return {
        "output": str(output),
        "documents": stats.documents,
        "shards": len(manifest.data["shards"]),
        "shards_written": writer.written,
        "shards_skipped": len(finished),
        "skipped_inputs": stats.skipped,
        "annotated": result.documents,
        "seconds": seconds,
        "docs_per_s": result.documents / seconds if seconds > 0 else 0.0,
        "words_per_s": result.words / seconds if seconds > 0 else 0.0,
        "workers": workers,
        "duplicates": result.duplicates,
        "startup_seconds": result.startup_seconds,
        "steady_docs_per_s": result.steady_docs_per_s,
        "steady_words_per_s": result.steady_words_per_s,
    }
