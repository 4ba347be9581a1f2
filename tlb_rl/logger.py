"""Metrics to TensorBoard, ``metrics.jsonl`` and ``metrics.csv`` in a run directory, plus a progress bar."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    """Writes one row of scalars per update.

    :param run_dir: where the files go; ``None`` logs nothing to disk (the Python API without a run dir).
    :param total_frames: for the progress bar.
    :param progress: show a progress bar on stderr.
    :param start_frames: frames already done (a resumed run).
    """

    def __init__(self, run_dir: Path | None, total_frames: int, progress: bool = True, start_frames: int = 0):
        self.run_dir = run_dir
        self.writer = None
        self.columns: list[str] | None = None
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when logging to disk

            self.writer = SummaryWriter(str(run_dir / "tb"))
        self.bar = tqdm(
            total=total_frames,
            initial=start_frames,
            unit="frame",
            unit_scale=True,
            disable=not progress,
            dynamic_ncols=True,
        )

    def log(self, frames: int, metrics: dict[str, float]) -> None:
        row = {"frames": frames, **{k: float(v) for k, v in metrics.items()}}
        if self.writer is not None:
            for key, value in metrics.items():
                if not math.isnan(value):
                    self.writer.add_scalar(key, value, frames)
            with open(self.run_dir / "metrics.jsonl", "a") as f:  # type: ignore[operator]
                f.write(json.dumps(row) + "\n")
            self._csv(row)
        self.bar.update(frames - self.bar.n)
        shown = {
            k.split("/")[-1]: metrics[k]
            for k in ("rollout/success_rate", "rollout/return", "time/fps")
            if k in metrics and not math.isnan(metrics[k])
        }
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def _csv(self, row: dict[str, Any]) -> None:
        path = self.run_dir / "metrics.csv"  # type: ignore[operator]
        if self.columns is None and path.exists():  # a resumed run
            with open(path) as f:
                self.columns = next(csv.reader(f), [])
        if self.columns is None or not set(row) <= set(self.columns):
            # A key appeared (validation runs only now and then): rewrite the file with a wider header.
            rows = read_metrics(self.run_dir)  # type: ignore[arg-type]
            self.columns = list(dict.fromkeys([*(self.columns or []), *(k for r in rows for k in r)]))
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(rows)
            return
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
