"""Reliability: exact resume, crash-safe checkpoints, numerical faults, one clear line for every bad input.

The subprocess tests start the real console command and interrupt or kill it; what they wait for is a
checkpoint on disk, never a duration, so a slow machine makes them slower, not flaky.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_process import tlb_rl, wait_for
from run_files import metrics_by_frames

from agents import PPO
from commands.cli import main
from envs import make_env, make_vec_env
from envs.seeding import TRAINING_SEED_LIMIT, SeededEpisodes, episode_seed
from tlb_rl.checkpoint import load_checkpoint, save_checkpoint

TLB_SMALL = {"d_model": 16, "n_heads": 2, "chunk_size": 4, "n_slow": 2}
# Checkpoints below are taken in the middle of DoorKey episodes.
DOORKEY = dict(
    env="MiniGrid-DoorKey-5x5-v0",
    env_kwargs={"max_episode_steps": 20},  # episodes end (truncated) inside the tests, yet outlast a rollout
    core="tlb",
    core_kwargs=TLB_SMALL,
    n_envs=2,
    n_steps=16,
    batch_size=16,
    n_epochs=2,
    eval_every=0,
    total_frames=6 * 32,
    checkpoint_every=1,
    vectorization="sync",
)
CLI_TINY = [
    *(f"{k}={v}" for k, v in DOORKEY.items() if not k.endswith("_kwargs")),
    *(f"core_kwargs.{k}={v}" for k, v in TLB_SMALL.items()),
    "env_kwargs.max_episode_steps=20",
]


def _run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- resume
def test_episode_seeds_are_a_function_of_stream_and_index_and_stay_in_the_training_range():
    seeds = [episode_seed(s, k) for s in (0, 7, 499_999, 10**9) for k in range(50)]
    assert all(0 <= x < TRAINING_SEED_LIMIT for x in seeds)
    assert seeds == [episode_seed(s, k) for s in (0, 7, 499_999, 10**9) for k in range(50)]
    assert len(set(seeds)) > 190  # streams do not repeat each other's episodes


def test_an_env_snapshot_rebuilds_the_same_episode():
    env = make_env("MiniGrid-DoorKey-5x5-v0", seed=3)
    assert isinstance(env, SeededEpisodes)
    last, _ = env.reset()
    for _ in range(30):
        last, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            last, _ = env.reset()
    snap = env.snapshot()
    twin = make_env("MiniGrid-DoorKey-5x5-v0", seed=999)
    twin.restore_from = snap
    obs, _ = twin.reset()
    assert np.array_equal(obs["image"], last["image"])
    assert twin.unwrapped.agent_pos == env.unwrapped.agent_pos
    assert twin.unwrapped.step_count == env.unwrapped.step_count
    rng_a, rng_b = env.unwrapped.np_random.integers(10**9), twin.unwrapped.np_random.integers(10**9)
    assert rng_a == rng_b
    for _ in range(40):  # and the two go on identically, resets included
        a = env.action_space.sample()
        o1, r1, t1, u1, _ = env.step(a)
        o2, r2, t2, u2, _ = twin.step(a)
        assert np.array_equal(o1["image"], o2["image"]) and (r1, t1, u1) == (r2, t2, u2)
        if t1 or u1:
            assert np.array_equal(env.reset()[0]["image"], twin.reset()[0]["image"])


def test_vector_env_snapshots_round_trip():
    envs = make_vec_env("MiniGrid-DoorKey-5x5-v0", 2, seed=5, vectorization="sync")
    envs.reset(seed=5)
    for _ in range(7):
        envs.step(np.array([2, 0]))
    snaps = envs.call("snapshot")
    obs_a = envs.step(np.array([1, 2]))[0]
    other = make_vec_env("MiniGrid-DoorKey-5x5-v0", 2, seed=0, vectorization="sync")
    other.set_attr("restore_from", list(snaps))
    other.reset()
    obs_b = other.step(np.array([1, 2]))[0]
    assert np.array_equal(obs_a["image"], obs_b["image"])


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    whole = PPO(**DOORKEY, run_dir=str(tmp_path / "whole"))
    whole.learn(progress=False)
    whole.close()

    part = PPO(**DOORKEY, run_dir=str(tmp_path / "part"))
    part.learn(callback=lambda model, _: model.updates < 3, progress=False)  # stops after update 3
    part.close()
    del part
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    np.random.seed(12345)
    resumed = PPO.load(tmp_path / "part" / "checkpoints" / "latest.pt")
    assert resumed.frames == 3 * 32
    resumed.learn(progress=False)
    resumed.close()

    a, b = metrics_by_frames(tmp_path / "whole"), metrics_by_frames(tmp_path / "part")
    assert sorted(a) == sorted(b) == [32 * i for i in range(1, 7)]
    for frames in sorted(a):
        assert a[frames] == b[frames], f"metrics differ at {frames} frames"
    assert any(r.get("rollout/episodes", 0) > 0 for r in a.values()), "episodes must end inside the test"


def test_resume_with_a_core_state_of_another_layout_starts_fresh_episodes(tmp_path, capsys):
    run = PPO(**DOORKEY, run_dir=str(tmp_path / "run"))
    run.learn(callback=lambda model, _: model.updates < 2, progress=False)
    run.close()
    path = tmp_path / "run" / "checkpoints" / "latest.pt"
    data = load_checkpoint(path)
    state = data["rollout"]["core_state"]
    state["kv"] = state["kv"][:, :, :-1]  # the layout of an older TLB core: one cache slot fewer
    save_checkpoint(data, path)
    resumed = PPO.load(path)
    resumed.learn(progress=False)  # no shape error: the envs' episodes start afresh
    resumed.close()
    assert "does not fit core 'tlb'" in capsys.readouterr().err
    assert resumed.frames == DOORKEY["total_frames"]


def test_ctrl_c_saves_an_exact_checkpoint_and_resume_continues_the_run(tmp_path, capsys):
    # No schedule, so total_frames may change; one thread in both processes, so sums add up in one order.
    flags = ["--no-progress", "--no-gif", *CLI_TINY, "anneal_lr=false", "torch_threads=1"]
    proc = tlb_rl("train", *flags, f"run_dir={tmp_path / 'run'}", "total_frames=100000000", cwd=tmp_path)
    wait_for(tmp_path / "run" / "checkpoints" / "latest.pt", proc, replaced_times=1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"tlb-rl train --resume {tmp_path / 'run'}" in err and "Traceback" not in err
    stopped = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["progress"]["frames"]
    assert max(metrics_by_frames(tmp_path / "run")) == stopped, "the checkpoint holds the last logged update"

    end = stopped + 3 * 32
    code, err = _run_cli(["train", "--resume", str(tmp_path / "run"), "--no-progress", f"total_frames={end}"], capsys)
    assert code == 0, err
    code, err = _run_cli(
        ["train", *flags, f"run_dir={tmp_path / 'whole'}", f"total_frames={end}"],
        capsys,
    )
    assert code == 0, err
    a, b = metrics_by_frames(tmp_path / "whole"), metrics_by_frames(tmp_path / "run")
    assert sorted(a) == sorted(b)
    for frames in sorted(a):
        assert a[frames] == b[frames], f"metrics differ at {frames} frames"


def test_sigkill_leaves_a_loadable_checkpoint_that_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    proc = tlb_rl("train", "--no-progress", *CLI_TINY, f"run_dir={run}", "total_frames=100000000", cwd=tmp_path)
    wait_for(run / "checkpoints" / "latest.pt", proc, replaced_times=3)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    data = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert data["progress"]["frames"] >= 4 * 32
    frames = data["progress"]["frames"]
    code, err = _run_cli(["train", "--resume", str(run), "--no-progress", f"total_frames={frames + 32}"], capsys)
    assert code == 0, err
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["progress"]["frames"] == frames + 32


# ----------------------------------------------------------------------------------- numerical faults
NAN_ENV = '''
import gymnasium as gym
import numpy as np


class NanAfter(gym.Env):
    """Rewards turn NaN after 100 steps of this env (a bug in a user's reward function)."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.steps = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.steps += 1
        reward = float("nan") if self.steps > 100 else 0.0
        return np.zeros(3, np.float32), reward, False, self.steps % 10 == 0, {}
'''


def test_nan_stops_training_naming_the_update_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    (tmp_path / "nan_env.py").write_text(NAN_ENV)
    run = tmp_path / "run"
    args = [
        "train",
        "--no-progress",
        f"env={tmp_path / 'nan_env.py'}:NanAfter",
        "core=lstm",
        "n_envs=2",
        "n_steps=16",
        "batch_size=32",
        "eval_every=0",
        "checkpoint_every=1",
        "vectorization=sync",
        f"run_dir={run}",
    ]
    code, err = _run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 1, err
    # Rewards turn NaN at step 101 of each env, i.e. in the rollout of update 7 (16 steps per update).
    assert lines[-1].startswith("tlb-rl: error:") and "in update 7" in lines[-1] and "Traceback" not in err
    data = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert data["progress"]["updates"] == 6
    assert all(torch.isfinite(v).all() for v in data["policy"].values())


# ------------------------------------------------------------------------------------------- bad input
PLUGIN_BAD_SPACE = """
import gymnasium as gym
import numpy as np


class Graph(gym.Env):
    observation_space = gym.spaces.Graph(gym.spaces.Box(0, 1, (2,)), None)
    action_space = gym.spaces.Discrete(2)
"""

PLUGIN_RAISES = """
import gymnasium as gym
import numpy as np


class Broken(gym.Env):
    observation_space = gym.spaces.Box(0, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        raise KeyError("level_file")
"""


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TLB and an LSTM checkpoint of a tiny T-maze run, and a run directory without a checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    for core in ("tlb", "lstm"):
        model = PPO("tmaze", core=core, n_envs=2, n_steps=8, batch_size=16, vectorization="sync")
        model.save(root / f"{core}.pt")
    (root / "empty_run").mkdir()
    (root / "bad_space.py").write_text(PLUGIN_BAD_SPACE)
    (root / "raises.py").write_text(PLUGIN_RAISES)
    (root / "not_a_dir").write_text("a file where a directory is expected")
    (root / "truncated.pt").write_bytes((root / "tlb.pt").read_bytes()[:2000])
    return root


BAD_INPUTS = {
    "unknown env id": (["train", "env=MiniGrid-MemoryS7-v9"], "unknown env 'MiniGrid-MemoryS7-v9'"),
    "unknown config key": (["train", "learnin_rate=0.1"], "unknown PPO key 'learnin_rate'"),
    "wrong value type": (["train", "n_envs=eight"], "'n_envs' must be int"),
    "value out of range": (["train", "n_envs=0"], "'n_envs' must be at least 1"),
    "unknown core": (["train", "core=lstn"], "unknown core 'lstn'"),
    "plug-in with an unsupported space": (["train", "env={root}/bad_space.py:Graph"], "Graph"),
    "plug-in that raises on reset": (["train", "env={root}/raises.py:Broken"], "level_file"),
    "missing checkpoint": (["eval", "{root}/no_such.pt"], "no checkpoint at"),
    "corrupt (truncated) checkpoint": (["eval", "{root}/truncated.pt"], "corrupt"),
    "checkpoint for another core": (
        ["train", "env=tmaze", "core=lstm", "init_from={root}/tlb.pt", "total_frames=16"],
        "does not fit this policy",
    ),
    "checkpoint for another observation space": (
        ["train", "env=MiniGrid-Empty-5x5-v0", "init_from={root}/tlb.pt", "total_frames=16"],
        "other spaces",
    ),
    "resume of a run without a checkpoint": (["train", "--resume", "{root}/empty_run"], "checkpoint not found"),
    "eval of a run dir with no checkpoint": (["eval", "{root}/empty_run"], "no checkpoint at"),
    "unwritable output dir": (["train", "env=tmaze", "run_dir={root}/not_a_dir/run"], "cannot write"),
    "missing config file": (["train", "--config", "{root}/nope.yaml"], "config file not found"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(kind, saved_runs, capsys):
    args, message = BAD_INPUTS[kind]
    code, err = _run_cli([a.format(root=saved_runs) for a in args], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tlb-rl: error:"), err
    assert message.format(root=saved_runs) in lines[0], lines[0]


def test_debug_flag_shows_the_traceback(saved_runs):
    proc = tlb_rl("--debug", "eval", str(saved_runs / "truncated.pt"), cwd=saved_runs)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" in err
