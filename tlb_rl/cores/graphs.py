"""A core's training pass replayed as CUDA graphs: what an agent's ``cuda_graphs=True`` does.

A policy of ~150k parameters is launch-bound on a GPU: TLB's forward + backward over [16, 128] launches
thousands of small kernels, 28 ms eager on an H200 against 3.5 ms replayed from a graph, which is what a
cuDNN LSTM of as many parameters takes (docs/benchmarks.md). A graph replays fixed kernels on fixed buffers,
so only a core whose ops do not depend on the data can be captured (``Core.compilable``, ``Core.static_error``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tlb_rl.cores.base import Core, State

MAX_SHAPES = 4
"""Input shapes captured per core (each holds its own buffers on the GPU); calls of other shapes run eagerly."""


class TrainingPass(nn.Module):
    """A core's training call with tensors in and out, as graph capture takes it: (x, starts, *state) -> (y, *state)."""

    def __init__(self, core: Core, keys: list[str]):
        super().__init__()
        self.core, self.keys = core, keys

    def forward(self, x: torch.Tensor, starts: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new = self.core(x, dict(zip(self.keys, state, strict=True)), starts, state_grad=False)
        return (y, *(new[k] for k in self.keys))


class CoreGraphs:
    """Runs ``core``'s training calls (gradients on, final state detached: PPO's and BC's passes) as CUDA graphs,
    one per input shape, captured by ``torch.cuda.make_graphed_callables`` on the shape's first call.

    A graph keeps the activations of its last forward for its backward, so a call whose shape's last forward has
    not been backpropagated yet runs eagerly, as does any call past :data:`MAX_SHAPES` shapes. Outputs are
    copies: they stay valid after later replays. Parameters are read in place, so optimiser steps and
    ``load_state_dict`` reach the graphs; moving the core to another device does not (build a new ``CoreGraphs``).
    """

    def __init__(self, core: Core):
        self.core = core
        self._graphs: dict[tuple, Callable[..., tuple[torch.Tensor, ...]]] = {}
        self._awaiting_backward: set[tuple] = set()

    def __call__(self, x: torch.Tensor, state: State, episode_starts: torch.Tensor) -> tuple[torch.Tensor, State]:
        keys = list(state)
        # The starts' shape too, though a right one is x's first two dimensions: a replay skips the core's input
        # checks, and a wrong one must reach them (a capture) rather than broadcast into the graph's buffer.
        shape = (
            tuple(x.shape),
            x.dtype,
            x.requires_grad,
            tuple(episode_starts.shape),
            tuple((k, tuple(state[k].shape), state[k].dtype) for k in keys),
        )
        graphed = self._graphs.get(shape)
        if graphed is None and len(self._graphs) < MAX_SHAPES:
            sample = (
                x.detach().clone().requires_grad_(x.requires_grad),
                episode_starts.clone(),
                *(state[k].detach().clone() for k in keys),
            )
            # Unused inputs are allowed: the starts and the state need no gradient, and some settings of a core
            # leave a parameter out of the training pass.
            graphed = torch.cuda.make_graphed_callables(TrainingPass(self.core, keys), sample, allow_unused_input=True)
            self._graphs[shape] = graphed
        if graphed is None or shape in self._awaiting_backward:
            return self.core(x, state, episode_starts, state_grad=False)
        out = graphed(x, episode_starts, *(state[k] for k in keys))
        y = out[0].clone()
        if y.requires_grad:
            self._awaiting_backward.add(shape)
            y.register_hook(lambda _: self._awaiting_backward.discard(shape))
        # Detached: the graphed function makes every output part of its autograd graph, the state included,
        # which would link the next segment's backward to this one's (BC carries the state on).
        return y, {k: v.detach().clone() for k, v in zip(keys, out[1:], strict=True)}
