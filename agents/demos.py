"""Expert demonstrations, played in parallel and saved as a dataset (:mod:`agents.dataset`)::

    dataset = generate_demos("BabyAI-GoToLocal-v0", n_episodes=1000, out="demos/gotolocal", workers=2)

The expert is the BabyAI bot on BabyAI levels, :func:`agents.experts.memory_expert` on MiniGrid's Memory
envs, or one of the user's (``expert="module:function"``; :mod:`agents.experts`). ``tlb-rl demos`` calls it.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from agents.dataset import DemoDataset, DemoEpisode
from agents.experts import Expert, find_expert
from envs import make_env
from envs.seeding import VALIDATION_SEED_BASE
from tlb_rl.errors import UserError

EPISODE_TIME_LIMIT_S = 10.0
"""Wall-clock limit of one expert episode: the BabyAI bot's planner can loop forever on a level it cannot solve."""
GIVE_UP_AFTER = 20
"""If the expert fails this many episodes in a row from the start, the env is taken as one it cannot solve."""


class _EpisodeTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _EpisodeTimeout


def expert_episode(env: gym.Env, seed: int, expert: Expert) -> DemoEpisode:
    """Let ``expert`` play the episode of env seed ``seed`` on a wrapped env from :func:`envs.make_env`.

    The expert may plan on the unwrapped env; the observations kept are the wrapper's. An episode that
    raises or runs out of steps or time comes back with ``success=False`` and the reason in ``error``.
    """
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [obs], [], []
    success, error = False, None
    timed = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    if timed:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, EPISODE_TIME_LIMIT_S)
    try:
        policy = expert(env)
        while True:
            action = int(policy())
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            if terminated or truncated:
                success = bool(terminated and reward > 0)
                error = None if success else ("ran out of steps" if truncated else "ended without reward")
                break
    except _EpisodeTimeout:
        error = f"the expert planned for more than {EPISODE_TIME_LIMIT_S:g} s"
    except Exception as e:  # the BabyAI bot asserts on situations it does not handle
        error = f"the expert failed: {type(e).__name__}: {e}"
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return DemoEpisode(
        seed=seed,
        obs={k: np.stack([o[k] for o in observations]) for k in observations[0]},
        actions=np.asarray(actions, dtype=np.int64),
        rewards=np.asarray(rewards, dtype=np.float32),
        success=success,
        error=error,
    )


_worker_env: tuple[str, gym.Env] | None = None  # (what made it, the env)


def _play_seeds(job: tuple[str, dict[str, Any], str | None, list[int]]) -> list[DemoEpisode]:
    """Worker: play a list of seeds with one env kept for the process's lifetime (or until another is asked for:
    with ``workers=1`` the worker is this process, which may generate demos of several envs)."""
    global _worker_env
    env_id, env_kwargs, expert_spec, seeds = job
    key = repr((env_id, sorted(env_kwargs.items())))
    if _worker_env is None or _worker_env[0] != key:
        if _worker_env is not None:
            _worker_env[1].close()
        _worker_env = (key, make_env(env_id, **env_kwargs))
    env = _worker_env[1]
    _, expert = find_expert(env, expert_spec)
    return [expert_episode(env, s, expert) for s in seeds]


def _chunks(seeds: range, size: int) -> Iterator[list[int]]:
    for i in range(0, len(seeds), size):
        yield list(seeds[i : i + size])


def generate_demos(
    env_id: str,
    n_episodes: int,
    out: str | Path,
    *,
    workers: int = 1,
    seed: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    expert: str | None = None,
    progress: bool = True,
) -> DemoDataset:
    """Let an expert play env seeds ``seed .. seed + n_episodes - 1``; keep and save the successful ones.

    :param workers: processes playing in parallel (1: play in this process). They start by "forkserver", as
        async envs do, which re-imports the main script: a script that passes ``workers > 1`` needs
        ``if __name__ == "__main__":``.
    :param seed: first env seed; all seeds must stay below the validation/evaluation seeds (500,000).
    :param expert: ``"module:function"`` (see :mod:`agents.experts`); None: the built-in expert for the env.
    :return: the saved dataset (its header counts the failures and lists their seeds).
    :raises UserError: an env no expert plays or the expert cannot solve, seeds that reach the held-out range.
    """
    env_kwargs = dict(env_kwargs or {})
    if n_episodes < 1 or workers < 1:
        raise UserError(f"episodes and workers must be at least 1, got {n_episodes} and {workers}")
    if seed < 0 or seed + n_episodes > VALIDATION_SEED_BASE:
        raise UserError(
            f"demo seeds {seed}..{seed + n_episodes - 1} must lie in 0..{VALIDATION_SEED_BASE - 1}: "
            "higher seeds are held out for validation and evaluation"
        )
    env = make_env(env_id, **env_kwargs)
    try:
        name, play = find_expert(env, expert)
    except UserError:
        env.close()
        raise
    spaces = (env.observation_space, env.action_space)
    # A few episodes here first: an env the expert cannot solve fails fast with a message, not after N tries.
    first = [expert_episode(env, s, play) for s in range(seed, seed + min(GIVE_UP_AFTER, n_episodes))]
    env.close()
    if not any(e.success for e in first):
        raise UserError(
            f"the expert ({name}) solved none of the first {len(first)} episodes of {env_id} "
            f"({first[0].error}); it cannot generate demonstrations for this env"
        )
    episodes = list(first)
    start = time.perf_counter()
    rest = range(seed + len(first), seed + n_episodes)
    bar = tqdm(total=n_episodes, initial=len(first), unit="ep", disable=not progress, dynamic_ncols=True)
    jobs = [(env_id, env_kwargs, expert, c) for c in _chunks(rest, 50)]
    if workers == 1:
        results: Iterator[list[DemoEpisode]] = map(_play_seeds, jobs)
        pool = None
    else:
        # Not "fork": a worker forked from a process with threads (torch's, a progress bar's) can inherit a held
        # lock and hang for good; seen in the test suite, where terminate() then waited on it forever.
        pool = multiprocessing.get_context("forkserver").Pool(workers)
        results = pool.imap(_play_seeds, jobs)  # in order, so the dataset does not depend on scheduling
    try:
        for chunk in results:
            episodes.extend(chunk)
            bar.update(len(chunk))
            bar.set_postfix(failed=sum(not e.success for e in episodes), refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    failed = [e for e in episodes if not e.success]
    header = {
        "env": env_id,
        "env_kwargs": env_kwargs,
        "generator": name,
        "seeds_played": [seed, seed + n_episodes],
        "failed_seeds": [e.seed for e in failed],
        "failure_reasons": sorted({e.error or "" for e in failed}),
        "generation_s": round(time.perf_counter() - start, 3),
    }
    dataset = DemoDataset.from_episodes([e for e in episodes if e.success], spaces, header)
    dataset.save(out)
    return dataset


__all__ = ["expert_episode", "generate_demos"]
