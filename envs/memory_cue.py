"""MiniGrid's Memory envs with the cue's type in every observation: the choice without the need to remember.

At the junction of ``MiniGrid-MemoryS*`` the right object is the one matching the cue seen in the start room,
so the choice combines memory with what is in view. With the cue given at every step (``cue``: 1 for a key,
0 for a ball) no memory is needed, so a policy that still fails to choose fails at combining the two, not at
remembering. A plug-in by module path:

    tlb-rl demos --env envs.memory_cue:memory_s11_with_cue --episodes 25000 --out demos/memory_s11_cue
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from gymnasium import spaces


def cue_cell(level: gym.Env) -> tuple[int, int]:
    """Where ``minigrid.envs.MemoryEnv`` puts the cue object in the start room (``level``: the unwrapped env)."""
    return 1, level.grid.height // 2 - 1


class CueInObservation(gym.ObservationWrapper):
    """Adds ``cue`` (Discrete(2): 1 for a key, 0 for a ball) to a MiniGrid Memory env's observation."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = spaces.Dict({**env.observation_space.spaces, "cue": spaces.Discrete(2)})

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        level = self.env.unwrapped
        return {**observation, "cue": int(level.grid.get(*cue_cell(level)).type == "key")}


def memory_s11_with_cue(**kwargs: Any) -> gym.Env:
    """``MiniGrid-MemoryS11-v0`` (options passed on) with :class:`CueInObservation`."""
    return CueInObservation(gym.make("MiniGrid-MemoryS11-v0", **kwargs))
