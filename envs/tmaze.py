"""The T-maze memory-length test (Ni et al. 2023, "When do transformers shine in RL?"), as a plug-in.

Passive T-maze with memory length ``L = corridor_length``::

    step 0        the cue: up or down (the only step that shows it)
    steps 1..L-1  the corridor: every observation the same, and the agent advances whatever it does
    step L        the junction: action 0 goes up, 1 goes down; reward 1 on the cued side, else 0

Every ``info`` holds ``cue`` (0: up, 1: down), so ``tlb-rl inspect --probe cue`` can ask whether a
policy's memory still holds it at the junction.

An episode is L + 1 steps and nothing but memory of step 0 beats guessing (0.5). With ``active=True``
the agent walks instead: action 2 steps forward, 0 and 1 move it only at the junction, and an episode
that has not chosen after ``max_steps`` is truncated with reward 0.

With ``swap=True`` the junction also shows a fourth observation entry, a coin flipped each episode: when it
is 1 the arms are swapped (the cued side is reached with the other action). The right action is then the
cue XOR what is in view, as in MiniGrid's Memory envs, where the turn depends on the cue and on which side
its match lies: neither the memory nor the view alone beats guessing.

This file is written the way a user writes a plug-in: a ``gymnasium.Env`` subclass whose constructor
takes keyword options, registered in ``pyproject.toml``::

    [project.entry-points."tlb_rl.envs"]
    tmaze = "envs.tmaze:TMazeEnv"

so ``make_env("tmaze", corridor_length=50)`` and ``make_env("envs.tmaze:TMazeEnv")`` both build it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

UP, DOWN, FORWARD = 0, 1, 2


class TMazeEnv(gym.Env[np.ndarray, np.int64]):
    """Passive (or active) T-maze; the observation is ``[cue_up, cue_down, at_junction]`` in {0, 1}, and with
    ``swap=True`` also ``swapped`` (shown at the junction only).

    :param corridor_length: L, the steps between the cue and the junction (the memory length), >= 0.
    :param active: the agent must walk the corridor with action 2 instead of being carried.
    :param max_steps: time limit of the active variant; default 2 * (L + 1). Ignored when passive.
    :param swap: arms swapped in half the episodes, which the junction shows: the choice is cue XOR swap.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self, corridor_length: int = 10, active: bool = False, max_steps: int | None = None, swap: bool = False
    ):
        if corridor_length < 0:
            raise ValueError(f"corridor_length must be >= 0, got {corridor_length}")
        self.corridor_length = corridor_length
        self.active = active
        self.max_steps = max_steps if max_steps is not None else 2 * (corridor_length + 1)
        self.swap = swap
        self.observation_space = spaces.Box(0.0, 1.0, shape=(4 if swap else 3,), dtype=np.float32)
        self.action_space = spaces.Discrete(3 if active else 2)
        self._cue = UP
        self._swapped = 0
        self._position = 0
        self._steps = 0

    def _observation(self) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        if self._steps == 0:
            obs[self._cue] = 1.0
        at_junction = self._position == self.corridor_length
        obs[2] = float(at_junction)
        if self.swap and at_junction:
            obs[3] = float(self._swapped)
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._cue = int(self.np_random.integers(2))
        self._swapped = int(self.np_random.integers(2)) if self.swap else 0  # drawn only then: seeds keep their cues
        self._position = 0
        self._steps = 0
        return self._observation(), {"cue": self._cue}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = int(action)
        self._steps += 1
        if self._position == self.corridor_length and action in (UP, DOWN):
            success = action == self._cue ^ self._swapped
            return self._observation(), float(success), True, False, {"is_success": success, "cue": self._cue}
        if not self.active or action == FORWARD:
            self._position = min(self._position + 1, self.corridor_length)
        truncated = self.active and self._steps >= self.max_steps
        info = {"is_success": False, "cue": self._cue} if truncated else {"cue": self._cue}
        return self._observation(), 0.0, False, truncated, info
