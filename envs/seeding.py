"""Every training episode from a known seed, so a run's envs can be saved and restored exactly.

An env made with a seed starts a *seed stream*: its k-th episode is reset with :func:`episode_seed`
(stream, k), a pure function, and the wrapper records the actions of the episode in progress. The state
of the env is then (stream, k, actions so far): small plain data that a checkpoint holds without pickling
the env, and that :class:`SeededEpisodes` turns back into the same env by resetting with the
episode's seed and replaying the actions. This holds for any env that is deterministic given its reset
seed and actions, which is what Gymnasium's seeding contract promises.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

TRAINING_SEED_LIMIT = 500_000
"""Training episodes (and recorded demonstrations) use env seeds below this."""
VALIDATION_SEED_BASE = TRAINING_SEED_LIMIT
"""Env seeds of the evaluations that pick the best checkpoint during training start here, so the reported
success is not measured on the episodes that selected the checkpoint."""
EVAL_SEED_BASE = 1_000_000
"""Env seeds of reported evaluations (final evaluation, ``tlb-rl eval``) start here."""


def episode_seed(stream: int, episode: int) -> int:
    """The reset seed of episode ``episode`` (0 = the first) of seed stream ``stream``."""
    if episode == 0:
        return stream % TRAINING_SEED_LIMIT
    return int(np.random.default_rng([stream, episode]).integers(TRAINING_SEED_LIMIT))


class SeededEpisodes(gym.Wrapper):
    """Resets episode k with ``episode_seed(stream, k)`` and keeps the actions of the current episode.

    ``reset(seed=s)`` starts the stream ``s``; a reset without a seed (e.g. a vector env's autoreset) moves
    to the stream's next episode. ``snapshot()`` returns the env's state; setting ``restore_from`` to
    a snapshot makes the next ``reset()`` rebuild that state and return its observation.

    :param env: the env.
    :param seed: the first stream (used by the first reset that passes no seed); also seeds the action space.
    """

    def __init__(self, env: gym.Env, seed: int):
        super().__init__(env)
        self._stream, self._episode = seed, -1
        self._actions: list[Any] = []
        self.restore_from: dict[str, Any] | None = None
        env.action_space.seed(seed)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if self.restore_from is not None:
            return self._replay()
        if seed is not None:
            self._stream, self._episode = seed, 0
        else:
            self._episode += 1
        self._actions = []
        return self.env.reset(seed=episode_seed(self._stream, self._episode), options=options)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        self._actions.append(np.array(action, copy=True))
        return self.env.step(action)

    def snapshot(self) -> dict[str, Any]:
        """The env's state as plain data: seed stream, episode index, the episode's actions so far."""
        shape = self.env.action_space.shape or ()
        actions = np.stack(self._actions) if self._actions else np.zeros((0, *shape))
        return {"stream": self._stream, "episode": self._episode, "actions": actions}

    def _replay(self) -> tuple[Any, dict]:
        snapshot, self.restore_from = self.restore_from, None
        self._stream, self._episode = int(snapshot["stream"]), int(snapshot["episode"])
        self._actions = []
        obs, info = self.env.reset(seed=episode_seed(self._stream, self._episode))
        for action in snapshot["actions"]:
            obs, _, terminated, truncated, info = self.step(action)
            if terminated or truncated:
                # Not deterministic given its seed: go on from a fresh episode; the caller, comparing the
                # observation with the saved one, tells the user the resume is not exact.
                return self.reset()
        return obs, info
