"""Building blocks shared by the transformer families.

Every family (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2, ModernBERT, GPT-2)
is assembled from these: one self-attention module (scaled-dot-product attention
with whatever mask or additive bias the family needs), one feed-forward module
(optional bias, optional gated linear unit), a post-norm and a pre-norm layer,
rotary position embeddings as functions, and the attention masks. A family then
only adds its embeddings and a map from its checkpoint's tensor names to the
names used here.

Shapes: hidden states are (batch, length, width); attention inputs are split
into (batch, heads, length, head_dim); masks and biases broadcast to
(batch, heads, query, key).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` in Hugging Face configs."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# -- masks -----------------------------------------------------------------------------
def key_padding_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(batch, length) 1/0 mask -> (batch, 1, 1, length) bool: keys that may be attended."""
    if attention_mask is None:
        return None
    return attention_mask.to(torch.bool)[:, None, None, :]


def causal_mask(
    attention_mask: Optional[torch.Tensor], length: int, device: torch.device
) -> torch.Tensor:
    """(batch|1, 1, length, length) bool: key j visible from query i iff j <= i (and j is
    not padding)."""
    mask = torch.ones((length, length), dtype=torch.bool, device=device).tril()[None, None]
    padding = key_padding_mask(attention_mask)
    return mask if padding is None else mask & padding


def sliding_window_mask(
    attention_mask: Optional[torch.Tensor], length: int, radius: int, device: torch.device
) -> torch.Tensor:
    """(batch|1, 1, length, length) bool: key j visible from query i iff |i - j| <= radius
    (and j is not padding)."""
    positions = torch.arange(length, device=device)
    mask = ((positions[None, :] - positions[:, None]).abs() <= radius)[None, None]
    padding = key_padding_mask(attention_mask)
    return mask if padding is None else mask & padding


def mask_to_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Bool mask -> additive float bias (0 where visible, the dtype's minimum where not).

    For families that add their own float bias (DeBERTa's relative positions):
    SDPA takes one ``attn_mask``, either bool or float, so the two are summed.
    The finite minimum (not -inf) keeps fully masked rows free of NaN.
    """
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)


# -- rotary position embeddings -----------------------------------------------------------
def rotary_cos_sin(
    length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (length, head_dim) each, in the ``rotate_half`` layout
    (frequencies repeated over the two halves), computed in float32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    )
    positions = torch.arange(length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    table = torch.cat((angles, angles), dim=-1)
    return table.cos().to(dtype), table.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, length, head_dim) queries or keys by position."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos + rotated * sin


# -- attention -------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention with projections in, SDPA, and the output projection.

    fused_qkv: one ``qkv`` linear of width 3 x width (ModernBERT, GPT-2) instead
    of ``query``/``key``/``value``. ``bias``: biases on the input projections;
    ``out_bias``: on the output projection ``out``.
    """

    def __init__(
        self,
        width: int,
        n_heads: int,
        *,
        bias: bool = True,
        out_bias: Optional[bool] = None,
        fused_qkv: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.head_dim = width // n_heads
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(width, 3 * width, bias=bias)
        else:
            self.query = nn.Linear(width, width, bias=bias)
            self.key = nn.Linear(width, width, bias=bias)
            self.value = nn.Linear(width, width, bias=bias)
        self.out = nn.Linear(width, width, bias=bias if out_bias is None else out_bias)
        self.dropout_p = dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, width) -> (batch, heads, length, head_dim)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def project(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each (batch, heads, length, head_dim)."""
        if self.fused_qkv:
            query, key, value = self.qkv(hidden).chunk(3, dim=-1)
        else:
            query, key, value = self.query(hidden), self.key(hidden), self.value(hidden)
        return self.split_heads(query), self.split_heads(key), self.split_heads(value)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Optional[torch.Tensor],
        *,
        scale: Optional[float] = None,
    ) -> torch.Tensor:
        """SDPA over split heads, then merged heads through ``out``: (batch, length, width).

        ``mask``: bool (True = visible) or an additive float bias, broadcastable to
        (batch, heads, query, key). ``scale``: None for 1/sqrt(head_dim).
        """
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=scale,
        )
        batch, _, length, _ = context.shape
        return self.out(context.transpose(1, 2).reshape(batch, length, -1))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor],
        rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        query, key, value = self.project(hidden)
        if rotary is not None:
            cos, sin = rotary
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        return self.attend(query, key, value, mask)


class FeedForward(nn.Module):
    """``inner(width -> ffn)``, activation, ``outer(ffn -> width)``.

    glu: ``inner`` is 2 x ffn wide and its output is split into input and gate,
    giving ``act(input) * gate`` (GeGLU with a GELU activation).
    """

    def __init__(
        self,
        width: int,
        ffn: int,
        act: str,
        *,
        bias: bool = True,
        glu: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.glu = glu
        self.inner = nn.Linear(width, 2 * ffn if glu else ffn, bias=bias)
        self.outer = nn.Linear(ffn, width, bias=bias)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.glu:
            value, gate = self.inner(hidden).chunk(2, dim=-1)
            return self.outer(self.dropout(self.act(value) * gate))
        return self.outer(self.act(self.inner(hidden)))


def layer_norm(width: int, eps: float, bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=eps, bias=bias)


class PostNormLayer(nn.Module):
    """BERT's layer: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x))).

    Used by BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT and DeBERTa-v2
    (which passes its own attention module).
    """

    def __init__(
        self,
        attention: nn.Module,
        ffn: FeedForward,
        width: int,
        eps: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.attention_norm = layer_norm(width, eps)
        self.ffn = ffn
        self.ffn_norm = layer_norm(width, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor], **attention_kwargs) -> torch.Tensor:
        attended = self.attention_norm(
            hidden + self.dropout(self.attention(hidden, mask, **attention_kwargs))
        )
        return self.ffn_norm(attended + self.dropout(self.ffn(attended)))


class PreNormLayer(nn.Module):
    """GPT-2's and ModernBERT's layer: x = x + attn(LN(x)); x = x + ffn(LN(x)).

    ``attention_norm=None`` skips the first norm (ModernBERT's layer 0, whose
    input is already normalised by the embeddings).
    """

    def __init__(
        self,
        attention: SelfAttention,
        ffn: FeedForward,
        width: int,
        eps: float,
        dropout: float,
        *,
        norm_bias: bool = True,
        first_norm: bool = True,
    ) -> None:
        super().__init__()
        self.attention_norm = layer_norm(width, eps, norm_bias) if first_norm else nn.Identity()
        self.attention = attention
        self.ffn_norm = layer_norm(width, eps, norm_bias)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor], **attention_kwargs) -> torch.Tensor:
        hidden = hidden + self.dropout(self.attention(self.attention_norm(hidden), mask, **attention_kwargs))
        return hidden + self.dropout(self.ffn(self.ffn_norm(hidden)))
