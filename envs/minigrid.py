"""MiniGrid and BabyAI observations made ready for a policy.

:func:`wrap_minigrid` turns MiniGrid's observation into a ``Dict`` of fixed-size arrays:

- ``image``: the symbolic egocentric view, ``view_size x view_size x 3`` uint8 (object, colour, state),
  with the largest code as bound (not 255), so encoders can size their embeddings from the space;
- ``direction``: ``Discrete(4)``;
- ``mission``: token ids (see :mod:`envs.text`), only for envs whose mission varies between episodes
  (BabyAI levels, MiniGrid missions with placeholders); a constant mission carries no information;
- any other entry a user's wrapper added to the observation, as it is.
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
from minigrid.core.mission import MissionSpace
from minigrid.envs.babyai.core.roomgrid_level import BabyAIMissionSpace, RoomGridLevel
from minigrid.minigrid_env import MiniGridEnv

from envs.text import MISSION_LENGTH, VOCABULARY, text_space, tokenize
from tlb_rl.errors import UserError

__all__ = [
    "VOCABULARY",
    "MiniGridObservation",
    "QuietReset",
    "is_minigrid",
    "mission_varies",
    "wrap_minigrid",
]

_SAMPLING_NOISE = ("Sampling rejected:", "Timeout during mission generation:")


def mission_varies(mission_space: spaces.Space) -> bool:
    """True when an env's mission can differ between episodes, so the policy must read it."""
    if isinstance(mission_space, BabyAIMissionSpace):
        return True
    if isinstance(mission_space, MissionSpace):
        return mission_space.ordered_placeholders is not None
    return isinstance(mission_space, spaces.Text)


class MiniGridObservation(gym.ObservationWrapper):
    """MiniGrid's ``{image, direction, mission}`` as fixed-size arrays; see the module docstring.

    :param env: a MiniGrid or BabyAI env.
    :param mission_length: token slots of ``mission``.
    """

    def __init__(self, env: gym.Env, mission_length: int = MISSION_LENGTH):
        super().__init__(env)
        source = env.observation_space
        size = source["image"].shape[0]
        # The largest code of any channel: object types reach 10; the state channel holds the agent's
        # direction (0..3) in fully observed grids.
        high = max(*OBJECT_TO_IDX.values(), *COLOR_TO_IDX.values(), *STATE_TO_IDX.values(), 3)
        parts: dict[str, spaces.Space] = {
            "image": spaces.Box(0, high, (size, size, 3), dtype=np.uint8),
            "direction": spaces.Discrete(4),
        }
        self._mission_length = mission_length
        self._with_mission = mission_varies(source["mission"])
        if self._with_mission:
            parts["mission"] = text_space(mission_length)
        self._extra = [key for key in source.spaces if key not in ("image", "direction", "mission")]
        self.observation_space = spaces.Dict(parts | {key: source[key] for key in self._extra})

    def observation(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {"image": observation["image"], "direction": np.int64(observation["direction"])}
        if self._with_mission:
            out["mission"] = tokenize(observation["mission"], self._mission_length)
        for key in self._extra:  # none for MiniGrid's own envs: this runs on every step
            out[key] = observation[key]
        return out


class QuietReset(gym.Wrapper):
    """Drops the "Sampling rejected: ..." lines BabyAI prints on many resets; other output passes."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            result = self.env.reset(**kwargs)
        kept = [line for line in captured.getvalue().splitlines(keepends=True) if not line.startswith(_SAMPLING_NOISE)]
        if kept:
            sys.stdout.write("".join(kept))
        return result


def set_view_size(env: gym.Env, view_size: int) -> None:
    """Give the agent a ``view_size`` x ``view_size`` view, in the env itself.

    MiniGrid's ``ViewSizeWrapper`` recomputes the view after the env has computed its own 7x7 one, which
    made a step ~3x slower for a 3x3 view (MiniGrid-MemoryS7, benchmarks/env_speed.py); setting the env's
    ``agent_view_size`` computes only the small view, and gives the same arrays (tests/test_envs.py).
    """
    base = env.unwrapped
    base.agent_view_size = view_size
    image = spaces.Box(0, 255, (view_size, view_size, 3), dtype=np.uint8)
    base.observation_space = spaces.Dict({**base.observation_space.spaces, "image": image})


def is_minigrid(env: gym.Env) -> bool:
    """True for MiniGrid and BabyAI envs, including users' subclasses of ``MiniGridEnv``."""
    return isinstance(env.unwrapped, MiniGridEnv)


def wrap_minigrid(env: gym.Env, *, view_size: int | None = None, mission_length: int = MISSION_LENGTH) -> gym.Env:
    """Apply the view size, the quiet reset (BabyAI) and :class:`MiniGridObservation` to a MiniGrid env.

    :param view_size: side of the agent's square view (odd, >= 3); None keeps the env's (7).
    :param mission_length: token slots of the ``mission`` array.
    """
    if view_size is not None:
        if type(view_size) is not int or view_size < 3 or view_size % 2 == 0:  # bool is no size
            raise UserError(f"view_size must be an odd integer >= 3, got {view_size!r}")
        set_view_size(env, view_size)
    if isinstance(env.unwrapped, RoomGridLevel):
        env = QuietReset(env)
    return MiniGridObservation(env, mission_length)
