"""Continued masked-LM (+NSP) and causal-LM pretraining of transformer checkpoints.

``python -m spacy_ctx pretrain CONFIG OUTPUT`` runs :func:`pretrain`: the config
(:mod:`.pretrain_config`) names the raw text and the checkpoint; ``objective =
"elmo"`` hands the run to :func:`spacy_ctx.training.elmo_pretrain.pretrain_elmo`.

The MLM/CLM loop:

- **Data.** Raw documents (:mod:`.corpus`) are encoded with the checkpoint's own
  tokenizer, given spaCy word ids (``lang``'s tokenizer) and packed into
  sequences of ``seq_len`` pieces (:mod:`.packing`); with ``nsp`` they are cut
  into sentences and paired instead, new pairs every epoch. Held-out text is
  ``[paths] heldout`` or the documents :func:`.corpus.split_heldout` puts aside.
- **Order and masks.** Epoch ``e`` visits the sequences in a permutation drawn
  from ``(seed, e)``; a training position is ``(epoch, cursor)``. Masks are drawn
  every step (dynamic masking) from one ``torch.Generator`` seeded with ``seed``.
  Dropout uses torch's global generator, also seeded. GPT-2 (``objective =
  "clm"``) predicts every next piece; nothing is masked.
- **Step.** ``batch_size`` sequences per micro-batch, ``grad_accumulation``
  micro-batches per optimizer step; the loss is the mean over all predicted
  pieces of the step (plus the mean NSP loss), whatever the split into
  micro-batches. Gradients are clipped to ``grad_clip``; AdamW with warmup and
  linear decay (:mod:`.optim`); bf16 autocast on CUDA only.
- **Output.** Every ``eval_frequency`` steps (and at step 0 and the last step)
  one row (step, loss, masked-piece accuracy, NSP accuracy, pieces/s,
  held-out loss) is printed and appended to ``OUTPUT/metrics.jsonl``;
  ``OUTPUT/model-best`` is the model with the lowest held-out loss so far.
  Every ``checkpoint_frequency`` steps ``OUTPUT/checkpoint/state.pt`` (model,
  optimizer, scheduler, generator states, data position, step, best loss) is
  written atomically together with ``OUTPUT/model-last``. Both model folders
  are Hugging Face checkpoints (:func:`~spacy_ctx.encoders.pretraining_checkpoint.save_pretrained`).
- **Resume.** ``resume=True`` reloads the checkpoint and continues from its
  step; on the CPU the result equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, SpacyCtxError
from .pretrain_config import PretrainSettings, load_config, read_settings

PathLike = Union[str, Path]
IGNORE_INDEX = -100
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_VERSION = 1
#: Settings that may change between a run and its resumption (they do not change
#: the trajectory up to the step where the run stopped).
RESUMABLE_CHANGES = ("max_steps", "eval_frequency", "checkpoint_frequency", "heldout_max_sequences")


class ResumeError(SpacyCtxError):
    """``--resume`` cannot continue: no checkpoint, or one from other settings or data."""


# -- data ----------------------------------------------------------------------------------------
@dataclass
class PretrainData:
    """Everything the loop reads: the tokenizer's ids and the packed examples."""

    tokenizer: Any
    train: List[Any]  # PackedSequence (no NSP); for NSP the pairs are rebuilt per epoch
    heldout: List[Any]
    doc_sentences: Optional[List[Any]] = None  # NSP: training documents as sentences
    mask_id: Optional[int] = None
    special_ids: Tuple[int, ...] = ()
    vocab_size: int = 0
    fingerprint: str = ""
    stats: Dict[str, Any] = field(default_factory=dict)


def _texts(paths: Sequence[Path], settings: PretrainSettings, log=None) -> List[str]:
    """The documents of ``paths``; skipped lines and cut long lines are reported through ``log``."""
    from .corpus import read_raw_texts

    raw = read_raw_texts(paths, text_key=settings.text_key, max_chars=settings.max_chars, scan=False)
    texts = [item.text for item in raw]
    if log is not None:
        log(f"{', '.join(str(p) for p in paths)}: {raw.stats.summary()}")
        for skipped in raw.skipped[:3]:
            log(f"  skipped {skipped.file}:{skipped.line}: {skipped.reason}")
    return texts


def _nsp_pairs(doc_sentences: List[Any], settings: PretrainSettings, tokenizer: Any, seed: int) -> List[Any]:
    from .packing import make_nsp_pairs

    rng = random.Random(seed)
    return list(
        make_nsp_pairs(doc_sentences, settings.seq_len, rng, prefix_ids=tokenizer.prefix_ids, sep_ids=tokenizer.suffix_ids)
    )


def _fingerprint(sequences: Sequence[Any]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for seq in sequences:
        digest.update(np.asarray(seq.ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def prepare_data(settings: PretrainSettings, *, eos_id: Optional[int] = None, log=None) -> PretrainData:
    """Read, split, encode and pack the raw text (see the module docstring).

    Everything is held in memory as packed int64 arrays (about 8 bytes per piece).
    ``log``: a callable for one-line reports (documents read, lines skipped).
    """
    import spacy

    from ..pieces.tokenizer import PieceTokenizer
    from .corpus import split_heldout
    from .packing import encode_documents, mask_id_of, pack_sequences, sentence_pieces, sentence_splitter, special_ids_of

    assert settings.encoder is not None
    tokenizer = PieceTokenizer.from_pretrained_dir(settings.encoder)
    texts = _texts(settings.raw_text, settings, log)
    if settings.heldout:
        train_texts, heldout_texts = texts, _texts(settings.heldout, settings, log)
    elif settings.heldout_fraction > 0:
        train_split, heldout_split = split_heldout(texts, settings.heldout_fraction, settings.seed)
        train_texts, heldout_texts = list(train_split), list(heldout_split)
        if not heldout_texts:
            raise ConfigError(
                f"heldout_fraction = {settings.heldout_fraction} held out none of the {len(texts)} documents; "
                "raise it or pass --paths.heldout FILE"
            )
        if not train_texts:
            raise ConfigError(f"heldout_fraction = {settings.heldout_fraction} held out every document; lower it")
    else:
        train_texts, heldout_texts = texts, []
    make_doc = sentence_splitter(settings.lang) if settings.nsp else spacy.blank(settings.lang).make_doc

    def encoded(items: List[str]):
        return encode_documents(items, tokenizer, make_doc, sentences=settings.nsp)

    if settings.objective == "clm" and eos_id is None:
        eos_id = tokenizer.tokenizer.token_to_id("<|endoftext|>")
    # GPT-2 has no specials around a sequence; documents are joined with its end-of-text id.
    separator = [eos_id] if (settings.objective == "clm" and eos_id is not None) else None
    data = PretrainData(tokenizer=tokenizer, train=[], heldout=[])
    if settings.nsp:
        data.doc_sentences = sentence_pieces(encoded(train_texts))
        heldout_sentences = sentence_pieces(encoded(heldout_texts))
        # Fixed held-out pairs (seeded apart from training), so held-out scores are comparable.
        data.heldout = _nsp_pairs(heldout_sentences, settings, tokenizer, settings.seed + 1) if heldout_texts else []
        first_epoch = _nsp_pairs(data.doc_sentences, settings, tokenizer, _epoch_seed(settings.seed, 0))
        if not first_epoch:
            raise ConfigError("no next-sentence pair could be built: the raw text needs documents with 2+ sentences")
        data.train = first_epoch
    else:
        data.train = list(pack_sequences(encoded(train_texts), settings.seq_len, tokenizer.prefix_ids,
                                         tokenizer.suffix_ids, separator_ids=separator))
        data.heldout = list(pack_sequences(encoded(heldout_texts), settings.seq_len, tokenizer.prefix_ids,
                                           tokenizer.suffix_ids, separator_ids=separator)) if heldout_texts else []
    if not data.train:
        raise ConfigError("the raw text gave no training sequence (every document was empty?)")
    data.heldout = data.heldout[: settings.heldout_max_sequences]
    data.vocab_size = tokenizer.max_id + 1
    data.special_ids = tuple(sorted(special_ids_of(tokenizer)))
    if settings.objective == "mlm":
        data.mask_id = mask_id_of(tokenizer)
    data.fingerprint = _fingerprint(data.train)
    data.stats = {
        "train_documents": len(train_texts),
        "heldout_documents": len(heldout_texts),
        "train_sequences": len(data.train),
        "heldout_sequences": len(data.heldout),
        "train_pieces": int(sum(len(s) for s in data.train)),
    }
    return data


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` examples (a function of seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class DataStream:
    """Training examples in epoch order from a position ``(epoch, cursor)``.

    The position is all the state there is: orders (and NSP pairs) are functions
    of the seed and the epoch, so a resumed run rebuilds them exactly.
    """

    def __init__(self, data: PretrainData, settings: PretrainSettings, epoch: int = 0, cursor: int = 0) -> None:
        self.data, self.settings = data, settings
        self.epoch, self.cursor = epoch, cursor
        self._load_epoch()

    def _load_epoch(self) -> None:
        if self.settings.nsp and self.epoch > 0:
            assert self.data.doc_sentences is not None
            self.examples = _nsp_pairs(self.data.doc_sentences, self.settings, self.data.tokenizer,
                                       _epoch_seed(self.settings.seed, self.epoch))
        else:
            self.examples = self.data.train
        self.order = epoch_order(len(self.examples), self.settings.seed, self.epoch)

    def take(self, n: int) -> List[Any]:
        """The next ``n`` examples (crossing into the next epoch when needed)."""
        out = []
        while len(out) < n:
            if self.cursor >= len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._load_epoch()
            out.append(self.examples[int(self.order[self.cursor])])
            self.cursor += 1
        return out


# -- batches and losses ----------------------------------------------------------------------------
def make_batch(
    examples: Sequence[Any], data: PretrainData, settings: PretrainSettings, generator: torch.Generator
) -> Dict[str, torch.Tensor]:
    """Collate examples and draw their masks (MLM) or shift labels (CLM); CPU tensors."""
    from .masking import mask_for_mlm
    from .packing import collate

    batch = collate(examples, data.tokenizer.pad_id)
    if settings.objective == "clm":
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels  # shifted in the loss: position i predicts i + 1
        return batch
    assert data.mask_id is not None
    masked, labels = mask_for_mlm(
        batch["input_ids"],
        special_mask=batch["special_mask"],
        word_ids=batch["word_ids"],
        mode=settings.masking,  # type: ignore[arg-type]
        probability=settings.mask_probability,
        mask_id=data.mask_id,
        vocab_size=data.vocab_size,
        generator=generator,
        span_p=1.0 / settings.span_mean_length,
        special_ids=data.special_ids,
        attention_mask=batch["attention_mask"],
    )
    batch["input_ids"], batch["labels"] = masked, labels
    return batch


def n_targets(batch: Dict[str, torch.Tensor], causal: bool) -> int:
    """How many pieces a batch predicts."""
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    return int((labels != IGNORE_INDEX).sum())


def batch_losses(
    model: torch.nn.Module, batch: Dict[str, torch.Tensor], *, causal: bool, nsp: bool, device: torch.device
) -> Dict[str, torch.Tensor]:
    """Summed (not averaged) LM and NSP losses and correct counts of one batch."""
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    types = batch["token_type_ids"].to(device) if nsp else None
    # The LM head runs only where a piece is predicted (most of a small model's
    # cost is the vocabulary projection); causal position i predicts piece i + 1.
    predict = torch.zeros_like(labels, dtype=torch.bool)
    if causal:
        predict[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][predict[:, :-1]]
    else:
        predict = labels != IGNORE_INDEX
        targets = labels[predict]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        lm_logits, nsp_logits = model(input_ids, attention, types, predict=predict)
    logits = lm_logits.float()
    lm_sum = F.cross_entropy(logits, targets, reduction="sum") if len(targets) else logits.sum() * 0.0
    with torch.no_grad():
        lm_correct = (logits.argmax(-1) == targets).sum()
    out = {"lm_sum": lm_sum, "lm_correct": lm_correct, "lm_n": torch.tensor(len(targets))}
    if nsp:
        assert nsp_logits is not None
        nsp_labels = batch["next_sentence_label"].to(device)
        nsp_logits = nsp_logits.float()
        out["nsp_sum"] = F.cross_entropy(nsp_logits, nsp_labels, reduction="sum")
        with torch.no_grad():
            out["nsp_correct"] = (nsp_logits.argmax(-1) == nsp_labels).sum()
        out["nsp_n"] = torch.tensor(len(nsp_labels), device=device)
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: PretrainData,
    settings: PretrainSettings,
    device: torch.device,
    *,
    mask_seed: Optional[int] = None,
) -> Dict[str, Optional[float]]:
    """Held-out loss (mean per predicted piece), accuracy and NSP accuracy.

    Masks come from a generator seeded apart from training (``mask_seed``,
    default ``seed + 1``), the
    same at every evaluation, and the training generators are left untouched.
    """
    if not data.heldout:
        return {"heldout_loss": None, "heldout_accuracy": None, "heldout_nsp_accuracy": None}
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(settings.seed + 1 if mask_seed is None else mask_seed)
    causal = settings.objective == "clm"
    totals = {"lm_sum": 0.0, "lm_correct": 0, "lm_n": 0, "nsp_correct": 0, "nsp_n": 0}
    for start in range(0, len(data.heldout), settings.batch_size):
        batch = make_batch(data.heldout[start : start + settings.batch_size], data, settings, generator)
        result = batch_losses(model, batch, causal=causal, nsp=settings.nsp, device=device)
        for key in totals:
            if key in result:
                totals[key] += result[key].item()
    model.train(was_training)
    loss = totals["lm_sum"] / totals["lm_n"] if totals["lm_n"] else None
    return {
        "heldout_loss": loss,
        "heldout_accuracy": totals["lm_correct"] / totals["lm_n"] if totals["lm_n"] else None,
        "heldout_nsp_accuracy": totals["nsp_correct"] / totals["nsp_n"] if totals["nsp_n"] else None,
    }


# -- output ----------------------------------------------------------------------------------------
def _atomic_save(state: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _save_model(model: Any, tokenizer_dir: Path, path: Path) -> None:
    """Write a model folder next to ``path`` and swap it in, so a crash never leaves half a folder."""
    from ..encoders.pretraining_checkpoint import save_pretrained

    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    save_pretrained(model, tokenizer_dir, tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


class Table:
    """The table printed every ``eval_frequency`` steps."""

    COLUMNS = ("Step", "Epoch", "Loss", "MLM acc", "NSP acc", "Pieces/s", "Held-out loss", "LR")
    WIDTHS = (7, 5, 8, 7, 7, 9, 13, 9)

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.started = False

    def _line(self, values: Sequence[str]) -> None:
        cells = [str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(values, self.WIDTHS))]
        print("  ".join(cells), file=self.stream, flush=True)

    def row(self, row: Dict[str, Any]) -> None:
        if not self.started:
            self._line(self.COLUMNS)
            self._line(["-" * w for w in self.WIDTHS])
            self.started = True

        def fmt(value: Optional[float], spec: str) -> str:
            return "-" if value is None else format(value, spec)

        self._line([
            str(row["step"]), str(row["epoch"]), fmt(row["loss"], ".4f"), fmt(row["accuracy"], ".3f"),
            fmt(row["nsp_accuracy"], ".3f"), fmt(row["pieces_per_second"], ".0f"),
            fmt(row["heldout_loss"], ".4f"), fmt(row["learn_rate"], ".2e"),
        ])


def _device(gpu_id: int) -> torch.device:
    if gpu_id is None or gpu_id < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--gpu-id {gpu_id}: no CUDA device is available; use --gpu-id -1 for the CPU")
    if gpu_id >= torch.cuda.device_count():
        raise ConfigError(f"--gpu-id {gpu_id}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(f"cuda:{gpu_id}")


def _apply_dropout(model: torch.nn.Module, dropout: Union[bool, float]) -> None:
    """A number sets every dropout rate (hidden and attention) of the model."""
    if isinstance(dropout, bool):
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = float(dropout)
        if hasattr(module, "dropout_p"):
            module.dropout_p = float(dropout)


def _check_model_fits(settings: PretrainSettings) -> Dict[str, Any]:
    """seq_len against the checkpoint's positions, from config.json alone (no weights
    read); returns the original config.json dict."""
    from ..encoders.checkpoint import read_family_config

    assert settings.encoder is not None
    family, config = read_family_config(settings.encoder / "config.json")
    limit = family.usable_positions(config)
    if limit is not None and settings.seq_len > limit:
        raise ConfigError(
            f"[pretraining] seq_len = {settings.seq_len} but {settings.encoder} takes at most {limit} "
            f"positions; set --pretraining.seq_len {limit} or less"
        )
    raw = getattr(config, "raw", None)
    return dict(raw) if isinstance(raw, dict) else {}


def _trajectory_settings(settings: PretrainSettings) -> Dict[str, Any]:
    """The settings a resumed run must share with the checkpoint. Paths are left
    out (the same files may be named differently); the data fingerprint checks
    the training sequences instead."""
    data = settings.to_json()
    for key in RESUMABLE_CHANGES + ("raw_text", "heldout", "encoder"):
        data.pop(key, None)
    return data


# -- the loop --------------------------------------------------------------------------------------
def pretrain(
    config_path: PathLike,
    output: PathLike,
    *,
    overrides: Optional[Dict[str, Any]] = None,
    gpu_id: int = -1,
    resume: bool = False,
    stop_at: Optional[int] = None,
    progress: bool = True,
    stream=None,
) -> Dict[str, Any]:
    """Run a pretraining config (``objective`` "mlm", "clm" or "elmo") into ``output``.

    ``overrides``: ``{"section.key": value}`` (spaCy's command-line syntax).
    ``resume``: continue from ``output/checkpoint``. ``stop_at``: stop after this
    optimizer step as if the process were killed there (after that step's
    checkpoint, if one is due), for tests. Returns a summary dict.
    """
    config = load_config(config_path, overrides)
    objective = dict(config.get("pretraining", {})).get("objective", "mlm")
    if objective == "elmo":
        from .elmo_pretrain import pretrain_elmo

        return pretrain_elmo(config, output, resume=resume, gpu_id=gpu_id)
    settings = read_settings(config)
    output = Path(output)
    state_path = output / "checkpoint" / STATE_FILE
    if resume and not state_path.is_file():
        raise ResumeError(f"--resume: {state_path} does not exist; start without --resume")
    if not resume and state_path.is_file():
        raise ResumeError(
            f"{output} already holds a run ({state_path}); pass --resume to continue it, or choose another OUTPUT"
        )
    raw_config = _check_model_fits(settings)
    device = _device(gpu_id)
    output.mkdir(parents=True, exist_ok=True)
    config.to_disk(output / "config.cfg")
    return _run(settings, output, device=device, resume=resume, stop_at=stop_at, progress=progress,
                stream=stream or sys.stdout, raw_config=raw_config)


def _run(
    settings: PretrainSettings,
    output: Path,
    *,
    device: torch.device,
    resume: bool,
    stop_at: Optional[int],
    progress: bool,
    stream,
    raw_config: Dict[str, Any],
) -> Dict[str, Any]:
    from tqdm import tqdm

    from ..encoders.pretraining_checkpoint import load_pretraining_model
    from ..encoders.heads import word_embedding
    from .optim import make_optimizer

    assert settings.encoder is not None
    encoder_dir = settings.encoder
    causal = settings.objective == "clm"
    # The data first: a bad raw-text file fails before the weights are read.
    data = prepare_data(settings, eos_id=raw_config.get("eos_token_id"),
                        log=lambda line: print(line, file=stream, flush=True))
    torch.manual_seed(settings.seed)  # dropout and anything else drawing from the global generator
    model = load_pretraining_model(encoder_dir, nsp=settings.nsp, seed=settings.seed)
    if model.causal != causal:
        raise ConfigError(f"objective {settings.objective!r} does not fit {encoder_dir} ({model.family.name})")
    n_rows = word_embedding(model.encoder).shape[0]
    if data.vocab_size > n_rows:
        raise ConfigError(
            f"{encoder_dir}: the tokenizer has ids up to {data.vocab_size - 1} but the model only "
            f"{n_rows} word embeddings; the tokenizer does not belong to this checkpoint"
        )
    print(
        f"pretraining {model.family.name} ({settings.objective}{' + nsp' if settings.nsp else ''}, "
        f"heads loaded: {model.loaded_heads or 'none, created'}) on {device}: "
        + ", ".join(f"{k} {v}" for k, v in data.stats.items()),
        file=stream, flush=True,
    )
    model.to(device)
    _apply_dropout(model, settings.dropout)
    optimizer, scheduler = make_optimizer(
        model, learn_rate=settings.learn_rate, weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps, max_steps=settings.max_steps,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    step, epoch, cursor = 0, 0, 0
    best: Optional[float] = None
    best_step: Optional[int] = None
    metrics_path = output / METRICS_FILE
    state_path = output / "checkpoint" / STATE_FILE
    # Running sums since the last table row (checkpointed too, so a row that
    # spans a resumption averages the same steps).
    sums: Dict[str, Any] = {"loss": 0.0, "steps": 0, "lm_correct": 0, "lm_n": 0, "nsp_correct": 0, "nsp_n": 0,
                            "pieces": 0, "seconds": 0.0}
    if resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ResumeError(f"{state_path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        changed = sorted(
            key for key, value in _trajectory_settings(settings).items()
            if state["settings"].get(key) != value
        )
        if changed:
            raise ResumeError(
                f"--resume: {state_path} was written with other settings ({', '.join(changed)}); resume with "
                f"the same config (only {', '.join(RESUMABLE_CHANGES)} may change) or start a new OUTPUT"
            )
        if state["fingerprint"] != data.fingerprint:
            raise ResumeError(
                f"--resume: the raw text or tokenizer differs from the run in {output} (other training "
                "sequences); resume with the same data or start a new OUTPUT"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, epoch, cursor = state["step"], state["epoch"], state["cursor"]
        best, best_step = state["best"], state["best_step"]
        sums.update(state.get("sums", {}))
        _truncate_metrics(metrics_path, step)
        print(f"resumed from {state_path} at step {step} (epoch {epoch})", file=stream, flush=True)
    elif metrics_path.exists():
        metrics_path.unlink()
    stream_data = DataStream(data, settings, epoch, cursor)
    table = Table(stream)
    last_row: Optional[Dict[str, Any]] = None

    def report() -> Dict[str, Any]:
        nonlocal best, best_step, last_row
        scores = evaluate(model, data, settings, device)
        row = {
            "step": step,
            "epoch": stream_data.epoch,
            "loss": sums["loss"] / sums["steps"] if sums["steps"] else None,
            "accuracy": sums["lm_correct"] / sums["lm_n"] if sums["lm_n"] else None,
            "nsp_accuracy": sums["nsp_correct"] / sums["nsp_n"] if sums["nsp_n"] else None,
            "pieces_per_second": sums["pieces"] / sums["seconds"] if sums["seconds"] > 0 else None,
            **scores,
            "heldout_perplexity": _perplexity(scores["heldout_loss"]),
            "learn_rate": scheduler.get_last_lr()[0],
        }
        with open(metrics_path, "a", encoding="utf8") as handle:
            handle.write(json.dumps(row) + "\n")
        bar.clear()
        table.row(row)
        loss = scores["heldout_loss"]
        if loss is not None and (best is None or loss < best):
            best, best_step = loss, step
            _save_model(model, encoder_dir, output / "model-best")
        for key in sums:
            sums[key] = 0 if isinstance(sums[key], int) else 0.0
        last_row = row
        return row

    def checkpoint() -> None:
        _save_model(model, encoder_dir, output / "model-last")
        _atomic_save(
            {
                "version": CHECKPOINT_VERSION,
                "step": step,
                "epoch": stream_data.epoch,
                "cursor": stream_data.cursor,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "best": best,
                "best_step": best_step,
                "settings": settings.to_json(),
                "fingerprint": data.fingerprint,
                "sums": dict(sums),
            },
            state_path,
        )

    bar = tqdm(total=settings.max_steps, initial=step, desc="pretrain", leave=False, file=sys.stderr,
               disable=not progress or None)
    if step == 0:
        report()  # the starting point: held-out loss before any update
    model.train(settings.dropout is not False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    while step < settings.max_steps and (stop_at is None or step < stop_at):
        started = time.perf_counter()
        batches = [make_batch(stream_data.take(settings.batch_size), data, settings, generator)
                   for _ in range(settings.grad_accumulation)]
        total = max(sum(n_targets(b, causal) for b in batches), 1)
        n_pairs = sum(len(b["input_ids"]) for b in batches)
        step_loss = 0.0
        for batch in batches:
            result = batch_losses(model, batch, causal=causal, nsp=settings.nsp, device=device)
            loss = result["lm_sum"] / total
            if settings.nsp:
                loss = loss + result["nsp_sum"] / n_pairs
                sums["nsp_correct"] += int(result["nsp_correct"])
                sums["nsp_n"] += int(result["nsp_n"])
            loss.backward()
            step_loss += float(loss.detach())
            sums["lm_correct"] += int(result["lm_correct"])
            sums["lm_n"] += int(result["lm_n"])
            sums["pieces"] += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss):
            raise SpacyCtxError(
                f"step {step + 1}: the loss is {step_loss}; lower learn_rate (now {settings.learn_rate}) "
                "or raise warmup_steps"
            )
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        sums["loss"] += step_loss
        sums["steps"] += 1
        sums["seconds"] += time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if step % settings.eval_frequency == 0 or step == settings.max_steps:
            report()
        if step % settings.checkpoint_frequency == 0 or step == settings.max_steps:
            checkpoint()
    bar.close()
    if best is None and step == settings.max_steps:
        print("no held-out text (heldout_fraction = 0 and no [paths] heldout): model-best not written",
              file=stream, flush=True)
    return {
        "step": step,
        "finished": step >= settings.max_steps,
        "best_loss": best,
        "best_step": best_step,
        "last": last_row,
        "model_last": str(output / "model-last"),
        "model_best": str(output / "model-best") if best is not None else None,
        "data": data.stats,
    }


def _perplexity(loss: Optional[float]) -> Optional[float]:
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows a killed run wrote after its last checkpoint; they are written again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf8")


def read_metrics(output: PathLike) -> List[Dict[str, Any]]:
    """The rows of ``output/metrics.jsonl``."""
    path = Path(output) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf8").splitlines() if line.strip()]


# -- evaluation of a saved transformer LM ------------------------------------------------------------
def evaluate_transformer_lm(
    model_dir: PathLike,
    heldout: PathLike,
    *,
    seq_len: int = 128,
    batch_size: int = 16,
    mask_probability: float = 0.15,
    seed: int = 0,
    lang: str = "en",
    gpu_id: int = -1,
) -> Dict[str, Any]:
    """Masked-LM (or causal-LM for GPT-2) loss and perplexity of a saved model on raw text.

    Masked LM: ``mask_probability`` of the pieces, 80/10/10, masks drawn from
    ``seed`` (the same every call), the loss averaged over masked pieces; the
    perplexity is ``exp(loss)`` (a pseudo-perplexity: comparable between models
    of the same tokenizer only).
    """
    from ..encoders.checkpoint import read_family_config
    from ..encoders.pretraining_checkpoint import load_pretraining_model

    model_dir = Path(model_dir)
    family, config = read_family_config(model_dir / "config.json")
    limit = family.usable_positions(config)
    seq_len = min(seq_len, limit) if limit else seq_len
    settings = PretrainSettings(
        raw_text=[Path(heldout)], encoder=model_dir, heldout=None, objective="clm" if family.causal else "mlm",
        mask_probability=mask_probability, seq_len=seq_len, batch_size=batch_size, seed=seed, lang=lang,
        heldout_fraction=0.0, heldout_max_sequences=10**9,
    )
    if not Path(heldout).exists():
        raise ConfigError(f"held-out text {str(heldout)!r} does not exist")
    device = _device(gpu_id)
    model = load_pretraining_model(model_dir, create_missing=False).to(device)
    raw_config = getattr(model.config, "raw", None) or {}
    data = prepare_data(settings, eos_id=raw_config.get("eos_token_id"))
    data.heldout, data.train = data.train, []
    scores = evaluate(model, data, settings, device, mask_seed=seed)
    return {
        "objective": settings.objective,
        "loss": scores["heldout_loss"],
        "perplexity": _perplexity(scores["heldout_loss"]),
        "accuracy": scores["heldout_accuracy"],
        "sequences": len(data.heldout),
    }

