"""Learning-curve plots from a run's metrics."""

from __future__ import annotations

from pathlib import Path

from tlb_rl.logger import read_metrics


def plot_learning_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Success rate (training episodes and held-out evaluation) and return against frames, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "learning_curve.png"
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, ax in [
        ("rollout/success_rate", "training episodes", ax_s),
        ("validation/success_rate", "held-out validation seeds", ax_s),
        ("rollout/return", "training episodes", ax_r),
        ("validation/return", "held-out validation seeds", ax_r),
    ]:
        points = [(r["frames"], r[key]) for r in rows if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if key.startswith("validation") else None, ms=3, label=label)
    for ax, title in [(ax_s, "success rate"), (ax_r, "return")]:
        ax.set_xlabel("frames")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
