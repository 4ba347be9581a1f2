"""``Tuple`` observations as ``Dict`` ones keyed ``"0"``, ``"1"``, ...: the encoders take Dicts of flat spaces."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from gymnasium import spaces


class TupleToDict(gym.ObservationWrapper):
    """Presents a ``Tuple`` observation space as a ``Dict`` whose keys are the positions, as strings."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        source = env.observation_space
        assert isinstance(source, spaces.Tuple)
        self.observation_space = spaces.Dict({str(i): s for i, s in enumerate(source.spaces)})

    def observation(self, observation: tuple) -> dict[str, Any]:
        return {str(i): part for i, part in enumerate(observation)}
