"""Studies (``tlb-rl compare`` / ``tlb-rl report``): statistics against hand computations, the runner's retries
and resume, and a tiny study end to end on the local backend and on a local Ray instance."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_process import tlb_rl, wait_for

from commands.cli import main
from commands.study import report as report_mod
from commands.study import runner, stats
from commands.study.config import RunSpec, load_study
from tlb_rl.checkpoint import load_checkpoint
from tlb_rl.errors import UserError

REPO = Path(__file__).resolve().parents[1]

TINY_STUDY = {
    "name": "tiny",
    "seeds": [0, 1],
    "threshold": 0.6,
    "ppo": {
        "n_envs": 4,
        "n_steps": 128,
        "batch_size": 256,
        "n_epochs": 1,
        "eval_episodes": 8,
        "vectorization": "sync",
        "torch_threads": 1,
    },
    "cores": {"tlb": {"d_model": 16, "n_heads": 2, "chunk_size": 4}, "lstm": {"hidden_size": 16}},
    "envs": [
        {"name": "tmaze-L3", "env": "tmaze", "env_kwargs": {"corridor_length": 3}, "total_frames": 2048,
         "eval_every": 512}
    ],
}  # fmt: skip


def write_config(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------- statistics, by hand
def test_iqm_trims_a_quarter_at_each_end():
    assert stats.iqm(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2.5)  # mean of 2, 3
    assert stats.iqm(np.array([0, 1, 2, 3, 4, 5, 6, 100.0])) == pytest.approx(3.5)  # mean of 2..5
    assert stats.iqm(np.array([0.0, 0.3, 0.9])) == pytest.approx(0.4)  # 3 runs: nothing trimmed
    assert stats.iqm(np.array([0.0, 0.0, 0.0, 1.0])) == 0.0  # the mean would be 0.25


def test_bootstrap_interval_of_the_iqm_matches_its_exact_distribution():
    # Runs [0, 0, 0, 1] resampled: k ones ~ Binomial(4, 1/4); the IQM (middle two of four) is 0 for k <= 1,
    # 0.5 for k = 2 and 1 for k >= 3. P(IQM <= 0.5) = 243/256 = 0.949 < 0.975, so the upper bound is 1;
    # P(IQM = 0) = 189/256 > 0.025, so the lower bound is 0. (The mean's upper bound would be 0.75.)
    est = stats.iqm_estimate(np.array([0.0, 0.0, 0.0, 1.0]))
    assert (est.value, est.low, est.high) == (0.0, 0.0, 1.0)
    same = stats.iqm_estimate(np.array([0.4, 0.4, 0.4]))
    assert same.low == pytest.approx(0.4) and same.high == pytest.approx(0.4)


def test_bootstrap_is_stratified_by_task():
    # Task 0 always scores 0, task 1 always 1: resampling runs inside each task keeps one of each, so the
    # IQM of every resample is 0.5. (Resampling across tasks would give intervals wider than a point.)
    scores = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    est = stats.iqm_estimate(scores)
    assert (est.value, est.low, est.high) == (0.5, 0.5, 0.5)


def test_iqm_curve_band_is_pointwise():
    curves = np.array([[0.0, 1.0], [0.0, 0.0], [0.0, 0.5]])
    mean, low, high = stats.iqm_curve(curves)
    np.testing.assert_allclose(mean, [0.0, 0.5])
    np.testing.assert_allclose([low[0], high[0]], [0.0, 0.0])
    assert 0.0 <= low[1] < 0.5 < high[1] <= 1.0


def test_curve_on_grid_frames_to_threshold_and_auc():
    grid = np.array([1000, 2000, 3000, 4000])
    curve = stats.on_grid(np.array([1000, 2000, 3500]), np.array([0.1, 0.95, 0.5]), grid)
    np.testing.assert_allclose(curve, [0.1, 0.95, 0.95, 0.5])  # 3000 still holds the evaluation at 2000
    assert stats.frames_to_threshold(grid, curve, 0.9, 4000) == (2000.0, False)
    assert stats.frames_to_threshold(grid, curve, 0.99, 4000) == (4000.0, True)  # censored at the budget
    assert stats.area_under_curve(curve) == pytest.approx((0.1 + 0.95 + 0.95 + 0.5) / 4)
    with pytest.raises(ValueError, match="before the run's first evaluation"):
        stats.on_grid(np.array([2000]), np.array([0.5]), grid)


def test_report_statistics_on_synthetic_curves_match_hand_computation():
    grid = np.array([100, 200, 300, 400])
    # Four runs reach 0.9 at 100, 200, 300 frames and never (censored at the budget, 400).
    curves = [[0.9, 1, 1, 1], [0.5, 0.9, 1, 1], [0.1, 0.2, 0.9, 1], [0.0, 0.1, 0.2, 0.3]]
    finals = [1.0, 0.9, 0.8, 0.1]
    spec = RunSpec("e/r/s0", "e", "r", 0, "ppo", {})
    cell = report_mod.Cell(
        runs=[
            report_mod.RunData(spec, np.array(c, float), f, [1_000_000], 10.0, 500.0)
            for c, f in zip(curves, finals, strict=True)
        ]
    )
    cell.runs[0].last_eval = 200.0  # stopped early: from there on its curve holds its last value
    out = report_mod.summarize_cell(cell, grid, 0.9, 400)
    assert out["frames_to_threshold"]["per_run"] == [100, 200, 300, 400]
    assert out["frames_to_threshold"]["censored"] == [False, False, False, True]
    assert out["frames_to_threshold"]["iqm"] == pytest.approx(250.0)  # middle two of 100..400
    assert out["final_success"]["iqm"] == pytest.approx(0.85)  # middle two of 0.1, 0.8, 0.9, 1.0
    aucs = [np.mean(c) for c in curves]  # 0.975, 0.725, 0.55, 0.15
    assert out["auc"]["iqm"] == pytest.approx((aucs[1] + aucs[2]) / 2)
    np.testing.assert_allclose(out["curve"]["iqm"], [0.3, 0.55, 0.95, 1.0])  # per point, middle two
    md = report_mod.render_markdown(
        {
            "study": "s",
            "command": None,
            "threshold": 0.9,
            "envs": {"e": {"env": "tmaze", "env_kwargs": {}, "budget": 400, "eval_every": 100, "rows": {"r": out}}},
            "all_envs": {},
            "seeds": {
                "training_seeds": [0],
                "training_env_seeds": "",
                "validation_env_seeds": {"e": [500_000, 500_007]},
                "final_eval_env_seeds": [1_000_000, 1_000_099],
            },
            "missing_runs": [],
        }
    )
    assert "| r | 4 | >= 250 [" in md and "| 3/4 |" in md and "Censored at the budget (400): r (1)" in md
    assert out["stopped_early"] == {0: 200.0} and "Stopped before the budget (early stop): r s0 at 200." in md
    assert "## Final success by env" not in md  # one env: the table above says it all


def test_report_sets_each_rows_final_success_on_every_env_side_by_side():
    """A study over several envs (demonstration counts, memory lengths) gets one table of final success, a column
    per env; a row without finished runs on an env leaves its cell empty."""
    spec = RunSpec("e/r/s0", "e", "r", 0, "ppo", {})
    grid = np.array([100, 200])

    def cell(finals):
        runs = [report_mod.RunData(spec, np.array([0.5, f]), f, [1], 1.0, 1.0) for f in finals]
        return report_mod.summarize_cell(report_mod.Cell(runs=runs), grid, 0.9, 200)

    envs = {
        "few": {"rows": {"tlb": cell([0.5, 0.6, 0.7]), "lstm": cell([0.4])}},
        "many": {
            "rows": {"tlb": cell([0.9, 0.9, 0.9]), "lstm": report_mod.summarize_cell(report_mod.Cell(), grid, 0.9, 200)}
        },
    }
    for name, env in envs.items():
        env.update(env=name, env_kwargs={}, budget=200, eval_every=100)
    md = report_mod.render_markdown(
        {
            "study": "s",
            "command": None,
            "threshold": 0.9,
            "envs": envs,
            "all_envs": {},
            "seeds": {
                "training_seeds": [0],
                "training_env_seeds": "",
                "validation_env_seeds": {},
                "final_eval_env_seeds": [],
            },
            "missing_runs": [],
        }
    )
    table = md.split("## Final success by env")[1]
    assert "| row | few | many |" in table
    assert "| tlb | 0.60 [" in table and "(3) | 0.90 [0.90, 0.90] (3) |" in table
    assert "| lstm | 0.40 [0.40, 0.40] (1) |  |" in table


def test_an_env_measured_by_return_maps_its_returns_onto_zero_one(tmp_path):
    """Curves, threshold and final values of such an env are its returns scaled from return_range to [0, 1]."""
    from commands.study.config import EnvEntry

    run_dir = tmp_path / "runs" / "e" / "r" / "s0"
    run_dir.mkdir(parents=True)
    (run_dir / "study_run.json").write_text(json.dumps({"status": "done", "wall_s": 5.0}))
    rows = [{"frames": 100, "validation/success_rate": 0.0, "validation/return": -1.0},
            {"frames": 200, "validation/success_rate": 0.0, "validation/return": 0.5}]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "final_eval.json").write_text(json.dumps({"success_rate": 0.0, "mean_return": 0.0, "seeds": [7]}))
    env = EnvEntry("e", "x", 200, 100, measure="return", return_range=[-1, 1])
    run = report_mod.load_run(tmp_path, RunSpec("e/r/s0", "e", "r", 0, "ppo", {}), np.array([100, 200]), env)
    np.testing.assert_allclose(run.curve, [0.0, 0.75])
    assert run.final_success == pytest.approx(0.5)


# ---------------------------------------------------------------------- config
def test_study_config_errors_are_one_line(tmp_path):
    bad = {**TINY_STUDY, "envs": [{**TINY_STUDY["envs"][0], "eval_every": 1000}]}
    with pytest.raises(UserError, match="multiple of n_envs \\* n_steps"):
        load_study(write_config(tmp_path, bad))
    bad = {**TINY_STUDY, "envs": [{**TINY_STUDY["envs"][0], "measure": "return"}]}
    with pytest.raises(UserError, match="measure 'return' needs return_range"):
        load_study(write_config(tmp_path, bad))
    with pytest.raises(UserError, match="unknown study key 'seed'"):
        load_study(write_config(tmp_path, {**TINY_STUDY, "seed": 1}))
    with pytest.raises(UserError, match="learning_rat"):
        load_study(write_config(tmp_path, {**TINY_STUDY, "ppo": {"learning_rat": 1e-3}}))


def test_grid_merges_layers_and_every_cell_is_a_run(tmp_path):
    data = {
        **TINY_STUDY,
        "agents": [{"name": "ppo"}, {"name": "fast", "overrides": {"learning_rate": 0.01}}],
        "baselines": {"recurrentppo": {"n_epochs": 3}},
    }
    from commands.study.config import expand

    runs = expand(load_study(write_config(tmp_path, data)))
    assert len(runs) == 2 * 1 * (2 * 2 + 1)  # seeds x envs x (agents x cores + baseline)
    by_id = {r.run_id: r for r in runs}
    assert by_id["tmaze-L3/lstm-fast/s1"].config["learning_rate"] == 0.01
    assert by_id["tmaze-L3/tlb-ppo/s0"].config["core_kwargs"] == {"d_model": 16, "n_heads": 2, "chunk_size": 4}
    assert by_id["tmaze-L3/tlb-ppo/s0"].config["n_steps"] == 128
    baseline = by_id["tmaze-L3/sb3-recurrentppo/s1"].config
    assert (baseline["n_steps"], baseline["n_epochs"], baseline["seed"]) == (128, 3, 1)  # shared, own, grid


def test_an_agent_can_run_with_some_cores_only(tmp_path):
    from commands.study.config import expand

    compiled = {"name": "ppo", "cores": ["tlb"], "overrides": {"compile": True}}
    data = {**TINY_STUDY, "agents": [compiled, {"name": "ppo", "cores": ["lstm"]}]}
    runs = expand(load_study(write_config(tmp_path, data)))
    assert sorted({(r.row, r.config.get("compile", False)) for r in runs}) == [("lstm-ppo", False), ("tlb-ppo", True)]
    assert len(runs) == 2 * 2  # seeds x (one core per agent)
    clash = {**TINY_STUDY, "agents": [{"name": "ppo"}, {"name": "ppo", "cores": ["lstm"]}]}
    with pytest.raises(UserError, match="distinct names where they share a core"):
        load_study(write_config(tmp_path, clash))
    with pytest.raises(UserError, match="agent 'ppo': cores \\['gru'\\] not among"):
        load_study(write_config(tmp_path, {**TINY_STUDY, "agents": [{"name": "ppo", "cores": ["gru"]}]}))


def test_a_study_extends_another_and_takes_overrides(tmp_path):
    from commands.study.config import expand, study_source

    base = write_config(tmp_path, {**TINY_STUDY, "baselines": {"recurrentppo": {}}}, "base.yaml")
    (tmp_path / "sub").mkdir()
    child = {
        "extends": "../base.yaml",  # relative to the child's directory, not the working directory
        "seeds": [5],
        "ppo": {"n_epochs": 2},
        "cores": {"tlb": {"d_model": 16, "n_heads": 2}},
        "baselines": {},
        "agents": [{"name": "fast", "overrides": {"learning_rate": 0.01}}],
    }
    path = write_config(tmp_path / "sub", child, "child.yaml")
    study = load_study(path)
    assert study.name == "child"  # its own, not the base's "tiny"
    ((run,),) = [expand(study)]  # seeds, cores, baselines and agents replaced whole, so one run
    assert run.run_id == "tmaze-L3/tlb-fast/s5"
    assert (run.config["n_epochs"], run.config["n_steps"], run.config["learning_rate"]) == (2, 128, 0.01)
    assert run.config["core_kwargs"] == {"d_model": 16, "n_heads": 2}
    assert load_study(base).name == "tiny"

    overridden = load_study(path, overrides=["seeds=[1,2]", "ppo.n_steps=64", "name=other"])
    assert (overridden.name, overridden.seeds, overridden.ppo["n_steps"]) == ("other", [1, 2], 64)
    # The study directory keeps what the config resolves to, so it does not need the base file later.
    saved = yaml.safe_load(study_source(path, ["seeds=[1,2]"]))
    assert "extends" not in saved and saved["seeds"] == [1, 2] and saved["envs"] == TINY_STUDY["envs"]
    assert study_source(base) == base.read_text()

    with pytest.raises(UserError, match="unknown study key 'seed'"):
        load_study(path, overrides=["seed=1"])
    with pytest.raises(UserError, match="'extends' belongs in a study config's file"):
        load_study(base, overrides=["extends=sub/child.yaml"])
    write_config(tmp_path, {**TINY_STUDY, "extends": "sub/child.yaml"}, "base.yaml")
    with pytest.raises(UserError, match="leads back to itself"):
        load_study(path)
    for where in ("nowhere.yaml", "sub"):
        with pytest.raises(UserError, match=f"lost.yaml: extends '{where}', which is not a file"):
            load_study(write_config(tmp_path, {"extends": where}, "lost.yaml"))


def test_init_from_names_each_cells_own_checkpoint(tmp_path):
    from commands.study.config import expand

    for core in ("tlb", "lstm"):
        for seed in (0, 1):
            (tmp_path / f"{core}-s{seed}.pt").write_bytes(b"")
    warm = {"name": "warm", "overrides": {"init_from": str(tmp_path / "{core}-s{seed}.pt")}}
    runs = expand(load_study(write_config(tmp_path, {**TINY_STUDY, "agents": [warm]})))
    assert sorted(r.config["init_from"] for r in runs) == sorted(
        str(tmp_path / f"{core}-s{seed}.pt") for core in ("tlb", "lstm") for seed in (0, 1)
    )
    (tmp_path / "lstm-s1.pt").unlink()
    with pytest.raises(UserError, match=r"lstm-s1.pt' is not a file"):
        load_study(write_config(tmp_path, {**TINY_STUDY, "agents": [warm]}))
    typo = {"name": "warm", "overrides": {"init_from": "runs/{cores}/best.pt"}}
    with pytest.raises(UserError, match=r"may name \{core\}, \{seed\} and \{env\} only"):
        load_study(write_config(tmp_path, {**TINY_STUDY, "agents": [typo]}))


# ---------------------------------------------------------------------- runner: retries, never losing a run
def _fake_command(script: str):
    def command(spec, run_dir, config_file, resume):
        return [sys.executable, "-c", script, str(run_dir)]

    return command


def test_crashed_run_is_retried_once_then_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_command", _fake_command("import sys; print('boom'); sys.exit(3)"))
    spec = RunSpec("e/r/s0", "e", "r", 0, "ppo", {"x": 1})
    out = runner.run_one(str(tmp_path), vars(spec))
    assert out["status"] == "failed" and out["attempts"] == 2
    assert "exit status 3" in out["error"] and "boom" in out["error"]
    assert (tmp_path / "errors.log").read_text().count("=== e/r/s0 attempt") == 2
    record = json.loads((tmp_path / "runs/e/r/s0/study_run.json").read_text())
    assert record["status"] == "failed" and not runner.is_finished(tmp_path, spec)


def test_an_interrupted_run_is_not_retried_and_resumes_later(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_command", _fake_command("import sys; sys.exit(130)"))  # Ctrl-C in the child
    spec = RunSpec("e/r/s0", "e", "r", 0, "ppo", {"x": 1})
    out = runner.run_one(str(tmp_path), vars(spec))
    assert (out["status"], out["attempts"]) == ("interrupted", 1)
    assert not (tmp_path / "errors.log").exists() and not runner.is_finished(tmp_path, spec)


def test_a_run_that_fails_once_succeeds_on_retry(tmp_path, monkeypatch):
    script = (
        "import sys, pathlib; d = pathlib.Path(sys.argv[1]); m = d.parent / 'tried'\n"
        "if not m.exists(): m.touch(); sys.exit(1)\n"
        "(d / 'final_eval.json').write_text('{}')"
    )
    monkeypatch.setattr(runner, "_command", _fake_command(script))
    spec = RunSpec("e/r/s0", "e", "r", 0, "ppo", {"x": 1})
    out = runner.run_one(str(tmp_path), vars(spec))
    assert (out["status"], out["attempts"], out["error"]) == ("done", 2, None)
    assert runner.is_finished(tmp_path, spec)
    changed = RunSpec("e/r/s0", "e", "r", 0, "ppo", {"x": 2})
    with pytest.raises(UserError, match="different config"):
        runner.is_finished(tmp_path, changed)


def test_recurrentppo_baseline_writes_a_run_directory_like_ours(tmp_path, monkeypatch):
    from commands.study.sb3_baseline import RecurrentPPOConfig, train
    from envs.seeding import EVAL_SEED_BASE

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where SB3's default logger would make its folders

    config = RecurrentPPOConfig(
        env="tmaze", env_kwargs={"corridor_length": 2}, total_frames=1024, eval_every=512, n_envs=4, n_steps=64,
        batch_size=128, n_epochs=1, eval_episodes=6,
    )  # fmt: skip
    result = train(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in rows] == [512, 1024]  # each evaluation after the update that reached it
    assert all(0 <= r["validation/success_rate"] <= 1 and r["time/fps"] > 0 for r in rows)
    final = json.loads((tmp_path / "final_eval.json").read_text())
    assert final == result and final["seeds"] == list(range(EVAL_SEED_BASE, EVAL_SEED_BASE + 6))
    assert (tmp_path / "checkpoints" / "best.zip").is_file()
    assert not list(temp.glob("SB3-*"))


# ---------------------------------------------------------------------- end to end
def run_compare(args: list[str], capsys) -> int:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    capsys.readouterr()
    return code


def check_tiny_report(study_dir: Path) -> dict:
    for name in report_mod.REPORT_FILES:
        assert (study_dir / name).is_file(), name
    report = json.loads((study_dir / "report.json").read_text())
    rows = report["envs"]["tmaze-L3"]["rows"]
    assert list(rows) == ["tlb-ppo", "lstm-ppo"]
    for row in rows.values():
        assert row["runs"] == 2 and row["seeds"] == [0, 1] and not row["missing"]
        assert len(row["curve"]["iqm"]) == 4  # evaluations at 512, 1024, 1536, 2048 frames
        assert 0.0 <= row["final_success"]["ci_low"] <= row["final_success"]["iqm"] <= row["final_success"]["ci_high"]
        assert row["steps_per_s_mean"] > 0 and row["wall_s_mean"] > 0
    assert report["seeds"]["final_eval_env_seeds"] == [1_000_000, 1_000_007]
    md = (study_dir / "report.md").read_text()
    assert "| tlb-ppo | 2 |" in md and "| lstm-ppo | 2 |" in md and "Missing runs" not in md
    return report


def test_tiny_study_end_to_end_local_then_resume_skips_finished_runs(tmp_path, capsys):
    config = write_config(tmp_path, TINY_STUDY)
    study_dir = tmp_path / "study"
    assert run_compare(["compare", "--config", str(config), "--workers", "2", "--out", str(study_dir)], capsys) == 0
    check_tiny_report(study_dir)
    finals = sorted(study_dir.glob("runs/*/*/*/final_eval.json"))
    assert len(finals) == 4
    stamps = [p.stat().st_mtime_ns for p in finals]

    outcomes = runner.run_study(config, study_dir, workers=2, log=lambda _: None)
    assert sorted(o.status for o in outcomes) == ["skipped"] * 4
    assert [p.stat().st_mtime_ns for p in finals] == stamps
    assert all(json.loads(p.with_name("study_run.json").read_text())["attempts"] == 1 for p in finals)

    (study_dir / "report.md").unlink()
    assert run_compare(["report", str(study_dir)], capsys) == 0
    check_tiny_report(study_dir)

    # benchmarks/transfer.py plays every finished run on other values of an env option
    transfer = subprocess.run(
        [sys.executable, "benchmarks/transfer.py", str(study_dir), "--env", "tmaze-L3", "--option",
         "corridor_length", "--values", "3,7", "--episodes", "4"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = json.loads(transfer.stdout[: transfer.stdout.index("\nheld-out")])["rows"]
    assert sorted(rows) == ["lstm-ppo", "tlb-ppo"]
    assert all(sorted(cell["per_seed"]) == ["0", "1"] for cells in rows.values() for cell in cells.values())
    assert "| tlb-ppo | " in transfer.stdout

    # A study grows by new runs (a seed here); a config that drops or changes a run it holds is refused.
    for seeds, frames, refusal in (([0], 2048, "drops its run"), ([0, 1, 2], 4096, "changes the settings of")):
        other = write_config(
            tmp_path,
            {**TINY_STUDY, "seeds": seeds, "envs": [{**TINY_STUDY["envs"][0], "total_frames": frames}]},
            "other.yaml",
        )
        with pytest.raises(UserError, match=refusal):
            runner.run_study(other, study_dir, log=lambda _: None)
    # An override that drops a run is named as the cause, not the config it was given with.
    with pytest.raises(UserError, match=r"study.yaml with seeds=\[0\] drops its run"):
        runner.run_study(config, study_dir, log=lambda _: None, overrides=["seeds=[0]"])
    grown = write_config(tmp_path, {**TINY_STUDY, "seeds": [0, 1, 2]}, "grown.yaml")
    runner._check_study_file(study_dir, grown, load_study(grown))
    assert yaml.safe_load((study_dir / "study.yaml").read_text())["seeds"] == [0, 1, 2]
    assert [s.seed for s in runner.expand(load_study(grown)) if not runner.is_finished(study_dir, s)] == [2, 2]


def test_compare_exits_nonzero_when_runs_were_stopped_by_a_signal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "_command", _fake_command("import os, signal; os.kill(os.getpid(), signal.SIGTERM)"))
    config = write_config(tmp_path, TINY_STUDY)
    study_dir = tmp_path / "study"
    assert run_compare(["compare", "--config", str(config), "--out", str(study_dir)], capsys) == 130
    assert (study_dir / "report.md").is_file()  # written before exiting, with the runs marked missing
    records = [json.loads(p.read_text()) for p in study_dir.glob("runs/*/*/*/study_run.json")]
    assert sorted(r["status"] for r in records) == ["interrupted"] * 4


def test_sigterm_stops_a_study_after_each_running_run_checkpoints(tmp_path):
    # A real study in a child process, as a scheduler or `kill` would stop it; one worker, two runs: the second
    # must never start. What the test waits for is a checkpoint on disk, never a duration.
    study = {
        **TINY_STUDY,
        "ppo": {**TINY_STUDY["ppo"], "checkpoint_every": 1},
        "cores": {"lstm": {"hidden_size": 16}},
        "envs": [{**TINY_STUDY["envs"][0], "total_frames": 100_000_000, "eval_every": 51_200}],
    }
    config, study_dir = write_config(tmp_path, study), tmp_path / "study"
    proc = tlb_rl("compare", "--config", str(config), "--out", str(study_dir), "--workers", "1", cwd=tmp_path)
    run_dir = study_dir / "runs" / "tmaze-L3" / "lstm-ppo" / "s0"
    wait_for(run_dir / "checkpoints" / "latest.pt", proc, replaced_times=1)  # the run is past its start-up
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "the same command resumes the study" in err and "Traceback" not in err
    assert json.loads((run_dir / "study_run.json").read_text())["status"] == "interrupted"
    log = (study_dir / "logs" / "tmaze-L3" / "lstm-ppo" / "s0.attempt1.log").read_text()
    assert "SIGTERM: stopping after this update" in log and "Resume with: tlb-rl train --resume" in log
    frames = [json.loads(line)["frames"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["progress"]["frames"] == max(frames)
    assert not (study_dir / "runs" / "tmaze-L3" / "lstm-ppo" / "s1").exists(), "a queued run started"


def test_tiny_study_on_a_local_ray_instance(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'tlb-rl[ray]')")
    config = write_config(tmp_path, TINY_STUDY)
    study_dir = tmp_path / "study"
    args = ["compare", "--config", str(config), "--backend", "ray", "--workers", "2", "--out", str(study_dir)]
    assert run_compare(args, capsys) == 0
    check_tiny_report(study_dir)


# ---------------------------------------------------------------------- BC rows
BC_ENV = "BabyAI-GoToRedBallGrey-v0"


def tiny_bc_study(dataset: Path) -> dict:
    """A PPO-free study: TLB and LSTM behaviour cloning on 20 bot episodes, 3 gradient steps of 4 x 8 steps."""
    return {
        "name": "tiny-bc",
        "seeds": [0],
        "threshold": 0.5,
        "bc": {"seq_len": 8, "batch_size": 4, "val_fraction": 0.0, "patience": 0, "eval_episodes": 4,
               "test_episodes": 4, "torch_threads": 1},
        "agents": [{"name": "bc", "algo": "bc"}],
        "cores": {"tlb": {"d_model": 16, "n_heads": 2, "chunk_size": 4}, "lstm": {"hidden_size": 16}},
        "envs": [{"name": "redball", "env": BC_ENV, "total_frames": 96, "eval_every": 32,
                  "bc": {"dataset": str(dataset)}}],
    }  # fmt: skip


@pytest.fixture(scope="module")
def bc_demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agents.demos import generate_demos

    out = tmp_path_factory.mktemp("study-bc") / "demos"
    generate_demos(BC_ENV, 20, out, seed=0, progress=False)
    return out


def test_bc_rows_take_their_budget_in_gradient_steps_and_need_a_dataset(tmp_path, bc_demos):
    from commands.study.config import expand

    runs = expand(load_study(write_config(tmp_path, tiny_bc_study(bc_demos))))
    assert [(r.row, r.algo) for r in runs] == [("tlb-bc", "bc"), ("lstm-bc", "bc")]
    assert (runs[0].config["max_updates"], runs[0].config["eval_every_updates"]) == (3, 1)  # 96 and 32 steps of 32
    with pytest.raises(UserError, match="multiples of batch_size \\* seq_len \\(32\\)"):
        data = tiny_bc_study(bc_demos)
        data["envs"][0]["eval_every"] = 40
        load_study(write_config(tmp_path, data))
    with pytest.raises(UserError, match="is not a directory; make one with `tlb-rl demos`"):
        load_study(write_config(tmp_path, tiny_bc_study(tmp_path / "nowhere")))


def test_tiny_bc_study_end_to_end(tmp_path, bc_demos, capsys):
    dataset = tmp_path / "demos"
    shutil.copytree(bc_demos, dataset)
    config = write_config(tmp_path, tiny_bc_study(dataset))
    study_dir = tmp_path / "study"
    assert run_compare(["compare", "--config", str(config), "--workers", "2", "--out", str(study_dir)], capsys) == 0
    # The report re-renders from the run directories alone, after the demonstrations are gone.
    shutil.rmtree(dataset)
    (study_dir / "report.json").unlink()
    assert run_compare(["report", str(study_dir)], capsys) == 0
    report = json.loads((study_dir / "report.json").read_text())
    rows = report["envs"]["redball"]["rows"]
    assert list(rows) == ["tlb-bc", "lstm-bc"] and report["offline_rows"] == ["tlb-bc", "lstm-bc"]
    assert report["seeds"]["validation_env_seeds"] == {"redball": [500_000, 500_003]}  # the BC rows' 4 episodes
    for row in rows.values():
        assert row["runs"] == 1 and not row["missing"] and len(row["curve"]["iqm"]) == 3
        assert row["steps_per_s_mean"] > 0
    metrics = [json.loads(line) for line in next(study_dir.glob("runs/redball/tlb-bc/s0/metrics.jsonl")).open()]
    assert [m["frames"] <= 32 * (i + 1) for i, m in enumerate(metrics)] == [True] * 3  # on or before the grid
    assert "Rows trained on demonstrations (tlb-bc, lstm-bc)" in (study_dir / "report.md").read_text()
