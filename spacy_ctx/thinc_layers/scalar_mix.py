"""ELMo's scalar mix as a Thinc layer: ``gamma * sum_k softmax(s)_k * h_k``.

Input: one (n_layers, n_rows, width) array per Doc; output: one (n_rows, width)
array per Doc. Optional layer norm normalises each layer of each Doc over all of
its values (per Doc rather than per batch as in AllenNLP, so a Doc's result does
not depend on what else is in the batch). Layer dropout drops whole layers from
the softmax during training.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from thinc.api import Model
from thinc.types import Floats2d, Floats3d

LN_EPS = 1e-12
DROPPED = -1e20  # a logit that softmax turns into an exact 0


def ScalarMix(
    n_layers: Optional[int] = None, *, layer_norm: bool = False, layer_dropout: float = 0.0
) -> Model[List[Floats3d], List[Floats2d]]:
    """Learned softmax-weighted sum of layers times a learned scale.

    ``n_layers`` may be left to None and set (dim ``nL``) before initialization.
    """
    if n_layers is not None and n_layers < 1:
        raise ValueError(f"ScalarMix needs at least one layer, got {n_layers}")
    if not 0.0 <= layer_dropout < 1.0:
        raise ValueError(f"layer_dropout must be in [0, 1), got {layer_dropout}")
    return Model(
        "scalar_mix",
        forward,
        init=init,
        dims={"nL": n_layers},
        params={"weights": None, "gamma": None},
        attrs={"layer_norm": layer_norm, "layer_dropout": layer_dropout},
    )


def init(model: Model, X=None, Y=None) -> None:
    if not model.has_dim("nL"):
        raise ValueError("ScalarMix: the number of layers (nL) is unknown at initialization")
    model.set_param("weights", model.ops.alloc1f(model.get_dim("nL")))
    gamma = model.ops.alloc1f(1)
    gamma[0] = 1.0
    model.set_param("gamma", gamma)


def _normalize(xp, X: Floats3d) -> Tuple[Floats3d, Floats3d]:
    """Per-layer standardisation over all values; returns (X_hat, 1/sigma per layer)."""
    if X.shape[1] * X.shape[2] == 0:
        return X, xp.ones((X.shape[0], 1, 1), dtype=X.dtype)
    mean = X.mean(axis=(1, 2), keepdims=True)
    centered = X - mean
    inv_sigma = 1.0 / xp.sqrt((centered**2).mean(axis=(1, 2), keepdims=True) + LN_EPS)
    return centered * inv_sigma, inv_sigma


def forward(
    model: Model, Xs: List[Floats3d], is_train: bool
) -> Tuple[List[Floats2d], Callable]:
    xp = model.ops.xp
    logits = model.get_param("weights")
    gamma = float(model.get_param("gamma")[0])
    n_layers = logits.shape[0]
    for X in Xs:
        if X.shape[0] != n_layers:
            raise ValueError(
                f"ScalarMix was built for {n_layers} layers but received {X.shape[0]}; "
                "the encoder must return all layers to this listener."
            )
    dropout = model.attrs["layer_dropout"]
    if is_train and dropout > 0:
        dropped = xp.random.uniform(0.0, 1.0, (n_layers,)) < dropout
        if dropped.all():  # keep at least one layer
            dropped[int(xp.random.randint(n_layers))] = False
        logits = xp.where(dropped, DROPPED, logits)
    shifted = xp.exp(logits - logits.max())
    weights = (shifted / shifted.sum()).astype("float32")
    normed = []
    inv_sigmas = []
    for X in Xs:
        if model.attrs["layer_norm"]:
            X_hat, inv_sigma = _normalize(xp, X)
        else:
            X_hat, inv_sigma = X, None
        normed.append(X_hat)
        inv_sigmas.append(inv_sigma)
    mixed = [xp.tensordot(weights, X_hat, axes=(0, 0)) for X_hat in normed]
    Ys = [gamma * m for m in mixed]

    def backprop(dYs: List[Floats2d]) -> List[Floats3d]:
        d_gamma = sum(float((dY * m).sum()) for dY, m in zip(dYs, mixed))
        d_weights = xp.zeros((n_layers,), dtype="float32")
        dXs = []
        for dY, X_hat, inv_sigma in zip(dYs, normed, inv_sigmas):
            d_weights += gamma * xp.tensordot(X_hat, dY, axes=((1, 2), (0, 1)))
            dX_hat = gamma * weights[:, None, None] * dY[None]
            if inv_sigma is not None and X_hat.size:
                mean_d = dX_hat.mean(axis=(1, 2), keepdims=True)
                mean_dx = (dX_hat * X_hat).mean(axis=(1, 2), keepdims=True)
                dX_hat = inv_sigma * (dX_hat - mean_d - X_hat * mean_dx)
            dXs.append(dX_hat.astype("float32"))
        # Softmax backward: ds = w * (dw - sum(w * dw)); dropped layers have w = 0.
        d_logits = weights * (d_weights - float((weights * d_weights).sum()))
        model.inc_grad("weights", d_logits.astype("float32"))
        model.inc_grad("gamma", model.ops.asarray1f([d_gamma]))
        return dXs

    return Ys, backprop
