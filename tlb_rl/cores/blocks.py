"""Pre-LayerNorm Transformer pieces shared by the attention cores (nanoGPT-style, with cross-attention).

A block's forward is one path through it; cores that lay out queries and keys their own way (TLB's chunks
and cache) use the same steps through the methods below, so a change to a block reaches every core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tlb_rl.cores.record import record


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` without the module call. The attention cores call their layers' functions directly: a module
    call costs microseconds of Python (hooks, attribute lookups), as much as the arithmetic of one token, and
    TLB's acting step makes ~30 of them (``benchmarks/cores.py``, acting). Module hooks are not run."""
    if torch.compiler.is_compiling() and not x.is_cuda and layer.bias is not None:
        # Compiled on a CPU, inductor runs addmm as a copy of the broadcast bias into the output, then the product;
        # as a product and an add, the add joins the next elementwise kernel. Measured on TLB (docs/benchmarks.md):
        # acting step x0.86-0.94, fwd+bwd [16, 128] x0.95. On a GPU inductor does this itself.
        return x @ layer.weight.t() + layer.bias
    return F.linear(x, layer.weight, layer.bias)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` without the module call (see :func:`linear`)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[N, S, D] -> [N, H, S, D/H]"""
    N, S, D = x.shape
    return x.view(N, S, n_heads, D // n_heads).transpose(1, 2)


def attention_weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The weights [N, H, S, Sk] that ``scaled_dot_product_attention`` gives queries [N, H, S, d] over keys."""
    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1)


class Attention(nn.Module):
    """Multi-head attention's projections; :class:`Block` runs them (``q``, ``kv``, then :meth:`attend`)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys/values [N, S, 2D] -> keys and values [N, H, S, D/H]."""
        return split_heads(kv, 2 * self.n_heads).chunk(2, dim=1)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected queries [N, S, D] over keys/values [N, H, Sk, D/H] -> out-projected [N, S, D].

        Inputs are 3-D/4-D because CPU ``scaled_dot_product_attention`` takes its fused path only for
        [batch, heads, seq, dim]. ``mask``: bool (True = may attend) or additive float, broadcast to
        [N, H, S, Sk].
        """
        N, S, D = query.shape
        query = split_heads(query, self.n_heads)
        record(self, lambda: attention_weights(query, key, mask))
        dropout = self.dropout if self.training else 0.0
        if torch.compiler.is_compiling() and not query.is_cuda and not dropout:
            # Compiled on a CPU, written out: inductor fuses scale, mask and softmax between two batched matmuls
            # (or matches the pattern back to SDPA where it fits), while SDPA's CPU kernel pays per (batch, head)
            # block, and TLB's blocks are 16 x 16 (measured: docs/benchmarks.md). Eager, SDPA is the faster.
            y = attention_weights(query, key, mask) @ value
        else:
            y = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout)  # [N, H, S, D/H]
        return linear(self.out, y.transpose(1, 2).reshape(N * S, D)).view(N, S, D)  # a 2-D linear: one kernel


class MLP(nn.Sequential):
    def __init__(self, d_model: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Functional calls, not the four modules: TLB's slow update runs this on [B, N, D] once per chunk,
        # where per-call overhead outweighs the arithmetic.
        fc1, _, fc2, drop = self
        y = linear(fc2, F.gelu(linear(fc1, x)))
        return F.dropout(y, drop.p, self.training) if drop.p else y


class Block(nn.Module):
    """Attention + MLP, each pre-LayerNorm with a residual.

    A self-attention block, or with ``cross=True`` a cross-attention block from ``x`` to a ``context``.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_kv = nn.LayerNorm(d_model) if cross else None
        self.attn = Attention(d_model, n_heads, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout)

    @property
    def cross(self) -> bool:
        """A cross-attention block (it has a LayerNorm for its context)."""
        return self.ln_kv is not None

    def self_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention: projected queries [..., D] and keys/values [..., 2D] of the tokens ``x``."""
        a = layer_norm(self.ln_q, x)
        return linear(self.attn.q, a), linear(self.attn.kv, a)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-attention: projected queries [..., D] of the tokens ``x``."""
        return linear(self.attn.q, layer_norm(self.ln_q, x))

    def context(self, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention: projected keys/values [..., 2D] of the vectors attended to."""
        assert self.ln_kv is not None, "a self-attention block has no context"
        return linear(self.attn.kv, layer_norm(self.ln_kv, context))

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.keys_values(kv)

    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the attention adds to the tokens whose projected ``query`` [N, S, D] reads ``key``/``value``."""
        return self.attn.attend(query, key, value, mask)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP half of the block, residual included."""
        return x + self.mlp(layer_norm(self.ln_mlp, x))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.cross:
            query, kv = self.query(x), self.context(context)
        else:
            query, kv = self.self_projections(x)
        return self.feed_forward(x + self.attention(query, *self.keys_values(kv), mask))
