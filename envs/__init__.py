"""Environments: MiniGrid/BabyAI ready to train, plug-ins, vectorized rollouts, memory test envs.

``make_env(spec, **options)`` takes a Gymnasium id, a plug-in name, ``"module:Factory"``,
``"path/file.py:Factory"`` or a callable; see :mod:`envs.registry` and ``envs/README.md`` for plug-ins.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from envs.registry import (
    ENTRY_POINT_GROUP,
    EnvEntry,
    EnvFactory,
    build_env,
    check_spaces,
    describe_envs,
    list_envs,
)
from envs.text import VOCABULARY
from envs.vector import make_vec_env


def make_env(spec: str | EnvFactory, *, seed: int | None = None, **kwargs: Any) -> gym.Env:
    """Make one environment, ready for tlb-rl's encoders.

    MiniGrid/BabyAI observations become ``{"image", "direction"[, "mission"]}`` arrays (see
    :mod:`envs.minigrid`); ``Text`` observations become token ids (see :mod:`envs.text`).

    :param spec: a Gymnasium id, a plug-in name, ``"module:Factory"``, ``"path/file.py:Factory"``, a callable.
    :param seed: seed of the first reset and of the action space; None leaves them unseeded.
    :param kwargs: options for the env's constructor, plus ``view_size`` (MiniGrid: side of the agent's view),
        ``mission_length`` (token slots of text) and ``max_episode_steps`` (a time limit).
    :raises UserError: unknown spec or option, unsupported spaces, a plug-in that breaks the Gymnasium API.
    """
    return build_env(spec, seed, kwargs, check_api=True)


__all__ = [
    "ENTRY_POINT_GROUP",
    "VOCABULARY",
    "EnvEntry",
    "check_spaces",
    "describe_envs",
    "list_envs",
    "make_env",
    "make_vec_env",
]
