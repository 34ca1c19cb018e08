"""``annotate``: large corpora into DocBin shards with contextual vectors, resumable.

Entry point: :func:`spacy_ctx.annotate.local.annotate_corpus` (what the CLI
calls) with ``engine="local"`` (one process or ``nlp.pipe(n_process=N)`` on CPU;
also ``annotate_local``) or ``engine="ray"``, which calls
``spacy_ctx.annotate.ray_engine.annotate_ray(model, inputs, output, workers=...,
gpus_per_worker=..., address=..., batch_size=..., shard_size=..., store=...,
store_dtype=..., gpu_id=..., lang=..., text_key=..., id_key=..., overwrite=...,
progress=...)`` (Ray Data, an actor pool of
:class:`~spacy_ctx.annotate.worker.Annotator`; ``annotate_records_ray`` is its
record-level part).
Both read inputs, write shards and keep the manifest with the same pieces:

``inputs`` (:mod:`spacy_ctx.annotate.inputs`)
    ``iter_records(paths_or_globs, *, text_key="text", id_key=None, meta_key="meta",
    stats=None) -> Iterator[Record]``; ``Record(index, text, meta, id)`` numbered
    0, 1, ... over the VALID documents in input order (JSONL, .txt, Parquet);
    ``InputStats`` (pass one in as ``stats``) collects skipped lines
    ``(file, line, reason)`` and counts; ``expand_inputs(...) -> List[Path]``,
    ``count_rows(...)`` (an upper bound, for progress bars).
``worker`` (:mod:`spacy_ctx.annotate.worker`)
    ``Annotator(model, *, overrides={"store", "store_dtype", "gpu_id", "lang"})``
    loads the pipeline once; ``annotator(batch) -> {"index", "docbin", "n_words"}``
    on a columnar batch ``{"index": int64, "text": object, "meta": JSON strings or
    None, "id": str or None}`` (``meta``/``id`` optional); each ``docbin`` row is one
    Doc as ``DocBin(store_user_data=True)`` bytes. ``records_to_batch(records)``
    builds such a batch; ``annotator.annotate(records, n_process=1, batch_size=64)``
    yields ``(index, bytes, n_words)``; ``annotator.describe()`` is the manifest's
    ``pipeline`` entry (``describe_source(source)`` without loading). ``resolve_model(model) -> ModelSource`` (``.identity``).
``shards`` (:mod:`spacy_ctx.annotate.shards`)
    ``make_settings(source.identity, files, overrides=..., text_key=..., id_key=...,
    shard_size=...)``; ``load_or_create_manifest(out_dir, settings, overwrite)
    -> Manifest`` (mismatch: ``ManifestError`` unless overwrite);
    ``manifest.finished_shards() -> Set[int]``; ``pending_records(records,
    finished, shard_size)``; ``ShardWriter(out_dir, manifest).write(k, indices,
    rows, seconds=None)`` (shard k = indices ``[k*S, (k+1)*S)``, atomic, recorded in
    the manifest); ``ShardCollector(writer).add(index, bytes, n_words)`` (rows in
    any order; writes each shard when complete) and ``.close(n_documents)``;
    ``manifest.start_run(**info)`` / ``end_run(run, **info)``;
    ``manifest.finish(n_documents, stats.to_dict())`` (checks every record is
    in exactly one shard, marks complete); ``read_shards(dir)`` (also
    ``spacy_ctx.read_shards``) yields Docs in input order, checking checksums.

An engine's run, in order: expand inputs, resolve the model, make settings,
load/create the manifest (before loading the model), load the Annotator, set
``manifest.data["pipeline"] = annotator.describe()``, stream
``pending_records`` through the workers into a ShardCollector, ``close``, then
``finish``. Importing this package imports neither spaCy nor torch.
"""

from typing import Any

__all__ = ["annotate_corpus", "annotate_local", "read_shards"]


def __getattr__(name: str) -> Any:
    if name in ("annotate_corpus", "annotate_local"):
        from . import local

        return getattr(local, name)
    if name == "read_shards":
        from .shards import read_shards

        return read_shards
    raise AttributeError(f"module 'spacy_ctx.annotate' has no attribute {name!r}")
