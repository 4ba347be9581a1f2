"""Behaviour cloning: packing with carried state, overfitting a few demonstrations, run dir and checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agents.bc import BC, pack_episodes
from agents.bot import generate_demos
from agents.dataset import DATA_FILE, load_demos
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


def test_bc_runs_are_not_resumed_inexactly(overfit_run, capsys) -> None:
    """BC reshuffles its epochs from the seed, so a resumed run would not continue the interrupted one."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(overfit_run)])
    assert exit_info.value.code == 2
    assert "bc runs cannot be resumed exactly" in capsys.readouterr().err


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
