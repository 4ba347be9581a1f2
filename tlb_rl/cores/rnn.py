"""LSTM and GRU cores: torch's recurrent modules over sequences that hold several episodes."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from tlb_rl.cores.base import Core, State, check_inputs, check_sizes, detached, reset_rows


class RNNCore(Core):
    """An LSTM or GRU (one layer by default).

    A sequence without episode starts after its first step is one call of the fused module. A sequence
    with more starts runs either one call per span between the steps where some row starts (resetting
    those rows), or, when episodes are short, as one packed batch of its episodes (each from a zero state,
    a row's first from the row's state), whichever makes fewer kernel calls (docs/benchmarks.md).

    :param input_dim: width of the inputs.
    :param hidden_size: width of the hidden state and of the output.
    :param num_layers: stacked recurrent layers.
    :param forget_bias: initial bias of the gate that keeps the state: the LSTM's forget gate, the GRU's
        update gate. torch initialises both near 0, so half the state is lost every step and a cue is gone
        before learning can start; 2 keeps ~88% per step (measured: docs/results.md).
    :param input_norm: layer-normalise each step's input (no learned scale: the input weights hold one), as
        TLB's blocks do theirs. An encoder's features have whatever scale training gives them: a cloned GRU's
        grew to a standard deviation of ~100 within 25 updates, saturating every gate for good; on the T-maze
        they stay near 0.2, and only normalised did the LSTM and GRU learn a 500-step memory
        (docs/results.md). ``False`` is how the cores ran before 2026-11-30.
    :param cell: ``"lstm"`` or ``"gru"``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_size: int = 128,
        num_layers: int = 1,
        forget_bias: float = 2.0,
        input_norm: bool = True,
        cell: str = "lstm",
    ):
        super().__init__()
        check_sizes(hidden_size=hidden_size, num_layers=num_layers)
        module = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = module(input_dim, hidden_size, num_layers=num_layers, batch_first=True)
        # torch's gate order: LSTM input, forget, cell, output; GRU reset, update, new. Both keep the state
        # through the second gate (the GRU's h' = (1 - z) * n + z * h).
        with torch.no_grad():
            for k in range(num_layers):
                getattr(self.rnn, f"bias_ih_l{k}")[hidden_size : 2 * hidden_size] = forget_bias
                getattr(self.rnn, f"bias_hh_l{k}")[hidden_size : 2 * hidden_size] = 0.0
        self.input_dim, self.output_dim, self.cell = input_dim, hidden_size, cell
        self.num_layers, self.input_norm = num_layers, input_norm

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        zeros = torch.zeros(batch_size, self.num_layers, self.output_dim, device=device or self.device)
        return {"h": zeros, "c": zeros.clone()} if self.cell == "lstm" else {"h": zeros}

    def forward(
        self, x: torch.Tensor, state: State, episode_starts: torch.Tensor, *, state_grad: bool = True
    ) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        if self.input_norm:
            x = F.layer_norm(x, (self.input_dim,))
        starts = episode_starts.bool()
        T = x.shape[1]
        names = ["h", "c"] if self.cell == "lstm" else ["h"]  # the order torch's modules use
        # nn.LSTM wants [layers, B, H]; our state is batch-first [B, layers, H]. A row whose first step
        # starts an episode begins from zeros.
        hidden = [reset_rows(state[n], starts[:, 0]).transpose(0, 1).contiguous() for n in names]
        cuts = (torch.nonzero(starts[:, 1:].any(0)).flatten() + 1).tolist()  # steps where some row starts
        if not cuts:
            y, hidden = self._run(x, hidden)
        else:
            opens = starts.clone()
            opens[:, 0] = True  # every row's first piece opens at step 0, continuing its state or not
            t = torch.arange(T, device=x.device)
            pos = t - torch.where(opens, t, 0).cummax(1).values  # step within its episode piece
            # A packed batch loops over the longest piece; one call per span between cuts pays a call each.
            # On CPU torch runs packed sequences with its generic per-step kernel, ~4x dearer per step
            # than a plain call's fused one; measured on [2, 128] and [8, 128] (hidden 128), packing won
            # from about 3 spans per 5 steps of the longest piece (6-step episodes: 9.7 vs 40 ms fwd+bwd;
            # ~35-step episodes: 33 vs 12 ms the other way). On CUDA packing avoids the calls' launches.
            if x.is_cuda or 5 * (len(cuts) + 1) >= 3 * (int(pos.max()) + 1):
                y, hidden = self._packed(x, opens, pos, hidden)
            else:
                y, hidden = self._spans(x, starts, cuts, hidden)
        new = {n: h.transpose(0, 1) for n, h in zip(names, hidden, strict=True)}
        return y, new if state_grad else detached(new)

    def _run(self, x: torch.Tensor, hidden: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, new = self.rnn(x, tuple(hidden) if self.cell == "lstm" else hidden[0])
        return y, list(new) if self.cell == "lstm" else [new]

    def _spans(
        self, x: torch.Tensor, starts: torch.Tensor, cuts: list[int], hidden: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One call per span between the steps where some row starts an episode."""
        outputs = []
        for begin, end in itertools.pairwise([0, *cuts, x.shape[1]]):
            if begin:  # hidden is [layers, B, H]: zero the rows that start an episode here
                hidden = [h.masked_fill(starts[:, begin, None], 0.0) for h in hidden]
            y, hidden = self._run(x[:, begin:end], hidden)
            outputs.append(y)
        return torch.cat(outputs, 1), hidden

    def _packed(
        self, x: torch.Tensor, opens: torch.Tensor, pos: torch.Tensor, hidden: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every row's episode pieces as one packed batch, each from a zero state but a row's first.

        The packed layout is built directly (time-major, pieces longest first), not by padding: a batch
        mixing one long episode with many short ones would pad to pieces x longest piece.
        """
        B, T, F = x.shape
        n_pieces = opens.sum(1)
        first = n_pieces.cumsum(0) - n_pieces  # [B] global index of each row's first piece
        piece = opens.long().cumsum(1) - 1 + first[:, None]  # [B, T] the step's piece, globally
        lengths = torch.bincount(piece.flatten(), minlength=int(n_pieces.sum()))
        order = torch.argsort(lengths, descending=True, stable=True)  # the pieces, longest first
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=x.device)
        # batch_sizes[j]: pieces longer than j; step j of every piece sits in block j of the packed data.
        batch_sizes = (lengths[None, :] > torch.arange(int(lengths.max()), device=x.device)[:, None]).sum(1)
        slot = ((batch_sizes.cumsum(0) - batch_sizes)[pos] + rank[piece]).flatten()  # [B*T] place in the data
        data = x.new_empty(B * T, F).index_copy(0, slot, x.reshape(B * T, F))
        # Only a row's first piece continues a state; the pieces after it open episodes, from zeros.
        h0 = [h.new_zeros(h.shape[0], len(order), h.shape[2]).index_copy(1, first, h) for h in hidden]
        out, new = self._run(PackedSequence(data, batch_sizes.cpu(), order, rank), h0)
        last = first + n_pieces - 1  # each row's last piece holds its final state (h_n keeps input order)
        return out.data.index_select(0, slot).view(B, T, -1), [h[:, last] for h in new]
