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

__all__ = ["annotate_local", "Progress"]


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


def annotate_local(
    model: str,
    inputs: Union[str, Path, Sequence[Union[str, Path]]],
    output: Union[str, Path],
    *,
    n_process: int = 1,
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

    Returns a summary: documents, shards (written now / already there), skipped
    input lines, seconds, docs/s and words/s of this run.
    """
    if n_process < 1 or batch_size < 1:
        raise ConfigError(f"--n-process and --batch-size must be at least 1; got {n_process}, {batch_size}.")
    if n_process > 1 and gpu_id is not None and gpu_id >= 0:
        raise ConfigError(
            "--n-process > 1 runs forked CPU workers; CUDA does not survive fork. Use --n-process 1 "
            "with --gpu-id, or --engine ray with --gpus-per-worker."
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
    collector = ShardCollector(ShardWriter(output, manifest))
    t0 = time.perf_counter()
    try:
        for index, data, n_words in annotator.annotate(
            pending_records(records, finished, shard_size), n_process=n_process, batch_size=batch_size
        ):
            collector.add(index, data, n_words)
            bar.update(1, n_words)
        collector.close(stats.documents)
        bar.close(final=True)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    manifest.finish(stats.documents, stats.to_dict())
    written = collector.writer.written
    manifest.end_run(run, documents=collector.docs, words=collector.words, shards_written=written)
    return {
        "output": str(output),
        "documents": stats.documents,
        "shards": len(manifest.data["shards"]),
        "shards_written": written,
        "shards_skipped": len(finished),
        "skipped_inputs": stats.skipped,
        "annotated": collector.docs,
        "seconds": seconds,
        "docs_per_s": collector.docs / seconds if seconds > 0 else 0.0,
        "words_per_s": collector.words / seconds if seconds > 0 else 0.0,
    }
