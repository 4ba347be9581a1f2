"""The one interface every sequence core has.

A core maps a batch of input sequences to output sequences while carrying a fixed-size state::

    state = core.initial_state(batch_size, device)
    y, state = core(x, state, episode_starts)   # x: [B, T, input_dim], episode_starts: [B, T] bool

``episode_starts[b, t]`` resets row ``b`` before step ``t`` is processed. Calling a core once on T steps
gives the same outputs and final state as T calls of one step (tested for every core): PPO acts with
T = 1 and trains on whole rollouts with the same code.
"""

from __future__ import annotations

import torch
from torch import nn

State = dict[str, torch.Tensor]
"""A core's state: named tensors, each batch-first with a fixed shape, so buffers and checkpoints can hold it."""


class Core(nn.Module):
    """Base class of sequence cores.

    Subclasses set ``output_dim`` and implement :meth:`initial_state` and :meth:`forward`.
    A core with a training signal of its own (bRSM's next-step prediction) overrides
    :meth:`auxiliary_loss`; agents add it to their loss.
    """

    output_dim: int
    #: True when the core's output at step t depends on steps before t.
    has_memory: bool = True
    #: True when ``torch.compile(fullgraph=True)`` can trace the core (on a GPU's path; a deliberate graph break
    #: elsewhere is allowed): no data-dependent branches, no module Dynamo cannot trace (``nn.LSTM``); what an
    #: agent's ``compile=True`` and ``cuda_graphs=True`` need.
    compilable: bool = False

    def static_error(self) -> str | None:
        """Why this instance's ops depend on the data though its class is ``compilable`` (a setting that lays
        out its work by the data), phrased to follow "core 'NAME'"; None when they do not. ``compile=True`` and
        ``cuda_graphs=True`` refuse such a core with it."""
        return None

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The state of ``batch_size`` fresh episodes, on ``device`` (default: the core's)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self, x: torch.Tensor, state: State, episode_starts: torch.Tensor, *, state_grad: bool = True
    ) -> tuple[torch.Tensor, State]:
        """Run the core over ``x`` [B, T, input_dim]; returns outputs [B, T, output_dim] and the final state.

        ``state_grad=False``: the final state is returned detached, for training that never backpropagates
        across calls (PPO's and BC's segments). Eager, that saves nothing; compiled, it keeps the backward
        through the state out of the graph, which would otherwise run on zero gradients (AOTAutograd makes
        one for every output that requires grad): TLB's compiled fwd+bwd 2-8% faster (docs/benchmarks.md).
        """
        raise NotImplementedError

    def memory(self, state: State) -> torch.Tensor:
        """What ``state`` remembers, one vector per row [B, F] (what ``tlb-rl inspect`` probes and plots): by
        default every floating-point tensor of the state."""
        return torch.cat([v.flatten(1).float() for v in state.values() if v.is_floating_point()], 1)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss computed by the most recent :meth:`forward` call, or None."""
        return None


def detached(state: State) -> State:
    """``state`` cut from the autograd graph (a core's return for ``state_grad=False``)."""
    return {k: v.detach() for k, v in state.items()}


def check_inputs(x: torch.Tensor, episode_starts: torch.Tensor, input_dim: int) -> None:
    """Raise a clear error when a core is called with the wrong shapes."""
    if x.dim() != 3 or x.shape[-1] != input_dim:
        raise ValueError(f"core input must be [batch, time, {input_dim}], got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("core input must have at least one time step")
    if episode_starts.shape != x.shape[:2]:
        raise ValueError(
            f"episode_starts must be [batch, time] = {tuple(x.shape[:2])}, got {tuple(episode_starts.shape)}"
        )


def check_sizes(**sizes: int) -> None:
    """Raise ValueError naming the first size that is below 1."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def reset_rows(value: torch.Tensor, reset: torch.Tensor, fresh: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Replace the rows of ``value`` [B, ...] where ``reset`` [B] is true by ``fresh``."""
    mask = reset.view(-1, *([1] * (value.dim() - 1)))
    return torch.where(mask, fresh, value)
