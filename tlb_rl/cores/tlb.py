"""The Temporal Latent Bottleneck core (Didolkar et al. 2022), made causal for control.

Fast stream: Transformer layers over the steps of the current chunk of K steps, causal inside the chunk;
every R-th layer is followed by a cross-attention from the chunk's tokens to the slow vectors.
Slow stream: N vectors, updated when a chunk completes by reading the chunk's tokens.

Chunks follow each env's step clock (``clock="step"``, default): step t of a row is position ``t mod K`` of its
chunk, whatever the episodes do. An episode start resets the slow vectors to a learned value and masks what came
before it: the fast attention of later steps, and the slow update of the chunk. So every env completes a chunk on
the same steps, and a call's tokens lie in whole chunks (laid out by slot, see :class:`_Plan`), so every attention
is chunk-local. On a GPU nothing in the computation depends on the data's values: no host syncs, shapes fixed by T
(``torch.compile(fullgraph=True)`` works; the same property is what CUDA-graph capture needs,
benchmarks/cuda_graph.py). On a CPU, where a host read costs nothing, two reads skip work: the chunk of padding a
call starting a chunk does not need, and with it the layout itself (slot t is step t: no gather, no cached keys to
merge) when T is whole chunks (compiled too, at the price of a graph break); and the slow update on the acting
steps where no env completes a chunk (eager only).

With ``clock="episode"`` every episode start begins a chunk, as each of the paper's sequences does: an
episode's step t is position ``t mod K``, so an episode's first K steps attend to each other, where on the step
clock its start often shares a chunk with the previous episode's end and its first steps reach its later ones
through the slow vectors only (docs/results.md: with MemoryS11's cue given at an episode's first step, TLB
learned the choice on this clock in one seed of five by PPO, and by BC in one of three, where on the step clock
it did not in its one).
The slots a start skips to reach the next chunk are padding, so the layout depends on the data: one host read
per call, and no compile.

Two slow updates:

- ``slow_update="sequential"`` (default, the paper's): the slow vectors query the chunk (cross-attention +
  MLP), gated or residual. Its queries depend on the slow state, so chunks are read one after another.
- ``slow_update="parallel"``: learned queries read every chunk at once, and gates per slow vector mix the
  result in, ``s_c = f_c * s_{c-1} + i_c * u_c``: a linear recurrence, computed for all chunks as one
  [C, C] matrix product. Cheaper to train; how each learns: docs/benchmarks.md.

What the slow update reads of a chunk:

- ``slow_reads="before_cross"`` (default): the chunk's tokens as the first R layers leave them, before they
  meet the slow state, so every token-wise layer runs once, batched over all T steps.
- ``slow_reads="output"`` (the paper's): the fast stream's output for the chunk. The tokens of chunk c then
  depend on the slow vectors chunk c - 1 left, so every fast layer from the first cross-attention on runs
  inside the loop over chunks, one chunk at a time (sequential update only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tlb_rl.cores.base import Core, State, check_inputs, check_sizes, detached
from tlb_rl.cores.blocks import Block, layer_norm, linear
from tlb_rl.cores.record import record

SLOW_UPDATES = ("sequential", "parallel")
SLOW_READS = ("before_cross", "output")
CLOCKS = ("step", "episode")


class _Plan(NamedTuple):
    """Where a call's steps sit in its chunks, and what may attend to what.

    A call's tokens are laid out by slot: slot s of a row is position ``s mod K`` of chunk ``s // K``, and the
    call's step t sits at slot ``clock + t`` (the incoming state's ``chunk_len``); slots before the call hold
    the cached keys of the chunk in progress, slots after it are padding. The C chunks are whole, so every
    attention is chunk-local: a view, no copy, and T * K work instead of T^2.
    """

    C: int  # chunks the call can touch: S = C * K slots
    updates: int  # the first chunks, the only ones that can complete in the call
    whole: int  # the first chunks, complete whatever the clock: T // K (0 on the episode clock)
    stop: torch.Tensor  # [B] the slot after the call's last step
    # (src and dst: None when slot t holds step t, every row's clock at 0 and T whole chunks: no layout to do)
    src: torch.Tensor | None  # [B, S, D] the step held by each slot (T: a zero row, for slots outside the call)
    dst: torch.Tensor | None  # [B, T, D] the slot of each step
    cached: torch.Tensor | None  # [B, S, 1] the slot lies before the call: its keys come from the state's cache
    # (None when no row's clock is past 0: no slot does)
    first: torch.Tensor  # [B, S] the first position of its chunk a slot's step may attend to
    self_mask: torch.Tensor  # [B * C, 1, K, K] a step's keys: its chunk's steps of its episode up to it
    cross_mask: torch.Tensor  # [B * C, 1, K, 2N] the slow vectors a step reads: its chunk's or the initial ones
    update_mask: torch.Tensor  # [B, C, K] the keys chunk c's update reads: its last step's episode
    reset: torch.Tensor  # [B, C] an episode began in chunk c: its update starts from the initial slow vectors
    complete: torch.Tensor  # [B, C] chunk c has all K steps: only then is it read


def _static(t: torch.Tensor) -> bool:
    """Whether shapes and branches must not depend on data values: on a GPU, where a host read waits for the
    device and breaks graph capture. On a CPU a host read is free; under ``torch.compile`` it is a graph break."""
    return t.is_cuda


@torch.compiler.disable
def _any(t: torch.Tensor) -> bool:
    """``bool(t.any())``, run outside the graph: the same one graph break as the read inline, without Dynamo's
    warning about ``Tensor.item()`` on every compiled run's console."""
    return bool(t.any())


def _from_cache(kv: torch.Tensor, cached: torch.Tensor | None, cache: torch.Tensor | None, i: int) -> torch.Tensor:
    """Keys/values [B, L, 2D] with the slots where ``cached`` [B, L, 1] taken from ``cache[:, i]``."""
    return kv if cached is None else torch.where(cached, cache[:, i], kv)


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """A bool attention mask (True: may attend) as the float one SDPA adds to its scores."""
    return torch.zeros(mask.shape).masked_fill(~mask, -math.inf)


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
    :param slow_reads: what the slow update reads of a chunk: its tokens before the first cross-attention
        (``"before_cross"``, default) or the fast stream's output (``"output"``, the paper's; sequential only).
    :param clock: where chunks begin: on every K-th step of the env (``"step"``, default: static shapes, so
        it compiles and captures in a CUDA graph) or at every episode start and every K steps after it
        (``"episode"``: an episode's first K steps share a chunk; eager only). Measured: docs/results.md.
    """

    compilable = True

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
        slow_reads: str = "before_cross",
        clock: str = "step",
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
        if slow_reads not in SLOW_READS:
            raise ValueError(f"slow_reads must be one of {', '.join(SLOW_READS)}, got {slow_reads!r}")
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        if slow_reads == "output" and slow_update == "parallel":
            raise ValueError(
                "slow_reads='output' needs slow_update='sequential': the read chunk depends on the slow state"
            )
        self.input_dim, self.output_dim = input_dim, d_model
        self.K, self.N = chunk_size, n_slow
        self.parallel = slow_update == "parallel"
        self.reads_output = slow_reads == "output"
        self.episode_clock = clock == "episode"
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
        self.n_early = cross_every  # the self-attention layers before the first cross-attention
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
        # Masks are additive (0 or -inf): SDPA would turn a bool mask into one on every call (measured: the
        # chunk-local attention's fwd+bwd ~25% faster on CPU).
        self.register_buffer("_visible", _additive(visible), persistent=False)
        # What the next step keeps (nothing after the chunk's last step), and the slot a step writes, as 0/1 floats:
        # the acting step multiplies and lerps by them, exact for 0 and 1, where a bool mask's `where` or its
        # promotion in a product costs more (acting step x0.93 eager: docs/benchmarks.md).
        self.register_buffer("_kept", (visible & (k < chunk_size - 1)[:, None, None]).float(), persistent=False)
        self.register_buffer("_write", torch.eye(chunk_size)[..., None], persistent=False)
        self.register_buffer("_next", (k + 1) % chunk_size, persistent=False)
        # The cross-attention's keys per chunk: its slow vectors, then the initial ones; a step reads the second
        # half when its episode began in the chunk (row 1), else the first.
        first_half = torch.arange(2 * n_slow) < n_slow
        self.register_buffer("_cross", _additive(torch.stack([first_half, ~first_half])), persistent=False)

    def static_error(self) -> str | None:
        if self.episode_clock:
            return (
                "with clock='episode' lays out its chunks by where episodes start, so its shapes change with the data"
            )
        return None

    def chunk_position(self, state: State, episode_starts: torch.Tensor) -> torch.Tensor:
        """The position [B] in its chunk of the step that follows ``state`` (``episode_starts`` [B]: it begins an
        episode); the step completes its chunk at position K - 1."""
        return state["chunk_len"].masked_fill(episode_starts, 0) if self.episode_clock else state["chunk_len"]

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        D, device = self.output_dim, device or self.device
        return {
            "slow": self.slow_init.detach().to(device).expand(batch_size, -1, -1).clone(),  # [B, N, D]
            # keys/values of the current chunk's earlier steps of this episode (slot = position in the chunk;
            # K slots, so the acting step writes its own in place), per self-attention block and slow update
            "kv": torch.zeros(batch_size, self.n_cached, self.K, 2 * D, device=device, dtype=self.pos.dtype),
            "chunk_len": torch.zeros(batch_size, dtype=torch.long, device=device),  # steps of the chunk seen
            # the first slot of the chunk that belongs to the current episode (0: it began before the chunk)
            "ep_start": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def memory(self, state: State) -> torch.Tensor:
        """The slow vectors [B, N * D]: what the core carries beyond the chunk in progress."""
        return state["slow"].flatten(1)

    def forward(
        self, x: torch.Tensor, state: State, episode_starts: torch.Tensor, *, state_grad: bool = True
    ) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        B, T, _ = x.shape
        if T == 1:
            y, new = self._step(x, state, episode_starts[:, 0].bool())
            return y, new if state_grad else detached(new)
        # The latest clock the layout allows for. K - 1 makes the shapes depend on T alone, as a GPU's graph capture
        # needs. On a CPU a host read is free, and a call whose rows all begin a chunk (PPO's rollouts of a multiple
        # of K steps) then lays out no chunk of padding: T = 128, K = 16 is 8 chunks instead of 9. Compiled on a
        # CPU, the read is one graph break (the call of `_any`, which runs outside the graph) and the answer a
        # constant of the graph after it, so it is only 0 or K - 1: two graphs per shape at most.
        clock = state["chunk_len"]
        if self.episode_clock:
            lead = 0  # unused: the plan finds the layout from the episode starts
        elif _static(clock):
            lead = self.K - 1
        elif torch.compiler.is_compiling():
            lead = self.K - 1 if _any(clock) else 0
        else:
            lead = int(clock.max())
        plan = self._plan(state, episode_starts.bool(), lead)
        C, K, N, D = plan.C, self.K, self.N, self.output_dim
        S = C * K
        # Tokens by slot [B, S, D]; the position embedding of slot s is pos[s mod K], a repeat, not a gather.
        identity = plan.src is None
        h = linear(self.proj, x) if identity else F.pad(linear(self.proj, x), (0, 0, 0, 1)).gather(1, plan.src)
        h = h + self.pos.repeat(C, 1)
        # [B, n_cached, S, 2D]: the chunk in progress, by slot
        cache = None if plan.cached is None else F.pad(state["kv"], (0, 0, 0, S - K))
        keys: list[torch.Tensor] = []  # [B, S, 2D] per self-attention block
        for layer in self.layers[: self.n_early]:
            h, kv = self._self_attention(layer, h, plan.cached, cache, len(keys), plan.self_mask)
            keys.append(kv)
        if self.reads_output:
            h, late_keys, update_kv, slow = self._by_chunk(h, cache, plan, state["slow"])
            keys += late_keys
        else:
            update_kv = _from_cache(self.update.context(h), plan.cached, cache, -1)
            slow_before, slow = self._slow_stream(update_kv.view(B * C, K, -1), plan, state["slow"])
            # each chunk's slow vectors, and the initial ones for the steps whose episode began in it
            context = torch.cat([slow_before, self.slow_init.expand(B, C, N, D)], 2).view(B * C, 2 * N, D)
            for layer in self.layers[self.n_early :]:
                if layer.cross:
                    h = self._cross_attention(layer, h, context, plan.cross_mask)
                else:
                    h, kv = self._self_attention(layer, h, plan.cached, cache, len(keys), plan.self_mask)
                    keys.append(kv)
        keys.append(update_kv)
        y = layer_norm(self.ln_out, h if identity else h.gather(1, plan.dst))
        new = {"slow": slow, **self._carried_keys(torch.stack(keys, 1), plan, state, T)}
        return y, new if state_grad else detached(new)

    def _self_attention(
        self,
        layer: Block,
        h: torch.Tensor,
        cached: torch.Tensor | None,
        cache: torch.Tensor | None,
        i: int,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A self-attention block on tokens [B, L, D] in whole chunks (L a multiple of K), each attending inside
        its chunk where ``mask`` [B * L / K, 1, K, K] allows; the keys/values [B, L, 2D] of the slots where
        ``cached`` [B, L, 1] come from ``cache[:, i]``. Returns the tokens after the block and their keys/values."""
        K, D = self.K, self.output_dim
        query, kv = layer.self_projections(h)
        kv = _from_cache(kv, cached, cache, i)
        y = layer.attention(query.view(-1, K, D), *layer.keys_values(kv.view(-1, K, 2 * D)), mask)
        return layer.feed_forward(h + y.view_as(h)), kv

    def _cross_attention(
        self, layer: Block, h: torch.Tensor, context: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """A cross-attention block from tokens [B, L, D] in whole chunks to each chunk's ``context`` [B * L / K, 2N, D]
        (its slow vectors, then the initial ones), where ``mask`` [B * L / K, 1, K, 2N] allows."""
        K, D = self.K, self.output_dim
        y = layer.attention(layer.query(h).view(-1, K, D), *layer.keys_values(layer.context(context)), mask)
        return layer.feed_forward(h + y.view_as(h))

    def _by_chunk(
        self, h: torch.Tensor, cache: torch.Tensor | None, plan: _Plan, slow: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``slow_reads="output"``: the fast layers from the first cross-attention on, one chunk at a time, each
        chunk's update reading their output. ``h`` [B, S, D] as the earlier layers leave it. Returns the output
        tokens [B, S, D], the later self-attention blocks' keys/values and the update's [B, S, 2D], and the
        slow vectors after the last chunk."""
        B, C, K, N, D = h.shape[0], plan.C, self.K, self.N, self.output_dim
        tokens = h.view(B, C, K, D).unbind(1)
        self_masks = plan.self_mask.view(B, C, 1, K, K).unbind(1)
        cross_masks = plan.cross_mask.view(B, C, 1, K, 2 * N).unbind(1)
        # only chunk 0 can hold slots before the call
        cached = None if plan.cached is None else plan.cached[:, :K]
        cache = None if cache is None else cache[:, :, :K]
        init = self.slow_init.expand(B, N, D)
        out: list[torch.Tensor] = []
        keys: list[list[torch.Tensor]] = []
        update_kv: list[torch.Tensor] = []

        def read(c: int, slow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, chunk_keys, i = tokens[c], [], self.n_early
            context = torch.cat([slow, init], 1)
            for layer in self.layers[self.n_early :]:
                if layer.cross:
                    x = self._cross_attention(layer, x, context, cross_masks[c])
                else:
                    x, kv = self._self_attention(layer, x, cached if c == 0 else None, cache, i, self_masks[c])
                    chunk_keys.append(kv)
                    i += 1
            kv = self.update.context(x)
            update_kv.append(_from_cache(kv, cached, cache, -1) if c == 0 else kv)
            out.append(x)
            keys.append(chunk_keys)
            return self.update.keys_values(update_kv[-1])

        _, slow = self._sequential_stream(read, plan, slow)
        late_keys = [torch.cat(per_chunk, 1) for per_chunk in zip(*keys, strict=True)]
        return torch.cat(out, 1), late_keys, torch.cat(update_kv, 1), slow

    def _episode_slots(self, clock: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The episode clock's slot [B, T] of each step: the steps before a row's first start continue its chunk
        (slot ``clock + t``), and each episode start moves on to the next chunk boundary."""
        B, T = starts.shape
        K, t = self.K, torch.arange(T, device=starts.device)
        piece = starts.long().cumsum(1)  # [B, T] 0 for the steps before the first start, then one per episode
        offset = t - torch.where(starts, t, 0).cummax(1).values  # the step within its piece
        lengths = torch.zeros(B, T + 1, dtype=torch.long, device=starts.device).scatter_add_(
            1, piece, torch.ones_like(piece)
        )

        def up(n: torch.Tensor) -> torch.Tensor:
            return (n + K - 1) // K * K

        spans = torch.cat([up(clock + lengths[:, :1]) - clock, up(lengths[:, 1:])], 1)  # slots each piece takes
        base = clock + spans.cumsum(1) - spans  # [B, T + 1] each piece's first slot
        return base.gather(1, piece) + offset

    def _plan(self, state: State, starts: torch.Tensor, lead: int) -> _Plan:
        """Where a call's steps sit by slot, and what may attend to what (see :class:`_Plan`), for a call whose
        rows' clocks are at most ``lead`` (on the step clock; the episode clock's layout comes from ``starts``)."""
        B, T = starts.shape
        K, D, dev = self.K, self.output_dim, starts.device
        clock = state["chunk_len"][:, None]  # [B, 1]
        if self.episode_clock:
            slot = self._episode_slots(clock, starts)  # [B, T]
            stop = slot[:, -1] + 1
            # one host read: the last slot, whether every row ends at T (no chunk cut short), whether a row continues
            # a chunk begun before the call
            last_slot, ends_at_T, continues = torch.stack([stop.max(), (stop == T).all(), clock.any()]).tolist()
            C = (last_slot - 1) // K + 1
            identity = C * K == T and bool(ends_at_T) and not continues
            carried = bool(continues)
        else:
            stop = state["chunk_len"] + T
            C = (lead + T - 1) // K + 1  # the chunks of slots 0 .. lead + T - 1
            identity = lead == 0 and C * K == T  # slot t holds step t
            carried = lead > 0
            slot = None if identity else clock + torch.arange(T, device=dev)
        s = torch.arange(C * K, device=dev)
        if not identity:
            step = s - clock  # [B, S] where the slot lies from the call's start: < 0 before it
            if self.episode_clock:
                src = torch.full((B, C * K), T, dtype=torch.long, device=dev)
                src.scatter_(1, slot, torch.arange(T, device=dev).expand(B, T))
            else:
                src = torch.where((step >= 0) & (step < T), step, T)
            starts = F.pad(starts, (0, 1)).gather(1, src)  # [B, S]
        last = torch.where(starts, s, -1).cummax(1).values  # slot of the latest episode start up to each slot
        chunk_start = s // K * K
        fresh = last >= chunk_start  # the slot's episode began in its chunk: it reads the initial slow vectors
        # The first position a slot may attend to: its chunk's, its episode's, or the incoming state's episode's;
        # never past the slot itself, so the attention of a slot before the call (discarded) has a key.
        first = (torch.maximum(last, state["ep_start"][:, None]) - chunk_start).clamp(min=0)
        position = s % K
        self_mask = self._visible[position, torch.minimum(first, position)]  # [B, S, K]
        ends = first.view(B, C, K)[:, :, -1]  # [B, C] the first position of each chunk's last step's episode
        c = torch.arange(C, device=dev)
        if self.episode_clock and not identity:
            # complete: the chunk's last slot holds a step (not when an episode cut it short)
            complete = ((src < T) | (step < 0)).view(B, C, K)[:, :, -1]
        else:
            complete = (c + 1) * K <= clock + T
        return _Plan(
            C=C,
            updates=C if self.episode_clock else (lead + T) // K,
            whole=0 if self.episode_clock else T // K,
            stop=stop,
            src=None if identity else src[..., None].expand(-1, -1, D),
            dst=None if identity else slot[..., None].expand(-1, -1, D),
            cached=(step < 0)[..., None] if carried else None,
            first=first,
            self_mask=self_mask.view(B * C, 1, K, K),
            cross_mask=self._cross[fresh.long()].view(B * C, 1, K, -1),
            update_mask=self._visible[K - 1, ends],  # never empty: a chunk's last slot is always visible
            reset=last.view(B, C, K)[:, :, -1] >= c * K,
            complete=complete,
        )

    def _carried_keys(self, keys: torch.Tensor, plan: _Plan, state: State, T: int) -> State:
        """The state's keys/values [B, n_cached, K, 2D] of the chunk in progress after the call (from the first
        slot of its episode, zeros elsewhere), its length and that first slot; ``keys`` [B, n_cached, S, 2D]."""
        K, stop = self.K, plan.stop
        B, n, _, F2 = keys.shape
        new_len = stop % K
        new_ep = torch.where(new_len > 0, plan.first.gather(1, stop[:, None] - 1)[:, 0], 0)
        chunk = (stop // K).clamp(max=plan.C - 1)  # past the last chunk only when new_len = 0: nothing is kept
        kv = keys.view(B, n, plan.C, K, F2).gather(2, chunk.view(B, 1, 1, 1, 1).expand(-1, n, 1, K, F2))[:, :, 0]
        s = torch.arange(K, device=keys.device)
        kv = kv * ((s < new_len[:, None]) & (s >= new_ep[:, None]))[:, None, :, None]
        return {"kv": kv, "chunk_len": new_len, "ep_start": new_ep}

    def _step(self, x: torch.Tensor, state: State, start: torch.Tensor) -> tuple[torch.Tensor, State]:
        """One step ([B, 1, input_dim]) without the chunk layout: the acting path.

        Same result as the sequence path (tests/test_cores.py checks T one-step calls against one call of
        T steps): the step writes its keys/values into its chunk's slot of the cache and attends to the
        slots of its episode up to it, and the slow vectors read the chunk when it completes.
        """
        K = self.K
        q = self.chunk_position(state, start)  # [B] the step's position in its chunk
        ep = torch.where(start, q, state["ep_start"])
        slow = torch.where(start[:, None, None], self.slow_init, state["slow"])
        visible = self._visible[q, ep][:, None, None]  # [B, 1, 1, K]
        write = self._write[q]  # [B, K, 1]
        # Tokens stay [B, D] here: a linear on 2-D input is one kernel; on [B, 1, D] it adds reshapes.
        h = linear(self.proj, x[:, 0]) + self.pos[q]  # [B, D]
        cache = state["kv"]
        chunk_kv: list[torch.Tensor] = []
        read_at = len(self.layers) if self.reads_output else self.n_early  # the tokens the slow update reads
        for i, layer in enumerate(self.layers):
            if i == read_at:
                update_kv = torch.lerp(cache[:, -1], self.update.context(h)[:, None], write)
            if not layer.cross:
                query, kv = layer.self_projections(h)
                kv = torch.lerp(cache[:, len(chunk_kv)], kv[:, None], write)  # [B, K, 2D]
                chunk_kv.append(kv)
                y = layer.attention(query[:, None], *layer.keys_values(kv), visible)
            else:
                y = layer.attention(layer.query(h)[:, None], *layer.keys_values(layer.context(slow)))
            h = layer.feed_forward(h + y[:, 0])
        if self.reads_output:
            update_kv = torch.lerp(cache[:, -1], self.update.context(h)[:, None], write)
        chunk_kv.append(update_kv)
        complete = q == K - 1
        new_slow = slow
        # Skipping the update on the K-1 of K steps where no row completes a chunk saves most of its cost; compiled,
        # the read would be a graph break, which costs more than the update.
        if _static(complete) or torch.compiler.is_compiling() or bool(complete.any()):
            key, value = self.update.keys_values(update_kv)
            if self.parallel:
                log_keep, written = self._parallel_update(key, value, visible)
                new = log_keep.exp() * slow + written
            else:
                new = self._sequential_update(slow, key, value, visible)
            new_slow = torch.where(complete[:, None, None], new, slow)
        kv = torch.stack(chunk_kv, 1) * self._kept[q, ep][:, None, :, None]
        new_state = {"slow": new_slow, "kv": kv, "chunk_len": self._next[q], "ep_start": ep.masked_fill(complete, 0)}
        return layer_norm(self.ln_out, h)[:, None], new_state

    def _slow_stream(
        self, update_kv: torch.Tensor, plan: _Plan, slow: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slow vectors at the start of every chunk [B, C, N, D], and after the last one [B, N, D].

        ``update_kv`` [B * C, K, 2D]: the update's keys/values by chunk; chunk c reads its own where
        ``plan.update_mask`` allows, starts from the initial slow vectors where ``plan.reset``, and is read
        only where ``plan.complete`` (all its K steps are in).
        """
        reset, complete = plan.reset, plan.complete
        B, C = reset.shape
        init = self.slow_init.expand(B, -1, -1)
        keys, values = self.update.keys_values(update_kv)  # [B * C, H, K, D/H]
        if self.parallel:  # every chunk's learned queries at once, then the gated recurrence as one product
            log_keep, written = self._parallel_update(keys, values, plan.update_mask.view(B * C, 1, 1, -1))
            log_keep, written = log_keep.view(B, C, self.N, 1), written.view(B, C, self.N, -1)
            after = self._gated_recurrence(log_keep, written, slow, init, reset, complete)  # [B, C, N, D]
            return torch.cat([slow[:, None], after[:, :-1]], 1), after[:, -1]
        # Unbound once: indexing [:, c] in the loop would make every iteration's backward add a zero-padded
        # copy of all C chunks (O(C^2) work); unbind's backward is one stack.
        keys, values = keys.unflatten(0, (B, C)).unbind(1), values.unflatten(0, (B, C)).unbind(1)
        before, slow = self._sequential_stream(lambda c, _: (keys[c], values[c]), plan, slow)
        return torch.stack(before, 1), slow

    def _sequential_stream(
        self, read: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], plan: _Plan, slow: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The sequential update's loop over chunks: the slow vectors at the start of every chunk (C of [B, N, D]),
        and after the last one. ``read(c, slow)``: the keys and values [B, H, K, D/H] chunk c's update reads,
        given the slow vectors [B, N, D] the chunk starts with."""
        B, C = plan.reset.shape
        init = self.slow_init.expand(B, -1, -1)
        masks = plan.update_mask[:, :, None, None].unbind(1)  # [B, 1, 1, K] each
        resets, completes = plan.reset[..., None, None].unbind(1), plan.complete[..., None, None].unbind(1)
        before = []
        for c in range(C):  # the only sequential loop: one iteration per chunk
            before.append(slow)
            key, value = read(c, slow)
            slow = torch.where(resets[c], init, slow)
            if c < plan.updates:  # else chunk c cannot complete in this call, whatever the clock
                update = self._sequential_update(slow, key, value, masks[c])
                slow = update if c < plan.whole else torch.where(completes[c], update, slow)
        return before, slow

    def _sequential_update(
        self, slow: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The slow vectors [B, N, D] after querying one chunk's keys/values [B, H, S, D/H] where mask allows."""
        upd = self.update
        new = upd.feed_forward(slow + upd.attention(upd.query(slow), key, value, mask))
        if self.gate is None:
            return new
        opening = torch.sigmoid(linear(self.gate, torch.cat([slow, new], -1)))
        record((self, "opening"), lambda: opening.mean(-1))  # [B, N]: the share of each slow vector replaced
        return torch.lerp(slow, new, opening)

    def _parallel_update(
        self, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a chunk's keys/values [M, H, K, D/H] do to the slow vectors, for M chunks at once: the log of the
        share each slow vector keeps [M, N, 1] and what is written [M, N, D]."""
        upd = self.update
        query = upd.query(self.slow_query).expand(key.shape[0], -1, -1)
        u = upd.feed_forward(self.slow_query + upd.attention(query, key, value, mask))
        keep, write = linear(self.gate, u).split(1, -1)
        log_keep = F.logsigmoid(keep + self.gate_bias)
        record((self, "opening"), lambda: 1 - log_keep.exp()[..., 0])  # [M, N]: the share of each slow vector let go
        return log_keep, torch.sigmoid(write) * u

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
