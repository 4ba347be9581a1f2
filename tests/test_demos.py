"""Expert demonstrations: what is stored is what the wrapped env shows, it round-trips, bad input gets one line."""

from __future__ import annotations

import numpy as np
import pytest

from agents.dataset import DATA_FILE, demos_from_minari, demos_to_minari, load_demos
from agents.demos import generate_demos
from commands.cli import main
from envs import make_env
from tlb_rl.errors import UserError

ENV = "BabyAI-GoToLocal-v0"


@pytest.fixture(scope="module")
def demos_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demos") / "gotolocal"
    generate_demos(ENV, 12, out, seed=100, progress=False)
    return out


def test_round_trip_replays_in_the_env(demos_dir) -> None:
    """Loaded episodes hold the wrapped env's observations and the bot's actions: replaying them succeeds."""
    data = load_demos(demos_dir, env=ENV)
    assert len(data) == 12 and list(data.seeds) == list(range(100, 112))
    assert data.per_episode == ["mission"]
    env = make_env(ENV)
    for i in range(len(data)):
        obs, actions = data.episode(i)
        seen, _ = env.reset(seed=int(data.seeds[i]))
        for t, action in enumerate(actions):
            for k in seen:
                np.testing.assert_array_equal(obs[k][t], seen[k], err_msg=f"episode {i} step {t} key {k}")
            seen, reward, terminated, _, _ = env.step(int(action))
        for k in seen:
            np.testing.assert_array_equal(obs[k][-1], seen[k])
        assert terminated and reward > 0


def test_workers_give_the_same_dataset(demos_dir, tmp_path) -> None:
    parallel = generate_demos(ENV, 12, tmp_path / "p", seed=100, workers=2, progress=False)
    serial = load_demos(demos_dir)
    np.testing.assert_array_equal(parallel.actions, serial.actions)
    np.testing.assert_array_equal(parallel.seeds, serial.seeds)
    for k in serial.obs:
        np.testing.assert_array_equal(parallel.obs[k], serial.obs[k])


def test_minari_round_trip(demos_dir, tmp_path) -> None:
    pytest.importorskip("minari")
    data = load_demos(demos_dir)
    demos_to_minari(data, "tlbrl/gotolocal/test-v0", tmp_path / "minari")
    back = demos_from_minari("tlbrl/gotolocal/test-v0", tmp_path / "minari")
    assert back.env == ENV and back.observation_space == data.observation_space
    np.testing.assert_array_equal(back.seeds, data.seeds)
    np.testing.assert_array_equal(back.actions, data.actions)
    np.testing.assert_array_equal(back.lengths, data.lengths)
    for k in data.obs:
        np.testing.assert_array_equal(back.obs[k], data.obs[k])


def test_truncated_file_gives_one_line(demos_dir, tmp_path) -> None:
    raw = (demos_dir / DATA_FILE).read_bytes()
    (tmp_path / DATA_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_demos(tmp_path)


def test_corrupt_bytes_give_one_line(demos_dir, tmp_path) -> None:
    raw = bytearray((demos_dir / DATA_FILE).read_bytes())
    raw[len(raw) // 3 : len(raw) // 3 + 64] = bytes(64)  # damage a compressed member, keep the zip directory
    (tmp_path / DATA_FILE).write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"truncated or corrupt|inconsistent"):
        load_demos(tmp_path)


def test_missing_and_wrong_env_datasets(demos_dir, tmp_path) -> None:
    with pytest.raises(UserError, match="no demonstrations at"):
        load_demos(tmp_path / "nothing")
    with pytest.raises(UserError, match="are of 'BabyAI-GoToLocal-v0', but 'BabyAI-GoToRedBallGrey-v0' was asked"):
        load_demos(demos_dir, env="BabyAI-GoToRedBallGrey-v0")


def test_refuses_envs_without_an_expert_and_held_out_seeds(tmp_path) -> None:
    with pytest.raises(UserError, match="no built-in expert plays EmptyEnv"):
        generate_demos("MiniGrid-Empty-5x5-v0", 2, tmp_path, progress=False)
    with pytest.raises(UserError, match="held out"):
        generate_demos(ENV, 10, tmp_path, seed=499_995, progress=False)


def test_unsolvable_level_gives_a_message_not_a_hang(tmp_path) -> None:
    # The bot's own docstring lists KeyInBox among the levels it cannot solve.
    with pytest.raises(UserError, match="solved none of the first"):
        generate_demos("BabyAI-KeyInBox-v0", 50, tmp_path, progress=False)


def test_cli_reports_kept_and_failed(tmp_path, capsys) -> None:
    main(["demos", "--env", ENV, "--episodes", "3", "--out", str(tmp_path / "d"), "--no-progress"])
    out = capsys.readouterr().out
    assert "kept 3 of 3 episodes (0 failed)" in out
    assert load_demos(tmp_path / "d").header["seeds_played"] == [0, 3]


@pytest.mark.parametrize("env_id", ["MiniGrid-MemoryS7-v0", "MiniGrid-MemoryS13-v0"])
def test_memory_expert_looks_at_the_cue_then_picks_its_match(tmp_path, env_id) -> None:
    data = generate_demos(env_id, 30, tmp_path / "d", progress=False)
    assert len(data) == 30 and data.header["generator"] == "agents.experts:memory_expert"
    env = make_env(env_id)
    for i in range(len(data)):
        _, actions = data.episode(i)
        env.reset(seed=int(data.seeds[i]))
        level = env.unwrapped
        cue = (1, level.grid.height // 2 - 1)
        seen_at = None
        for t, action in enumerate(actions):
            if seen_at is None and level.agent_sees(*cue):
                seen_at = t
            _, reward, terminated, _, _ = env.step(int(action))
        # the cue was in view before the last steps, and the episode ended on the matching object's side
        assert seen_at is not None and seen_at < len(actions) - 2, (i, seen_at, len(actions))
        assert terminated and reward > 0 and tuple(level.agent_pos) == tuple(level.success_pos)


def test_a_users_expert_by_name_and_bad_names(tmp_path, capsys) -> None:
    plugin = tmp_path / "my_expert.py"
    plugin.write_text("def straight(env):\n    return lambda: 2  # always forward\n")
    with pytest.raises(UserError, match=r"the expert \(.*my_expert.py:straight\) solved none of the first 5"):
        generate_demos("MiniGrid-Empty-5x5-v0", 5, tmp_path / "d", expert=f"{plugin}:straight", progress=False)
    with pytest.raises(UserError, match="give it as module:function"):
        generate_demos("MiniGrid-Empty-5x5-v0", 2, tmp_path / "d", expert="straight", progress=False)
    with pytest.raises(UserError, match=r"expert 'agents\.experts:nothing': 'agents\.experts' has no attribute"):
        generate_demos("MiniGrid-Empty-5x5-v0", 2, tmp_path / "d", expert="agents.experts:nothing", progress=False)
    turn = "agents.experts:memory_expert"
    main(["demos", "--env", "MiniGrid-MemoryS7-v0", "--episodes", "3", "--out", str(tmp_path / "m"), "--expert", turn])
    assert "kept 3 of 3 episodes" in capsys.readouterr().out
