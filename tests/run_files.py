"""Helpers for the tests that compare what two runs wrote."""

from __future__ import annotations

import json
from pathlib import Path


def metrics_by_frames(run_dir: Path) -> dict[int, dict[str, float]]:
    """Rows of a run's metrics.jsonl by frame count, without the wall-clock timings (which never repeat)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {int(r["frames"]): {k: v for k, v in r.items() if not k.startswith("time/")} for r in rows}
