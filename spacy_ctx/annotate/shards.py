"""DocBin shards and ``manifest.json``: atomic, checksummed, resumable.

Layout of an output folder::

    out/shard-00000.spacy   records 0 .. S-1      (S = shard_size, valid records only)
    out/shard-00001.spacy   records S .. 2S-1
    ...
    out/manifest.json

Shard ``k`` holds exactly the records with index in ``[k*S, (k+1)*S)``, in
index order (the last shard may be shorter). Shards and the manifest are
written to a temporary file, flushed to disk and renamed over the final name
(``os.replace``), so a crash leaves either the old file or the new one. The
manifest is rewritten after every shard; a shard counts as finished only once
the manifest lists it (with its byte size and SHA-256), so a shard file written
just before a crash is simply redone.

The manifest holds ``settings`` (the model, the output-relevant settings, the
inputs with their sizes, the shard size): :func:`load_or_create_manifest`
refuses to continue a folder made with other settings unless ``overwrite``.
After the last shard, :meth:`Manifest.finish` checks that the shards cover every
record exactly once and marks the run ``complete``; it also records the
skipped input lines and counts, and each run's timings.

Test hook: with ``SPACY_CTX_ANNOTATE_EXIT_AFTER=N`` in the environment, the
process exits abruptly (``os._exit(75)``, no cleanup) right after its N-th
shard is recorded, as a crash would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Union

from ..errors import ConfigError, SpacyCtxError

__all__ = [
    "EXIT_AFTER_ENV",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ShardCollector",
    "ShardError",
    "ShardWriter",
    "load_manifest",
    "load_or_create_manifest",
    "make_settings",
    "pending_records",
    "read_shards",
    "shard_name",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "spacy-ctx-annotate/1"
EXIT_AFTER_ENV = "SPACY_CTX_ANNOTATE_EXIT_AFTER"
_SHARD_GLOB = "shard-*.spacy"


class ManifestError(ConfigError):
    """The output folder's manifest is missing, unreadable, or made with other settings."""


class ShardError(SpacyCtxError, ValueError):
    """A shard is missing, corrupted (checksum), or does not hold the records it should."""


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"shard-{k:05d}.spacy"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _find_malloc_trim() -> Optional[Any]:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> None:
    """Hand free heap pages back to the OS (glibc ``malloc_trim(0)``; no-op elsewhere).

    Batches of varying shapes leave the heap fragmented; without this the resident
    memory of a long run creeps up (about +60 MB over 30,000 short documents with a
    tiny BERT), with it it stays flat. Called once per shard, so the cost is noise.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def current_rss_mb() -> Optional[float]:
    """This process's resident memory in MiB (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _normalized(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


class Manifest:
    """``manifest.json`` of one output folder (a JSON dict in :attr:`data`)."""

    def __init__(self, out_dir: Union[str, Path], data: Dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.data = data

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def settings(self) -> Dict[str, Any]:
        return self.data["settings"]

    @property
    def shard_size(self) -> int:
        return int(self.settings["shard_size"])

    @property
    def shards(self) -> List[Dict[str, Any]]:
        """Finished shards' records, by shard number."""
        return sorted(self.data["shards"].values(), key=lambda s: s["shard"])

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    def save(self) -> None:
        """Write the manifest atomically."""
        self.data["updated"] = _now()
        _atomic_write(self.path, (json.dumps(self.data, indent=1, ensure_ascii=False) + "\n").encode("utf8"))

    def finished_shards(self) -> Set[int]:
        """Shards listed as finished whose file is present with the recorded size.

        (Checksums are checked by :func:`read_shards`; a rerun only needs to know
        what to skip.)
        """
        done = set()
        for info in self.data["shards"].values():
            path = self.out_dir / info["file"]
            if path.is_file() and path.stat().st_size == info["bytes"]:
                done.add(int(info["shard"]))
        return done

    def record_shard(self, info: Dict[str, Any]) -> None:
        """Add a finished shard and save the manifest."""
        self.data["shards"][str(info["shard"])] = info
        self.data["complete"] = False
        self.save()

    def start_run(self, **info: Any) -> Dict[str, Any]:
        """Append a run record (engine, workers, ...); returns it for :meth:`end_run`."""
        run = {"started": _now(), **info, "_t0": time.perf_counter()}
        self.data.setdefault("runs", []).append(run)
        self.save_without_timer()
        return run

    def save_without_timer(self) -> None:
        timers = [run.pop("_t0", None) for run in self.data.get("runs", [])]
        try:
            self.save()
        finally:
            for run, t0 in zip(self.data.get("runs", []), timers):
                if t0 is not None:
                    run["_t0"] = t0

    def end_run(self, run: Dict[str, Any], **info: Any) -> None:
        """Close a run record with its wall time and counts, and save."""
        t0 = run.pop("_t0", None)
        run.update(info)
        run["finished"] = _now()
        if t0 is not None:
            run["seconds"] = round(time.perf_counter() - t0, 3)
        self.save_without_timer()

    def finish(self, n_documents: int, input_stats: Mapping[str, Any]) -> None:
        """Check that the shards hold records ``0 .. n_documents-1`` exactly once, and mark complete.

        ``input_stats``: :meth:`InputStats.to_dict` of the full pass over the inputs.
        """
        size = self.shard_size
        expected = math.ceil(n_documents / size)
        found = sorted(int(k) for k in self.data["shards"])
        if found != list(range(expected)):
            missing = sorted(set(range(expected)) - set(found))
            extra = sorted(set(found) - set(range(expected)))
            raise ShardError(
                f"{self.path}: {n_documents} documents need shards 0..{expected - 1}; missing "
                f"{missing[:10]}, unexpected {extra[:10]}. Rerun the same command to redo them."
            )
        for k in found:
            info = self.data["shards"][str(k)]
            want = min(size, n_documents - k * size)
            if info["docs"] != want or info["first"] != k * size:
                raise ShardError(
                    f"{self.out_dir / info['file']}: holds {info['docs']} documents from "
                    f"{info['first']}, expected {want} from {k * size}."
                )
        self.data["documents"] = n_documents
        self.data["inputs_read"] = {k: v for k, v in input_stats.items() if k != "skipped_lines"}
        self.data["skipped"] = input_stats.get("skipped_lines", [])
        self.data["complete"] = True
        self.save_without_timer()


def _describe_settings_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(changes)


def load_manifest(out_dir: Union[str, Path]) -> Manifest:
    """The manifest of an output folder (:class:`ManifestError` if missing or unreadable)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; is {out_dir} an annotate output folder?")
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: unreadable manifest ({err}); rerun with --overwrite.") from err
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}.")
    return Manifest(out_dir, data)


def _clear_output(out_dir: Path) -> None:
    """Remove what annotate wrote (shards, temporaries, manifest); nothing else."""
    for path in list(out_dir.glob(_SHARD_GLOB)) + list(out_dir.glob(".shard-*.tmp")) + list(
        out_dir.glob(f".{MANIFEST_NAME}.*.tmp")
    ):
        path.unlink()
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()


def load_or_create_manifest(
    out_dir: Union[str, Path], settings: Mapping[str, Any], overwrite: bool = False
) -> Manifest:
    """The folder's manifest for these settings: the existing one (to resume) or a new one.

    ``settings`` must hold ``shard_size``; it is compared as JSON with the
    existing manifest's, and any difference is a :class:`ManifestError` naming
    it, unless ``overwrite`` (then the old shards and manifest are removed).
    Leftover temporary files of a crashed run are removed.
    """
    out_dir = Path(out_dir)
    settings = _normalized(dict(settings))
    if int(settings.get("shard_size", 0)) < 1:
        raise ConfigError(f"shard_size must be at least 1; got {settings.get('shard_size')!r}.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ManifestError(f"{out_dir}: exists and is not a folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear_output(out_dir)
    for tmp in list(out_dir.glob(".shard-*.tmp")) + list(out_dir.glob(f".{MANIFEST_NAME}.*.tmp")):
        tmp.unlink()  # a crashed run's partial writes
    path = out_dir / MANIFEST_NAME
    if path.exists():
        manifest = load_manifest(out_dir)
        if manifest.settings != settings:
            raise ManifestError(
                f"{path} was written with other settings ({_describe_settings_change(manifest.settings, settings)}). "
                "Rerun with the same model and settings to resume, pass --overwrite to replace the "
                "output, or choose another output folder."
            )
        return manifest
    strays = sorted(out_dir.glob(_SHARD_GLOB))
    if strays:
        raise ManifestError(
            f"{out_dir}: holds {len(strays)} shard file(s) (e.g. {strays[0].name}) but no {MANIFEST_NAME}; "
            "pass --overwrite to replace them, or choose another output folder."
        )
    manifest = Manifest(
        out_dir,
        {
            "format": FORMAT,
            "created": _now(),
            "model": settings.get("model"),
            "settings": settings,
            "complete": False,
            "documents": None,
            "shards": {},
            "skipped": [],
            "runs": [],
        },
    )
    manifest.save()
    return manifest


class ShardWriter:
    """Writes finished shards of single-Doc DocBin rows and records them in the manifest."""

    def __init__(self, out_dir: Union[str, Path], manifest: Manifest) -> None:
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.written = 0
        exit_after = os.environ.get(EXIT_AFTER_ENV)
        self._exit_after = int(exit_after) if exit_after else None

    def write(
        self,
        k: int,
        indices: Sequence[int],
        rows: Sequence[bytes],
        *,
        seconds: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Write shard ``k`` from its records' indices and DocBin bytes (any order).

        The rows are put in index order; the indices must be ``k*S, k*S+1, ...``
        without gap or duplicate (at most S of them). Returns the manifest entry.
        """
        from spacy.tokens import DocBin

        size = self.manifest.shard_size
        if len(indices) != len(rows) or not rows:
            raise ShardError(f"shard {k}: {len(indices)} indices for {len(rows)} rows.")
        order = sorted(range(len(rows)), key=lambda i: int(indices[i]))
        ordered = [int(indices[i]) for i in order]
        first = k * size
        if ordered != list(range(first, first + len(ordered))) or len(ordered) > size:
            raise ShardError(
                f"shard {k}: records {ordered[:3]}...{ordered[-3:]} ({len(ordered)}) are not exactly "
                f"{first}..{first + len(ordered) - 1} within [{first}, {first + size})."
            )
        merged = DocBin(store_user_data=True).from_bytes(rows[order[0]])
        for i in order[1:]:
            merged.merge(DocBin(store_user_data=True).from_bytes(rows[i]))
        data = merged.to_bytes()
        name = shard_name(k)
        _atomic_write(self.out_dir / name, data)
        info = {
            "shard": k,
            "file": name,
            "first": first,
            "end": first + len(ordered),
            "docs": len(ordered),
            "words": int(sum(len(t) for t in merged.tokens)),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "seconds": None if seconds is None else round(seconds, 3),
            "written": _now(),
            # The writer's resident memory after the shard: flat over a run when nothing leaks.
            "rss_mb": None,
        }
        del merged, data
        release_free_memory()
        info["rss_mb"] = current_rss_mb()
        self.manifest.record_shard(info)
        self.written += 1
        if self._exit_after is not None and self.written >= self._exit_after:
            os._exit(75)  # test hook: die as a crash would, without cleanup
        return info


def read_shards(
    out_dir: Union[str, Path],
    *,
    vocab: Any = None,
    partial: bool = False,
    check: bool = True,
    hooks: bool = True,
) -> Iterator[Any]:
    """Docs of an annotate output folder, in input order, checked against the manifest.

    vocab: the Vocab to load into (default: a blank pipeline's of the recorded
    language). partial: also read an unfinished run's finished shards (else an
    unfinished run is an error). check: verify each shard's size and SHA-256.
    hooks: install the contextual vector hooks (``.vector``, ``.similarity``) on
    Docs that have ``doc._.ctx``. A missing or corrupted shard is a
    :class:`ShardError` naming the file.
    """
    import spacy
    from spacy.tokens import DocBin

    from ..doc_data import install_vector_hooks

    manifest = load_manifest(out_dir)
    if not manifest.complete and not partial:
        raise ShardError(
            f"{manifest.path}: the run is not finished ({len(manifest.data['shards'])} shard(s) so far); "
            "rerun the annotate command to finish it, or pass partial=True."
        )
    if vocab is None:
        lang = (manifest.data.get("pipeline") or {}).get("lang") or "xx"
        vocab = spacy.blank(lang).vocab
    for info in manifest.shards:
        path = Path(out_dir) / info["file"]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ShardError(f"{path}: cannot read a shard listed in the manifest ({err}).") from err
        if check:
            digest = hashlib.sha256(data).hexdigest()
            if len(data) != info["bytes"] or digest != info["sha256"]:
                raise ShardError(
                    f"{path}: corrupted shard: {len(data)} bytes with SHA-256 {digest[:16]}..., the "
                    f"manifest says {info['bytes']} bytes, {info['sha256'][:16]}...; rerun with "
                    "--overwrite to rebuild the output."
                )
        try:
            doc_bin = DocBin(store_user_data=True).from_bytes(data)
        except Exception as err:  # zlib/msgpack errors of damaged bytes (with check=False)
            raise ShardError(f"{path}: not a readable DocBin ({type(err).__name__}: {err}).") from err
        for doc in doc_bin.get_docs(vocab):
            if hooks and doc._.ctx is not None:
                install_vector_hooks(doc)
            yield doc


# -- helpers shared by the engines ----------------------------------------------------------------
def make_settings(
    model: str,
    files: Sequence[Union[str, Path]],
    *,
    overrides: Mapping[str, Any],
    text_key: str,
    id_key: Optional[str],
    shard_size: int,
) -> Dict[str, Any]:
    """The settings that decide the output (the manifest's identity).

    ``model``: :attr:`ModelSource.identity`; ``files``: the expanded inputs (their
    sizes are recorded, so a grown file is noticed); ``overrides``: ``store``,
    ``store_dtype``, ``lang`` (the device does not change the output and is left out).
    """
    return _normalized(
        {
            "model": model,
            "store": overrides.get("store"),
            "store_dtype": overrides.get("store_dtype"),
            "lang": overrides.get("lang"),
            "text_key": text_key,
            "id_key": id_key,
            "shard_size": int(shard_size),
            "inputs": [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size} for f in files],
        }
    )


def pending_records(records: Iterator[Any], finished: Set[int], shard_size: int) -> Iterator[Any]:
    """The records whose shard is not finished yet (the input is still read in full)."""
    for record in records:
        if record.index // shard_size not in finished:
            yield record


class ShardCollector:
    """Gathers annotated rows (any order) and writes each shard once all its rows are in.

    Full shards are written as soon as they are complete; :meth:`close` writes the
    last, shorter shard (and fails if any other shard is incomplete: lost rows).
    """

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self.size = writer.manifest.shard_size
        self._rows: Dict[int, Dict[int, bytes]] = {}
        self._started: Dict[int, float] = {}
        self.docs = 0
        self.words = 0

    def add(self, index: int, data: bytes, n_words: int = 0) -> Optional[Dict[str, Any]]:
        """Add one row; returns the shard's manifest entry when this row completed a shard."""
        k = int(index) // self.size
        rows = self._rows.setdefault(k, {})
        self._started.setdefault(k, time.perf_counter())
        if int(index) in rows:
            raise ShardError(f"record {index} was annotated twice.")
        rows[int(index)] = data
        self.docs += 1
        self.words += int(n_words)
        if len(rows) == self.size:
            return self._flush(k)
        return None

    def _flush(self, k: int) -> Dict[str, Any]:
        rows = self._rows.pop(k)
        seconds = time.perf_counter() - self._started.pop(k)
        indices = sorted(rows)
        return self.writer.write(k, indices, [rows[i] for i in indices], seconds=seconds)

    def close(self, n_documents: int) -> None:
        """Write the last shard; every other shard must be complete by now."""
        last = (n_documents - 1) // self.size if n_documents else -1
        for k in sorted(self._rows):
            want = min(self.size, n_documents - k * self.size)
            if k != last or len(self._rows[k]) != want:
                raise ShardError(
                    f"shard {k}: {len(self._rows[k])} of {want} records annotated; records were lost."
                )
            self._flush(k)
