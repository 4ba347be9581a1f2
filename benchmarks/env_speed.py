"""Env steps/s: one plain env against 8 vectorized envs, sync (one process) and async (subprocesses).

Run from the repository root: ``.venv/bin/python benchmarks/env_speed.py`` (prints JSON, then a summary).
The envs are built once, then timed in alternating windows and summarised by the median, so load from
other processes hits every variant alike. ``--sweep`` adds a synthetic env whose step burns a chosen
number of microseconds, to find where async starts to pay (the rule behind ``vectorization="auto"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs import make_env, make_vec_env
from envs.vector import usable_cores

Stepper = Callable[[], int]  # runs a few steps, returns how many env steps it made


class BusyEnv(gym.Env):
    """An env whose step burns ``cost_us`` microseconds of CPU and returns a 7x7x3 uint8 image.

    :param cost_us: CPU time of one step.
    """

    def __init__(self, cost_us: float = 0.0):
        self.cost_us = cost_us
        self.observation_space = spaces.Box(0, 10, (7, 7, 3), np.uint8)
        self.action_space = spaces.Discrete(3)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros((7, 7, 3), np.uint8), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        end = time.perf_counter() + self.cost_us * 1e-6
        while time.perf_counter() < end:
            pass
        done = self.np_random.random() < 0.01
        return np.zeros((7, 7, 3), np.uint8), 0.0, bool(done), False, {}


def plain_stepper(env: gym.Env) -> Stepper:
    """100 random steps of one env, resetting by hand."""
    env.reset(seed=0)

    def run() -> int:
        for _ in range(100):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
        return 100

    return run


def vector_stepper(envs: gym.vector.VectorEnv) -> Stepper:
    """20 random steps of every env of a vector env (which resets by itself)."""
    envs.reset(seed=0)

    def run() -> int:
        for _ in range(20):
            envs.step(envs.action_space.sample())
        return 20 * envs.num_envs

    return run


def median_rates(steppers: dict[str, Stepper], seconds: float, rounds: int) -> dict[str, dict[str, float]]:
    """Median, min and max steps/s of each stepper over ``rounds`` alternating windows, ``seconds`` in all."""
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, run in steppers.items():
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                steps += run()
            samples[name].append(steps / (time.perf_counter() - start))
    return {
        name: {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
        for name, rates in samples.items()
    }


def timed_vec_env(spec: Any, n_envs: int, mode: str, **kwargs: Any) -> tuple[gym.vector.VectorEnv, float]:
    """A vector env and the seconds it took to make and reset it."""
    start = time.perf_counter()
    envs = make_vec_env(spec, n_envs, vectorization=mode, **kwargs)
    envs.reset(seed=0)
    return envs, time.perf_counter() - start


def minigrid_wrapper_stepper(spec: str, view_size: int) -> Stepper:
    """One env with MiniGrid's own ViewSizeWrapper, which ``envs`` replaced (it renders the 7x7 view too)."""
    from minigrid.wrappers import ViewSizeWrapper

    env = ViewSizeWrapper(gym.make(spec), agent_view_size=view_size)
    env.reset(seed=0)
    return plain_stepper(env)


def compare(spec: Any, n_envs: int, seconds: float, rounds: int, plain: bool, **kwargs: Any) -> dict[str, Any]:
    """Rates of sync and async vector envs of ``spec`` (and of one plain env), with start-up times.

    With ``plain`` and a ``view_size`` option, one env with MiniGrid's ViewSizeWrapper is timed too.
    """
    sync, sync_startup = timed_vec_env(spec, n_envs, "sync", **kwargs)
    async_, async_startup = timed_vec_env(spec, n_envs, "async", **kwargs)
    steppers = {"sync": vector_stepper(sync), "async": vector_stepper(async_)}
    if plain:
        steppers = {"plain": plain_stepper(make_env(spec, seed=0, **kwargs)), **steppers}
        if "view_size" in kwargs:
            steppers["minigrid_wrapper"] = minigrid_wrapper_stepper(spec, kwargs["view_size"])
    result: dict[str, Any] = median_rates(steppers, seconds, rounds)
    result["sync"]["startup_s"], result["async"]["startup_s"] = sync_startup, async_startup
    sync.close()
    async_.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="MiniGrid-MemoryS7-v0", help="spec (default MiniGrid-MemoryS7-v0)")
    parser.add_argument("--view-size", type=int, default=3, help="MiniGrid view size (default 3)")
    parser.add_argument("--n-envs", type=int, default=8, help="vectorized envs (default 8)")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per variant (default 15)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating windows per variant (default 15)")
    parser.add_argument("--sweep", action="store_true", help="also time BusyEnv at several step costs")
    args = parser.parse_args()
    options = {"view_size": args.view_size} if args.env.startswith(("MiniGrid", "BabyAI")) else {}

    result: dict[str, Any] = {
        "env": args.env,
        "options": options,
        "n_envs": args.n_envs,
        "cpu_cores": usable_cores(),
        # Other processes on the machine skew every figure: keep the load next to them.
        "load_average_1min_before": os.getloadavg()[0],
        **compare(args.env, args.n_envs, args.seconds, args.rounds, plain=True, **options),
    }
    if args.sweep:
        result["sweep"] = {
            cost: compare(BusyEnv, args.n_envs, args.seconds / 3, args.rounds, plain=False, cost_us=cost)
            for cost in (0, 50, 100, 200, 500, 1000)
        }
    result["load_average_1min_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))

    load = f"load {result['load_average_1min_before']:.1f} -> {result['load_average_1min_after']:.1f}"
    print(f"\n{args.env} {options}, {result['cpu_cores']} cores ({load}), random actions, median steps/s:")
    labels = {"plain": "plain env", "sync": f"sync x{args.n_envs}", "async": f"async x{args.n_envs}"}
    labels["minigrid_wrapper"] = "one env, MiniGrid's ViewSizeWrapper"
    for name, label in labels.items():
        if name not in result:
            continue
        r = result[name]
        startup = f"  start-up {r['startup_s']:.2f} s" if "startup_s" in r else ""
        print(f"  {label:<9} {r['median']:>8,.0f}  (min {r['min']:,.0f}, max {r['max']:,.0f}){startup}")
    for cost, row in result.get("sweep", {}).items():
        print(f"  BusyEnv {cost:>4} us/step: async/sync = {row['async']['median'] / row['sync']['median']:.2f}")


if __name__ == "__main__":
    main()
