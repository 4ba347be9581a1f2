"""Behaviour cloning: packing with carried state, overfitting a few demonstrations, run dir and checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from run_files import metrics_by_frames

from agents.bc import BC, pack_episodes
from agents.dataset import DATA_FILE, load_demos
from agents.demos import generate_demos
from commands.cli import main
from tlb_rl.checkpoint import load_checkpoint
from tlb_rl.errors import UserError
from tlb_rl.policy import SequencePolicy
from tlb_rl.spaces import space_from_dict

ENV = "BabyAI-GoToRedBallGrey-v0"
SMALL_TLB = ["core_kwargs.d_model=32", "core_kwargs.n_heads=2", "core_kwargs.chunk_size=4", "core_kwargs.n_slow=4"]


@pytest.fixture(scope="module")
def demos_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bc") / "demos"
    generate_demos(ENV, 20, out, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def overfit_run(demos_dir, tmp_path_factory: pytest.TempPathFactory):
    """``tlb-rl train --algo bc`` on 20 demonstrations, no validation split, evaluated once at the end."""
    run_dir = tmp_path_factory.mktemp("bc") / "run"
    main(
        [
            "train",
            "--algo",
            "bc",
            "--config",
            "configs/bc/babyai_gotoredballgrey.yaml",
            "--no-progress",
            f"dataset={demos_dir}",
            f"run_dir={run_dir}",
            "n_demos=20",
            "val_fraction=0",
            "batch_size=20",
            "max_updates=120",
            "eval_every_updates=120",
            "seq_len=16",
            "eval_episodes=2",
            "test_episodes=2",
            "learning_rate=0.003",
            *SMALL_TLB,
        ]
    )
    return run_dir


def test_overfits_its_demonstrations(overfit_run, demos_dir) -> None:
    """~100% success on the demonstrations' own seeds (the bot solved every one of them)."""
    model = BC.load(overfit_run / "checkpoints" / "best.pt")
    seeds = load_demos(demos_dir).seeds
    assert list(seeds) == list(range(20))
    result = model.evaluate(20, seed_start=0, deterministic=True)
    assert result["success_rate"] >= 0.95, result


def test_run_dir_and_checkpoint_contract(overfit_run) -> None:
    for name in ("config.json", "metrics.jsonl", "final_eval.json", "learning_curve.png", "episode.gif"):
        assert (overfit_run / name).is_file(), name
    assert json.loads((overfit_run / "final_eval.json").read_text())["episodes"] == 2
    data = load_checkpoint(overfit_run / "checkpoints" / "best.pt")
    assert data["algo"] == "bc"
    cfg = data["config"]
    assert {"env", "env_kwargs", "core", "core_kwargs", "encoder_kwargs"} <= set(cfg)
    # What PPO's init_from relies on: a SequencePolicy built from config + spaces takes the weights as they are.
    policy = SequencePolicy(
        space_from_dict(data["spaces"]["observation"]),
        space_from_dict(data["spaces"]["action"]),
        cfg["core"],
        cfg["core_kwargs"],
        cfg["encoder_kwargs"],
    )
    policy.load_state_dict(data["policy"])


def test_interrupted_and_resumed_bc_equals_the_uninterrupted_run(demos_dir, tmp_path, capsys) -> None:
    """Stopped after every evaluation (mid-epoch and at an epoch's end) and resumed from the checkpoint each
    time, the last leg by ``tlb-rl train --resume``: the same metrics and weights as one run."""
    config = dict(
        dataset=str(demos_dir), core_kwargs={"d_model": 32, "n_heads": 2, "chunk_size": 4, "n_slow": 4},
        val_fraction=0.1, batch_size=4, seq_len=8, max_updates=20, eval_every_updates=2, eval_episodes=2,
        test_episodes=2, patience=0, seed=3,
    )  # fmt: skip
    whole = BC(ENV, run_dir=str(tmp_path / "whole"), **config)
    whole.learn(progress=False)
    assert whole.epochs >= 2, "the run must cross epochs"

    latest = tmp_path / "part" / "checkpoints" / "latest.pt"
    part = BC(ENV, run_dir=str(tmp_path / "part"), **config)
    where: list[tuple[int, int]] = []  # (segments done, segments) of the epoch at each stop
    while part.updates < 18:
        part.learn(callback=lambda model, _: False, progress=False)  # stops after its first evaluation
        where.append((part._position, len(part._resume_epoch(part._data[0]))))
        del part
        torch.manual_seed(12345)  # whatever the process did in between must not matter
        np.random.seed(12345)
        part = BC.load(latest)
    assert any(0 < done < n for done, n in where) and any(done == n for done, n in where), where
    main(["train", "--resume", str(tmp_path / "part"), "--no-progress"])
    assert "resuming" in capsys.readouterr().err

    a, b = metrics_by_frames(tmp_path / "whole"), metrics_by_frames(tmp_path / "part")
    assert sorted(a) == sorted(b) and len(a) == 10
    for frames in sorted(a):
        assert a[frames] == b[frames], f"metrics differ at {frames} frames"
    resumed = load_checkpoint(latest)["policy"]
    for k, v in whole.policy.state_dict().items():
        assert torch.equal(v, resumed[k]), k


def test_a_bc_checkpoint_for_another_split_resumes_from_a_new_epoch(demos_dir, tmp_path, capsys) -> None:
    run = BC(ENV, dataset=str(demos_dir), run_dir=str(tmp_path / "run"), max_updates=4, eval_every_updates=2,
             batch_size=4, seq_len=8, eval_episodes=1, test_episodes=1)  # fmt: skip
    run.learn(callback=lambda model, _: False, progress=False)
    resumed = BC.load(tmp_path / "run" / "checkpoints" / "latest.pt", n_demos=15)
    resumed.learn(progress=False)
    assert resumed.updates == 4
    assert "training goes on from a new epoch" in capsys.readouterr().err


def test_eval_command_reads_bc_runs(overfit_run, capsys) -> None:
    main(["eval", str(overfit_run), "--episodes", "3"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["episodes"] == 3 and 0.0 <= summary["success_rate"] <= 1.0


@pytest.mark.parametrize("core", ["tlb", "lstm"])
def test_segments_with_carried_state_match_whole_streams(demos_dir, core) -> None:
    """Cutting the packed streams into short segments and carrying the state changes nothing in the forward pass."""
    kwargs = {"d_model": 32, "n_heads": 2, "chunk_size": 4, "n_slow": 4} if core == "tlb" else {"hidden_size": 32}
    model = BC(ENV, core=core, dataset=str(demos_dir), core_kwargs=kwargs, val_fraction=0, batch_size=3)
    data = load_demos(demos_dir)
    whole = model.validation_loss(data)
    model.config.seq_len = 5  # segments end mid-episode, so the carried state matters
    cut = model.validation_loss(data)
    np.testing.assert_allclose(cut, whole, rtol=1e-5)
    segments = pack_episodes(data, np.arange(len(data)), 3, 5, torch.device("cpu"))
    assert sum(int(s.mask.sum()) for s in segments) == data.lengths.sum()
    assert sum(int(s.episode_starts.sum()) for s in segments) == len(data)
    taken = torch.cat([s.actions[s.mask] for s in segments])
    assert sorted(taken.tolist()) == sorted(data.actions.tolist())


def test_bad_datasets_give_one_line(demos_dir, tmp_path, capsys) -> None:
    with pytest.raises(UserError, match="are of 'BabyAI-GoToRedBallGrey-v0', but 'BabyAI-GoToLocal-v0'"):
        BC("BabyAI-GoToLocal-v0", dataset=str(demos_dir)).learn(progress=False)
    with pytest.raises(UserError, match=r"n_demos=50 asked for, but .* holds 20"):
        BC(ENV, dataset=str(demos_dir), n_demos=50).learn(progress=False)
    raw = (demos_dir / DATA_FILE).read_bytes()
    (tmp_path / DATA_FILE).write_bytes(raw[:1000])
    with pytest.raises(SystemExit) as exit_info:
        config = "configs/bc/babyai_gotoredballgrey.yaml"
        main(["train", "--algo", "bc", "--config", config, f"dataset={tmp_path}", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated or corrupt" in err
