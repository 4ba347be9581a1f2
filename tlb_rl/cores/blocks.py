"""Pre-LayerNorm Transformer pieces shared by the attention cores (nanoGPT-style, with cross-attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of ``q`` [B, Tq, D] over ``kv`` [B, Tk, D]."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, Tq, D = q.shape
        H = self.n_heads
        query = self.q(q).view(B, Tq, H, D // H).transpose(1, 2)  # [B, H, Tq, D/H]
        key, value = self.kv(kv).view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x [B, H, Tk, D/H]
        y = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, Tq, D))


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
        y = F.linear(F.gelu(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
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

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.ln_q(x)
        kv = q if self.ln_kv is None else self.ln_kv(context)
        x = x + self.attn(q, kv, mask=mask)
        return x + self.mlp(self.ln_mlp(x))
