"""Environments: built-in families through encoder and core, plug-ins, vector envs, bad input."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import envs
from envs.memory_cue import CueAtStart, CueInObservation, CueSometimes, cue_cell
from envs.text import MISSION_LENGTH, PAD, UNKNOWN, VOCABULARY, detokenize, tokenize
from envs.tmaze import TMazeEnv
from envs.vector import choose_vectorization
from tlb_rl.cores import make_core
from tlb_rl.distributions import make_action_head
from tlb_rl.encoders import make_encoder, obs_to_tensor
from tlb_rl.errors import UserError

PLUGINS = '''
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class Corridor(gym.Env):
    """Box observations, Discrete actions; ends after `length` steps."""

    def __init__(self, length=3):
        self.length = length
        self.observation_space = spaces.Box(0.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.array([self.t / self.length, 0.0], np.float32)
        return obs, 0.0, self.t >= self.length, False, {}


def make_corridor(length=3):
    return Corridor(length)


class Instructed(Corridor):
    """A Dict with a Text entry, and float Box actions."""

    def __init__(self):
        super().__init__()
        text = spaces.Text(100, charset="abcdefghijklmnopqrstuvwxyz ")
        self.observation_space = spaces.Dict({"mission": text, "position": spaces.Discrete(4)})
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"mission": "go to the red ball", "position": 0}, {}

    def step(self, action):
        self.t += 1
        return {"mission": "go to the red ball", "position": self.t}, 0.0, self.t >= 3, False, {}


class TupleObservations(Corridor):
    def __init__(self):
        super().__init__()
        self.observation_space = spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3)))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed, options=options)
        return (0, 1), {}

    def step(self, action):
        _, reward, terminated, truncated, info = super().step(action)
        return (1, 2), reward, terminated, truncated, info


class GraphObservations(Corridor):
    def __init__(self):
        super().__init__()
        self.observation_space = spaces.Graph(spaces.Box(0, 1, (2,)), None)


class TupleActions(Corridor):
    def __init__(self):
        super().__init__()
        self.action_space = spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3)))


class ResetRaises(Corridor):
    def reset(self, *, seed=None, options=None):
        raise RuntimeError("no map loaded")


class ResetReturnsObsOnly(Corridor):
    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed)[0]


class SlowStep(Corridor):
    def step(self, action):
        time.sleep(0.0005)
        return super().step(action)
'''
PLUGIN_MODULE = "tlb_rl_test_plugins"


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("plugins") / f"{PLUGIN_MODULE}.py"
    path.write_text(PLUGINS)
    return str(path)


@pytest.fixture
def plugin_module(plugin_file: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(os.path.dirname(plugin_file))
    return PLUGIN_MODULE


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **plugins: str) -> None:
    """Make ``importlib.metadata.entry_points`` report ``plugins`` (name -> "module:attr") as tlb_rl.envs."""
    entries = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(name, value, envs.ENTRY_POINT_GROUP) for name, value in plugins.items()
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: entries.select(group=group))


def run_through_policy(vec: gym.vector.VectorEnv, core_name: str, steps: int = 6) -> dict:
    """Step ``vec`` with actions from encoder -> core -> action head; returns the last observation."""
    encoder = make_encoder(vec.single_observation_space)
    core = make_core(core_name, encoder.output_dim)
    head = make_action_head(vec.single_action_space, core.output_dim)
    state = core.initial_state(vec.num_envs, "cpu")
    obs, _ = vec.reset()
    starts = torch.ones(vec.num_envs, dtype=torch.bool)
    for _ in range(steps):
        x = encoder(obs_to_tensor(obs, "cpu"))  # [B, D]
        y, state = core(x[:, None], state, starts[:, None])  # [B, 1, H]
        assert y.shape == (vec.num_envs, 1, core.output_dim) and torch.isfinite(y).all()
        actions = head(y[:, 0]).sample()
        obs, _, terminated, truncated, _ = vec.step(actions.numpy())
        starts = torch.as_tensor(terminated | truncated)
    vec.close()
    return obs


# --- built-in families ---------------------------------------------------------------------------------


@pytest.mark.parametrize("core_name", ["lstm", "tlb"])
def test_minigrid_memory_with_view_size_3_runs_through_encoder_and_core(core_name: str) -> None:
    vec = envs.make_vec_env("MiniGrid-MemoryS7-v0", 2, view_size=3, vectorization="sync")
    assert set(vec.single_observation_space.spaces) == {"image", "direction"}  # its mission never changes
    obs = run_through_policy(vec, core_name)
    assert obs["image"].shape == (2, 3, 3, 3) and obs["image"].dtype == np.uint8


@pytest.mark.parametrize(("env_id", "view_size"), [("MiniGrid-MemoryS7-v0", 3), ("BabyAI-GoToLocal-v0", 5)])
def test_view_size_gives_the_views_of_minigrids_view_size_wrapper(env_id: str, view_size: int) -> None:
    from minigrid.wrappers import ViewSizeWrapper

    ours = envs.make_env(env_id, view_size=view_size)
    theirs = ViewSizeWrapper(gym.make(env_id), agent_view_size=view_size)
    assert ours.observation_space["image"].shape == (view_size, view_size, 3)
    rng = np.random.default_rng(0)
    for episode in range(3):
        a, _ = ours.reset(seed=episode)
        b, _ = theirs.reset(seed=episode)
        for _ in range(60):
            assert np.array_equal(a["image"], b["image"]) and a["direction"] == b["direction"]
            action = int(rng.integers(ours.action_space.n))
            a, ra, ta, tra, _ = ours.step(action)
            b, rb, tb, trb, _ = theirs.step(action)
            assert (ra, ta, tra) == (rb, tb, trb)
            if ta or tra:
                break


@pytest.mark.parametrize("core_name", ["lstm", "tlb"])
def test_babyai_runs_through_encoder_and_core_with_its_mission(core_name: str) -> None:
    vec = envs.make_vec_env("BabyAI-GoToLocal-v0", 2, vectorization="sync")
    obs = run_through_policy(vec, core_name)
    assert obs["image"].shape == (2, 7, 7, 3)
    assert obs["mission"].shape == (2, MISSION_LENGTH)
    assert all(detokenize(m).startswith("go to") for m in obs["mission"])


@pytest.mark.parametrize("core_name", ["lstm", "tlb"])
def test_tmaze_runs_through_encoder_and_core(core_name: str) -> None:
    vec = envs.make_vec_env("tmaze", 3, corridor_length=4, vectorization="sync")
    obs = run_through_policy(vec, core_name)
    assert obs.shape == (3, 3) and obs.dtype == np.float32


def test_minigrid_image_bounds_are_the_symbol_codes_not_pixels() -> None:
    env = envs.make_env("MiniGrid-MemoryS7-v0", seed=0)
    obs, _ = env.reset()
    image_space = env.observation_space["image"]
    assert image_space.shape == (7, 7, 3) and int(image_space.high.max()) == 10
    assert image_space.contains(obs["image"])


def test_babyai_sampling_rejected_lines_are_silenced(capfd: pytest.CaptureFixture[str]) -> None:
    # Seed 8 of GoToLocal rejects a sample: the raw env prints, ours must not.
    gym.make("BabyAI-GoToLocal-v0").reset(seed=8)
    assert "Sampling rejected" in capfd.readouterr().out
    envs.make_env("BabyAI-GoToLocal-v0").reset(seed=8)
    assert capfd.readouterr().out == ""


def test_max_episode_steps_truncates_a_minigrid_env() -> None:
    env = envs.make_env("MiniGrid-MemoryS7-v0", max_episode_steps=2, seed=0)
    env.reset()
    assert not env.step(2)[3]
    assert env.step(2)[3]


# --- the mission vocabulary -----------------------------------------------------------------------------


def test_vocabulary_is_the_same_in_every_process() -> None:
    code = "import json, envs; print(json.dumps(envs.VOCABULARY))"
    for hash_seed in ("1", "2"):  # set iteration order changes with the hash seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert json.loads(out.stdout) == VOCABULARY


@pytest.mark.parametrize(
    "env_id",
    [
        "BabyAI-GoToLocal-v0",
        "BabyAI-PutNextLocal-v0",
        "BabyAI-OpenDoorLoc-v0",
        "BabyAI-SynthLoc-v0",
        "BabyAI-BossLevel-v0",
        "MiniGrid-Fetch-5x5-N2-v0",
        "MiniGrid-LockedRoom-v0",
        "MiniGrid-PutNear-6x6-N2-v0",
    ],
)
def test_vocabulary_knows_every_word_of_built_in_missions(env_id: str) -> None:
    env = envs.make_env(env_id)
    for seed in range(10):
        ids = env.reset(seed=seed)[0]["mission"]
        mission = env.unwrapped.mission
        assert UNKNOWN not in ids, mission
        assert detokenize(ids) == " ".join(mission.replace(",", "").lower().split())


def test_tokenize_pads_marks_unknown_words_and_truncates() -> None:
    ids = tokenize("Go to the XYZZY ball!", length=6)
    assert ids.dtype == np.int64 and ids.shape == (6,)
    assert ids[3] == UNKNOWN and ids[5] == PAD
    assert detokenize(ids) == "go to the <unk> ball"
    assert (tokenize("red " * 10, length=4) == VOCABULARY.index("red")).all()


# --- T-maze -------------------------------------------------------------------------------------------


def play_tmaze(env: TMazeEnv, seed: int, choose) -> tuple[float, int]:
    obs, _ = env.reset(seed=seed)
    cue = int(np.argmax(obs[:2]))
    total, steps, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(choose(cue, obs))
        total, steps, done = total + reward, steps + 1, terminated or truncated
    return total, steps


def test_passive_tmaze_shows_the_cue_only_first_and_pays_only_memory() -> None:
    env = TMazeEnv(corridor_length=5)
    obs, _ = env.reset(seed=0)
    assert obs[:2].sum() == 1 and obs[2] == 0
    for t in range(1, 6):
        obs, reward, terminated, _, _ = env.step(0)
        assert obs[:2].sum() == 0 and obs[2] == (t == 5) and reward == 0 and not terminated
    # Remembering the cue always wins in L + 1 steps; a fixed answer wins about half the time.
    assert all(play_tmaze(env, s, lambda cue, obs: cue) == (1.0, 6) for s in range(20))
    wins = sum(play_tmaze(env, s, lambda cue, obs: 0)[0] for s in range(200))
    assert 70 < wins < 130


def test_swapped_tmaze_pays_the_cue_xor_the_view_at_the_junction() -> None:
    env = TMazeEnv(corridor_length=4, swap=True)
    swapped = []
    for s in range(200):
        obs, _ = env.reset(seed=s)
        assert obs.shape == (4,) and obs[3] == 0  # the swap is in view at the junction only
        seen: list[float] = []

        def cue_xor_view(cue: int, obs: np.ndarray, seen: list[float] = seen) -> int:
            seen.append(float(obs[3]))
            return cue ^ int(obs[3])

        assert play_tmaze(env, s, cue_xor_view) == (1.0, 5)
        assert seen[:-1] == [0.0] * 4
        swapped.append(seen[-1])
    assert 70 < sum(swapped) < 130
    # Memory alone (the cue) or the view alone (the swap) wins about half the time.
    for choose in (lambda cue, obs: cue, lambda cue, obs: int(obs[3])):
        wins = sum(play_tmaze(env, s, choose)[0] for s in range(200))
        assert 70 < wins < 130
    assert TMazeEnv(corridor_length=4).reset(seed=3)[0].shape == (3,)


def test_active_tmaze_needs_walking_and_times_out() -> None:
    env = TMazeEnv(corridor_length=3, active=True)
    assert play_tmaze(env, 0, lambda cue, obs: cue if obs[2] else 2) == (1.0, 4)
    assert play_tmaze(env, 0, lambda cue, obs: cue if obs[2] else 0) == (0.0, 8)  # never moves; 2 (L + 1)


def test_tmaze_is_a_plugin_by_name_and_by_module() -> None:
    assert any(e.name == "tmaze" and e.family == "plug-in" for e in envs.list_envs())
    assert "tmaze" in envs.describe_envs()
    for spec in ("tmaze", "envs.tmaze:TMazeEnv"):
        assert envs.make_env(spec, corridor_length=7).unwrapped.corridor_length == 7


# --- plug-ins -----------------------------------------------------------------------------------------


def test_plugin_from_a_file_outside_the_package(plugin_file: str) -> None:
    env = envs.make_env(f"{plugin_file}:Corridor", length=2, seed=0)
    env.reset()
    assert env.step(0)[2] is False and env.step(0)[2] is True


def test_plugin_by_module_class_and_factory(plugin_module: str) -> None:
    assert envs.make_env(f"{plugin_module}:Corridor", length=5).unwrapped.length == 5
    assert envs.make_env(f"{plugin_module}:make_corridor", length=4).unwrapped.length == 4


def test_plugin_by_entry_point(plugin_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch, corridor=f"{plugin_module}:Corridor")
    assert envs.make_env("corridor", length=6).unwrapped.length == 6
    assert ("corridor", "plug-in") in [(e.name, e.family) for e in envs.list_envs()]
    assert f"{plugin_module}:Corridor" in envs.describe_envs()


def test_plugin_callable() -> None:
    env = envs.make_env(lambda: TMazeEnv(corridor_length=2), seed=1)
    assert env.reset()[0].shape == (3,)


def test_an_entry_a_wrapper_adds_to_a_minigrid_observation_reaches_the_policy() -> None:
    env = envs.make_env(lambda: CueInObservation(gym.make("MiniGrid-MemoryS7-v0")), seed=3)
    assert set(env.observation_space.spaces) == {"image", "direction", "cue"}
    cues = {int(env.reset(seed=s)[0]["cue"]) for s in range(8)}
    assert cues == {0, 1}
    encoder = make_encoder(env.observation_space)
    obs = obs_to_tensor({k: np.asarray(v)[None] for k, v in env.reset(seed=0)[0].items()}, "cpu")
    assert encoder(obs).shape == (1, encoder.output_dim)


def test_cue_at_start_names_the_cue_object_in_the_first_observation_only() -> None:
    env = envs.make_env(lambda: CueAtStart(gym.make("MiniGrid-MemoryS7-v0")), seed=3)
    assert env.observation_space["cue"] == spaces.Discrete(3)
    cues = set()
    for seed in range(8):
        obs, _ = env.reset(seed=seed)
        level = env.unwrapped
        cues.add(int(obs["cue"]))
        assert obs["cue"] == {"ball": 1, "key": 2}[level.grid.get(*cue_cell(level)).type]
        assert all(env.step(0)[0]["cue"] == 0 for _ in range(3))  # turning left never ends an episode
    assert cues == {1, 2}


def test_cue_sometimes_names_the_cue_in_every_observation_of_hinted_episodes_and_in_none_of_the_others() -> None:
    env = envs.make_env(lambda: CueSometimes(gym.make("MiniGrid-MemoryS7-v0"), hint_prob=0.5), seed=3)
    assert env.observation_space["cue"] == spaces.Discrete(3)
    cues = []
    for seed in range(40):
        obs, _ = env.reset(seed=seed)
        level = env.unwrapped
        cue = int(obs["cue"])
        assert cue in (0, {"ball": 1, "key": 2}[level.grid.get(*cue_cell(level)).type])
        assert all(env.step(0)[0]["cue"] == cue for _ in range(3))
        cues.append(cue)
    assert 5 < cues.count(0) < 35 and {1, 2} <= set(cues)
    never = CueSometimes(gym.make("MiniGrid-MemoryS7-v0"), hint_prob=0.0)
    assert all(never.reset(seed=s)[0]["cue"] == 0 for s in range(10))
    with pytest.raises(ValueError, match="hint_prob"):
        CueSometimes(gym.make("MiniGrid-MemoryS7-v0"), hint_prob=1.5)


def test_plugin_text_observations_are_tokenised_and_encode(plugin_module: str) -> None:
    env = envs.make_env(f"{plugin_module}:Instructed", seed=0)
    assert env.observation_space["mission"] == spaces.Box(0, len(VOCABULARY) - 1, (MISSION_LENGTH,), np.int64)
    obs, _ = env.reset()
    assert detokenize(obs["mission"]) == "go to the red ball"
    encoder = make_encoder(env.observation_space)
    batch = {k: np.stack([v, v]) for k, v in obs.items()}
    assert encoder(obs_to_tensor(batch, "cpu")).shape == (2, encoder.output_dim)


# --- bad input: one line each -------------------------------------------------------------------------


def error_of(spec, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        envs.make_env(spec, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unknown_id_names_it_and_the_closest_ids() -> None:
    message = error_of("MiniGrid-MemoryS7-v1")
    assert "'MiniGrid-MemoryS7-v1'" in message and "MiniGrid-MemoryS7-v0" in message
    assert "closest" not in error_of("no-such-thing-at-all")


def test_unknown_option_names_it_and_what_the_env_takes() -> None:
    message = error_of("MiniGrid-MemoryS7-v0", sise=5)
    assert "'sise'" in message and "size" in message and "view_size" in message
    assert "'corridor_lenght'" in error_of("tmaze", corridor_lenght=5)
    assert "MiniGrid and BabyAI envs only" in error_of("tmaze", view_size=3)
    assert "odd integer" in error_of("MiniGrid-MemoryS7-v0", view_size=4)


def test_bad_module_file_or_attribute(plugin_module: str, tmp_path: Path) -> None:
    assert "cannot import 'no_such_module_xyz'" in error_of("no_such_module_xyz:Env")
    assert "no file" in error_of("/nonexistent/envs.py:Env")
    assert "has no attribute 'Nope'" in error_of(f"{plugin_module}:Nope")
    broken = tmp_path / "broken_env.py"
    broken.write_text("class Env(:\n")
    assert "SyntaxError" in error_of(f"{broken}:Env")


def test_unsupported_spaces_name_the_space_and_what_is_supported(plugin_module: str) -> None:
    message = error_of(f"{plugin_module}:GraphObservations")
    assert "observation space Graph(" in message and "supported: Box" in message
    message = error_of(f"{plugin_module}:TupleActions")
    assert "action space Tuple(Discrete(2), Discrete(3))" in message and "supported: Discrete" in message


def test_tuple_observations_reach_the_policy_as_a_dict(plugin_module: str) -> None:
    env = envs.make_env(f"{plugin_module}:TupleObservations")
    assert env.observation_space == spaces.Dict({"0": spaces.Discrete(2), "1": spaces.Discrete(3)})
    obs, _ = env.reset(seed=0)
    assert obs == {"0": 0, "1": 1} and env.step(1)[0] == {"0": 1, "1": 2}
    make_encoder(env.observation_space)


def test_plugin_that_raises_in_reset(plugin_module: str) -> None:
    assert "raised in reset(): RuntimeError: no map loaded" in error_of(f"{plugin_module}:ResetRaises")


def test_plugin_that_breaks_the_api_gets_the_checker_message(plugin_module: str) -> None:
    message = error_of(f"{plugin_module}:ResetReturnsObsOnly")
    assert "breaks the Gymnasium API" in message and "`env.reset()` was not a tuple" in message


def test_bad_spec_fails_in_make_vec_env_before_any_worker_starts() -> None:
    with pytest.raises(UserError, match="unknown env"):
        envs.make_vec_env("MiniGrid-MemoryS7-v1", 2, vectorization="async")
    with pytest.raises(UserError, match="vectorization"):
        envs.make_vec_env("tmaze", 2, vectorization="threads")


@pytest.mark.parametrize(
    "space",
    [
        spaces.Box(0, 1, (3,)),
        spaces.Box(0, 255, (16, 16, 3), np.uint8),
        spaces.Discrete(3),
        spaces.MultiDiscrete([2, 3]),
        spaces.MultiBinary(4),
        spaces.Dict({"a": spaces.Discrete(3), "b": spaces.Box(-1, 1, (2,))}),
        spaces.Tuple((spaces.Discrete(2),)),
        spaces.Dict({"a": spaces.Dict({"b": spaces.Discrete(2)})}),
        spaces.Graph(spaces.Box(0, 1, (2,)), None),
    ],
    ids=lambda s: type(s).__name__,
)
def test_check_spaces_accepts_exactly_what_the_encoders_encode(space: spaces.Space) -> None:
    """...once make_env has made a Tuple a Dict."""
    env = TMazeEnv()
    env.observation_space = space
    try:
        as_dict = isinstance(space, spaces.Tuple)
        make_encoder(spaces.Dict({str(i): s for i, s in enumerate(space.spaces)}) if as_dict else space)
    except UserError:
        with pytest.raises(UserError, match="is not supported"):
            envs.check_spaces(env)
    else:
        envs.check_spaces(env)


# --- vector envs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_vector_env_keeps_the_final_observation_of_a_truncated_episode(vectorization: str) -> None:
    # Passive T-maze of 10 cut at 3 steps: the last observation is the corridor, the next one a cue.
    vec = envs.make_vec_env("tmaze", 2, corridor_length=10, max_episode_steps=3, vectorization=vectorization)
    try:
        vec.reset()
        for _ in range(2):
            obs, _, _, truncated, info = vec.step(np.zeros(2, np.int64))
            assert not truncated.any() and not info.get("_final_obs", np.zeros(2)).any()
        obs, _, terminated, truncated, info = vec.step(np.zeros(2, np.int64))
        assert truncated.all() and not terminated.any() and info["_final_obs"].all()
        assert np.stack(info["final_obs"]).tolist() == [[0, 0, 0], [0, 0, 0]]  # the corridor
        assert (obs[:, :2].sum(axis=1) == 1).all()  # already the next episode's cue
    finally:
        vec.close()


def test_vector_env_i_is_seeded_seed_plus_i() -> None:
    vec = envs.make_vec_env("BabyAI-GoToLocal-v0", 3, seed=10, vectorization="sync")
    obs, _ = vec.reset()
    for i in range(3):
        single, _ = envs.make_env("BabyAI-GoToLocal-v0", seed=10 + i).reset()
        assert (obs["image"][i] == single["image"]).all() and (obs["mission"][i] == single["mission"]).all()
    other, _ = envs.make_vec_env("BabyAI-GoToLocal-v0", 3, seed=11, vectorization="sync").reset()
    assert (other["image"][0] == obs["image"][1]).all() and not (other["image"] == obs["image"]).all()


def test_auto_vectorization_picks_processes_only_for_slow_steps(
    plugin_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = envs.make_env(f"{plugin_module}:SlowStep", length=1000)
    fast = TMazeEnv()
    monkeypatch.setattr("envs.vector.usable_cores", lambda: 2)
    assert choose_vectorization(slow, 8) == "async" and choose_vectorization(fast, 8) == "sync"
    assert choose_vectorization(slow, 1) == "sync"
    start = time.perf_counter()
    assert isinstance(envs.make_vec_env("tmaze", 4), gym.vector.SyncVectorEnv)
    assert time.perf_counter() - start < 1.0  # the probe is short
    monkeypatch.setattr("envs.vector.usable_cores", lambda: 1)
    assert choose_vectorization(slow, 8) == "sync"


def test_plugin_checker_runs_once_per_process(plugin_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr("envs.registry._CHECKED", set())
    monkeypatch.setattr("envs.registry._check_plugin", lambda name, env: calls.append(env))
    for _ in range(3):
        envs.make_env(f"{plugin_module}:Corridor", length=9)
    envs.make_vec_env(f"{plugin_module}:Corridor", 4, length=9, vectorization="sync").close()
    assert len(calls) == 1


def test_describe_envs_lists_families() -> None:
    text = envs.describe_envs()
    assert "MiniGrid-MemoryS7-v0" in text and "BabyAI-GoToLocal-v0" in text
