"""A sequence policy: observation encoder -> memory core -> actor and critic heads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch
from torch import nn

from tlb_rl.cores import State, core_hyperparameters, make_core
from tlb_rl.cores.graphs import CoreGraphs
from tlb_rl.distributions import make_action_head
from tlb_rl.encoders import Observation, encoder_options, make_encoder

Obs = Observation  # a batch: a tensor, or a dict of tensors for Dict spaces


def map_obs(fn: Callable[[torch.Tensor], torch.Tensor], obs: Obs) -> Obs:
    """Apply ``fn`` to an observation tensor, or to every tensor of a Dict observation."""
    return {k: fn(v) for k, v in obs.items()} if isinstance(obs, dict) else fn(obs)


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    # Small final layers keep the first policy near uniform and the first values near zero (CleanRL's init).
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class SequencePolicy(nn.Module):
    """Encoder, core and heads of an agent; every call takes [B, T] sequences and a core state.

    :param observation_space: the environment's observation space (picks the encoder).
    :param action_space: the environment's action space (picks the action distribution).
    :param core: name of the memory core (see ``tlb_rl.cores.CORES``).
    :param core_kwargs: hyperparameters of the core.
    :param encoder_kwargs: options of the encoder.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        core: str = "tlb",
        core_kwargs: dict[str, Any] | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.encoder = make_encoder(observation_space, **(encoder_kwargs or {}))
        self.core = make_core(core, self.encoder.output_dim, **(core_kwargs or {}))
        self.actor = make_action_head(action_space, self.core.output_dim)
        # Every option with its value, defaults included, for configs and checkpoints: a run saved today
        # loads into the same network after a default changes.
        self.core_kwargs = {**core_hyperparameters(core), **(core_kwargs or {})}
        self.encoder_kwargs = encoder_options(**(encoder_kwargs or {}))
        self.critic = _orthogonal(nn.Linear(self.core.output_dim, 1), 1.0)
        self.core_graphs: CoreGraphs | None = None
        """Set by :meth:`use_cuda_graphs`; a plain attribute, so it is neither a submodule nor in the state dict."""

    def use_cuda_graphs(self) -> None:
        """Run the core's training passes (``state_grad=False`` with gradients on) as CUDA graphs from now on
        (:class:`~tlb_rl.cores.graphs.CoreGraphs`); the policy must already be on its GPU."""
        self.core_graphs = CoreGraphs(self.core)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return self.core.initial_state(batch_size, device or self.critic.weight.device)

    def forward(
        self, obs: Obs, state: State, episode_starts: torch.Tensor, *, state_grad: bool = True
    ) -> tuple[Any, torch.Tensor, State]:
        """Action distribution and values [B, T] for observations [B, T, ...]; returns the new state too
        (detached with ``state_grad=False``, see :meth:`Core.forward <tlb_rl.cores.base.Core.forward>`)."""
        B, T = episode_starts.shape
        features = self.encoder(map_obs(lambda v: v.reshape(B * T, *v.shape[2:]), obs))  # [B*T, F]
        if self.core_graphs is not None and not state_grad and torch.is_grad_enabled():
            y, state = self.core_graphs(features.view(B, T, -1), state, episode_starts)  # [B, T, D]
        else:
            y, state = self.core(features.view(B, T, -1), state, episode_starts, state_grad=state_grad)
        y = y.reshape(B * T, -1)
        dist = self.actor(y)
        return dist, self.critic(y).view(B, T), state

    @torch.inference_mode()  # not no_grad: it also skips version counters, ~6% of an acting step
    def act(
        self, obs: Obs, state: State, episode_starts: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State]:
        """One step for a batch of environments: observations [B, ...] -> actions, log-probs, values, state.

        Returns inference tensors: clone them before an in-place edit or a pass that needs gradients.
        """
        dist, values, state = self(map_obs(lambda v: v[:, None], obs), state, episode_starts[:, None])
        actions = dist.mode() if deterministic else dist.sample()
        return actions, dist.log_prob(actions), values[:, 0], state

    @torch.inference_mode()
    def value(self, obs: Obs, state: State, episode_starts: torch.Tensor) -> torch.Tensor:
        """Values [B] of one step's observations [B, ...], leaving ``state`` as it was."""
        return self(map_obs(lambda v: v[:, None], obs), state, episode_starts[:, None])[1][:, 0]
