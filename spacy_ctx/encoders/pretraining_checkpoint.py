"""Loading and saving :class:`~.heads.PretrainingModel` as Hugging Face checkpoints.

:func:`load_pretraining_model` reads the encoder with
:func:`~.checkpoint.load_encoder` (strict, validated before allocation) and the
head tensors from the same weight file: the names outside the encoder prefix
(plus BERT's pooler inside it), through the family's :class:`~.heads.HeadSpec`.
A head that is there must be complete, with the shapes the config implies; a
head that is not there is created as Hugging Face initialises one.

:func:`save_pretrained` writes a folder that ``transformers``'
``AutoModelForMaskedLM`` (``AutoModelForCausalLM`` for GPT-2,
``BertForPreTraining`` with a next-sentence head) loads with no missing or
unexpected keys, and that ``ctx_bert`` loads too: ``config.json`` with the
architecture set, ``model.safetensors`` under HF names with the family prefix
and the head (tied decoder weights omitted, as transformers 5 saves them), and
the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import CheckpointError
from .checkpoint import (
    CheckpointWeights,
    _all_finite,
    export_state_dict,
    find_weights_file,
    load_encoder,
    map_checkpoint_keys,
)
from .family import Family
from .heads import (
    ARCHITECTURES,
    DEBERTA_MLM,
    DEBERTA_MLM_NEW,
    LM_HEADS,
    NSP_ARCHITECTURE,
    NSP_HEADS,
    HeadSpec,
    PretrainingModel,
    init_head,
    strip_tf_names,
    word_embedding,
)

#: Tokenizer files copied from a checkpoint folder by :func:`save_pretrained`.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "spm.model",
    "sentencepiece.bpe.model",
    "pieces.json",
)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def load_pretraining_model(
    model_dir: Union[str, Path], *, nsp: bool = False, seed: int = 0, create_missing: bool = True
) -> PretrainingModel:
    """Build the encoder of ``model_dir`` with its LM head (and NSP head if ``nsp``).

    Heads present in the checkpoint are loaded strictly (every tensor, exact
    shapes, finite values); missing ones are created with ``seed`` (normal(0,
    ``initializer_range``) weights, zero biases, LayerNorm ones/zeros, decoder
    tied to the word embeddings), or refused when ``create_missing`` is False.
    ``model.loaded_heads`` says which were read. The model is in eval mode.
    """
    model_dir = Path(model_dir)
    family, config, encoder = load_encoder(model_dir)
    source = find_weights_file(model_dir)
    model_type = getattr(config, "model_type", family.name)
    if family.name not in LM_HEADS:
        raise CheckpointError(
            f"{model_dir / 'config.json'}: model_type={model_type!r} has no masked- or causal-LM "
            f"head; pretraining supports {', '.join(sorted(ARCHITECTURES))}."
        )
    if nsp and family.name not in NSP_HEADS:
        raise CheckpointError(
            f"{model_dir / 'config.json'}: next-sentence prediction needs a BERT checkpoint "
            f"(model_type 'bert'); this is {model_type!r}. Turn NSP off for this model."
        )
    weights = CheckpointWeights(source)
    keys, encoder_prefix = _outer_keys(weights, family, config)
    embedding = word_embedding(encoder)
    _check_tied(weights, keys, family, config, embedding)
    generator = torch.Generator().manual_seed(seed)
    std = _initializer_range(config)

    spec = _lm_spec(family, config, keys, encoder_prefix, source)
    try:
        lm_head = spec.build(config, embedding)
    except ValueError as err:  # e.g. an unknown classifier_activation
        raise CheckpointError(f"{model_dir / 'config.json'}: cannot build the LM head ({err}).") from err
    init_head(lm_head, std, generator)
    loaded: List[str] = []
    if _load_head(spec, lm_head, weights, keys, encoder_prefix):
        loaded.append("lm")
    elif not create_missing:
        raise CheckpointError(
            f"{source}: no language-model head (no tensors named "
            f"{', '.join(repr(s.replace('{encoder}', encoder_prefix)) for s in spec.scope)}*); this "
            f"is a bare encoder. Use a checkpoint saved with a *ForMaskedLM head, or pretrain one."
        )
    nsp_head: Optional[nn.Module] = None
    if nsp:
        nsp_spec = NSP_HEADS[family.name]
        nsp_head = nsp_spec.build(config, embedding)
        init_head(nsp_head, std, generator)
        # BERT's pooler alone (a bare BertModel has one) is no next-sentence head.
        if _load_head(nsp_spec, nsp_head, weights, keys, encoder_prefix, need="cls.seq_relationship."):
            loaded.append("nsp")
        elif not create_missing:
            raise CheckpointError(
                f"{source}: no next-sentence head (cls.seq_relationship.*); next-sentence "
                "scores need a checkpoint saved as BertForPreTraining."
            )
    model = PretrainingModel(encoder, family, config, spec, lm_head, nsp_head, loaded)
    return model.eval()


def _outer_keys(weights: CheckpointWeights, family: Family, config: Any) -> Tuple[Dict[str, str], str]:
    """Checkpoint names relative to the outer prefix (a sentence-transformers
    wrapper, usually none) -> the real key, and the family's encoder prefix as
    this checkpoint uses it (``"bert."`` or ``""``). A file with our own names
    holds no heads: ``({}, "")``."""
    keymap = map_checkpoint_keys(weights, family, config)
    if keymap.own_format:
        return {}, ""
    prefix = None
    for ours, key in keymap.names.items():
        inner = family.to_checkpoint(ours)
        if inner and key.endswith(inner):
            prefix = key[: len(key) - len(inner)]
            break
    if prefix is None:  # only TF-named (gamma/beta) tensors: cannot happen for embeddings
        return {}, ""
    encoder_prefix = max((p for p in family.prefixes if prefix.endswith(p)), key=len, default="")
    outer = prefix[: len(prefix) - len(encoder_prefix)]
    keys = {strip_tf_names(k[len(outer):]): k for k in weights.shapes if k.startswith(outer)}
    return keys, encoder_prefix


def _initializer_range(config: Any) -> float:
    raw = getattr(config, "raw", None) or {}
    value = raw.get("initializer_range", 0.02) if isinstance(raw, dict) else 0.02
    usable = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return float(value) if usable else 0.02


def _lm_spec(
    family: Family, config: Any, keys: Dict[str, str], encoder_prefix: str, source: Path
) -> HeadSpec:
    """The head layout the checkpoint uses; for a new head, the one its config implies."""
    specs = LM_HEADS[family.name]
    present = [s for s in specs if any(s.owns(name, encoder_prefix) for name in keys)]
    if len(present) > 1:
        raise CheckpointError(
            f"{source}: holds both {present[0].name} and {present[1].name} head tensors "
            f"({', '.join(s.scope[0] for s in present)}); a checkpoint has one LM head."
        )
    if present:
        return present[0]
    if family.name == "deberta-v2":
        raw = getattr(config, "raw", None) or {}
        return DEBERTA_MLM if raw.get("legacy", True) is not False else DEBERTA_MLM_NEW
    return specs[0]


def _check_tied(
    weights: CheckpointWeights,
    keys: Dict[str, str],
    family: Family,
    config: Any,
    embedding: nn.Parameter,
) -> None:
    """Our decoders are tied to the word embeddings. A stored decoder weight must
    have the embeddings' shape, and when ``tie_word_embeddings`` is false it must
    also equal them (an untied decoder would be lost)."""
    raw = getattr(config, "raw", None) or {}
    untied = isinstance(raw, dict) and raw.get("tie_word_embeddings", True) is False
    for spec in LM_HEADS[family.name]:
        for name in spec.tied:
            key = keys.get(name)
            if key is None:
                continue
            want = tuple(embedding.shape) if name.endswith("weight") else (embedding.shape[0],)
            if weights.shapes[key] != want:
                raise CheckpointError(
                    f"{weights.file_of[key]}: tensor '{key}' has shape {weights.shapes[key]} but the "
                    f"tied decoder needs {want}. The head belongs to a different model."
                )
            if untied and name.endswith("weight"):
                (_, tensor), = weights.tensors([key])
                if not torch.equal(tensor.to(embedding.dtype), embedding.detach()):
                    raise CheckpointError(
                        f"{weights.file_of[key]}: '{key}' differs from the word embeddings "
                        "(tie_word_embeddings=false); untied decoders are not supported, the "
                        "pretraining heads always share the embedding table."
                    )


def _load_head(
    spec: HeadSpec,
    module: nn.Module,
    weights: CheckpointWeights,
    keys: Dict[str, str],
    encoder_prefix: str,
    need: Optional[str] = None,
) -> bool:
    """Copy the head's tensors into ``module``. False if the checkpoint has none
    (with ``need``: none starting with it, e.g. BERT's pooler alone is no NSP
    head); a partial head, an unknown name in its scope or a wrong shape is a
    :class:`CheckpointError`."""
    wanted = {n: tuple(t.shape) for n, t in module.state_dict().items() if not n.startswith("decoder.")}
    if not wanted:
        return True  # GPT-2: the decoder is the embeddings
    found: Dict[str, str] = {}
    unexpected: List[str] = []
    for name, key in keys.items():
        if not spec.owns(name, encoder_prefix) or name in spec.tied:
            continue
        ours = spec.to_ours(name, encoder_prefix)
        if ours is None or ours not in wanted:
            unexpected.append(key)
        else:
            found[ours] = key
    owned = [keys[n] for n in keys if spec.owns(n, encoder_prefix) and n not in spec.tied]
    if need is not None and not any(n.startswith(need) for n in keys):
        return False
    if not owned:
        return False
    missing = [spec.to_checkpoint(o, encoder_prefix) for o in wanted if o not in found]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing key(s) {', '.join(repr(m) for m in missing)}")
        if unexpected:
            problems.append(
                "unexpected key(s) " + ", ".join(f"'{k}' {weights.shapes[k]}" for k in unexpected)
            )
        raise CheckpointError(
            f"{weights.path}: the {spec.name} head is incomplete: {'; '.join(problems)}. The file "
            "is damaged or was written by a different model class."
        )
    for ours, key in found.items():
        shape, dtype = weights.shapes[key], weights.dtypes.get(key)
        if shape != wanted[ours]:
            raise CheckpointError(
                f"{weights.file_of[key]}: head tensor '{key}' has shape {shape} but config.json "
                f"implies {wanted[ours]}. The head and the config belong to different models."
            )
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{weights.file_of[key]}: head tensor '{key}' has dtype {dtype}; weights must be "
                "floating point."
            )
    params = module.state_dict()
    ours_of = {key: ours for ours, key in found.items()}
    with torch.no_grad():
        for key, tensor in weights.tensors(sorted(ours_of)):
            param = params[ours_of[key]]
            param.copy_(tensor)
            if not _all_finite(param):
                raise CheckpointError(
                    f"{weights.file_of[key]}: tensor '{key}' contains NaN or infinite values. "
                    "The file is corrupt; save the checkpoint again."
                )
    return True


# -- saving -------------------------------------------------------------------------------
def export_pretraining_state_dict(model: PretrainingModel) -> Dict[str, torch.Tensor]:
    """The model's tensors under the names its ``transformers`` class uses: the
    encoder under the family prefix, the heads outside it; tied decoders omitted."""
    family = model.family
    prefix = family.prefixes[0]
    state = export_state_dict(model.encoder, family, prefix=prefix)
    heads = [(model.lm_spec, model.lm_head)]
    if model.nsp_head is not None:
        heads.append((NSP_HEADS[family.name], model.nsp_head))
    for spec, module in heads:
        for ours, tensor in module.state_dict().items():
            if ours.startswith("decoder."):
                continue  # the word embeddings, already written
            name = spec.to_checkpoint(ours, prefix)
            if name is None:
                raise CheckpointError(f"head {spec.name!r}: no checkpoint name for '{ours}'.")
            state[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return state


def hf_config(model: PretrainingModel) -> Dict[str, Any]:
    """``config.json`` for the exported folder: the original dict with
    ``architectures`` naming the head's class (and DeBERTa's ``legacy`` matching
    the head layout)."""
    config = model.config
    raw = getattr(config, "raw", None)
    data = dict(raw) if raw else config.to_dict()
    model_type = data.get("model_type") or getattr(config, "model_type", model.family.model_types[0])
    if model.nsp_head is not None:
        data["architectures"] = [NSP_ARCHITECTURE]
    else:
        data["architectures"] = [ARCHITECTURES.get(model_type, ARCHITECTURES[model.family.name])]
    if model.family.name == "deberta-v2":
        data["legacy"] = model.lm_spec is DEBERTA_MLM
    if data.get("tie_word_embeddings") is False:
        data["tie_word_embeddings"] = True  # our decoders are tied
    return data


def save_pretrained(model: PretrainingModel, tokenizer: Any, path: Union[str, Path]) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder (created) and return it.

    tokenizer: the checkpoint folder to copy the tokenizer files from (any of
    :data:`TOKENIZER_FILES` it has), or an object with ``to_dir(path)`` (a
    :class:`~spacy_ctx.pieces.tokenizer.PieceTokenizer`).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = export_pretraining_state_dict(model)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(model), indent=2), encoding="utf8")
    if hasattr(tokenizer, "to_dir"):
        tokenizer.to_dir(path)
    else:
        source = Path(tokenizer)
        copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
        if not copied:
            raise CheckpointError(
                f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) to copy "
                f"into {path}; pass the folder the model was loaded from."
            )
        if source.resolve() != path.resolve():
            for name in copied:
                shutil.copyfile(source / name, path / name)
    return path
