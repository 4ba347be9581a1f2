"""Rollout storage for PPO with a sequence core: [n_steps, n_envs] tensors plus core states at segment starts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from tlb_rl.cores import State
from tlb_rl.policy import Obs, map_obs


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_values: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [T, B] tensors.

    ``dones[t]`` is true when the episode ended after the action at step t (the next value is then not
    used). A truncated episode is not an end of the task: the caller adds gamma * V(final observation)
    to its last reward before calling this. ``last_values`` [B] are the values after the last step.

    :return: advantages and returns (advantages + values), both [T, B].
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_values)
    next_values = last_values
    for t in reversed(range(T)):
        not_done = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        running = delta + gamma * gae_lambda * not_done * running
        advantages[t] = running
        next_values = values[t]
    return advantages, advantages + values


class RolloutBatch(NamedTuple):
    """A minibatch of segments: every field is [segments, seq_len, ...] except ``states``."""

    obs: Obs
    states: State  # the core state at each segment's first step, [segments, ...]
    episode_starts: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class RolloutBuffer:
    """One rollout of ``n_steps`` x ``n_envs``, cut into segments of ``seq_len`` steps for training.

    The core state is stored only where a segment begins; training re-runs the core over each segment
    from that state with the current parameters.
    """

    def __init__(self, n_steps: int, n_envs: int, seq_len: int, device: torch.device):
        if n_steps % seq_len:
            raise ValueError(f"seq_len ({seq_len}) must divide n_steps ({n_steps})")
        self.n_steps, self.n_envs, self.seq_len, self.device = n_steps, n_envs, seq_len, device
        self.obs: Obs | None = None
        self.states: list[State] = []
        shape = (n_steps, n_envs)
        self.episode_starts = torch.zeros(shape, dtype=torch.bool, device=device)
        self.dones = torch.zeros(shape, dtype=torch.bool, device=device)
        self.rewards, self.values, self.log_probs = (torch.zeros(shape, device=device) for _ in range(3))
        self.actions: torch.Tensor | None = None
        self.advantages, self.returns = torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def add(
        self,
        t: int,
        obs: Obs,
        state: State,
        episode_starts: torch.Tensor,
        actions: torch.Tensor,
        log_probs: torch.Tensor,
        values: torch.Tensor,
        rewards: torch.Tensor,
        dones: torch.Tensor,
    ) -> None:
        """Record step ``t``; ``state`` is the core state *before* this step."""
        if self.obs is None:  # sized from the first observation, whatever the space
            self.obs = map_obs(lambda v: v.new_zeros(self.n_steps, *v.shape), obs)
            self.actions = actions.new_zeros(self.n_steps, *actions.shape)
        if t == 0:
            self.states = []
        if t % self.seq_len == 0:
            self.states.append({k: v.clone() for k, v in state.items()})
        if isinstance(self.obs, dict):
            for k, v in obs.items():
                self.obs[k][t] = v
        else:
            self.obs[t] = obs
        self.episode_starts[t], self.actions[t], self.log_probs[t] = episode_starts, actions, log_probs
        self.values[t], self.rewards[t], self.dones[t] = values, rewards, dones

    def finish(self, last_values: torch.Tensor, gamma: float, gae_lambda: float) -> None:
        """Compute advantages and returns, and cut the rollout into segments once for all epochs."""
        assert self.obs is not None and self.actions is not None
        self.advantages, self.returns = compute_gae(
            self.rewards, self.values, self.dones, last_values, gamma, gae_lambda
        )
        self.segments = RolloutBatch(
            map_obs(self._segments, self.obs),
            {k: torch.cat([s[k] for s in self.states]) for k in self.states[0]},  # segment-major, like the rest
            *(
                self._segments(x)
                for x in (self.episode_starts, self.actions, self.log_probs, self.values, self.advantages, self.returns)
            ),
        )

    def _segments(self, x: torch.Tensor) -> torch.Tensor:
        """[n_steps, n_envs, ...] -> [n_segments * n_envs, seq_len, ...], segment-major."""
        L, n = self.seq_len, self.n_steps // self.seq_len
        x = x.reshape(n, L, self.n_envs, *x.shape[2:]).transpose(1, 2)  # [n, envs, L, ...]
        return x.reshape(n * self.n_envs, L, *x.shape[3:])

    def minibatches(self, batch_size: int, generator: torch.Generator) -> Iterator[RolloutBatch]:
        """Shuffled minibatches of whole segments, ``batch_size`` steps each (after :meth:`finish`)."""
        if batch_size % self.seq_len:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of seq_len ({self.seq_len})")
        full = self.segments
        n_segments = self.n_steps // self.seq_len * self.n_envs
        per_batch = batch_size // self.seq_len
        order = torch.randperm(n_segments, generator=generator).to(self.device)
        for i in range(0, n_segments, per_batch):
            idx = order[i : i + per_batch]
            yield RolloutBatch(
                map_obs(lambda v, idx=idx: v[idx], full.obs),
                {k: v[idx] for k, v in full.states.items()},
                *(f[idx] for f in full[2:]),
            )


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target); nan when the target is constant."""
    var = target.var().item()
    return float("nan") if var == 0 else 1.0 - (target - predicted).var().item() / var


__all__ = ["RolloutBatch", "RolloutBuffer", "compute_gae", "explained_variance"]
