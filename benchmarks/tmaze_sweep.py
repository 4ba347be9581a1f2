"""The T-maze memory-length sweep: the longest corridor at which each core reaches a success threshold.

For each core, corridor lengths are tried in ascending order; a run stops as soon as a validation
evaluation reaches the threshold, the best checkpoint is then measured on the held-out evaluation seeds
(``final_eval.json``), and a core that misses at one length is not tried at longer ones. One process, one
run at a time (``torch_threads=1``), seed 0 by default: a cheap map of where memory breaks, which the
multi-seed study (configs/compare/full.yaml) then measures properly.

    python benchmarks/tmaze_sweep.py --lengths 20,50,100 --budget 400000 --out studies/tmaze-sweep

Rollouts hold whole episodes: n_steps is the smallest multiple of L + 1 that is >= 128 (every passive
T-maze episode lasts L + 1 steps and all envs start together), so no episode straddles two rollouts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def rollout_steps(corridor_length: int, at_least: int = 128) -> int:
    """The smallest multiple of the episode length (L + 1) that is >= ``at_least``."""
    episode = corridor_length + 1
    return episode * math.ceil(at_least / episode)


def eval_interval(corridor_length: int) -> int:
    """Frames between validations: 10k, or 200 episodes' worth of frames for long corridors.

    A validation plays 100 episodes of L + 1 steps; at a fixed 10k frames it took ~70% of the wall-clock
    at L = 500 (measured: 13 s per validation against 5.5 s of training between two).
    """
    return max(10_000, 200 * (corridor_length + 1))


def run_length(core: str, corridor_length: int, budget: int, seed: int, threshold: float, run_dir: Path) -> dict:
    """Train one core on one corridor length until validation success >= threshold or the budget is spent."""
    from agents.ppo import PPO, PPOConfig

    n_steps = rollout_steps(corridor_length)
    per_update = 8 * n_steps
    config = PPOConfig(
        env="tmaze",
        env_kwargs={"corridor_length": corridor_length},
        core=core,
        total_frames=budget,
        n_envs=8,
        n_steps=n_steps,
        batch_size=2 * n_steps,
        n_epochs=4,
        learning_rate=5e-4,
        ent_coef=0.01,
        seed=seed,
        vectorization="sync",
        torch_threads=1,
        eval_every=per_update * max(1, round(eval_interval(corridor_length) / per_update)),
        eval_episodes=100,
        target_success=threshold,
        run_dir=str(run_dir),
    )
    model = PPO.from_config(config)
    started = time.perf_counter()
    model.learn(progress=False)
    model.close()
    best = run_dir / "checkpoints" / "best.pt"
    final_model = PPO.load(best, run_dir=str(run_dir)) if best.exists() else model
    result = final_model.evaluate()  # held-out evaluation seeds, eval_episodes episodes
    result.update(
        checkpoint=str(best),
        wall_s=time.perf_counter() - started,
        frames=model.frames,
        validation_reached_at=model.frames if model.last_success >= threshold else None,
        n_steps=n_steps,
        budget=budget,
    )
    (run_dir / "final_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="10,20,50,100,200,500,1000", help="corridor lengths, ascending")
    parser.add_argument("--budget", type=int, default=400_000, help="frames per run (default 400000)")
    parser.add_argument("--cores", default="tlb,lstm", help="comma-separated cores (default tlb,lstm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.95, help="success to reach (default 0.95)")
    parser.add_argument("--out", default="studies/tmaze-sweep", help="directory of the run directories")
    args = parser.parse_args(argv)
    cores = args.cores.split(",")
    missed: set[str] = set()
    summary = []
    for length in sorted(int(x) for x in args.lengths.split(",")):
        for core in cores:
            if core in missed:
                continue
            run_dir = Path(args.out) / f"{core}-L{length}-s{args.seed}-{args.budget // 1000}k"
            final = run_dir / "final_eval.json"
            if final.exists():  # done by an earlier invocation
                result = json.loads(final.read_text())
            else:
                result = run_length(core, length, args.budget, args.seed, args.threshold, run_dir)
            ok = result["success_rate"] >= args.threshold
            summary.append({"core": core, "corridor_length": length, "reached": ok, **result})
            print(
                f"{core} L={length}: held-out success {result['success_rate']:.2f} "
                f"(validation >= {args.threshold} at {result['validation_reached_at']} frames; "
                f"{result['frames']} frames, {result['wall_s']:.0f} s)",
                flush=True,
            )
            if not ok:
                missed.add(core)
    longest = {
        c: max((s["corridor_length"] for s in summary if s["core"] == c and s["reached"]), default=None) for c in cores
    }
    keep = ("core", "corridor_length", "reached", "success_rate", "validation_reached_at", "frames", "budget")
    print(json.dumps({"longest": longest, "runs": [{k: s[k] for k in keep} for s in summary]}, indent=2))


if __name__ == "__main__":
    main()
