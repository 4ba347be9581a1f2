"""LSTM and GRU cores: torch's fused recurrent modules, one call per sequence however many episodes it holds."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tlb_rl.cores.base import Core, State, check_inputs, check_sizes, reset_rows


class RNNCore(Core):
    """A single-layer LSTM or GRU.

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
        """Runs every row's pieces between episode starts as one packed batch; returns outputs and final states."""
        B, T, F = x.shape
        opens = starts.clone()
        opens[:, 0] = True  # every row's first piece opens at step 0, continuing its state or not
        piece = opens.long().cumsum(1) - 1  # [B, T] the step's piece within its row
        n_pieces = piece[:, -1] + 1
        first = n_pieces.cumsum(0) - n_pieces  # [B] global index of each row's first piece
        t = torch.arange(T, device=x.device)
        pos = t - torch.where(opens, t, 0).cummax(1).values  # step within its piece
        S = int(n_pieces.sum())
        lengths = torch.bincount((piece + first[:, None]).flatten(), minlength=S)
        L = int(lengths.max())
        slot = ((piece + first[:, None]) * L + pos).flatten()  # [B*T] the step's place in [S, L]
        padded = x.new_zeros(S * L, F).index_copy(0, slot, x.reshape(B * T, F)).view(S, L, F)
        # Only a row's first piece continues a state; the pieces after it open episodes, from zeros.
        h0 = [h.new_zeros(h.shape[0], S, h.shape[2]).index_copy(1, first, h) for h in hidden]
        packed = pack_padded_sequence(padded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, new = self.rnn(packed, tuple(h0) if self.cell == "lstm" else h0[0])
        y = pad_packed_sequence(out, batch_first=True, total_length=L)[0].reshape(S * L, -1)
        last = first + n_pieces - 1  # each row's last piece holds its final state (h_n keeps input order)
        finals = [h[:, last] for h in (new if self.cell == "lstm" else (new,))]
        return y.index_select(0, slot).view(B, T, -1), finals


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
