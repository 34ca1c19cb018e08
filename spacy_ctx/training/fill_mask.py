"""fill-mask and next-sentence scoring with a pretraining checkpoint.

:func:`fill_mask` gives, for each mask token in a text, the ``top_k`` most
probable pieces with their probabilities, as ``transformers``'
``pipeline("fill-mask")`` does (same pieces, same scores, same ``token_str``
and ``sequence`` strings). :func:`next_sentence` gives the probability that
sentence B follows sentence A from BERT's next-sentence head, as
``BertForPreTraining`` computes it. :func:`format_fill_mask` renders the
results as a table for the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..encoders.heads import PretrainingModel
from ..encoders.pretraining_checkpoint import load_pretraining_model
from ..errors import CheckpointError
from ..pieces.tokenizer import PieceTokenizer

Prediction = Dict[str, Any]
_MASK_NAMES = ("[MASK]", "<mask>")
# transformers' clean_up_tokenization: spaces before punctuation and clitics.
_CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


class _Text:
    """The checkpoint's tokenizer with what fill-mask needs: specials, the mask
    token and transformers' decoding rules (``clean_up_tokenization_spaces``)."""

    def __init__(self, model_dir: Path) -> None:
        self.pieces = PieceTokenizer.from_pretrained_dir(model_dir)
        self.tokenizer = self.pieces.tokenizer
        settings = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")
        names = [_token_text(settings.get("mask_token")), _token_text(special_map.get("mask_token"))]
        names += list(_MASK_NAMES)
        self.mask_token: Optional[str] = None
        self.mask_id: Optional[int] = None
        for name in names:
            token_id = self.tokenizer.token_to_id(name) if name else None
            if token_id is not None:
                self.mask_token, self.mask_id = name, token_id
                break
        # transformers skips the clean-up for BPE models (it would corrupt them).
        self.cleanup = bool(settings.get("clean_up_tokenization_spaces", False)) and (
            type(self.tokenizer.model).__name__ != "BPE"
        )

    def encode(self, text: str) -> List[int]:
        """Piece ids with the model's specials around them."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.pieces.prefix_ids + list(ids) + self.pieces.suffix_ids

    def encode_pair(self, first: str, second: str) -> Tuple[List[int], List[int]]:
        """``[CLS] A [SEP] B [SEP]`` and its token types (0 up to the first [SEP], then 1)."""
        a = self.tokenizer.encode(first, add_special_tokens=False).ids
        b = self.tokenizer.encode(second, add_special_tokens=False).ids
        head = self.pieces.prefix_ids + list(a) + self.pieces.suffix_ids
        tail = list(b) + self.pieces.suffix_ids
        return head + tail, [0] * len(head) + [1] * len(tail)

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.cleanup:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf8")) if path.is_file() else {}
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}).") from err
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def fill_mask(
    model_dir: Union[str, Path],
    text: str,
    top_k: int = 5,
    *,
    model: Optional[PretrainingModel] = None,
) -> List[List[Prediction]]:
    """The ``top_k`` pieces for each mask token in ``text``, most probable first.

    Returns one list per mask token (in text order) of dicts with ``score`` (the
    softmax probability), ``token`` (the piece id), ``token_str`` (the piece
    decoded) and ``sequence`` (the text with this piece filled in, decoded as
    transformers' fill-mask pipeline does). The mask token is the tokenizer's
    (``[MASK]``, ``<mask>``, ...). ``model``: an already loaded model of
    ``model_dir`` (default: load it; the checkpoint must have an MLM head).
    """
    model_dir = Path(model_dir)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    text_tools = _Text(model_dir)
    if text_tools.mask_id is None:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has no mask token (looked for the tokenizer_config.json "
            f"mask_token and {', '.join(_MASK_NAMES)}); fill-mask needs a masked-LM tokenizer."
        )
    ids = text_tools.encode(text)
    positions = [i for i, piece in enumerate(ids) if piece == text_tools.mask_id]
    if not positions:
        raise ValueError(
            f"the text has no mask token {text_tools.mask_token!r}; write it where a word should be "
            f"predicted, e.g. 'The {text_tools.mask_token} raised interest rates.'"
        )
    if model is None:
        model = load_pretraining_model(model_dir, create_missing=False)
    if model.causal:
        raise CheckpointError(
            f"{model_dir}: a causal language model (model_type "
            f"{getattr(model.config, 'model_type', model.family.name)!r}) cannot fill masks."
        )
    _check_length(model, ids, model_dir)
    model.eval()
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        logits, _ = model(input_ids, torch.ones_like(input_ids))
        probs = logits[0, positions].float().softmax(dim=-1)
        values, predictions = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    single = len(positions) == 1
    pad_id = text_tools.pieces.pad_id
    results: List[List[Prediction]] = []
    for row, position in enumerate(positions):
        options = []
        for score, piece in zip(values[row].tolist(), predictions[row].tolist()):
            filled = list(ids)
            filled[position] = piece
            filled = [i for i in filled if i != pad_id]
            options.append(
                {
                    "score": float(score),
                    "token": int(piece),
                    "token_str": text_tools.decode([piece], skip_special_tokens=False),
                    # Other masks stay visible when there are several (as transformers does).
                    "sequence": text_tools.decode(filled, skip_special_tokens=single),
                }
            )
        results.append(options)
    return results


def next_sentence(
    model_dir: Union[str, Path], first: str, second: str, *, model: Optional[PretrainingModel] = None
) -> float:
    """The probability that ``second`` follows ``first`` (BERT's next-sentence
    head: softmax of ``[CLS] first [SEP] second [SEP]``'s two logits, class 0 =
    "is next"). The checkpoint must have the head (saved as BertForPreTraining)."""
    model_dir = Path(model_dir)
    if model is None:
        model = load_pretraining_model(model_dir, nsp=True, create_missing=False)
    if model.nsp_head is None:
        raise CheckpointError(
            f"{model_dir}: the model has no next-sentence head; load it with nsp=True from a "
            "checkpoint saved as BertForPreTraining."
        )
    text_tools = _Text(model_dir)
    ids, types = text_tools.encode_pair(first, second)
    _check_length(model, ids, model_dir)
    model.eval()
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        _, nsp = model(
            input_ids, torch.ones_like(input_ids), torch.tensor([types], dtype=torch.long, device=device)
        )
    assert nsp is not None
    return float(nsp[0].float().softmax(dim=-1)[0])


def _check_length(model: PretrainingModel, ids: List[int], model_dir: Path) -> None:
    limit = model.family.usable_positions(model.config)
    if len(ids) > limit:
        raise ValueError(
            f"the input has {len(ids)} pieces (specials included) but {model_dir} takes at most "
            f"{limit}; shorten the text."
        )


def format_fill_mask(results: List[List[Prediction]]) -> str:
    """A plain-text table of :func:`fill_mask`'s results: one block per mask with
    rank, piece, probability and the filled-in text."""
    lines: List[str] = []
    for number, options in enumerate(results, start=1):
        if len(results) > 1:
            lines.append(f"mask {number}")
        width = max([len(repr(o["token_str"])) for o in options] + [5])
        lines.append(f"{'#':>3}  {'piece':<{width}}  {'prob':>8}  sequence")
        for rank, option in enumerate(options, start=1):
            piece = repr(option["token_str"])
            lines.append(f"{rank:>3}  {piece:<{width}}  {option['score']:>8.4f}  {option['sequence']}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
