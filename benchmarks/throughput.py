"""Training throughput (env steps/s) of TLB-PPO and LSTM-PPO against SB3's PPO and sb3-contrib's RecurrentPPO.

All agents train on MiniGrid-MemoryS7 with a 3x3 view, 8 envs, n_steps 128, batch_size 256, n_epochs 4,
in one run on one machine; the summary gives ratios, which mean more than absolute numbers on a noisy box.

    python benchmarks/throughput.py [--frames 8192] [--agents tlb,lstm,recurrentppo,ppo_mlp]
"""

from __future__ import annotations

import argparse
import json
import time

import gymnasium as gym
import torch

ENV_ID = "MiniGrid-MemoryS7-v0"
SETTINGS = {"n_envs": 8, "n_steps": 128, "batch_size": 256, "n_epochs": 4}


def _sb3_env() -> gym.Env:
    from minigrid.wrappers import ImgObsWrapper

    # The env's own 3x3 view, as our envs make it (envs.minigrid.set_view_size): MiniGrid's ViewSizeWrapper
    # would make every SB3 step 3.7x dearer than ours, and the comparison would time the env, not the agent.
    return gym.wrappers.FlattenObservation(ImgObsWrapper(gym.make(ENV_ID, agent_view_size=3)))


def _time_sb3(algo: str, frames: int) -> float:
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(_sb3_env, n_envs=SETTINGS["n_envs"], seed=0)
    kwargs = {k: SETTINGS[k] for k in ("n_steps", "batch_size", "n_epochs")}
    model = (
        RecurrentPPO("MlpLstmPolicy", env, device="cpu", **kwargs)
        if algo == "recurrentppo"
        else PPO("MlpPolicy", env, device="cpu", **kwargs)
    )
    warmup = SETTINGS["n_envs"] * SETTINGS["n_steps"]
    model.learn(warmup)
    t0 = time.perf_counter()
    model.learn(frames, reset_num_timesteps=False)
    return frames / (time.perf_counter() - t0)


def _time_ours(core: str, frames: int, seq_len: int | None) -> float:
    from agents import PPO

    model = PPO(ENV_ID, core=core, env_kwargs={"view_size": 3}, device="cpu", seq_len=seq_len, eval_every=0, **SETTINGS)
    warmup = SETTINGS["n_envs"] * SETTINGS["n_steps"]
    model.learn(warmup, progress=False)
    t0 = time.perf_counter()
    model.learn(warmup + frames, progress=False)
    return frames / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8192, help="timed frames per agent (default 8192)")
    parser.add_argument(
        "--agents",
        default="tlb,lstm,recurrentppo,ppo_mlp",
        help="comma-separated: tlb, lstm, gru, transformer, none, recurrentppo, ppo_mlp",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="our agents' training segment length (default: whole rollouts, n_steps)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fps = {}
    for agent in args.agents.split(","):
        if agent in ("recurrentppo", "ppo_mlp"):
            fps[agent] = _time_sb3(agent, args.frames)
        else:
            fps[f"{agent}_ppo"] = _time_ours(agent, args.frames, args.seq_len)
        print(f"{agent}: {list(fps.values())[-1]:.0f} steps/s", flush=True)
    ratios = {}
    for ours in [k for k in fps if k.endswith("_ppo")]:
        for peer in ("recurrentppo", "ppo_mlp"):
            if peer in fps:
                ratios[f"{ours}/{peer}"] = fps[ours] / fps[peer]
    result = {
        "env": ENV_ID,
        "view_size": 3,
        **SETTINGS,
        "seq_len": args.seq_len or SETTINGS["n_steps"],
        "timed_frames": args.frames,
        "torch_threads": torch.get_num_threads(),
        "steps_per_s": fps,
        "ratios": ratios,
    }
    print(json.dumps(result, indent=2))
    print("\nsummary:")
    for name, value in fps.items():
        print(f"  {name:>16}: {value:8.0f} steps/s")
    for name, value in ratios.items():
        print(f"  {name:>30}: {value:.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
