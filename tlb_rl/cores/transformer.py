"""A causal Transformer over the last W steps, with no slow stream: TLB's "no bottleneck" ablation.

Each layer's step t attends to that layer's inputs at steps t-W+1 .. t of the same episode. The state
keeps every layer's inputs for the last W-1 steps (Transformer-XL style memory), so one call of T
steps and T calls of one step compute the same thing. Positions enter as a learned bias per head and
distance, which does not depend on where a call begins.
"""

from __future__ import annotations

import torch
from torch import nn

from tlb_rl.cores.base import Core, State, check_inputs, check_sizes, detached
from tlb_rl.cores.blocks import Block


class WindowTransformerCore(Core):
    """Sliding-window causal Transformer.

    :param input_dim: width of the inputs.
    :param d_model: token width; also the output width.
    :param window: W, the number of steps (the current one included) a layer attends to.
    :param n_layers: Transformer layers.
    :param n_heads: attention heads.
    :param mlp_ratio: hidden width of the MLPs as a multiple of ``d_model``.
    :param dropout: dropout in attention and MLPs.
    """

    compilable = True

    def __init__(
        self,
        input_dim: int,
        d_model: int = 64,
        window: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_sizes(d_model=d_model, window=window, n_layers=n_layers, n_heads=n_heads, mlp_ratio=mlp_ratio)
        self.input_dim, self.output_dim = input_dim, d_model
        self.W, self.n_layers, self.n_heads = window, n_layers, n_heads
        self.proj = nn.Linear(input_dim, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, dropout, cross=True) for _ in range(n_layers))
        self.distance_bias = nn.Parameter(torch.zeros(n_heads, window))
        self.ln_out = nn.LayerNorm(d_model)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        D, M, device = self.output_dim, self.W - 1, device or self.device
        return {
            "memory": torch.zeros(batch_size, self.n_layers, M, D, device=device),  # layer inputs, last W-1 steps
            "n_valid": torch.zeros(batch_size, dtype=torch.long, device=device),  # of those, in this episode
        }

    def forward(
        self, x: torch.Tensor, state: State, episode_starts: torch.Tensor, *, state_grad: bool = True
    ) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        T = x.shape[1]
        M, dev = self.W - 1, x.device
        # Index i of a query step is M + t in the key sequence [memory, current]; key j is valid for i when
        # i - W < j <= i and j is not before the first step of i's episode.
        t = torch.arange(T, device=dev)
        last_start = torch.where(episode_starts.bool(), t, -1).cummax(1).values  # [B, T]
        first_key = torch.where(last_start >= 0, M + last_start, M - state["n_valid"][:, None])  # [B, T]
        j = torch.arange(M + T, device=dev)
        dist = (M + t)[:, None] - j  # [T, M+T]
        allowed = (dist >= 0) & (dist < self.W) & (j >= first_key[..., None])  # [B, T, M+T]
        bias = self.distance_bias[:, dist.clamp(0, M)]  # [H, T, M+T]
        mask = torch.where(allowed[:, None], bias, float("-inf"))  # [B, H, T, M+T]

        h = self.proj(x)
        memories = []
        for layer, blk in enumerate(self.blocks):
            keys = torch.cat([state["memory"][:, layer].to(h.dtype), h], 1)  # [B, M+T, D]
            memories.append(keys[:, T:])
            h = blk(h, keys, mask=mask)
        last = last_start[:, -1]
        n_valid = torch.where(last >= 0, T - last, state["n_valid"] + T).clamp(max=M)
        new = {"memory": torch.stack(memories, 1), "n_valid": n_valid}
        return self.ln_out(h), new if state_grad else detached(new)
