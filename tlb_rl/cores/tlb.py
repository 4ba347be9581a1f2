"""The Temporal Latent Bottleneck core (Didolkar et al. 2022), made causal for control.

Fast stream: Transformer layers over the steps of the current chunk of K steps, causal inside the chunk,
with a cross-attention to the slow vectors every R layers. Slow stream: N vectors, updated by
cross-attention to the chunk's fast outputs (+ MLP, residual or gated) when a chunk completes.
Chunks count from the episode start; an episode start resets the slow vectors to a learned value.

Speed: the layers before the first cross-attention do not depend on the slow state, so they run for
all chunks of a sequence at once; only the rest runs in a loop over chunks (about T/K iterations, plus
one per episode start). Acting one step recomputes the current chunk only: O(K), not O(t).
"""

from __future__ import annotations

import torch
from torch import nn

from tlb_rl.cores.base import Core, State, check_inputs
from tlb_rl.cores.blocks import Block


class SlowUpdate(nn.Module):
    """New slow vectors from the old ones (queries) and a completed chunk's fast outputs (keys/values)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float, gated: bool):
        super().__init__()
        self.block = Block(d_model, n_heads, mlp_ratio, dropout, cross=True)
        # A gate lets a slot keep its content instead of always adding to it; measured, not assumed.
        self.gate = nn.Linear(2 * d_model, d_model) if gated else None

    def forward(self, slow: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        candidate = self.block(slow, chunk)
        if self.gate is None:
            return candidate
        g = torch.sigmoid(self.gate(torch.cat([slow, candidate], -1)))
        return g * candidate + (1 - g) * slow


class TLBCore(Core):
    """Temporal Latent Bottleneck core.

    :param input_dim: width of the inputs.
    :param d_model: width of fast tokens and slow vectors; also the output width.
    :param chunk_size: K, steps per chunk.
    :param n_slow: N, number of slow vectors.
    :param n_layers: fast-stream self-attention layers.
    :param cross_every: R, a cross-attention to the slow vectors follows every R-th fast layer.
    :param n_heads: attention heads.
    :param mlp_ratio: hidden width of the MLPs as a multiple of ``d_model``.
    :param dropout: dropout in attention and MLPs.
    :param gated: gated instead of residual slow update.
    """

    def __init__(
        self,
        input_dim: int,
        d_model: int = 128,
        chunk_size: int = 8,
        n_slow: int = 8,
        n_layers: int = 2,
        cross_every: int = 2,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        gated: bool = False,
    ):
        super().__init__()
        if not 1 <= cross_every <= n_layers:
            raise ValueError(f"cross_every must be in [1, n_layers={n_layers}], got {cross_every}")
        if chunk_size < 1 or n_slow < 1:
            raise ValueError("chunk_size and n_slow must be at least 1")
        self.input_dim, self.output_dim = input_dim, d_model
        self.K, self.N = chunk_size, n_slow
        self.proj = nn.Linear(input_dim, d_model)
        self.pos = nn.Parameter(torch.randn(chunk_size, d_model) * 0.02)
        self.slow_init = nn.Parameter(torch.randn(n_slow, d_model) * 0.02)
        # Fast stream: `early` layers see only the chunk; each later stage starts with a cross-attention.
        block = lambda cross=False: Block(d_model, n_heads, mlp_ratio, dropout, cross=cross)  # noqa: E731
        self.early = nn.ModuleList(block() for _ in range(cross_every))
        self.stages = nn.ModuleList()
        for first in range(cross_every, n_layers + 1, cross_every):
            rest = min(cross_every, n_layers - first)
            self.stages.append(nn.ModuleList([block(cross=True), *(block() for _ in range(rest))]))
        self.update = SlowUpdate(d_model, n_heads, mlp_ratio, dropout, gated)
        self.ln_out = nn.LayerNorm(d_model)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        return {
            "slow": self.slow_init.detach().to(device).expand(batch_size, -1, -1).clone(),  # [B, N, D]
            "recent": torch.zeros(batch_size, self.K - 1, self.input_dim, device=device),  # last K-1 inputs
            "chunk_len": torch.zeros(batch_size, dtype=torch.long, device=device),  # steps of current chunk seen
        }

    def forward(self, x: torch.Tensor, state: State, episode_starts: torch.Tensor) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        B, T, _ = x.shape
        K, P = self.K, self.K - 1
        dev = x.device
        # The sequence seen by this call: the last K-1 inputs (some of them in the current chunk) + x.
        z = torch.cat([state["recent"].to(x.dtype), x], 1)  # [B, S, Din], S = P + T
        starts = torch.cat([torch.zeros(B, P, dtype=torch.bool, device=dev), episode_starts.bool()], 1)
        chunk_len = state["chunk_len"][:, None]  # [B, 1]

        # Position of every step inside its chunk; negative for remembered steps of an older chunk.
        s = torch.arange(P + T, device=dev)
        last_start = torch.where(starts, s, -1).cummax(1).values  # [B, S]
        since = torch.where(last_start >= 0, s - last_start, s - P + chunk_len)
        q = torch.where(since >= 0, since % K, since)  # [B, S]
        seg = (q == 0).cumsum(1) - 1  # chunk index of every step within this call; -1 before the first
        C = int(seg[:, -1].max()) + 1
        # Scatter steps into a chunk layout [B, C, K]; steps of no chunk go to a discarded slot.
        slot = torch.where(q >= 0, seg * K + q, C * K)  # [B, S]

        h = self.proj(z) + self.pos[q.clamp(min=0)]  # [B, S, D]
        D = h.shape[-1]
        layout = h.new_zeros(B, C * K + 1, D).scatter(1, slot[..., None].expand(-1, -1, D), h)
        chunks = layout[:, :-1].reshape(B * C, K, D)
        for blk in self.early:  # independent of the slow state: all chunks at once
            chunks = blk(chunks, causal=True)
        chunks = chunks.view(B, C, K, D)

        first = torch.zeros(B, C * K + 1, dtype=torch.bool, device=dev).scatter(1, slot, starts)
        reset = first[:, :-1].view(B, C, K)[:, :, 0]  # [B, C] chunk begins an episode
        filled = torch.zeros(B, C * K + 1, dtype=torch.bool, device=dev).scatter(1, slot, q == K - 1)
        complete = filled[:, :-1].view(B, C, K)[:, :, -1]  # [B, C] chunk has all K steps

        slow, init = state["slow"].to(x.dtype), self.slow_init.expand(B, -1, -1)
        outs = []
        for c in range(C):
            slow = torch.where(reset[:, c, None, None], init, slow)
            y = chunks[:, c]  # [B, K, D]
            for stage in self.stages:
                y = stage[0](y, slow)
                for blk in stage[1:]:
                    y = blk(y, causal=True)
            outs.append(y)
            slow = torch.where(complete[:, c, None, None], self.update(slow, y), slow)

        out = torch.stack(outs, 1).view(B, C * K, D)
        out = out.gather(1, slot[:, P:, None].expand(-1, -1, D))  # [B, T, D]
        new_state = {"slow": slow, "recent": z[:, T:], "chunk_len": (q[:, -1] + 1) % K}
        return self.ln_out(out), new_state
