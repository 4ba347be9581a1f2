"""MiniGrid's Memory envs with the cue's type handed to the policy: the parts of the choice one at a time.

At the junction of ``MiniGrid-MemoryS*`` the right object is the one matching the cue seen in the start room,
so the choice combines memory with what is in view. Two variants take one difficulty away each, and a third
mixes the task with its easiest variant:

- the cue's type in every observation (:class:`CueInObservation`): no memory is needed, so a policy that
  still fails to choose fails at combining cue and view;
- the cue's type as a symbol in the first observation only (:class:`CueAtStart`): memory is needed, but not
  finding the cue in the 7x7 view, so a policy that fails there fails at carrying a clean bit to the junction;
- the cue's type in every observation of some episodes and in none of the others (:class:`CueSometimes`): the
  hinted episodes teach the policy to combine the cue with the view, the others ask for that cue from memory.

Plug-ins by module path:

    tlb-rl demos --env envs.memory_cue:memory_s11_with_cue --episodes 25000 --out demos/memory_s11_cue
    tlb-rl demos --env envs.memory_cue:memory_s11_cue_at_start --episodes 25000 --out demos/memory_s11_start
    tlb-rl demos --env envs.memory_cue:memory_s11_hinted --episodes 25000 --out demos/memory_s11_hinted
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from gymnasium import spaces


def cue_cell(level: gym.Env) -> tuple[int, int]:
    """Where ``minigrid.envs.MemoryEnv`` puts the cue object in the start room (``level``: the unwrapped env)."""
    return 1, level.grid.height // 2 - 1


def cue_is_key(level: gym.Env) -> bool:
    """Whether the cue object of a MiniGrid Memory env (``level``: the unwrapped env) is a key (else a ball)."""
    return level.grid.get(*cue_cell(level)).type == "key"


class CueInObservation(gym.ObservationWrapper):
    """Adds ``cue`` (Discrete(2): 1 for a key, 0 for a ball) to a MiniGrid Memory env's observation."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = spaces.Dict({**env.observation_space.spaces, "cue": spaces.Discrete(2)})

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        return {**observation, "cue": int(cue_is_key(self.env.unwrapped))}


def memory_s11_with_cue(**kwargs: Any) -> gym.Env:
    """``MiniGrid-MemoryS11-v0`` (options passed on) with :class:`CueInObservation`."""
    return CueInObservation(gym.make("MiniGrid-MemoryS11-v0", **kwargs))


class CueAtStart(gym.Wrapper):
    """Adds ``cue`` (Discrete(3)) to a MiniGrid Memory env's observations: in the first observation of an episode
    1 for a ball and 2 for a key, in every later one 0 (nothing). The cue object stays in the start room."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = spaces.Dict({**env.observation_space.spaces, "cue": spaces.Discrete(3)})

    def reset(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        observation, info = self.env.reset(**kwargs)
        return {**observation, "cue": 1 + int(cue_is_key(self.env.unwrapped))}, info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return {**observation, "cue": 0}, reward, terminated, truncated, info


def memory_s11_cue_at_start(**kwargs: Any) -> gym.Env:
    """``MiniGrid-MemoryS11-v0`` (options passed on) with :class:`CueAtStart`."""
    return CueAtStart(gym.make("MiniGrid-MemoryS11-v0", **kwargs))


class CueSometimes(gym.Wrapper):
    """Adds ``cue`` (Discrete(3)) to a MiniGrid Memory env's observations: in a share ``hint_prob`` of the episodes
    (drawn at each reset from the env's generator) 1 for a ball and 2 for a key in every observation, in the
    others 0 (nothing) in every observation. The cue object stays in the start room, so an unhinted episode is
    the Memory task itself."""

    def __init__(self, env: gym.Env, hint_prob: float = 0.5):
        if not 0.0 <= hint_prob <= 1.0:
            raise ValueError(f"hint_prob must be in [0, 1], got {hint_prob}")
        super().__init__(env)
        self.hint_prob = hint_prob
        self.observation_space = spaces.Dict({**env.observation_space.spaces, "cue": spaces.Discrete(3)})
        self._cue = 0

    def reset(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        observation, info = self.env.reset(**kwargs)
        hinted = self.np_random.random() < self.hint_prob
        self._cue = 1 + int(cue_is_key(self.env.unwrapped)) if hinted else 0
        return {**observation, "cue": self._cue}, info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return {**observation, "cue": self._cue}, reward, terminated, truncated, info


def memory_s11_hinted(hint_prob: float = 0.5, **kwargs: Any) -> gym.Env:
    """``MiniGrid-MemoryS11-v0`` (options passed on) with :class:`CueSometimes`; ``hint_prob=0`` is MemoryS11 with
    an input that never carries anything, so a policy trained on the mix can go on training on the task."""
    return CueSometimes(gym.make("MiniGrid-MemoryS11-v0", **kwargs), hint_prob)
