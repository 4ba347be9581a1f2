"""LSTM and GRU cores: torch's fused recurrent modules, one call per sequence however many episodes it holds."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from tlb_rl.cores.base import Core, State, check_inputs, check_sizes, reset_rows


class RNNCore(Core):
    """An LSTM or GRU (one layer by default).

    A sequence without episode starts after its first step is one call of the fused module. A sequence
    with more starts is cut into its episodes, which run as one packed batch (each from a zero state, the
    first from the row's state), so the module is still called once. Cutting every row at every step where
    any row starts made one call per cut: with MemoryS7's ~6-step episodes, ~45 calls per 128-step pair of
    segments, and LSTM-PPO's update was 3x slower than TLB-PPO's.

    :param input_dim: width of the inputs.
    :param hidden_size: width of the hidden state and of the output.
    :param num_layers: stacked recurrent layers.
    :param forget_bias: initial bias of the LSTM's forget gate. torch initialises it near 0 (forget gate
        ~0.5), which loses a cue within a few dozen steps before learning can start. Measured on the recall
        test (cue, 24 blank steps, width 32, 400 Adam steps, seeds 0-2): bias 0 stays at chance, 1 reaches
        0.47-0.73, 2 reaches 1.0 for every seed; so the baseline LSTM gets 2. Ignored by the GRU.
    :param cell: ``"lstm"`` or ``"gru"``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_size: int = 128,
        num_layers: int = 1,
        forget_bias: float = 2.0,
        cell: str = "lstm",
    ):
        super().__init__()
        check_sizes(hidden_size=hidden_size, num_layers=num_layers)
        module = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = module(input_dim, hidden_size, num_layers=num_layers, batch_first=True)
        if cell == "lstm":
            with torch.no_grad():
                for k in range(num_layers):  # gate order in torch: input, forget, cell, output
                    getattr(self.rnn, f"bias_ih_l{k}")[hidden_size : 2 * hidden_size] = forget_bias
                    getattr(self.rnn, f"bias_hh_l{k}")[hidden_size : 2 * hidden_size] = 0.0
        self.input_dim, self.output_dim, self.cell = input_dim, hidden_size, cell
        self.num_layers = num_layers

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        zeros = torch.zeros(batch_size, self.num_layers, self.output_dim, device=device or self.device)
        return {"h": zeros, "c": zeros.clone()} if self.cell == "lstm" else {"h": zeros}

    def forward(self, x: torch.Tensor, state: State, episode_starts: torch.Tensor) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        starts = episode_starts.bool()
        names = ["h", "c"] if self.cell == "lstm" else ["h"]  # the order torch's modules use
        # nn.LSTM wants [layers, B, H]; our state is batch-first [B, layers, H]. A row whose first step
        # starts an episode begins from zeros.
        hidden = [reset_rows(state[n], starts[:, 0]).transpose(0, 1).contiguous() for n in names]
        if starts[:, 1:].any():
            y, hidden = self._episodes(x, starts, hidden)
        else:
            y, new = self.rnn(x, tuple(hidden) if self.cell == "lstm" else hidden[0])
            hidden = list(new) if self.cell == "lstm" else [new]
        return y, {n: h.transpose(0, 1) for n, h in zip(names, hidden, strict=True)}

    def _episodes(
        self, x: torch.Tensor, starts: torch.Tensor, hidden: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs every row's pieces between episode starts as one packed batch; returns outputs and final states.

        The packed layout is built directly (time-major, pieces longest first), not by padding: a batch
        mixing one long episode with many short ones would pad to pieces x longest piece.
        """
        B, T, F = x.shape
        opens = starts.clone()
        opens[:, 0] = True  # every row's first piece opens at step 0, continuing its state or not
        n_pieces = opens.sum(1)
        first = n_pieces.cumsum(0) - n_pieces  # [B] global index of each row's first piece
        piece = opens.long().cumsum(1) - 1 + first[:, None]  # [B, T] the step's piece, globally
        t = torch.arange(T, device=x.device)
        pos = t - torch.where(opens, t, 0).cummax(1).values  # step within its piece
        lengths = torch.bincount(piece.flatten(), minlength=int(n_pieces.sum()))
        order = torch.argsort(lengths, descending=True, stable=True)  # the pieces, longest first
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=x.device)
        # batch_sizes[j]: pieces longer than j; step j of every piece sits in block j of the packed data.
        batch_sizes = (lengths[None, :] > torch.arange(int(lengths.max()), device=x.device)[:, None]).sum(1)
        slot = ((batch_sizes.cumsum(0) - batch_sizes)[pos] + rank[piece]).flatten()  # [B*T] place in the data
        data = x.new_empty(B * T, F).index_copy(0, slot, x.reshape(B * T, F))
        packed = PackedSequence(data, batch_sizes.cpu(), order, rank)
        # Only a row's first piece continues a state; the pieces after it open episodes, from zeros.
        h0 = [h.new_zeros(h.shape[0], len(order), h.shape[2]).index_copy(1, first, h) for h in hidden]
        out, new = self.rnn(packed, tuple(h0) if self.cell == "lstm" else h0[0])
        last = first + n_pieces - 1  # each row's last piece holds its final state (h_n keeps input order)
        finals = [h[:, last] for h in (new if self.cell == "lstm" else (new,))]
        return out.data.index_select(0, slot).view(B, T, -1), finals


class FeedForwardCore(Core):
    """No memory: one hidden layer applied to every step on its own (the ``none`` baseline)."""

    has_memory = False

    def __init__(self, input_dim: int, hidden_size: int = 128):
        super().__init__()
        check_sizes(hidden_size=hidden_size)
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.ReLU())
        self.input_dim, self.output_dim = input_dim, hidden_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return {}

    def forward(self, x: torch.Tensor, state: State, episode_starts: torch.Tensor) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        return self.net(x), state
