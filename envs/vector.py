"""Vectorized environments for rollouts (gymnasium 1.x vector API, same-step autoreset)."""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any

import gymnasium as gym
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from envs.registry import EnvFactory, build_env
from tlb_rl.errors import UserError

VECTORIZATIONS = ("auto", "sync", "async")

# Measured with `python benchmarks/env_speed.py --sweep` on the project's 2-core machine, 8 envs, async/sync env
# steps/s at 0, 50, 100, 200, 500, 1000 us of work per step: 0.08, 0.45, 0.62, 1.08, 1.41, 1.55 (other
# sessions running, load not recorded); with load 6-9 from other sessions the ratios scatter (0.06 to 2.3)
# and async pays nowhere reliably. MiniGrid-MemoryS7 (~130 us a step) is faster in one process by the median
# of alternating windows (load ~6: plain 5,100, sync 4,900, async 3,000; single windows vary +-50%).
ASYNC_MIN_STEP_S = 200e-6
_PROBE_S, _PROBE_STEPS = 0.05, 200


def mean_step_seconds(env: gym.Env) -> float:
    """Wall time of one random-action step of ``env``, resets included, from a short run (<= ~50 ms)."""
    env.reset(seed=0)
    env.action_space.seed(0)
    steps, start = 0, time.perf_counter()
    while steps < _PROBE_STEPS and time.perf_counter() - start < _PROBE_S:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
        steps += 1
    return (time.perf_counter() - start) / steps


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_vectorization(env: gym.Env, n_envs: int) -> str:
    """Returns "async" when subprocesses pay for ``n_envs`` copies of ``env`` on this machine, else "sync".

    The threshold was measured on 2 cores; more cores would pay for somewhat cheaper steps (unmeasured).
    """
    if n_envs < 2 or usable_cores() < 2:
        return "sync"
    return "async" if mean_step_seconds(env) >= ASYNC_MIN_STEP_S else "sync"


def make_vec_env(
    spec: str | EnvFactory,
    n_envs: int = 8,
    *,
    seed: int = 0,
    vectorization: str = "auto",
    **kwargs: Any,
) -> VectorEnv:
    """``n_envs`` copies of ``make_env(spec, **kwargs)`` stepped as one batch.

    Autoreset is ``SAME_STEP``: the step that ends an episode already returns the next episode's first
    observation, and the last one is in ``info["final_obs"][i]`` where ``info["_final_obs"][i]`` is true
    (truncated episodes bootstrap from it).

    Async workers start by "forkserver" (forking a process whose torch threads run can deadlock), which
    re-imports the main script: a script that makes async envs needs ``if __name__ == "__main__":``.

    :param spec: as for :func:`envs.make_env`.
    :param n_envs: number of envs.
    :param seed: env ``i`` is seeded ``seed + i`` on its first reset (its action space too).
    :param vectorization: "sync" (one process), "async" (one subprocess per env, observations in shared
        memory) or "auto" (async only where it measurably pays, see :func:`choose_vectorization`).
    :param kwargs: env options, as for :func:`envs.make_env`.
    :raises UserError: as :func:`envs.make_env`, or an unknown ``vectorization``.
    """
    if vectorization not in VECTORIZATIONS:
        raise UserError(f"vectorization must be one of {', '.join(VECTORIZATIONS)}, got '{vectorization}'")
    # Made here first so a bad spec fails with its one-line message, not inside a worker process.
    probe = build_env(spec, None, kwargs, check_api=True)
    if vectorization == "auto":
        vectorization = choose_vectorization(probe, n_envs)
    probe.close()
    if vectorization == "sync":
        fns = [functools.partial(build_env, spec, seed + i, kwargs, False) for i in range(n_envs)]
        return SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    fns = [functools.partial(_build_in_worker, spec, seed + i, kwargs) for i in range(n_envs)]
    return AsyncVectorEnv(fns, shared_memory=True, context="forkserver", autoreset_mode=AutoresetMode.SAME_STEP)


def _build_in_worker(spec: str | EnvFactory, seed: int, kwargs: dict[str, Any]) -> gym.Env:
    # Ctrl-C in a terminal reaches the whole process group; the trainer decides when to stop, so a worker
    # must not die halfway through a rollout.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return build_env(spec, seed, kwargs, False)
