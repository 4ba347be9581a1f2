"""Exact resume: a checkpoint holds the in-flight rollout and the random streams as plain data.

The envs are not pickled. Each is a :class:`envs.seeding.SeededEpisodes`, whose state is (seed stream,
episode index, actions so far); restoring resets it with that episode's seed and replays the actions. With
the core states, episode starts and random generators saved too, a resumed run continues exactly as the
uninterrupted one would (tests/test_reliability.py checks it).
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch

from tlb_rl.cores import State


class Carry(NamedTuple):
    """Where collection stopped: the envs' last observations, the core state and which envs start an episode."""

    obs: Any
    state: State
    starts: torch.Tensor


def rollout_snapshot(
    envs: gym.vector.VectorEnv, carry: Carry, env_spec: str, env_kwargs: dict, returns: np.ndarray, lengths: np.ndarray
) -> dict[str, Any]:
    """The in-flight rollout as plain data: each env's seed stream and episode actions, core states."""
    obs = carry.obs
    return {
        "env_spec": env_spec,
        "env_kwargs": env_kwargs,
        "envs": [
            {"stream": e["stream"], "episode": e["episode"], "actions": torch.as_tensor(e["actions"])}
            for e in envs.call("snapshot")
        ],
        "obs": {k: torch.as_tensor(v) for k, v in obs.items()} if isinstance(obs, dict) else torch.as_tensor(obs),
        "core_state": carry.state,
        "episode_starts": carry.starts,
        "episode_return": torch.as_tensor(returns),
        "episode_length": torch.as_tensor(lengths),
    }


def restore_rollout(
    saved: dict[str, Any],
    envs: gym.vector.VectorEnv,
    expected_state: State,
    core: str,
    env_spec: str,
    env_kwargs: dict,
    device: torch.device,
) -> tuple[Carry, np.ndarray, np.ndarray] | None:
    """Rebuild the envs' episodes (reset with their seeds, replay their actions) and the core states.

    :param expected_state: a fresh state of the current core (named ``core``), to check the saved one against.
    :return: the carry and the running episode returns and lengths; None when the saved rollout does not
        belong to these envs or this core (the envs then start fresh episodes, as a new run would).
    """
    same_setting = len(saved["envs"]) == envs.num_envs and saved["env_spec"] == env_spec
    if not (same_setting and saved["env_kwargs"] == env_kwargs):
        return None
    saved_state = saved["core_state"]
    if set(saved_state) != set(expected_state) or any(
        saved_state[k].shape != v.shape for k, v in expected_state.items()
    ):
        print(
            f"warning: the checkpoint's core state does not fit core '{core}' (saved by another version of "
            "tlb-rl?); the weights are restored, the envs start fresh episodes",
            file=sys.stderr,
        )
        return None
    envs.set_attr("restore_from", [{**e, "actions": e["actions"].numpy()} for e in saved["envs"]])
    obs, _ = envs.reset()
    if not _same_observations(obs, saved["obs"]):
        print(
            f"warning: env '{env_spec}' did not replay its episodes exactly (it is not deterministic given "
            "its seed and actions); training goes on, but not exactly as the uninterrupted run would",
            file=sys.stderr,
        )
    state = {k: v.to(device) for k, v in saved_state.items()}
    carry = Carry(obs, state, saved["episode_starts"].to(device))
    return carry, saved["episode_return"].numpy().copy(), saved["episode_length"].numpy().copy()


def rng_snapshot(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Torch's global (CPU and CUDA) random states and the agent's own generator, if it has one."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_rng(saved: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    if generator is not None:
        generator.set_state(saved["generator"])


def _same_observations(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same_observations(a[k], b[k]) for k in a)
    return bool(np.array_equal(np.asarray(a), torch.as_tensor(b).numpy()))
