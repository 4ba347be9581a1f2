"""The statistics of a study: pure functions of numpy arrays, checked in tests against hand computations.

Aggregates follow rliable (Agarwal et al., 2021): the interquartile mean (IQM, the mean of the middle 50%
of runs: ``scipy.stats.trim_mean(x, 0.25)``) with 95% stratified-bootstrap confidence intervals, runs
resampled with replacement inside each task (env). With one task, stratified is plain bootstrap over runs.
IQM trims ``floor(0.25 * n)`` runs at each end, so with 3 seeds it is the mean and with 5 the mean of the
middle 3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tlb_rl.errors import UserError

BOOTSTRAP_REPS = 2000
"""Bootstrap resamples per interval; 2000 keeps a whole report under a few seconds."""
CONFIDENCE = 0.95


def iqm(scores: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Interquartile mean along ``axis`` (None: of all values, as rliable's ``aggregate_iqm``)."""
    from scipy.stats import trim_mean  # scipy comes with rliable (the ``stats`` extra)

    return np.asarray(trim_mean(scores, proportiontocut=0.25, axis=axis))


def bootstrap_interval(
    scores: np.ndarray,
    func: Callable[[np.ndarray], np.ndarray],
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and 95% percentile stratified-bootstrap interval of ``func(scores)``, via rliable.

    :param scores: [runs, tasks, ...]; runs are resampled inside each task (and independently at each
        trailing index, so a curve gets a pointwise band).
    :param func: maps an array shaped like ``scores`` to a 1-D array of estimates.
    :return: (estimate, lower, upper), each shaped like ``func``'s output.
    """
    try:
        from rliable import library as rly  # imported here: it pulls in pandas and arch (~1 s)
    except ImportError as e:
        raise UserError(f"study statistics need rliable ({e}): pip install 'tlb-rl[stats]'") from None

    # rliable draws its resamples from numpy's global generator: seed it for a reproducible report,
    # and put the caller's state back afterwards.
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        points, intervals = rly.get_interval_estimates(
            {"x": np.asarray(scores, dtype=float)}, func, reps=reps, confidence_interval_size=CONFIDENCE
        )
    finally:
        np.random.set_state(saved)
    return np.asarray(points["x"]), intervals["x"][0], intervals["x"][1]


def on_grid(frames: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Each grid point gets the latest evaluation made at or before it (a step function).

    :raises ValueError: if a grid point comes before the run's first evaluation.
    """
    frames, values = np.asarray(frames, dtype=float), np.asarray(values, dtype=float)
    order = np.argsort(frames, kind="stable")
    frames, values = frames[order], values[order]
    idx = np.searchsorted(frames, grid, side="right") - 1
    if len(frames) == 0 or (idx < 0).any():
        first = frames[0] if len(frames) else None
        raise ValueError(f"grid point {grid[0]} comes before the run's first evaluation (at {first})")
    return values[idx]


def frames_to_threshold(grid: np.ndarray, curve: np.ndarray, threshold: float, budget: int) -> tuple[float, bool]:
    """Frames of the first evaluation with ``curve >= threshold``; a run that never gets there is censored.

    :return: (frames, censored): a censored run is counted at ``budget`` (a lower bound on its true value).
    """
    hits = np.flatnonzero(np.asarray(curve) >= threshold)
    if len(hits) == 0:
        return float(budget), True
    return float(grid[hits[0]]), False


def area_under_curve(curve: np.ndarray) -> float:
    """Mean success over equally spaced evaluations: the area under the step curve divided by the budget."""
    return float(np.mean(curve))


@dataclass
class Estimate:
    """An IQM and its 95% confidence interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"iqm": self.value, "ci_low": self.low, "ci_high": self.high}


def iqm_estimate(per_run: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> Estimate:
    """IQM over runs of one value per run, with its bootstrap interval. ``per_run``: [runs] or [runs, tasks]."""
    scores = np.asarray(per_run, dtype=float)
    if scores.ndim == 1:
        scores = scores[:, None]
    point, low, high = bootstrap_interval(scores, lambda s: np.array([iqm(s)]), reps, seed)
    return Estimate(float(point[0]), float(low[0]), float(high[0]))


def iqm_curve(curves: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Pointwise IQM over runs of curves [runs, points], with its 95% band: (iqm, lower, upper)."""
    scores = np.asarray(curves, dtype=float)[:, None, :]  # [runs, 1 task, points]
    return bootstrap_interval(scores, lambda s: iqm(s[:, 0, :], axis=0), reps, seed)
