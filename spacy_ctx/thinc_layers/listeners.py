"""Listeners: how ``ner``, ``textcat``, ``tagger``, ``spancat`` consume a shared encoder.

A listener is ``Model[List[Doc], List[Floats2d]]`` (one row per spaCy token) made of

* a *receiver*: the upstream ``CtxComponent`` runs once per batch and hands
  every listener its outputs and a gradient callback (:meth:`ListenerLink.receive`);
  when nothing was received (initialization, prediction outside the pipeline, or
  an encoder excluded from updates) the listener asks the component to encode
  the Docs itself, without gradients;
* a *head* (``Model[List[CtxOutput], List[Floats2d]]``): pick the last layer or
  scalar-mix all layers, then pool pieces to tokens.

The head is also what :func:`build_standalone` chains after a copy of the encoder
when ``nlp.replace_listeners`` makes a component independent.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from spacy.errors import Errors
from spacy.tokens import Doc
from thinc.api import Model, Ragged, chain, deserialize_attr, serialize_attr
from thinc.backends import CupyOps
from thinc.types import Floats2d, Floats3d
from thinc.util import torch2xp

from ..backends import CtxOutput
from .backend_layer import DEFAULT_MAX_BATCH_TOKENS, GradMode, run_backend

LISTENER_NAME = "ctx_listener"
LAYERS_LAST = "last"
LAYERS_ALL = "all"


def get_batch_id(docs: Sequence[Doc]) -> int:
    """Content hash of a batch (as spaCy's Tok2Vec listener computes it)."""
    return sum(sum(token.orth for token in doc) for doc in docs)


class ListenerLink:
    """Runtime state of a listener: its upstream component and the last batch it received.

    Never serialized, and shared rather than deep-copied with the model.
    """

    def __init__(self, component: Any = None) -> None:
        self.component = component
        self.batch_id: Optional[int] = None
        self.outputs: Optional[List[CtxOutput]] = None
        self.backprop: Optional[Callable] = None
        # The last prediction batch, per Doc object: components such as the parser
        # predict on re-sorted sub-batches of what the encoder saw.
        self.predicted: Dict[int, Tuple[Doc, CtxOutput]] = {}

    def __deepcopy__(self, memo) -> "ListenerLink":
        return ListenerLink(self.component)

    def receive(
        self,
        batch_id: Optional[int],
        outputs: Optional[List[CtxOutput]],
        backprop: Optional[Callable],
    ) -> None:
        self.batch_id, self.outputs, self.backprop = batch_id, outputs, backprop

    def receive_prediction(self, docs: List[Doc], outputs: List[CtxOutput]) -> None:
        """Outputs of a prediction pass, unless training outputs for this batch wait here
        (an encoder in ``annotating_components`` predicts right after its update)."""
        if self.backprop is not None and self.batch_id == get_batch_id(docs):
            return
        self.receive(None, None, None)  # forget any earlier training batch
        self.predicted = {id(doc): (doc, output) for doc, output in zip(docs, outputs)}

    def take(self, docs: List[Doc], is_train: bool) -> Tuple[Optional[List[CtxOutput]], Optional[Callable]]:
        """Outputs received for this batch, or (None, None).

        Training needs exactly the batch the encoder saw; prediction also accepts
        any subset of the last prediction batch, in any order.
        """
        if not is_train and self.predicted:
            found = [self.predicted.get(id(doc)) for doc in docs]
            if all(entry is not None and entry[0] is doc for entry, doc in zip(found, docs)):
                for doc in docs:  # consumed: do not keep Docs or tensors alive longer
                    del self.predicted[id(doc)]
                return [entry[1] for entry in found], None  # type: ignore[index]
        if self.outputs is None:
            return None, None
        batch_id = get_batch_id(docs)
        if batch_id != self.batch_id or len(self.outputs) != len(docs):
            if is_train:
                raise ValueError(Errors.E953.format(id1=batch_id, id2=self.batch_id))
            return None, None
        outputs, backprop = self.outputs, self.backprop
        self.batch_id, self.outputs, self.backprop = None, None, None
        return outputs, backprop


@serialize_attr.register(ListenerLink)
def _serialize_link(_: ListenerLink, value: ListenerLink, name: str, model: Model) -> bytes:
    return b""


@deserialize_attr.register(ListenerLink)
def _deserialize_link(current: ListenerLink, value: bytes, name: str, model: Model) -> ListenerLink:
    return current  # the link is re-made by the component's find_listeners


# -- the listener -----------------------------------------------------------------------------
def build_listener(
    head: Model[List[CtxOutput], List[Floats2d]], *, upstream: str, grad_factor: float
) -> Model[List[Doc], List[Floats2d]]:
    """Wrap a head as a listener of the encoder component named ``upstream`` (or ``"*"``)."""
    return Model(
        LISTENER_NAME,
        listener_forward,
        init=listener_init,
        layers=[head],
        dims={"nO": None},
        attrs={
            "upstream_name": upstream,
            "grad_factor": float(grad_factor),
            "layers_needed": head.attrs["layers_needed"],
            "link": ListenerLink(),
        },
    )


def is_listener(model: Model) -> bool:
    return model.name == LISTENER_NAME and isinstance(model.attrs.get("link"), ListenerLink)


def _upstream(model: Model):
    component = model.attrs["link"].component
    if component is None:
        raise ValueError(
            f"The {LISTENER_NAME} (upstream={model.attrs['upstream_name']!r}) is not connected "
            "to a ctx_bert/ctx_elmo component. Add the encoder component before the component "
            "that listens to it, with a matching name."
        )
    return component


def listener_init(model: Model, X: Optional[List[Doc]] = None, Y=None) -> None:
    component = _upstream(model)
    model.set_dim("nO", component.width, force=True)
    head = model.layers[0]
    for node in head.walk():
        if node.name == "scalar_mix":
            n_layers = len(component.layer_names)
            if not node.has_dim("nL"):
                node.set_dim("nL", n_layers)
            elif node.get_dim("nL") != n_layers:
                raise ValueError(
                    f"ScalarMixListener has n_layers={node.get_dim('nL')} but the encoder "
                    f"'{component.name}' returns {n_layers} layers; set n_layers to "
                    f"{n_layers} or leave it null."
                )
    head.initialize()


def listener_forward(
    model: Model, docs: List[Doc], is_train: bool
) -> Tuple[List[Floats2d], Callable]:
    link: ListenerLink = model.attrs["link"]
    outputs, upstream_backprop = link.take(docs, is_train)
    if outputs is None:
        outputs = _upstream(model).encode_for_listener(docs, model.attrs["layers_needed"])
    head = model.layers[0]
    Y, backprop_head = head(outputs, is_train)
    grad_factor = model.attrs["grad_factor"]

    def backprop(dY: List[Floats2d]) -> List[Doc]:
        d_outputs = backprop_head(dY)  # also fills the head's own gradients (scalar mix)
        if upstream_backprop is not None:
            # Always report, even with nothing to send: the encoder counts listeners.
            if grad_factor == 0.0:
                upstream_backprop(None)
            else:
                if grad_factor != 1.0:
                    d_outputs = [d * grad_factor for d in d_outputs]
                upstream_backprop(d_outputs)
        return []

    return Y, backprop


# -- heads ----------------------------------------------------------------------------------------
def _to_xp(model: Model, tensor: torch.Tensor):
    """A detached torch tensor as an array of the model's ops (numpy or cupy)."""
    tensor = tensor.detach()
    if isinstance(model.ops, CupyOps):
        return torch2xp(tensor.contiguous())
    return tensor.to("cpu").numpy()


def build_head(
    pooling: Model[Ragged, Floats2d], mix: Optional[Model[List[Floats3d], List[Floats2d]]]
) -> Model[List[CtxOutput], List[Floats2d]]:
    """Last layer (``mix=None``) or a scalar mix of all layers, pooled to tokens."""
    layers = [with_empty_tokens(pooling)] + ([mix] if mix is not None else [])
    return Model(
        "ctx_listener_head",
        head_forward,
        init=init_sublayers,
        layers=layers,
        attrs={"layers_needed": LAYERS_ALL if mix is not None else LAYERS_LAST},
    )


def init_sublayers(model: Model, X=None, Y=None) -> None:
    """Initialize every sub-layer (Thinc's default init does not recurse)."""
    for layer in model.layers:
        layer.initialize()


def head_forward(
    model: Model, outputs: List[CtxOutput], is_train: bool
) -> Tuple[List[Floats2d], Callable]:
    pool = model.layers[0]
    mix = model.layers[1] if len(model.layers) > 1 else None
    shapes = [tuple(o.layers.shape) for o in outputs]
    if mix is not None:
        units, backprop_mix = mix([_to_xp(model, o.layers) for o in outputs], is_train)
    else:
        units = [_to_xp(model, o.layers[-1]) for o in outputs]
        backprop_mix = None
    xp = model.ops.xp
    # Rows each token pools, in token order: a piece may serve several tokens (or
    # none), so gather by piece_index; None is the identity and needs no copy.
    indices = [None if o.piece_index is None else xp.asarray(o.piece_index) for o in outputs]
    rows = [u if index is None else u[index] for u, index in zip(units, indices)]
    piece_counts = [model.ops.asarray1i(o.piece_counts) for o in outputs]
    width = shapes[0][2] if shapes else 0
    flat = xp.concatenate(rows) if rows else model.ops.alloc2f(0, width)
    Y_flat, backprop_pool = pool(Ragged(flat, xp.concatenate(piece_counts)), is_train)
    n_tokens = [len(o.piece_counts) for o in outputs]
    splits = np.cumsum(n_tokens)[:-1].tolist()
    Ys = xp.split(Y_flat, splits) if outputs else []

    def backprop(dYs: List[Floats2d]) -> List[Floats3d]:
        d_rows_flat = backprop_pool(xp.concatenate(dYs)).data
        row_splits = np.cumsum([len(r) for r in rows])[:-1].tolist()
        d_units = []
        for shape, index, d_rows in zip(shapes, indices, xp.split(d_rows_flat, row_splits)):
            if index is None:
                d_units.append(d_rows)
            else:  # a piece gathered for several tokens receives the sum of their gradients
                d_unit = model.ops.alloc2f(shape[1], shape[2])
                model.ops.scatter_add(d_unit, index, d_rows)
                d_units.append(d_unit)
        if backprop_mix is not None:
            return backprop_mix(d_units)
        d_layers = []
        for shape, d in zip(shapes, d_units):
            full = model.ops.alloc3f(*shape)
            full[-1] = d
            d_layers.append(full)
        return d_layers

    return list(Ys), backprop


def with_empty_tokens(pooling: Model[Ragged, Floats2d]) -> Model[Ragged, Floats2d]:
    """Let a reduce layer accept tokens with zero pieces: they pool to zeros.

    Thinc's reduce_first/last/max reject empty sequences, so each empty token
    gets one zero row for the duration of the call.
    """
    return Model("with_empty_tokens", _empty_tokens_forward, layers=[pooling], init=init_sublayers)


def _empty_tokens_forward(model: Model, X: Ragged, is_train: bool) -> Tuple[Floats2d, Callable]:
    pooling = model.layers[0]
    xp = model.ops.xp
    lengths = X.lengths
    empty = lengths == 0
    if not bool(empty.any()):
        return pooling(X, is_train)
    padded_lengths = xp.where(empty, 1, lengths).astype("int32")
    padded_starts = xp.cumsum(padded_lengths) - padded_lengths
    # Where each original row goes: its token's padded start + its offset in the token.
    token_of_row = xp.repeat(xp.arange(len(lengths)), lengths if xp is np else lengths.tolist())
    row_starts = xp.cumsum(lengths) - lengths
    offsets = xp.arange(X.data.shape[0]) - row_starts[token_of_row]
    destination = padded_starts[token_of_row] + offsets
    data = model.ops.alloc2f(int(padded_lengths.sum()), X.data.shape[1])
    data[destination] = X.data
    Y, backprop_pool = pooling(Ragged(data, padded_lengths), is_train)

    def backprop(dY: Floats2d) -> Ragged:
        return Ragged(backprop_pool(dY).data[destination], lengths)

    return Y, backprop


def build_standalone(
    encoder: Model[List[Doc], List[CtxOutput]],
    head: Model[List[CtxOutput], List[Floats2d]],
    *,
    frozen: bool = False,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> Model[List[Doc], List[Floats2d]]:
    """Encoder and head in one model: what a listener becomes after replace_listeners.

    frozen, max_batch_tokens: the settings of the component the listener listened to.
    """
    # The head reads only the last layer, or all of them for a scalar mix. These
    # attrs are fixed at construction; the encoder stays a sub-layer so its
    # weights are trained, saved and moved with the model.
    encode = Model(
        "ctx_standalone_encode",
        _standalone_encode_forward,
        layers=[encoder],
        init=init_sublayers,
        attrs={
            "layers": [-1] if head.attrs["layers_needed"] == LAYERS_LAST else None,
            "frozen": bool(frozen),
            "max_batch_tokens": int(max_batch_tokens),
        },
    )
    model = chain(encode, head)
    model.attrs["layers_needed"] = head.attrs["layers_needed"]
    return model


def _standalone_encode_forward(model: Model, docs: List[Doc], is_train: bool):
    if not is_train:
        mode = GradMode.PREDICT
    else:
        mode = GradMode.FROZEN if model.attrs["frozen"] else GradMode.TRAIN
    return run_backend(
        model.layers[0],
        docs,
        mode=mode,
        layers=model.attrs["layers"],
        max_batch_tokens=model.attrs["max_batch_tokens"],
    )
