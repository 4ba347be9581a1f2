"""Training throughput (env steps/s) of TLB-PPO and LSTM-PPO against SB3's PPO and sb3-contrib's RecurrentPPO.

All agents train on MiniGrid-MemoryS7 with a 3x3 view, 8 envs, n_steps 128, batch_size 256, n_epochs 4,
in one run on one machine. The agents take turns: every round times each agent for ``frames / rounds``
frames, and a ratio is taken within a round, so a machine that slows down for a minute (this project's
shared 2-core VM drifts by up to ~1.6x) slows every agent of that round, not one agent's whole
measurement. The summary gives the median over rounds, and for our agents the milliseconds per update
spent acting (env steps included) and training.

    python benchmarks/throughput.py [--frames 12288] [--rounds 3] [--agents tlb,lstm,none,recurrentppo,ppo_mlp]
                                    [--device cuda] [--n-envs 64]

Ratios are given for every TLB agent against every other agent in the run. ``--device`` moves our agents'
policy (SB3's peers stay on the CPU, where they are faster for these sizes); ``--n-envs`` changes the
number of envs of every agent.

An agent of ours may carry core hyperparameters, so that two settings of one core race in one run:
``--agents tlb,tlb:chunk_size=16,ppo_mlp`` (each ``key=value`` after a colon goes to ``core_kwargs``, except
``compile=true`` and ``cuda_graphs=true``, the agent's own options: ``--agents tlb,tlb:compile=true,lstm``). A
compiled agent's warm-up update compiles its graphs (and a graphed one captures its CUDA graphs), so the timed
rounds do not count it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import gymnasium as gym
import torch

from tlb_rl.cores import parse_core_spec

ENV_ID = "MiniGrid-MemoryS7-v0"
SETTINGS = {"n_envs": 8, "n_steps": 128, "batch_size": 256, "n_epochs": 4}
PEERS = ("recurrentppo", "ppo_mlp")


def _sb3_env() -> gym.Env:
    from minigrid.wrappers import ImgObsWrapper

    # The env's own 3x3 view, as our envs make it (envs.minigrid.set_view_size): MiniGrid's ViewSizeWrapper
    # would make every SB3 step ~3x dearer than ours, and the comparison would time the env, not the agent.
    return gym.wrappers.FlattenObservation(ImgObsWrapper(gym.make(ENV_ID, agent_view_size=3)))


def _sb3_trainer(algo: str, settings: dict[str, int]) -> Callable[[int], None]:
    """A warmed-up SB3 model; the returned function trains it for that many more frames."""
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger

    env = make_vec_env(_sb3_env, n_envs=settings["n_envs"], seed=0)
    kwargs = {k: settings[k] for k in ("n_steps", "batch_size", "n_epochs")}
    model = (
        RecurrentPPO("MlpLstmPolicy", env, device="cpu", **kwargs)
        if algo == "recurrentppo"
        else PPO("MlpPolicy", env, device="cpu", **kwargs)
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # the default makes a temp folder per learn()
    model.learn(settings["n_envs"] * settings["n_steps"])
    return lambda frames: model.learn(frames, reset_num_timesteps=False)


def _our_trainer(
    spec: str, seq_len: int | None, split: dict[str, float], settings: dict[str, int], device: str
) -> Callable[[int], None]:
    """A warmed-up PPO of ours; the returned function trains it for that many more frames.

    ``split`` accumulates the timed updates' seconds of acting (rollout, env steps included) and of training.
    """
    from agents import PPO

    core, core_kwargs, compiled = parse_core_spec(spec)
    cuda_graphs = bool(core_kwargs.pop("cuda_graphs", False))

    def record(model: PPO, metrics: dict[str, float]) -> None:
        split["rollout_s"] = split.get("rollout_s", 0.0) + metrics["time/rollout_s"]
        split["update_s"] = split.get("update_s", 0.0) + metrics["time/update_s"]

    # Envs stepped in-process, as SB3's DummyVecEnv steps them: "auto" could pick subprocesses on a loaded
    # machine, and the agents would then differ in how their envs run.
    model = PPO(
        ENV_ID,
        core=core,
        core_kwargs=core_kwargs,
        compile=compiled,
        cuda_graphs=cuda_graphs,
        env_kwargs={"view_size": 3},
        device=device,
        seq_len=seq_len,
        eval_every=0,
        vectorization="sync",
        **settings,
    )
    model.learn(settings["n_envs"] * settings["n_steps"], progress=False)
    return lambda frames: model.learn(model.frames + frames, callback=record, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12288, help="timed frames per agent, all rounds (default 12288)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each agent takes (default 3)")
    parser.add_argument(
        "--agents",
        default="tlb,lstm,recurrentppo,ppo_mlp",
        help="comma-separated: tlb, lstm, gru, transformer, brsm, none (each optionally :key=value...), "
        "recurrentppo, ppo_mlp",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="our agents' training segment length (default: whole rollouts, n_steps)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="our agents' device: cpu or cuda (default cpu)")
    parser.add_argument("--n-envs", type=int, default=SETTINGS["n_envs"], help="envs per agent (default %(default)s)")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {**SETTINGS, "n_envs": args.n_envs, "batch_size": SETTINGS["batch_size"] * args.n_envs // 8}
    per_update = settings["n_envs"] * settings["n_steps"]
    frames = max(per_update, args.frames // args.rounds // per_update * per_update)  # whole updates per turn

    specs = args.agents.split(",")
    # tlb -> tlb_ppo, tlb:chunk_size=16 -> tlb_ppo:chunk_size=16
    names = [a if a in PEERS else "{}_ppo{}{}".format(*a.partition(":")) for a in specs]
    splits: dict[str, dict[str, float]] = {name: {} for name in names if name not in PEERS}
    trainers: dict[str, Callable[[int], None]] = {}
    warmup_s: dict[str, float] = {}
    for name, agent in zip(names, specs, strict=True):
        t0 = time.perf_counter()
        trainers[name] = (
            _sb3_trainer(agent, settings)
            if agent in PEERS
            else _our_trainer(agent, args.seq_len, splits[name], settings, args.device)
        )
        warmup_s[name] = time.perf_counter() - t0  # one update, and for a compiled agent its compiling
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        fps = {}
        for name, train in trainers.items():
            t0 = time.perf_counter()
            train(frames)
            fps[name] = frames / (time.perf_counter() - t0)
        rounds.append(fps)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in fps.items()), flush=True)

    pairs = [(a, b) for a in names if a.startswith("tlb") for b in names if b != a]
    steps_per_s = {name: statistics.median(fps[name] for fps in rounds) for name in names}
    ratios = {f"{a}/{b}": statistics.median(fps[a] / fps[b] for fps in rounds) for a, b in pairs}
    # Where our agents' time goes, in ms per update (n_envs * n_steps frames), over all timed rounds.
    updates = frames * args.rounds / per_update
    ms_per_update = {
        name: {k.removesuffix("_s"): 1000 * v / updates for k, v in split.items()} for name, split in splits.items()
    }
    result = {
        "env": ENV_ID,
        "view_size": 3,
        **settings,
        "device": args.device,
        "seq_len": args.seq_len or settings["n_steps"],
        "frames_per_turn": frames,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "steps_per_s": steps_per_s,
        "ratios": ratios,
        "ms_per_update": ms_per_update,
        "warmup_s": warmup_s,
    }
    print(json.dumps(result, indent=2))
    width = max(map(len, [*names, *ratios]))
    print("\nsummary (medians over rounds):")
    for name, value in steps_per_s.items():
        print(f"  {name:>{width}}: {value:8.0f} steps/s")
    for name, value in ratios.items():
        print(f"  {name:>{width}}: {value:.2f}x")
    print(f"\nms per update of {per_update} frames (acting incl. env steps / training):")
    for name, split in ms_per_update.items():
        print(f"  {name:>{width}}: {split.get('rollout', 0):6.0f} / {split.get('update', 0):6.0f}")
    print("\nwarm-up (one update; a compiled agent's compiling included), s:")
    for name, value in warmup_s.items():
        print(f"  {name:>{width}}: {value:6.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
