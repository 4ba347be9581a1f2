"""Looking inside the memory: recording from the acting pass, the linear probe, and ``tlb-rl inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import PPO
from agents.inspect import Episode, _label, _ridge_r2, chunk_split, linear_probe, principal_components
from commands.cli import main
from tlb_rl.cores import make_core
from tlb_rl.cores.record import recording
from tlb_rl.errors import UserError

TMAZE = Path(__file__).resolve().parents[1] / "pretrained" / "tmaze100-tlb.pt"


@pytest.mark.parametrize("slow_update", ["sequential", "parallel"])
def test_recording_sees_the_acting_pass_without_changing_it(slow_update):
    torch.manual_seed(0)
    core = make_core("tlb", 5, d_model=16, chunk_size=4, n_slow=3, n_heads=2, slow_update=slow_update).eval()
    x, starts = torch.randn(2, 11, 5), torch.zeros(2, 11, dtype=torch.bool)
    starts[1, 6] = True  # row 1: an episode begins at the third step of the second chunk (steps 4-7)
    with torch.no_grad():
        state, plain, recorded = core.initial_state(2), [], []
        with recording() as rec:
            for t in range(11):
                y, state = core(x[:, t : t + 1], state, starts[:, t : t + 1])
                recorded.append(y)
        state = core.initial_state(2)
        for t in range(11):
            y, state = core(x[:, t : t + 1], state, starts[:, t : t + 1])
            plain.append(y)
    torch.testing.assert_close(torch.cat(recorded), torch.cat(plain), atol=0, rtol=0)
    updates = rec[core.update.attn]  # one per completed chunk: steps 3 and 7
    assert len(updates) == 2 and updates[0].shape == (2, 2, 3, 4)
    torch.testing.assert_close(updates[1].sum(-1), torch.ones(2, 2, 3))
    assert updates[1][1, :, :, :2].abs().max() == 0  # row 1's chunk update reads only its new episode's steps
    assert updates[1][0, :, :, :2].min() > 0
    openings = rec[(core, "opening")]
    assert len(openings) == 2 and openings[0].shape == (2, 3) and ((openings[0] > 0) & (openings[0] < 1)).all()
    cross = rec[core.layers[-1].attn]
    assert len(cross) == 11 and cross[0].shape == (2, 2, 1, 3)


def test_ridge_probe_reads_a_signal_and_not_its_absence():
    gen = np.random.default_rng(0)
    labels = np.arange(40) % 2
    noise = gen.normal(size=(40, 30))
    signal = noise + 3.0 * labels[:, None] * gen.normal(size=30)
    y = np.eye(2)[labels]
    assert _ridge_r2(signal, y, 1e-3) > 0.8
    assert _ridge_r2(noise, y, 1e-3) < 0.2


@pytest.mark.parametrize("trained", [True, False], ids=["trained", "untrained"])
def test_probe_finds_the_cue_in_a_trained_tlb_at_the_junction(trained):
    """The shipped T-maze policy (corridor 100) writes the cue into its slow vectors and keeps it for 100
    steps; an untrained one carries only a trace of it, far below the memory's own variation."""
    model = PPO.load(TMAZE)
    if not trained:
        torch.manual_seed(1)
        model = PPO.from_config(model.config)
    episodes = model.inspect(32, probe="cue")
    assert len(episodes) == 32 and all(len(e.memory) == 101 for e in episodes)
    probe = linear_probe(episodes)
    if trained:
        assert probe["r2"][0] < 0.1  # at the cue itself no chunk has completed: the slow vectors are the initial ones
        assert probe["last"] > 0.8
    else:
        assert probe["last"] < 0.3
    e = episodes[0]
    assert e.memory.shape == (101, 8 * 64) and e.reads.shape == (101, 8)
    assert len(e.writes) in (6, 7) and e.writes[0].shape == (8, 16) and len(e.openings) == len(e.writes)


def test_inspecting_an_lstm_gives_its_trajectory():
    model = PPO("tmaze", core="lstm", core_kwargs={"hidden_size": 8}, env_kwargs={"corridor_length": 6})
    episodes = model.inspect(6, probe="cue")
    assert [len(e.memory) for e in episodes] == [7] * 6 and episodes[0].memory.shape[1] == 16  # h and c
    assert episodes[0].reads is None and episodes[0].labels == [episodes[0].labels[0]] * 7
    paths, explained = principal_components(episodes)
    assert paths[0].shape == (7, 2) and 0 < explained.sum() <= 1 + 1e-9
    assert (episodes[0].change[1:] > 0).all()


def test_inspecting_a_core_without_memory_is_a_user_error():
    model = PPO("tmaze", core="none", env_kwargs={"corridor_length": 2})
    with pytest.raises(UserError, match="no memory"):
        model.inspect(2)


def test_cli_inspect_writes_figures_and_the_probe(tmp_path, capsys):
    out = tmp_path / "inspect"
    main(["inspect", str(TMAZE), "--probe", "cue", "--episodes", "16", "--figures", "2", "--out", str(out)])
    summary = json.loads((out / "inspect.json").read_text())
    assert summary["episodes"] == 16 and summary["probe"]["key"] == "cue" and summary["probe"]["last"] > 0.8
    assert summary["chunks"]["across_chunks"]["episodes"] == 16  # 101 steps: every episode crosses
    assert len(summary["probe"]["r2"]) == len(summary["probe"]["steps"]) > 90
    assert sorted(p.name for p in out.glob("*.png")) == [
        "episode_seed1000000.png",
        "episode_seed1000001.png",
        "pca.png",
        "probe.png",
    ]
    assert "linear probe of 'cue'" in capsys.readouterr().out


def test_cli_inspect_plays_the_env_with_other_options(tmp_path):
    out = tmp_path / "inspect"
    # trained on a 100-step corridor, played on a 150-step one
    main(["inspect", str(TMAZE), "env_kwargs.corridor_length=150", "--episodes", "4", "--out", str(out)])
    assert json.loads((out / "inspect.json").read_text())["mean_length"] == 151


def test_cli_inspect_gif_draws_the_memory_beside_the_frame(tmp_path):
    run = tmp_path / "run"
    model = PPO("MiniGrid-Empty-5x5-v0", core="lstm", core_kwargs={"hidden_size": 16}, n_envs=2, n_steps=8)
    model.learn(16, progress=False)
    model.save(run / "checkpoints" / "latest.pt")
    main(["inspect", str(run), "--episodes", "2", "--gif", "--figures", "1"])
    import imageio.v2 as imageio

    frames = imageio.mimread(run / "inspect" / "episode.gif")
    assert len(frames) >= 1 and frames[0].shape[1] > frames[0].shape[0]  # the frame, then the memory panel


def test_cli_inspect_with_an_unknown_probe_key_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(TMAZE), "--probe", "colour", "--episodes", "2", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "no 'colour'" in capsys.readouterr().err


def test_probe_labels_must_be_scalars_and_equal_ones_are_one_class():
    assert _label({"cue": np.int64(1)}, "cue") == 1 and _label({}, "cue") is None
    with pytest.raises(UserError, match="number, bool or string"):
        _label({"cue": np.zeros(3)}, "cue")
    # 1 and 1.0 are one class: with no other, there is nothing to score (no NaN in inspect.json)
    memory = np.random.default_rng(0).random((2, 4))
    episodes = [Episode(i, True, memory, np.zeros(2), [1, 1] if i % 2 else [1.0, 1.0]) for i in range(10)]
    probe = linear_probe(episodes)
    assert probe["r2"] == [] and probe["last"] is None


@pytest.mark.parametrize("flag", [["--probe-penalty", "0"], ["--figures", "-1"]])
def test_cli_inspect_refuses_bad_numbers(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(TMAZE), *flag])
    assert exit_info.value.code == 2


def test_chunk_split_counts_the_episodes_that_cross_a_chunk_boundary():
    """Corridor 2: episodes of 3 steps back to back on each env's clock, so episode j starts at step 3j; with
    K = 16 it crosses a boundary when 3j mod 16 is 14 or 15: 2 of every 16 episodes."""
    model = PPO("tmaze", core="tlb", core_kwargs={"d_model": 16, "n_heads": 2}, env_kwargs={"corridor_length": 2})
    episodes = model.inspect(8 * 16)
    assert {len(e.memory) for e in episodes} == {3}
    split = chunk_split(episodes)
    assert split["inside_one_chunk"]["episodes"] == 8 * 14 and split["across_chunks"]["episodes"] == 8 * 2
    across = [e for e in episodes if any(t < 2 for t in e.chunk_ends)]
    assert split["across_chunks"]["success_rate"] == np.mean([e.success for e in across])
    lstm = PPO("tmaze", core="lstm", core_kwargs={"hidden_size": 8}, env_kwargs={"corridor_length": 2})
    assert chunk_split(lstm.inspect(4)) is None


@pytest.mark.parametrize(("corridor", "inside"), [(2, 32), (15, 32), (16, 0)])
def test_on_the_episode_clock_an_episode_crosses_a_chunk_boundary_only_past_its_kth_step(corridor, inside):
    """Every episode begins a chunk: with K = 16 the T-maze's corridor + 1 steps lie in one chunk up to 16."""
    model = PPO(
        "tmaze",
        core="tlb",
        core_kwargs={"d_model": 16, "n_heads": 2, "clock": "episode"},
        env_kwargs={"corridor_length": corridor},
    )
    split = chunk_split(model.inspect(32))
    assert split["inside_one_chunk"]["episodes"] == inside and split["across_chunks"]["episodes"] == 32 - inside
