"""The Temporal Latent Bottleneck core (Didolkar et al. 2022), made causal for control.

Fast stream: Transformer layers over the steps of the current chunk of K steps, causal inside the chunk;
every R-th layer is followed by a cross-attention from the chunk's tokens to the slow vectors.
Slow stream: N vectors, updated when a chunk completes by reading the chunk's tokens.

Chunks follow each env's step clock: step t of a row is position ``t mod K`` of its chunk, whatever the
episodes do. An episode start resets the slow vectors to a learned value and masks what came before it:
the fast attention of later steps, and the slow update of the chunk. So the number of chunks in a call
depends on T alone, every env completes a chunk on the same steps, and nothing in the computation depends
on the data's values: no host syncs, static shapes (``torch.compile(fullgraph=True)`` works; the same
property is what CUDA-graph capture needs, benchmarks/cuda_graph.py).

Two slow updates:

- ``slow_update="sequential"`` (default, the paper's): the slow vectors query the chunk (cross-attention +
  MLP), gated or residual. Its queries depend on the slow state, so chunks are read one after another.
- ``slow_update="parallel"``: learned queries read every chunk at once, and gates per slow vector mix the
  result in, ``s_c = f_c * s_{c-1} + i_c * u_c``: a linear recurrence, computed for all chunks as one
  [C, C] matrix product. Cheaper to train; how each learns: docs/benchmarks.md.

The slow update reads the chunk's tokens as the first R layers leave them, before they meet the slow
state (the paper's reads the last fast layer, which would put every later fast layer inside the
recurrence), so every token-wise layer runs once, batched over all T steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tlb_rl.cores.base import Core, State, check_inputs, check_sizes
from tlb_rl.cores.blocks import Block

SLOW_UPDATES = ("sequential", "parallel")
BLOCK = 128
"""Steps per attention block of a long call: a step's keys (its chunk) lie within its block's P steps and the
K before them, so attention costs T * (P + K), not T^2, while a call of up to BLOCK steps is one block."""


class _Plan(NamedTuple):
    """Where a call's steps, keys and chunks sit: L steps (T padded) in nb blocks of P steps, touching C chunks."""

    nb: int
    P: int
    L: int
    C: int
    wins: list[int]  # the block whose keys chunk c's update reads
    slot: torch.Tensor  # [B, L] each step's slot, counted from the start of the chunk in progress at the call
    first: torch.Tensor  # [B, L] the first slot a step may attend to
    self_mask: torch.Tensor  # [B * nb, 1, P, P + K] a step's keys: its chunk's steps of its episode up to it
    cross_mask: torch.Tensor  # [B * nb, 1, P, (P/K + 2) * N] the slow vectors a step reads
    update_mask: torch.Tensor  # [B, C, P + K] the keys chunk c's update reads
    reset: torch.Tensor  # [B, C] an episode began in chunk c: its update starts from the initial slow vectors
    complete: torch.Tensor  # [B, C] chunk c has all K steps: only then is it read


def _windows(x: torch.Tensor, size: int, step: int) -> torch.Tensor:
    """Windows of ``size`` rows every ``step`` rows of x [B, L, F] -> [B * n, size, F] (a copy unless n = 1)."""
    if x.shape[1] == size:
        return x
    return x.unfold(1, size, step).transpose(2, 3).flatten(0, 1)


class TLBCore(Core):
    """Temporal Latent Bottleneck core.

    The defaults (width 64, K = 16 steps per chunk, N = 8 slow vectors, two fast layers, MLP ratio 2, gated
    sequential slow update) have about as many parameters as the default LSTM core (hidden 128): ~152k
    against ~132k with 128 inputs. Why these defaults: docs/results.md and docs/benchmarks.md.

    :param input_dim: width of the inputs.
    :param d_model: width of fast tokens and slow vectors; also the output width.
    :param chunk_size: K, steps per chunk.
    :param n_slow: N, number of slow vectors.
    :param n_layers: fast-stream self-attention layers.
    :param cross_every: R, a cross-attention to the slow vectors follows every R-th fast layer.
    :param n_heads: attention heads.
    :param mlp_ratio: hidden width of the MLPs as a multiple of ``d_model``.
    :param dropout: dropout in the MLPs.
    :param gated: sequential update only: mix the update into the slow vectors through a learned gate
        (default) instead of adding it residually as the paper does (measured: docs/results.md).
    :param slow_update: ``"sequential"`` (the paper's: the slow vectors query each chunk in turn) or
        ``"parallel"`` (learned queries read all chunks at once; a gated linear recurrence). See docs/cores.md.
    """

    def __init__(
        self,
        input_dim: int,
        d_model: int = 64,
        chunk_size: int = 16,
        n_slow: int = 8,
        n_layers: int = 2,
        cross_every: int = 2,
        n_heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
        gated: bool = True,
        slow_update: str = "sequential",
    ):
        super().__init__()
        check_sizes(
            d_model=d_model,
            chunk_size=chunk_size,
            n_slow=n_slow,
            n_layers=n_layers,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
        )
        if not 1 <= cross_every <= n_layers:
            raise ValueError(f"cross_every must be in [1, n_layers={n_layers}], got {cross_every}")
        if slow_update not in SLOW_UPDATES:
            raise ValueError(f"slow_update must be one of {', '.join(SLOW_UPDATES)}, got {slow_update!r}")
        self.input_dim, self.output_dim = input_dim, d_model
        self.K, self.N = chunk_size, n_slow
        self.parallel = slow_update == "parallel"
        self.proj = nn.Linear(input_dim, d_model)
        self.pos = nn.Parameter(torch.randn(chunk_size, d_model) * 0.02)
        self.slow_init = nn.Parameter(torch.randn(n_slow, d_model) * 0.02)
        # Fast stream in order; a cross block after every R-th self-attention block.
        layers: list[Block] = []
        for i in range(n_layers):
            layers.append(Block(d_model, n_heads, mlp_ratio, dropout))
            if (i + 1) % cross_every == 0:
                layers.append(Block(d_model, n_heads, mlp_ratio, dropout, cross=True))
        self.layers = nn.ModuleList(layers)
        self.update = Block(d_model, n_heads, mlp_ratio, dropout, cross=True)
        if self.parallel:
            self.slow_query = nn.Parameter(torch.randn(n_slow, d_model) * 0.02)
            # Per slow vector, from what the chunk wrote: how much of the old to keep, how much of the new to write
            # (two gates, as an LSTM's forget and input gates, so a slot can both write a cue and keep it).
            self.gate = nn.Linear(d_model, 2)
            nn.init.zeros_(self.gate.bias)
            # Chrono initialisation (Tallec & Ollivier 2018): slow vector n starts keeping a share 1 - 1/tau of
            # itself per chunk, tau = 2, 4, ..., 2^N chunks, so some slots hold a cue over long corridors from the
            # start; with every keep gate at ~0.5 a cue fades as 0.5^chunks before anything is learned.
            self.gate_bias = nn.Parameter(torch.log(2.0 ** torch.arange(1, n_slow + 1) - 1)[:, None])  # [N, 1]
        else:  # the gate lets a slot keep its content instead of always adding to it
            self.gate = nn.Linear(2 * d_model, d_model) if gated else None
        self.ln_out = nn.LayerNorm(d_model)
        self.n_cached = n_layers + 1  # keys/values of every self-attention block, and of the slow update
        # The acting step's masks, looked up by (position q, episode's first slot e): one op each instead of five.
        k = torch.arange(chunk_size)
        visible = (k <= k[:, None, None]) & (k >= k[:, None])  # [q, e, key]: e <= key <= q
        self.register_buffer("_visible", visible, persistent=False)
        # what the next step keeps: nothing after the chunk's last step
        self.register_buffer("_kept", visible & (k < chunk_size - 1)[:, None, None], persistent=False)
        self.register_buffer("_write", torch.eye(chunk_size, dtype=torch.bool)[..., None], persistent=False)
        self.register_buffer("_next", (k + 1) % chunk_size, persistent=False)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        D, device = self.output_dim, device or self.device
        return {
            "slow": self.slow_init.detach().to(device).expand(batch_size, -1, -1).clone(),  # [B, N, D]
            # keys/values of the current chunk's earlier steps of this episode (slot = position in the chunk;
            # K slots, so the acting step writes its own in place), per self-attention block and slow update
            "kv": torch.zeros(batch_size, self.n_cached, self.K, 2 * D, device=device),
            "chunk_len": torch.zeros(batch_size, dtype=torch.long, device=device),  # steps of the chunk seen
            # the first slot of the chunk that belongs to the current episode (0: it began before the chunk)
            "ep_start": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def forward(self, x: torch.Tensor, state: State, episode_starts: torch.Tensor) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        B, T, _ = x.shape
        if T == 1:
            return self._step(x, state, episode_starts[:, 0].bool())
        plan = self._plan(state, episode_starts.bool())
        nb, P, L, C, N = plan.nb, plan.P, plan.L, plan.C, self.N
        h = self.proj(F.pad(x, (0, 0, 0, L - T)) if L > T else x) + self.pos[plan.slot % self.K]  # [B, L, D]
        cache = state["kv"]
        keys: list[torch.Tensor] = []  # [B, K + L, 2D] per cached block: the cache, then the call's steps
        slow_before = None
        for layer in self.layers:
            if not layer.cross:
                query, kv = layer.self_projections(h)
                keys.append(torch.cat([cache[:, len(keys)], kv], 1))
                kv = layer.keys_values(_windows(keys[-1], P + self.K, P))
                y = layer.attention(query.view(B * nb, P, -1), *kv, plan.self_mask)
            else:
                if slow_before is None:  # the first cross-attention: run the slow stream up to here
                    update_kv = torch.cat([cache[:, -1], self.update.context(h)], 1)
                    slow_before, slow = self._slow_stream(_windows(update_kv, P + self.K, P), plan, state["slow"])
                    # [B, L/K + 2, N, D]: every chunk's (zeros past C), then the initial ones, projected at once
                    pad = slow_before.new_zeros(B, L // self.K + 1 - C, N, slow_before.shape[-1])
                    slow_before = torch.cat([slow_before, pad, self.slow_init.expand(B, 1, -1, -1)], 1)
                projected = layer.context(slow_before)
                W = P // self.K + 1  # the chunks a block's steps can belong to
                context = _windows(projected[:, :-1].flatten(2), W, P // self.K).view(B * nb, W * N, -1)
                init = projected[:, -1:].expand(-1, nb, -1, -1).reshape(B * nb, N, -1)
                context = torch.cat([context, init], 1)
                y = layer.attention(layer.query(h).view(B * nb, P, -1), *layer.keys_values(context), plan.cross_mask)
            h = layer.feed_forward(h + y.view(B, L, -1))
        keys.append(update_kv)
        return self.ln_out(h[:, :T]), {"slow": slow, **self._carried_keys(torch.stack(keys, 1), plan, state, T)}

    def _plan(self, state: State, starts: torch.Tensor) -> _Plan:
        """Where a call's steps, keys and chunks sit, and what may attend to what (see :class:`_Plan`)."""
        B, T = starts.shape
        K, N, dev = self.K, self.N, starts.device
        nb = math.ceil(T / BLOCK)
        P = K * math.ceil(math.ceil(T / nb) / K)
        L, C = nb * P, (T + K - 2) // K + 1  # C: the chunks the call can touch, whatever the clock
        clock = state["chunk_len"][:, None]
        slot = clock + torch.arange(L, device=dev)  # [B, L]
        chunk_start = slot // K * K
        starts = F.pad(starts, (0, L - T)) if L > T else starts
        last = torch.where(starts, slot, -1).cummax(1).values  # slot of the latest episode start in the call
        # The first slot a step may attend to: its chunk's, its episode's, or the incoming state's episode's.
        first = torch.maximum(torch.maximum(chunk_start, last), state["ep_start"][:, None])
        fresh = last >= chunk_start  # the step's episode began in its chunk: it reads the initial slow vectors

        # Key j of the sequence [cached K slots, L steps] sits at slot j (cache) or clock + j - K (step j - K).
        j = torch.arange(nb, device=dev)[:, None] * P + torch.arange(P + K, device=dev)  # [nb, P + K] block keys
        key_slot = torch.where(j < K, j, clock[..., None] + j - K)  # [B, nb, P + K]
        key_real = (j >= K) | (j < clock[..., None])  # cache slots past the clock are empty
        q_slot, q_first = slot.view(B, nb, P, 1), first.view(B, nb, P, 1)
        self_mask = key_real[:, :, None] & (key_slot[:, :, None] <= q_slot) & (key_slot[:, :, None] >= q_first)
        # Cross-attention keys of block b: the slow vectors before each of chunks bP/K .. bP/K + P/K, then the
        # initial ones; a step reads its chunk's, or the initial ones when its episode began in the chunk.
        W = P // K + 1
        key_chunk = torch.arange(nb, device=dev)[:, None] * (P // K) + torch.arange(W, device=dev)  # [nb, W]
        q_fresh = fresh.view(B, nb, P, 1)
        own = (key_chunk[:, None] == (q_slot // K)) & ~q_fresh  # [B, nb, P, W]
        cross_mask = torch.cat([own.repeat_interleave(N, -1), q_fresh.expand(-1, -1, -1, N)], -1)

        # Chunk c's update reads block wins[c] of the update's keys, from its episode's first slot.
        wins = [min(c * K // P, nb - 1) for c in range(C)]
        c = torch.arange(C, device=dev)
        win = (c * K // P).clamp(max=nb - 1)  # wins, made on the device (no copy from the host)
        end = (c[None] * K + K - 1 - clock).clamp(0, L - 1)  # [B, C] the step at the chunk's last slot
        end_first, end_last = first.gather(1, end), last.gather(1, end)
        slots_c = key_slot[:, win]  # [B, C, P + K]
        update_mask = key_real[:, win] & (slots_c >= end_first[..., None]) & (slots_c < (c[:, None] + 1) * K)
        # A chunk with no step in this call reads nothing and is never complete; letting it attend everywhere
        # keeps its (discarded) attention free of NaN, which some GPU kernels give for a row with no key.
        update_mask = update_mask | ~update_mask.any(-1, keepdim=True)
        return _Plan(
            nb, P, L, C, wins, slot, first,
            self_mask.view(B * nb, 1, P, P + K),
            cross_mask.view(B * nb, 1, P, (W + 1) * N),
            update_mask,
            reset=end_last >= c * K,
            complete=(c + 1) * K <= clock + T,
        )  # fmt: skip

    def _carried_keys(self, keys: torch.Tensor, plan: _Plan, state: State, T: int) -> State:
        """The state's keys/values [B, n_cached, K, 2D] of the chunk in progress after the call (from the first
        slot of its episode, zeros elsewhere), its length and that first slot; ``keys`` [B, n_cached, K + L, 2D]."""
        K, clock = self.K, state["chunk_len"]
        stop = clock + T
        new_len = stop % K
        new_ep = torch.where(new_len > 0, plan.first[:, T - 1] % K, 0)
        s = torch.arange(K, device=keys.device)
        at = (stop // K * K)[:, None] + s  # [B, K] the slots of the chunk in progress
        index = torch.where(at < clock[:, None], at, K + at - clock[:, None]).clamp(max=keys.shape[2] - 1)
        kv = keys.gather(2, index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1]))
        kv = kv * ((s < new_len[:, None]) & (s >= new_ep[:, None]))[:, None, :, None]
        return {"kv": kv, "chunk_len": new_len, "ep_start": new_ep}

    def _step(self, x: torch.Tensor, state: State, start: torch.Tensor) -> tuple[torch.Tensor, State]:
        """One step ([B, 1, input_dim]) without the chunk layout: the acting path.

        Same result as the sequence path (tests/test_cores.py checks T one-step calls against one call of
        T steps): the step writes its keys/values into its chunk's slot of the cache and attends to the
        slots of its episode up to it, and the slow vectors read the chunk when it completes.
        """
        K = self.K
        q = state["chunk_len"]  # [B] the step's position in its chunk
        ep = torch.where(start, q, state["ep_start"])
        slow = torch.where(start[:, None, None], self.slow_init, state["slow"])
        visible = self._visible[q, ep][:, None, None]  # [B, 1, 1, K]
        write = self._write[q]  # [B, K, 1]
        # Tokens stay [B, D] here: a linear on 2-D input is one kernel; on [B, 1, D] it adds reshapes.
        h = self.proj(x[:, 0]) + self.pos[q]  # [B, D]
        cache = state["kv"]
        chunk_kv: list[torch.Tensor] = []
        update_kv = None
        for layer in self.layers:
            if not layer.cross:
                query, kv = layer.self_projections(h)
                kv = torch.where(write, kv[:, None], cache[:, len(chunk_kv)])  # [B, K, 2D]
                chunk_kv.append(kv)
                y = layer.attention(query[:, None], *layer.keys_values(kv), visible)
            else:
                if update_kv is None:  # the first cross-attention: the slow stream reads the tokens here
                    update_kv = torch.where(write, self.update.context(h)[:, None], cache[:, -1])
                y = layer.attention(layer.query(h)[:, None], *layer.keys_values(layer.context(slow)))
            h = layer.feed_forward(h + y[:, 0])
        chunk_kv.append(update_kv)
        complete = q == K - 1
        new_slow = slow
        # In eager CPU mode a host read costs nothing, and skipping the update on the K-1 of K steps where no
        # row completes a chunk saves most of its cost; elsewhere the step stays branch-free for capture.
        if complete.is_cuda or torch.compiler.is_compiling() or bool(complete.any()):
            key, value = self.update.keys_values(update_kv)
            if self.parallel:
                log_keep, written = self._parallel_update(key, value, visible, 1)
                new = log_keep.exp() * slow + written
            else:
                new = self._sequential_update(slow, key, value, visible)
            new_slow = torch.where(complete[:, None, None], new, slow)
        kv = torch.stack(chunk_kv, 1) * self._kept[q, ep][:, None, :, None]
        new_state = {"slow": new_slow, "kv": kv, "chunk_len": self._next[q], "ep_start": ep.masked_fill(complete, 0)}
        return self.ln_out(h)[:, None], new_state

    def _slow_stream(self, windows: torch.Tensor, plan: _Plan, slow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slow vectors at the start of every chunk [B, C, N, D], and after the last one [B, N, D].

        ``windows`` [B * nb, P + K, 2D]: the update's keys/values in blocks; chunk c reads block ``wins[c]``
        where ``plan.update_mask`` allows, starts from the initial slow vectors where ``plan.reset``, and is
        read only where ``plan.complete`` (all its K steps are in).
        """
        mask, wins, reset, complete, nb = plan.update_mask, plan.wins, plan.reset, plan.complete, plan.nb
        B, C = reset.shape
        init = self.slow_init.expand(B, -1, -1)
        keys, values = self.update.keys_values(windows)  # [B * nb, H, P + K, D/H]
        if self.parallel:
            # Every chunk's learned queries at once: block b holds chunks bP/K .. (one more in the last block).
            S = max(wins.count(b) for b in range(nb))  # chunks of the fullest block (the last holds one more)
            per_block = plan.P // self.K
            if nb > 1:  # place chunk c at its block's row; unused rows attend everywhere (no NaN), then drop
                c = torch.arange(C, device=windows.device)
                where = c + (c // per_block).clamp(max=nb - 1) * (S - per_block)  # row b * S + its place in b
                mask = mask.new_ones(B, nb * S, mask.shape[-1]).index_copy(1, where, mask)
            mask = mask.view(B * nb, 1, S, -1).repeat_interleave(self.N, 2)
            log_keep, written = (v.view(B, nb * S, self.N, -1) for v in self._parallel_update(keys, values, mask, S))
            if nb > 1:
                log_keep, written = log_keep.index_select(1, where), written.index_select(1, where)
            # [B, C, N, 1], [B, C, N, D]
            after = self._gated_recurrence(log_keep, written, slow, init, reset, complete)  # [B, C, N, D]
            return torch.cat([slow[:, None], after[:, :-1]], 1), after[:, -1]
        # Unbound once: indexing [:, c] in the loop would make every iteration's backward add a zero-padded
        # copy of all C chunks (O(C^2) work); unbind's backward is one stack.
        keys, values = keys.unflatten(0, (B, nb)).unbind(1), values.unflatten(0, (B, nb)).unbind(1)
        masks = mask[:, :, None, None].unbind(1)  # [B, 1, 1, P + K] each
        resets, completes = reset[..., None, None].unbind(1), complete[..., None, None].unbind(1)
        before = []
        for c in range(C):  # the only sequential loop: one iteration per chunk
            before.append(slow)
            slow = torch.where(resets[c], init, slow)
            if c * self.K < plan.L:  # else chunk c cannot complete in this call, whatever the clock
                update = self._sequential_update(slow, keys[wins[c]], values[wins[c]], masks[c])
                slow = torch.where(completes[c], update, slow)
        return torch.stack(before, 1), slow

    def _sequential_update(
        self, slow: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The slow vectors [B, N, D] after querying one chunk's keys/values [B, H, S, D/H] where mask allows."""
        upd = self.update
        new = upd.feed_forward(slow + upd.attention(upd.query(slow), key, value, mask))
        if self.gate is None:
            return new
        return torch.lerp(slow, new, torch.sigmoid(self.gate(torch.cat([slow, new], -1))))

    def _parallel_update(
        self, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, chunks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``chunks`` chunks per row of keys/values [M, H, S, D/H] do to the slow vectors: the log of the
        share each slow vector keeps [M, chunks * N, 1] and what is written [M, chunks * N, D]."""
        upd = self.update
        base = self.slow_query.repeat(chunks, 1)  # [chunks * N, D]
        query = upd.query(base).expand(key.shape[0], -1, -1)
        u = upd.feed_forward(base + upd.attention(query, key, value, mask))
        keep, write = self.gate(u).split(1, -1)
        return F.logsigmoid(keep + self.gate_bias.repeat(chunks, 1)), torch.sigmoid(write) * u

    def _gated_recurrence(
        self,
        log_keep: torch.Tensor,
        written: torch.Tensor,
        slow: torch.Tensor,
        init: torch.Tensor,
        reset: torch.Tensor,
        complete: torch.Tensor,
    ) -> torch.Tensor:
        """All of ``s_c = g_c * base_c + written_c`` at once (base_c: ``s_{c-1}``, or ``init`` after a reset),
        from log g [B, C, N, 1], written [B, C, N, D] and s_{-1} = ``slow`` [B, N, D].

        Unrolled, s_c = sum_j w_cj b_j + w_c s_{-1} with w_cj the product of the gates after chunk j, zero across
        a reset: a [C, C] weight matrix per slow vector, so the recurrence is one batched matmul. A chunk that
        is not complete keeps its slow vectors (g = 1, nothing written).
        """
        C = reset.shape[1]
        m = complete[..., None, None]
        log_keep = torch.where(m, log_keep, 0.0)[..., 0]  # [B, C, N]
        fresh = torch.where(reset[..., None, None], log_keep.exp()[..., None] * init[:, None], 0.0)
        b = torch.where(m, written, 0.0) + fresh  # [B, C, N, D]
        total = log_keep.cumsum(1)  # [B, C, N]
        segment = reset.long().cumsum(1)  # [B, C]: chunks with no reset between them share a segment
        c = torch.arange(C, device=reset.device)
        linked = (c[:, None] >= c) & (segment[:, :, None] == segment[:, None])  # [B, C, C]
        w = (total[:, :, None] - total[:, None]).masked_fill(~linked[..., None], float("-inf")).exp()  # [B, C, C, N]
        carried = torch.where(segment[..., None] == 0, total.exp(), 0.0)[..., None] * slow[:, None]  # [B, C, N, D]
        return (w.permute(0, 3, 1, 2) @ b.transpose(1, 2)).transpose(1, 2) + carried
