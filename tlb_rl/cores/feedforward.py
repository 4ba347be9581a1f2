"""The ``none`` core: no memory, a baseline that shows what a task asks of memory."""

from __future__ import annotations

import torch
from torch import nn

from tlb_rl.cores.base import Core, State, check_inputs, check_sizes


class FeedForwardCore(Core):
    """No memory: one hidden layer applied to every step on its own (the ``none`` baseline)."""

    has_memory = False
    compilable = True

    def __init__(self, input_dim: int, hidden_size: int = 128):
        super().__init__()
        check_sizes(hidden_size=hidden_size)
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.ReLU())
        self.input_dim, self.output_dim = input_dim, hidden_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return {}

    def forward(
        self, x: torch.Tensor, state: State, episode_starts: torch.Tensor, *, state_grad: bool = True
    ) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        return self.net(x), state  # no state: nothing to detach
