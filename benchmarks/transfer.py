"""A study's trained runs played on other env options: how far what each memory learned carries.

Every finished run of one env row of a study is loaded from its best checkpoint and played on the held-out
evaluation seeds with one env option set to each of several values (e.g. a T-maze policy trained on a
100-step corridor, on corridors of 200, 500 and 1000 steps). Per row of the study: held-out success per seed,
and its IQM over seeds with a 95% stratified-bootstrap interval (the study report's statistics). Prints JSON,
then a table.

    tlb-rl compare --config configs/compare/memory_length.yaml --out studies/memory_length
    python benchmarks/transfer.py studies/memory_length --env tmaze-L100 --option corridor_length \\
        --values 100,200,500,1000 --episodes 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from agents import load_model
from commands.study.config import expand, load_study
from commands.study.stats import iqm_estimate


def transfer(
    study_dir: Path, env: str, option: str, values: list[Any], episodes: int, rows: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Held-out success of every finished run of env row ``env`` with ``option`` set to each of ``values``:
    ``{row: {str(value): {"per_seed": {seed: success}, "iqm": ..., "ci_low": ..., "ci_high": ...}}}``."""
    study = load_study(study_dir / "study.yaml", runnable=False)
    specs = [s for s in expand(study) if s.env_name == env and (rows is None or s.row in rows)]
    if not specs:
        sys.exit(f"study {study_dir} has no runs of env '{env}'" + (f" in rows {rows}" if rows else ""))
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        best = study_dir / "runs" / spec.run_id / "checkpoints" / "best.pt"
        if not best.is_file():
            print(f"skipped {spec.run_id}: no best checkpoint (not finished?)", file=sys.stderr)
            continue
        model = load_model(best, device="cpu", compile=False, cuda_graphs=False)
        kwargs = dict(model.config.env_kwargs)
        for value in values:
            model.set_env(env_kwargs={**kwargs, option: value})
            success = model.evaluate(episodes)["success_rate"]
            out.setdefault(spec.row, {}).setdefault(str(value), {"per_seed": {}})["per_seed"][spec.seed] = success
            print(f"{spec.run_id} {option}={value}: {success:.3f}", file=sys.stderr, flush=True)
    for cells in out.values():
        for cell in cells.values():
            cell.update(iqm_estimate(list(cell["per_seed"].values())).as_dict())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", type=Path, help="a study directory (tlb-rl compare --out)")
    parser.add_argument("--env", required=True, help="the env row's name in the study, e.g. tmaze-L100")
    parser.add_argument("--option", required=True, help="the env option to set, e.g. corridor_length")
    parser.add_argument("--values", required=True, help="comma-separated values, read as YAML (100,200,500)")
    parser.add_argument("--rows", help="comma-separated study rows to play (default: all), e.g. tlb-ppo,lstm-ppo")
    parser.add_argument("--episodes", type=int, default=100, help="held-out episodes per run and value")
    args = parser.parse_args()
    values = [yaml.safe_load(v) for v in args.values.split(",")]
    rows = args.rows.split(",") if args.rows else None
    result = transfer(args.study_dir, args.env, args.option, values, args.episodes, rows)
    print(json.dumps({"env": args.env, "option": args.option, "episodes": args.episodes, "rows": result}, indent=2))
    print(f"\nheld-out success, IQM over seeds [95% CI] ({args.episodes} episodes per run), {args.option} =")
    print("| row | " + " | ".join(str(v) for v in values) + " |")
    print("|---" * (len(values) + 1) + "|")
    for row, cells in result.items():
        print(
            f"| {row} | "
            + " | ".join(
                f"{c['iqm']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]" for c in (cells[str(v)] for v in values)
            )
            + " |"
        )


if __name__ == "__main__":
    main()
