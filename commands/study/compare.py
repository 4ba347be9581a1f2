"""The ``compare`` and ``report`` subcommands; ``commands/cli.py`` parses their arguments and calls these."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from commands.study.config import load_study
from commands.study.report import write_report
from commands.study.runner import failed, run_study
from tlb_rl.errors import TrainingError

STUDIES_DIR = Path("studies")


def compare(
    config: str,
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    out: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Path:
    """Run (or resume) the study of ``config`` (with ``key=value`` ``overrides``) and write its report; returns
    the study directory.

    :raises TrainingError: when runs failed twice (the report is written anyway, without them).
    :raises SystemExit: 130 when the user interrupted the study, or when runs were stopped by a signal (the
        report is written first, without them; this takes precedence over failed runs, which are listed too).
    """
    study_dir = Path(out) if out else STUDIES_DIR / load_study(config, runnable=False, overrides=overrides).name
    try:
        outcomes = run_study(
            config,
            study_dir,
            backend=backend,
            workers=workers,
            address=address,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            overrides=overrides,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; the same command resumes the study in {study_dir}", file=sys.stderr)
        sys.exit(130)
    command = " ".join(
        [
            "tlb-rl compare --config",
            shlex.quote(config),
            *([f"--out {shlex.quote(out)}"] if out else []),
            *map(shlex.quote, overrides),
        ]
    )
    (study_dir / "study_meta.json").write_text(json.dumps({"command": command}, indent=2) + "\n")
    report_path = write_report(study_dir)
    print(f"report: {report_path}")
    bad = [o.run_id for o in failed(outcomes)]
    failures = (
        f"{len(bad)} run(s) failed twice and are left out of the report: {', '.join(bad)}; see "
        f"{study_dir / 'errors.log'}; running the same compare command again retries them"
    )
    stopped = [o.run_id for o in outcomes if o.status == "interrupted"]
    if stopped:  # a run killed by a signal: the report is partial, and a script must be able to tell
        print(
            f"{len(stopped)} run(s) were interrupted and are missing from the report: {', '.join(stopped)}; "
            f"the same command resumes them in {study_dir}" + (f"\n{failures}" if bad else ""),
            file=sys.stderr,
        )
        sys.exit(130)
    if bad:
        raise TrainingError(failures)
    return study_dir


def report(study_dir: str) -> Path:
    """Re-render the report of an existing study directory."""
    path = write_report(study_dir)
    print(f"report: {path}")
    return path
