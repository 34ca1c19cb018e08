"""What makes a transformer family: config reading, module, checkpoint names.

Each family module (``bert.py``, ``deberta.py``, ``modernbert.py``, ``gpt2.py``)
describes itself with a :class:`Family` and registers it. The checkpoint
loader, the backend and the ``info`` command only talk to this interface, so
adding a family is a config mapping, a module built from :mod:`.blocks`, and a
table of tensor names.

Tensor names: our modules use their own names (shared blocks are called the
same in every family); ``Family.names`` is a list of ``(checkpoint, ours)``
templates that map a checkpoint's names (after its prefix, e.g. ``roberta.``)
to ours and back. ``{n}`` in a template stands for a layer number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import CheckpointError


class TransformerEncoder(nn.Module):
    """Base of every family's module: returns the embedding output and each layer.

    Subclasses set ``self.config`` (a family config with at least
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``vocab_size``) and implement :meth:`forward`.
    """

    config: Any

    @property
    def n_layers(self) -> int:
        """Number of outputs of :meth:`forward`: the embedding output plus each layer."""
        return self.config.num_hidden_layers + 1

    @property
    def layer_names(self) -> List[str]:
        return ["embeddings"] + [f"layer_{i + 1}" for i in range(self.config.num_hidden_layers)]

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def blocks_to_run(self, n_layers: Optional[int]) -> int:
        """How many transformer blocks :meth:`forward` runs to return its first
        ``n_layers`` outputs (None: all of them).

        Output ``k`` (0 = embeddings) depends only on blocks ``1..k``, so stopping
        after block ``n_layers - 1`` leaves the computed outputs unchanged; a model
        with a final norm (GPT-2, ModernBERT) applies it to the last block's output
        only, i.e. only when every block runs (Hugging Face's hidden states are
        the same: only the last entry is after the final norm).
        """
        n_blocks = self.config.num_hidden_layers
        if n_layers is None:
            return n_blocks
        valid = isinstance(n_layers, int) and not isinstance(n_layers, bool)
        if not valid or not 1 <= n_layers <= n_blocks + 1:
            raise ValueError(
                f"n_layers={n_layers!r} must be between 1 (embeddings only) and "
                f"{n_blocks + 1} (every layer) for this model."
            )
        return n_layers - 1

    @staticmethod
    def check_input_ids(input_ids: torch.Tensor, max_length: Optional[int]) -> int:
        """The length of ``input_ids``, after checking that it is (batch, length) with
        at most ``max_length`` positions (None: no bound); raises ValueError."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if max_length is not None and length > max_length:
            raise ValueError(
                f"input_ids has {length} positions but the model supports "
                f"{max_length}; cut the input into windows."
            )
        return length

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        n_layers: Optional[int] = None,
    ) -> List[torch.Tensor]:
        """input_ids, attention_mask: (batch, length), mask 1/True for real pieces and
        0/False for padding (always on the right). Returns ``n_layers`` tensors of
        shape (batch, length, width): the embedding output and the first
        ``n_layers - 1`` layers (None: all ``self.n_layers``); layers above the
        highest returned one are not computed (see :meth:`blocks_to_run`)."""
        raise NotImplementedError


NameRule = Tuple[str, str]


@dataclass(frozen=True)
class Family:
    """A transformer family, as the loader, the backend and ``info`` see it.

    name: canonical family name. model_types: the ``config.json`` ``model_type``
    values it loads. read_config(dict, source) -> validated config (raises
    :class:`CheckpointError` naming ``source`` and the key). build(config) -> a
    :class:`TransformerEncoder`. prefixes: encoder prefixes found in checkpoints,
    most specific first (``""`` = a bare model). names: ``(checkpoint, ours)``
    name templates. skipped: regexes of names inside the prefix that are not
    part of the encoder on purpose (pooler, ``position_ids`` buffers). heads:
    regexes of names outside the prefix that are task heads (skipped).
    transposed: regexes of *our* names whose checkpoint tensors are stored
    transposed (GPT-2's ``Conv1D``). causal: pieces see only their left context.
    usable_positions(config): positions a window may fill, specials included
    (e.g. 512 for RoBERTa's 514 position embeddings).
    """

    name: str
    model_types: Tuple[str, ...]
    read_config: Callable[[Dict[str, Any], str], Any]
    build: Callable[[Any], TransformerEncoder]
    usable_positions: Callable[[Any], int]
    prefixes: Tuple[str, ...] = ("",)
    names: Tuple[NameRule, ...] = ()
    skipped: Tuple[str, ...] = ()
    heads: Tuple[str, ...] = ()
    transposed: Tuple[str, ...] = ()
    causal: bool = False
    tokenizer_kind: str = "wordpiece"  # informative: wordpiece, bpe, unigram
    _compiled: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # -- names --------------------------------------------------------------------------
    def _rules(self, reverse: bool) -> List[Tuple["re.Pattern[str]", str]]:
        key = "reverse" if reverse else "forward"
        if key not in self._compiled:
            rules = []
            for checkpoint, ours in self.names:
                source, target = (ours, checkpoint) if reverse else (checkpoint, ours)
                pattern = "^" + re.escape(source).replace(r"\{n\}", r"(\d+)")
                rules.append((re.compile(pattern), target))
            self._compiled[key] = rules
        return self._compiled[key]

    @staticmethod
    def _rename(name: str, rules: Sequence[Tuple["re.Pattern[str]", str]]) -> Optional[str]:
        for pattern, target in rules:
            match = pattern.match(name)
            if match:
                replaced = target.replace("{n}", match.group(1)) if match.groups() else target
                return replaced + name[match.end():]
        return None

    def to_ours(self, checkpoint_name: str) -> Optional[str]:
        """Our name for a checkpoint tensor name (prefix already removed); None if no
        rule matches."""
        return self._rename(checkpoint_name, self._rules(reverse=False))

    def to_checkpoint(self, our_name: str) -> Optional[str]:
        """The checkpoint name (without prefix) for one of our tensor names."""
        return self._rename(our_name, self._rules(reverse=True))

    def is_skipped(self, inner_name: str) -> bool:
        return any(re.search(p, inner_name) for p in self.skipped)

    def is_head(self, outer_name: str) -> bool:
        return any(re.search(p, outer_name) for p in self.heads)

    def is_transposed(self, our_name: str) -> bool:
        return any(re.search(p, our_name) for p in self.transposed)

    def state_shapes(self, config: Any) -> Dict[str, Tuple[int, ...]]:
        """Name and shape of every tensor of ``build(config)``, without allocating it
        (the module is built on the ``meta`` device)."""
        with torch.device("meta"):
            module = self.build(config)
        return {name: tuple(t.shape) for name, t in module.state_dict().items()}


_FAMILIES: Dict[str, Family] = {}
# Family modules register themselves on import; this lists them for lazy import.
FAMILY_MODULES = ("bert", "deberta", "modernbert", "gpt2")


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def register_prefixed_family(name: str, prefix: str, **settings: Any) -> Family:
    """Register the family ``name`` (also its only ``model_type``) whose checkpoints
    hold the encoder under ``prefix`` (a model with a task head) or bare (a base
    model). ``settings`` are the other :class:`Family` fields."""
    return register_family(Family(name=name, model_types=(name,), prefixes=(prefix, ""), **settings))


def _import_all() -> None:
    import importlib
    import importlib.util

    for module in FAMILY_MODULES:
        if importlib.util.find_spec(f".{module}", __package__) is not None:
            importlib.import_module(f".{module}", __package__)


def supported_model_types() -> List[str]:
    _import_all()
    return sorted(_FAMILIES)


def family_for(model_type: Any, source: str = "config.json") -> Family:
    """The family that loads ``model_type``, or a :class:`CheckpointError` listing the
    supported ones."""
    _import_all()
    if isinstance(model_type, str) and model_type in _FAMILIES:
        return _FAMILIES[model_type]
    raise CheckpointError(
        f"{source}: model_type={model_type!r} is not supported by ctx_bert; supported "
        f"model types: {', '.join(sorted(_FAMILIES))}."
    )
