"""Evaluation on held-out environment seeds, with an optional GIF of one episode.

One episode loop (:func:`run_episodes`) serves every policy: ours through :func:`evaluate`, and any other
through an ``act`` function (the study's RecurrentPPO baseline uses it), so all rows are scored alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs.seeding import EVAL_SEED_BASE
from tlb_rl.encoders import obs_to_tensor
from tlb_rl.policy import SequencePolicy
from tlb_rl.spaces import clip_to_space, stack_observations

Act = Callable[[list[Any], np.ndarray], np.ndarray]
"""``act(observations, episode_starts)``: one action per env (clipped to a Box's bounds before the env gets it);
it keeps the policy's memory between calls."""


def episode_success(reward_sum: float, info: dict[str, Any]) -> bool:
    """``info['is_success']`` where the env reports it, else a positive return (MiniGrid pays only on success)."""
    if "is_success" in info:
        return bool(info["is_success"])
    return reward_sum > 0


def run_episodes(
    act: Act,
    make_env: Callable[..., gym.Env],
    n_episodes: int,
    seed_start: int = EVAL_SEED_BASE,
    n_parallel: int = 8,
    gif_path: str | Path | None = None,
) -> dict[str, Any]:
    """Play ``n_episodes`` episodes with env seeds ``seed_start, seed_start+1, ...``, ``n_parallel`` at a time.

    :param make_env: builds one environment; called with ``render_mode="rgb_array"`` for the GIF.
    :param gif_path: where to write a GIF of the first episode (needs an env that renders rgb arrays).
    :return: mean return, success rate, mean length, and the per-episode returns and seeds (in seed order).
    """
    n_parallel = min(n_parallel, n_episodes)
    envs = [make_env(render_mode="rgb_array") if (i == 0 and gif_path) else make_env() for i in range(n_parallel)]
    seeds = list(range(seed_start, seed_start + n_parallel))
    next_seed = seed_start + n_parallel
    obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)]
    starts = np.ones(n_parallel, dtype=bool)
    active = np.ones(n_parallel, dtype=bool)
    ret, length = np.zeros(n_parallel), np.zeros(n_parallel, dtype=int)
    results: list[tuple[int, float, bool, int]] = []
    frames: list[np.ndarray] = [envs[0].render()] if gif_path else []
    recording = bool(gif_path)
    while active.any():
        actions = act(obs, starts)
        starts = np.zeros(n_parallel, dtype=bool)
        for i in np.flatnonzero(active):
            obs[i], r, term, trunc, info = envs[i].step(clip_to_space(actions[i], envs[i].action_space))
            ret[i] += r
            length[i] += 1
            if i == 0 and recording:
                frames.append(envs[i].render())
            if term or trunc:
                results.append((seeds[i], float(ret[i]), episode_success(ret[i], info), int(length[i])))
                recording = recording and i != 0
                ret[i], length[i], starts[i] = 0.0, 0, True
                if next_seed < seed_start + n_episodes:
                    obs[i] = envs[i].reset(seed=next_seed)[0]
                    seeds[i], next_seed = next_seed, next_seed + 1
                else:
                    active[i] = False
    for env in envs:
        env.close()
    if gif_path and frames:
        import imageio.v2 as imageio

        imageio.mimsave(str(gif_path), frames, duration=0.15, loop=0)
    results.sort()
    returns = [r[1] for r in results]
    return {
        "episodes": len(results),
        "mean_return": float(np.mean(returns)),
        "success_rate": float(np.mean([r[2] for r in results])),
        "mean_length": float(np.mean([r[3] for r in results])),
        "seeds": [r[0] for r in results],
        "returns": returns,
    }


def evaluate(
    policy: SequencePolicy,
    make_env: Callable[..., gym.Env],
    n_episodes: int = 100,
    seed_start: int = EVAL_SEED_BASE,
    n_parallel: int = 8,
    deterministic: bool = False,
    gif_path: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`run_episodes` with a sequence policy, its memory carried across steps and reset at episode starts."""
    device = policy.critic.weight.device
    with torch.inference_mode():  # as every later state is: a compiled core then traces acting once
        state = policy.initial_state(min(n_parallel, n_episodes), device)

    def act(obs: list[Any], starts: np.ndarray) -> np.ndarray:
        nonlocal state
        batch = obs_to_tensor(stack_observations(obs), device)
        actions, _, _, state = policy.act(batch, state, torch.as_tensor(starts, device=device), deterministic)
        return actions.cpu().numpy()

    return run_episodes(act, make_env, n_episodes, seed_start, n_parallel, gif_path)
