"""Gymnasium spaces to and from plain data, so checkpoints describe their policy without pickling."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from tlb_rl.errors import UserError


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "low": space.low.tolist(),
            "high": space.high.tolist(),
            "shape": list(space.shape),
            "dtype": str(space.dtype),
        }
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "start": space.start.tolist()}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_dict(s) for k, s in space.spaces.items()}}
    raise UserError(f"cannot store a {type(space).__name__} space in a checkpoint")


def space_from_dict(data: dict[str, Any]) -> gym.Space:
    kind = data["type"]
    if kind == "Box":
        dtype = np.dtype(data["dtype"])
        low = np.asarray(data["low"], dtype=dtype).reshape(data["shape"])
        high = np.asarray(data["high"], dtype=dtype).reshape(data["shape"])
        return gym.spaces.Box(low, high, dtype=dtype)
    if kind == "Discrete":
        return gym.spaces.Discrete(data["n"], start=data["start"])
    if kind == "MultiDiscrete":
        return gym.spaces.MultiDiscrete(data["nvec"], start=data["start"])
    if kind == "MultiBinary":
        return gym.spaces.MultiBinary(data["n"])
    if kind == "Dict":
        return gym.spaces.Dict({k: space_from_dict(s) for k, s in data["spaces"].items()})
    raise UserError(f"unknown space type '{kind}' in checkpoint")


def policy_spaces_to_dict(observation: gym.Space, action: gym.Space) -> dict[str, Any]:
    """A policy's observation and action spaces as the plain data a checkpoint's ``"spaces"`` holds."""
    return {"observation": space_to_dict(observation), "action": space_to_dict(action)}


def policy_spaces_from_dict(data: dict[str, Any]) -> tuple[gym.Space, gym.Space]:
    """The (observation, action) spaces from :func:`policy_spaces_to_dict`'s output."""
    return space_from_dict(data["observation"]), space_from_dict(data["action"])


def stack_observations(observations: list[Any]) -> Any:
    """A list of single observations (arrays, or dicts of arrays) as one batch."""
    if isinstance(observations[0], dict):
        return {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


def clip_to_space(actions: np.ndarray, space: gym.Space) -> np.ndarray:
    """Actions clipped to a Box's bounds (a Gaussian policy samples outside them); others unchanged."""
    return np.clip(actions, space.low, space.high) if isinstance(space, gym.spaces.Box) else actions
