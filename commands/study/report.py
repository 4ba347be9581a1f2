"""A study's report: ``report.md``, ``report.json`` and ``curves.png`` in the study directory.

Learning curves are validation success (held-out validation seeds) at every multiple of the env's
``eval_every``; per env and row the report gives the IQM curve with its 95% stratified-bootstrap band, and a
table of frames to the success threshold (censored runs counted at the budget), final success (best
checkpoint on the held-out evaluation seeds), area under the curve, wall-clock and training steps/s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents import ALGORITHMS
from commands.study import stats
from commands.study.config import EnvEntry, RunSpec, StudyConfig, expand, load_study
from commands.study.sb3_baseline import DIFFERENCES
from tlb_rl.errors import UserError
from tlb_rl.logger import read_metrics

REPORT_FILES = ("report.md", "report.json", "curves.png")


@dataclass
class RunData:
    """What the report needs from one finished run directory."""

    spec: RunSpec
    curve: np.ndarray
    """The env's measure on the validation seeds at each grid point (success rate, or normalised return)."""
    final_success: float
    """The env's measure of the best checkpoint on the held-out evaluation seeds."""
    final_seeds: list[int]
    wall_s: float
    steps_per_s: float
    """Median of the per-update training throughput (evaluations excluded)."""
    last_eval: float = math.inf
    """Frames of the run's last validation evaluation (inf: not known, taken as the budget)."""


@dataclass
class Cell:
    """All runs of one row on one env."""

    runs: list[RunData] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Run ids that are not finished (failed or not run yet)."""


def grid_of(total_frames: int, eval_every: int) -> np.ndarray:
    """The frames at which every run of an env is compared: eval_every, 2 * eval_every, ... <= budget."""
    return np.arange(1, total_frames // eval_every + 1) * eval_every


def load_run(study_dir: Path, spec: RunSpec, grid: np.ndarray, env: EnvEntry) -> RunData | None:
    """The run's data on the env's measure (success rate, or return mapped onto [0, 1]), or None if unfinished."""
    run_dir = study_dir / "runs" / spec.run_id
    record_path, final_path = run_dir / "study_run.json", run_dir / "final_eval.json"
    if not record_path.exists() or not final_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if record.get("status") != "done":
        return None
    if env.measure == "success":
        key, final_key, scale = "validation/success_rate", "success_rate", (lambda x: x)
    else:
        low, high = env.return_range  # type: ignore[misc]
        key, final_key, scale = "validation/return", "mean_return", (lambda x: (x - low) / (high - low))
    # A resumed run may log the updates after its last checkpoint twice: the later row wins.
    rows = {int(r["frames"]): r for r in read_metrics(run_dir)}
    evals = [(f, scale(r[key])) for f, r in sorted(rows.items()) if key in r]
    if not evals:
        raise UserError(f"run {run_dir} has no validation evaluations ({key}) in metrics.jsonl")
    frames, measured = map(np.array, zip(*evals, strict=True))
    # PPO logs env steps/s, BC demonstration steps/s.
    fps = [r.get("time/fps", r.get("time/steps_per_s")) for r in rows.values()]
    fps = [f for f in fps if f is not None]
    final = json.loads(final_path.read_text())
    return RunData(
        spec=spec,
        curve=stats.on_grid(frames, measured, grid),
        final_success=float(scale(final[final_key])),
        final_seeds=list(final.get("seeds", [])),
        wall_s=float(record["wall_s"]),
        steps_per_s=float(np.median(fps)) if fps else float("nan"),
        last_eval=float(frames[-1]),
    )


def collect(study: StudyConfig, study_dir: Path, specs: list[RunSpec]) -> dict[str, dict[str, Cell]]:
    """env name -> row -> Cell for the runs ``specs`` (``expand(study)``), in the order of the config."""
    cells: dict[str, dict[str, Cell]] = {}
    envs = {e.name: e for e in study.envs}
    for spec in specs:
        env = envs[spec.env_name]
        cell = cells.setdefault(spec.env_name, {}).setdefault(spec.row, Cell())
        run = load_run(study_dir, spec, grid_of(env.total_frames, env.eval_every), env)
        if run is None:
            cell.missing.append(spec.run_id)
        else:
            cell.runs.append(run)
    return cells


def summarize_cell(cell: Cell, grid: np.ndarray, threshold: float, budget: int) -> dict[str, Any]:
    """The statistics of one row on one env (empty when no run finished)."""
    out: dict[str, Any] = {"runs": len(cell.runs), "missing": cell.missing}
    if not cell.runs:
        return out
    curves = np.stack([r.curve for r in cell.runs])
    reached = [stats.frames_to_threshold(grid, c, threshold, budget) for c in curves]
    # Stopped early (patience, target_success): its last evaluation lies an interval or more before the budget.
    # (A BC run that trained to its budget logs a little under it: its frames skip the batch's padding.)
    early = {r.spec.seed: r.last_eval for r in cell.runs if r.last_eval + grid[0] <= budget}
    frames = np.array([f for f, _ in reached])
    mean, low, high = stats.iqm_curve(curves)
    out.update(
        seeds=[r.spec.seed for r in cell.runs],
        frames_to_threshold={
            **stats.iqm_estimate(frames).as_dict(),
            "per_run": frames.tolist(),
            "censored": [bool(c) for _, c in reached],
        },
        final_success={
            **stats.iqm_estimate(np.array([r.final_success for r in cell.runs])).as_dict(),
            "per_run": [r.final_success for r in cell.runs],
        },
        auc={
            **stats.iqm_estimate(np.array([stats.area_under_curve(c) for c in curves])).as_dict(),
            "per_run": [stats.area_under_curve(c) for c in curves],
        },
        stopped_early=early,
        wall_s_mean=float(np.mean([r.wall_s for r in cell.runs])),
        steps_per_s_mean=float(np.nanmean([r.steps_per_s for r in cell.runs])),
        curve={"iqm": mean.tolist(), "ci_low": low.tolist(), "ci_high": high.tolist()},
    )
    return out


def aggregate(cells: dict[str, dict[str, Cell]]) -> dict[str, Any]:
    """Per row, IQM over all envs and runs of final success and AUC, stratified by env (rliable).

    Only rows with the same number of finished runs on every env (a [runs, envs] matrix) are included.
    """
    out: dict[str, Any] = {}
    rows = dict.fromkeys(row for by_row in cells.values() for row in by_row)
    for row in rows:
        per_env = [by_row.get(row, Cell()).runs for by_row in cells.values()]
        counts = {len(runs) for runs in per_env}
        if len(counts) != 1 or 0 in counts:
            continue
        final = np.array([[r.final_success for r in runs] for runs in per_env]).T  # [runs, envs]
        auc = np.array([[stats.area_under_curve(r.curve) for r in runs] for runs in per_env]).T
        out[row] = {
            "runs_per_env": counts.pop(),
            "final_success": stats.iqm_estimate(final).as_dict(),
            "auc": stats.iqm_estimate(auc).as_dict(),
        }
    return out


def _seed_ranges(cells: dict[str, dict[str, Cell]], study: StudyConfig, specs: list[RunSpec]) -> dict[str, Any]:
    from envs.seeding import VALIDATION_SEED_BASE

    final = sorted({s for by_row in cells.values() for c in by_row.values() for r in c.runs for s in r.final_seeds})
    # Validation episodes per env, from each row's own run config (PPO and BC rows may set it apart; the
    # default is 100 for both); an env whose rows differ lists them row by row.
    by_env: dict[str, dict[str, int]] = {}
    for spec in specs:
        by_env.setdefault(spec.env_name, {})[spec.row] = int(spec.config.get("eval_episodes", 100))
    episodes = {}
    for env, rows in by_env.items():
        if len(set(rows.values())) == 1:
            episodes[env] = next(iter(rows.values()))
        else:
            episodes.update({f"{env} ({row})": n for row, n in rows.items()})
    return {
        "training_seeds": study.seeds,
        "training_env_seeds": "run seed s: env i starts from seed s + i (all below the validation seeds)",
        "validation_env_seeds": {
            name: [VALIDATION_SEED_BASE, VALIDATION_SEED_BASE + n - 1] for name, n in episodes.items()
        },
        "final_eval_env_seeds": [final[0], final[-1]] if final else [],
    }


def build_report(study_dir: str | Path) -> dict[str, Any]:
    """Compute the report's data from the study directory (its ``study.yaml`` and run directories)."""
    study_dir = Path(study_dir)
    config_path = study_dir / "study.yaml"
    if not config_path.exists():
        raise UserError(f"{study_dir} is not a study directory (no study.yaml); run tlb-rl compare first")
    study = load_study(config_path, runnable=False)  # BC datasets may be gone by now; the runs are done
    specs = expand(study)  # validates every run's config
    cells = collect(study, study_dir, specs)
    meta_path = study_dir / "study_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    envs = {}
    for env in study.envs:
        grid = grid_of(env.total_frames, env.eval_every)
        envs[env.name] = {
            "env": env.env,
            "env_kwargs": env.env_kwargs,
            "budget": env.total_frames,
            "eval_every": env.eval_every,
            "measure": env.measure,
            "return_range": env.return_range,
            "grid": grid.tolist(),
            "rows": {
                row: summarize_cell(cell, grid, study.threshold, env.total_frames)
                for row, cell in cells[env.name].items()
            },
        }
    return {
        "study": study.name,
        "command": meta.get("command"),
        "threshold": study.threshold,
        "seeds": _seed_ranges(cells, study, specs),
        "envs": envs,
        "all_envs": aggregate(cells),
        "missing_runs": [m for by_row in cells.values() for c in by_row.values() for m in c.missing],
        "baseline_differences": list(DIFFERENCES) if study.baselines else [],
        "offline_rows": [
            f"{core}-{a.name}" for a in study.agents if ALGORITHMS[a.algo].offline for core in study.cores_of(a)
        ],
    }


def _frames(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e3 else f"{x:.0f}"


def _est(e: dict[str, float], fmt: Any = "{:.2f}".format) -> str:
    return f"{fmt(e['iqm'])} [{fmt(e['ci_low'])}, {fmt(e['ci_high'])}]"


def render_markdown(report: dict[str, Any]) -> str:
    t = report["threshold"]
    lines = [f"# Study `{report['study']}`", ""]
    if report["command"]:
        lines += [f"Command: `{report['command']}`", ""]
    lines += [
        "Statistics: interquartile mean (IQM) over seeds with 95% stratified-bootstrap confidence intervals "
        f"(rliable, {stats.BOOTSTRAP_REPS} resamples). *Frames to {t}*: first validation evaluation with success "
        f">= {t}; a run that never gets there is **censored** and counted at the budget, so that IQM is a lower "
        "bound. *Final success*: the best checkpoint (chosen on validation seeds) on held-out evaluation seeds. "
        "*AUC*: mean validation success over the evaluations (area under the curve / budget). Wall-clock is per "
        "run (start-up, evaluations and final evaluation included, runs sharing the machine); steps/s is the "
        "training throughput (median over updates, evaluations excluded).",
        "",
    ]
    if report.get("baseline_differences"):
        lines += [
            "The sb3-contrib RecurrentPPO rows share the study's rollout length, epochs, learning rate and its "
            "annealing, entropy and value weights, clipping, GAE and validation seeds; they differ in:",
            *[f"- {d}" for d in report["baseline_differences"]],
            "",
        ]
    if report.get("offline_rows"):
        lines += [
            f"Rows trained on demonstrations ({', '.join(report['offline_rows'])}): frames and steps/s count "
            "demonstration steps trained on (teacher forcing on the bot's episodes), not environment steps.",
            "",
        ]
    for name, env in report["envs"].items():
        kwargs = ", ".join(f"{k}={v}" for k, v in env["env_kwargs"].items())
        lines += [
            f"## {name}: `{env['env']}`{f' ({kwargs})' if kwargs else ''}",
            "",
            f"Budget {env['budget']:,} frames per run; validation every {env['eval_every']:,} frames."
            + (
                f" Measure: mean episodic return mapped from {env['return_range']} onto [0, 1]; *success*, the "
                "threshold and the curves below mean that measure on this env."
                if env.get("measure") == "return"
                else ""
            ),
            "",
            f"| row | runs | frames to {t} | reached | final success | AUC | wall-clock / run | steps/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row, cell in env["rows"].items():
            if not cell["runs"]:
                lines.append(f"| {row} | 0 | no finished run | | | | | |")
                continue
            ftt = cell["frames_to_threshold"]
            n_censored = sum(ftt["censored"])
            reached = f"{cell['runs'] - n_censored}/{cell['runs']}"
            prefix = ">= " if n_censored else ""
            lines.append(
                f"| {row} | {cell['runs']} | {prefix}{_est(ftt, _frames)} | {reached} | "
                f"{_est(cell['final_success'])} | {_est(cell['auc'])} | {cell['wall_s_mean']:.0f} s | "
                f"{cell['steps_per_s_mean']:,.0f} |"
            )
        censored = [
            f"{row} ({sum(c['frames_to_threshold']['censored'])})"
            for row, c in env["rows"].items()
            if c["runs"] and any(c["frames_to_threshold"]["censored"])
        ]
        if censored:
            lines += ["", f"Censored at the budget ({_frames(env['budget'])}): {', '.join(censored)} run(s)."]
        early = [
            f"{row} s{seed} at {_frames(f)}"
            for row, c in env["rows"].items()
            for seed, f in (c.get("stopped_early") or {}).items()
        ]
        if early:
            lines += [
                "",
                f"Stopped before the budget (early stop): {', '.join(early)}. Each keeps its last validation value "
                "from there to the budget, in its curve and its AUC.",
            ]
        lines.append("")
    if len(report["envs"]) > 1:
        lines += _by_env_table(report)
    if report["all_envs"]:
        lines += [
            "## All envs",
            "",
            "IQM over every (env, seed) run, bootstrap stratified by env.",
            "",
            "| row | runs per env | final success | AUC |",
            "|---|---|---|---|",
        ]
        for row, agg in report["all_envs"].items():
            lines.append(f"| {row} | {agg['runs_per_env']} | {_est(agg['final_success'])} | {_est(agg['auc'])} |")
        lines.append("")
    seeds = report["seeds"]
    lines += [
        "## Seeds",
        "",
        f"- training seeds: {seeds['training_seeds']} ({seeds['training_env_seeds']})",
        "- validation env seeds (curves, best checkpoint): "
        + ", ".join(f"{k} {a}-{b}" for k, (a, b) in seeds["validation_env_seeds"].items()),
        f"- final evaluation env seeds: {'-'.join(map(str, seeds['final_eval_env_seeds'])) or 'none yet'}",
        "",
    ]
    if report["missing_runs"]:
        lines += [
            f"## Missing runs ({len(report['missing_runs'])}): not in the statistics above",
            "",
            "Failed or not yet run; see errors.log and logs/ in the study directory.",
            "",
            *[f"- {m}" for m in report["missing_runs"]],
            "",
        ]
    lines += ["![learning curves](curves.png)", ""]
    return "\n".join(lines)


def _by_env_table(report: dict[str, Any]) -> list[str]:
    """Final success of every row on every env side by side (the rows of the envs above, one column each): how
    a row's result moves with what the envs vary, e.g. the number of demonstrations or the memory length."""
    envs = report["envs"]
    rows = dict.fromkeys(row for env in envs.values() for row in env["rows"])
    lines = [
        "## Final success by env",
        "",
        "IQM [95% CI] (finished runs) of the best checkpoints on the held-out seeds, as in the tables above.",
        "",
        "| row | " + " | ".join(envs) + " |",
        "|---|" + "---|" * len(envs),
    ]
    for row in rows:
        cells = []
        for env in envs.values():
            cell = env["rows"].get(row, {})
            cells.append(f"{_est(cell['final_success'])} ({cell['runs']})" if cell.get("runs") else "")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_curves(report: dict[str, Any], out: Path) -> None:
    """One panel per env: the IQM validation-success curve of every row with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = report["envs"]
    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.6), squeeze=False)
    for ax, (name, env) in zip(axes[0], envs.items(), strict=True):
        grid = np.array(env["grid"])
        for row, cell in env["rows"].items():
            if not cell["runs"]:
                continue
            c = cell["curve"]
            (line,) = ax.plot(grid, c["iqm"], label=f"{row} ({cell['runs']})")
            ax.fill_between(grid, c["ci_low"], c["ci_high"], color=line.get_color(), alpha=0.2)
        ax.axhline(report["threshold"], color="grey", ls=":", lw=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("frames")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an env whose runs are all missing has no curve to label
            ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("validation success (IQM, 95% CI)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(study_dir: str | Path) -> Path:
    """Write report.md, report.json and curves.png into the study directory; returns report.md's path."""
    study_dir = Path(study_dir)
    report = build_report(study_dir)
    (study_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(report, study_dir / "curves.png")
    path = study_dir / "report.md"
    path.write_text(render_markdown(report))
    return path
