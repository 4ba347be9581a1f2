"""The ``tlb-rl`` command: a tiny training run end to end, evaluation, and one-line errors for bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents import ALGORITHMS
from commands.cli import main, parse_args
from commands.study.config import expand, load_study
from tlb_rl.config import from_dict, load_yaml

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "env=tmaze",
    "env_kwargs.corridor_length=3",
    "n_envs=2",
    "n_steps=16",
    "batch_size=32",
    "total_frames=96",
    "eval_every=64",
    "eval_episodes=4",
    "vectorization=sync",
    "core_kwargs.d_model=16",
    "core_kwargs.n_heads=2",
    "core_kwargs.chunk_size=4",
]


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_a_complete_run_directory_and_eval_reads_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--no-progress", *TINY, f"run_dir={run_dir}"], capsys)
    assert code == 0, err
    for name in ["config.json", "metrics.jsonl", "metrics.csv", "final_eval.json", "learning_curve.png"]:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert any((run_dir / "tb").iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in rows] == [32, 64, 96]
    assert "validation/success_rate" in rows[1] and "train/approx_kl" in rows[0]
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert final["episodes"] == 4 and min(final["seeds"]) >= 1_000_000
    assert json.loads((run_dir / "config.json").read_text())["core"] == "tlb"

    code, out, err = run_cli(["eval", str(run_dir), "--episodes", "6"], capsys)
    assert code == 0, err
    assert json.loads(out)["episodes"] == 6
    # The same policy under other env options: a longer corridor than it was trained on (3), whose episodes
    # take its length and one step more.
    code, out, err = run_cli(["eval", str(run_dir), "env_kwargs.corridor_length=9", "--episodes", "4"], capsys)
    assert code == 0, err
    assert json.loads(out)["mean_length"] == 10
    # Overrides after the options are taken too.
    code, out, err = run_cli(["eval", str(run_dir), "--episodes", "4", "env_kwargs.corridor_length=5"], capsys)
    assert code == 0, err
    assert json.loads(out)["mean_length"] == 6
    for overrides, message in (
        (["seed=3"], "only the env can be overridden here (env=ID, env_kwargs.KEY=VALUE), not seed"),
        (["env_kwargs.active=true"], "with {'corridor_length': 3, 'active': True} has spaces Box(0.0, 1.0, (3,), "),
        (["env=CartPole-v1", "env_kwargs={}"], "but the policy was built for Box(0.0, 1.0, (3,), float32)"),
        (["env_kwargs.corridor_lenght=5"], "corridor_lenght"),
    ):
        code, _, err = run_cli(["eval", str(run_dir), *overrides, "--episodes", "2"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err

    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "validation/success_rate" in header and "train/approx_kl" in header

    saved = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    code, out, err = run_cli(
        ["train", "--no-progress", "--resume", str(run_dir), "total_frames=128", "env_kwargs.corridor_length=4"],
        capsys,
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in rows] == [32, 64, 96, 128]
    resumed = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    # The resumed run started from the saved weights and optimizer: Adam's step count went on from there.
    steps = [s["step"] for s in resumed["optimizer"]["state"].values()]
    saved_steps = [s["step"] for s in saved["optimizer"]["state"].values()]
    assert all(a == b + 4 for a, b in zip(steps, saved_steps, strict=True))  # one update: 4 epochs x 1 minibatch
    assert resumed["config"]["env_kwargs"] == {"corridor_length": 4}
    assert resumed["config"]["core_kwargs"] == saved["config"]["core_kwargs"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "env=MiniGrid-MemoryS7-v9"], "MiniGrid-MemoryS7-v0"),
        (
            ["train", "env=tmaze", "learnin_rate=0.1"],
            "unknown PPO key 'learnin_rate' (did you mean 'learning_rate'?)",
        ),
        (["train", "env=tmaze", "n_steps=many"], "'n_steps' must be int"),
        (["train", "env=tmaze", "core=lstn"], "unknown core 'lstn' (did you mean 'lstm'?)"),
        (["train", "env=tmaze", "core_kwargs.chunk=3"], "core 'tlb' has no hyperparameter 'chunk'"),
        (["train", "env=tmaze", "core_kwargs.chunk_size=0"], "chunk_size"),
        (["train", "--config", "no/such/config.yaml"], "config file not found"),
        (["train", "--config", str(REPO / "configs")], "cannot read config file"),
        (["train", "env=tmaze", "core=lstm", "core_kwargs.chunk_size=4"], "give core_kwargs={} when changing core"),
        (["train", "env=tmaze", "core_kwargs.clock=episode", "compile=true"], "cannot be compiled: drop compile=true"),
        (["train", "env=tmaze", "device=cpu", "cuda_graphs=true"], "cuda_graphs=true needs a CUDA device"),
        (["eval", "no/such/run"], "no checkpoint at"),
        (["train", "--algo", "sac", "env=tmaze"], "unknown algorithm 'sac'; known: ppo, bc"),
        (["train", "--algo", "bc", "patiense=2"], "unknown BC key 'patiense' (did you mean 'patience'?)"),
        (["compare", "--config", str(REPO / "configs/compare/quick.yaml"), "seed=1"], "unknown study key 'seed'"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, message, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlb-rl: error:"), err
    assert message in lines[0]


def test_overrides_go_before_or_after_the_options(capsys):
    args = parse_args(["train", "core=lstm", "--config", "c.yaml", "seed=2", "--no-progress", "n_envs=4"])
    assert args.overrides == ["core=lstm", "seed=2", "n_envs=4"] and args.config == "c.yaml" and args.no_progress
    assert parse_args(["eval", "RUN", "--episodes", "4", "env=X"]).overrides == ["env=X"]
    # Anything else left over is refused, as is an override where the command takes none.
    for argv, stray in ((["eval", "RUN", "--episodes", "4", "stray"], "stray"), (["report", "DIR", "a=1"], "a=1")):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2 and f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_corrupt_and_malicious_checkpoints_are_refused(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    code, _, err = run_cli(["eval", str(corrupt)], capsys)
    assert code == 2 and "corrupt" in err

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": Exploit()}, evil)
    code, _, err = run_cli(["eval", str(evil)], capsys)
    assert code == 2 and "refusing to load" in err and "io.open" in err
    assert "weights_only" not in err, "the error must not advise loading the file unsafely"
    assert not marker.exists(), "loading a checkpoint ran code"

    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    code, _, err = run_cli(["eval", str(pickled)], capsys)
    assert code == 2 and err.count("\n") == 1


def test_console_script_lists_commands_and_envs():
    help_text = subprocess.run(
        [sys.executable, "-m", "commands.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("train", "eval", "envs"):
        assert command in help_text
    listing = subprocess.run(
        [sys.executable, "-m", "commands.cli", "envs"], capture_output=True, text=True, check=True
    ).stdout
    assert "MiniGrid-MemoryS7-v0" in listing and "tmaze" in listing


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keys and types, and for a study every run's config: a typo in a shipped file fails here, not in a user's run.
    monkeypatch.chdir(REPO)  # studies name their agents' config files from the repository root
    if path.parent.name == "compare":
        assert expand(load_study(path, runnable=False))
    else:
        algo = ALGORITHMS[path.parent.name]
        from_dict(algo.config_class, load_yaml(path), str(path))
