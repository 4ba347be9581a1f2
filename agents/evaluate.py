"""Evaluation on held-out environment seeds, with an optional GIF of one episode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs.seeding import TRAINING_SEED_LIMIT
from tlb_rl.encoders import obs_to_tensor
from tlb_rl.policy import SequencePolicy
from tlb_rl.spaces import clip_to_space, stack_observations

EVAL_SEED_BASE = 1_000_000
"""Env seeds of reported evaluations (final evaluation, ``tlb-rl eval``) start here."""
VALIDATION_SEED_BASE = TRAINING_SEED_LIMIT
"""Env seeds of the evaluations that pick the best checkpoint during training start here, so the reported
success is not measured on the episodes that selected the checkpoint. Training envs use seeds below."""


def episode_success(reward_sum: float, info: dict[str, Any]) -> bool:
    """``info['is_success']`` where the env reports it, else a positive return (MiniGrid pays only on success)."""
    if "is_success" in info:
        return bool(info["is_success"])
    return reward_sum > 0


def evaluate(
    policy: SequencePolicy,
    make_env: Callable[..., gym.Env],
    n_episodes: int = 100,
    seed_start: int = EVAL_SEED_BASE,
    n_parallel: int = 8,
    deterministic: bool = False,
    gif_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``n_episodes`` episodes with env seeds ``seed_start, seed_start+1, ...``, several at a time.

    :param make_env: builds one environment; called with ``render_mode="rgb_array"`` for the GIF.
    :param gif_path: where to write a GIF of the first episode (needs an env that renders rgb arrays).
    :return: mean return, success rate, mean length, and the per-episode lists and seeds.
    """
    device = policy.critic.weight.device
    n_parallel = min(n_parallel, n_episodes)
    envs = [make_env(render_mode="rgb_array") if (i == 0 and gif_path) else make_env() for i in range(n_parallel)]
    next_seed = seed_start
    seeds, obs = [], []
    for env in envs:
        obs.append(env.reset(seed=next_seed)[0])
        seeds.append(next_seed)
        next_seed += 1
    state = policy.initial_state(n_parallel, device)
    starts = torch.ones(n_parallel, dtype=torch.bool, device=device)
    active = np.ones(n_parallel, dtype=bool)
    ret, length = np.zeros(n_parallel), np.zeros(n_parallel, dtype=int)
    results: list[tuple[int, float, bool, int]] = []
    frames: list[np.ndarray] = [envs[0].render()] if gif_path else []
    recording = bool(gif_path)
    while active.any():
        batch = obs_to_tensor(stack_observations(obs), device)
        actions, _, _, state = policy.act(batch, state, starts, deterministic=deterministic)
        actions = actions.cpu().numpy()
        starts = torch.zeros_like(starts)
        for i, env in enumerate(envs):
            if not active[i]:
                continue
            o, r, term, trunc, info = env.step(clip_to_space(actions[i], env.action_space))
            ret[i] += r
            length[i] += 1
            if i == 0 and recording:
                frames.append(env.render())
            if term or trunc:
                results.append((seeds[i], float(ret[i]), episode_success(ret[i], info), int(length[i])))
                recording = recording and i != 0
                ret[i], length[i] = 0.0, 0
                starts[i] = True
                if next_seed < seed_start + n_episodes:
                    o, _ = env.reset(seed=next_seed)
                    seeds[i] = next_seed
                    next_seed += 1
                else:
                    active[i] = False
            obs[i] = o
    for env in envs:
        env.close()
    if gif_path and frames:
        import imageio.v2 as imageio

        imageio.mimsave(str(gif_path), frames, duration=0.15, loop=0)
    results.sort()
    returns = [r[1] for r in results]
    success = [r[2] for r in results]
    return {
        "episodes": len(results),
        "mean_return": float(np.mean(returns)),
        "success_rate": float(np.mean(success)),
        "mean_length": float(np.mean([r[3] for r in results])),
        "seeds": [r[0] for r in results],
        "returns": returns,
    }
