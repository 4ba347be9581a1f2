"""Memory soak: PPO for 1M frames with resident memory (RSS) sampled at intervals, to show it stays flat.

Trains with a real run directory, so that what a long run does besides learning is soaked too: metrics
and TensorBoard logging, a checkpoint every ``checkpoint_every`` updates (each one snapshots the envs'
in-flight episode actions, which exact resume replays) and a validation evaluation every ``eval_every``
frames. The default env, MiniGrid-MemoryS7 with a 3x3 view, has episodes that also end by truncation.

The first half of the run is warm-up (imports, allocator pools, the first checkpoint and evaluation);
the verdict looks at the second half only: RSS growth from its first sample to the last, and a
least-squares slope. Linux only (reads /proc/self).

    python benchmarks/soak.py [--frames 1000000] [--every 50000] [--core tlb] [--env MiniGrid-MemoryS7-v0]
                              [--env-kwargs '{"view_size": 3}'] [--run-dir DIR] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

# Flat means second-half growth under the larger of these. 20 MiB is several times the RSS wobble of
# the allocators (glibc arenas, torch's CPU caching), and a leak of ~100 bytes per env step (one small
# numpy array kept per action) would add ~50 MiB over the second half of 1M frames.
THRESHOLD_MIB = 20.0
THRESHOLD_FRACTION = 0.05


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _sample(frames: int, elapsed_s: float) -> dict[str, Any]:
    # Collect first so the object count is live objects, not cyclic garbage that happens to be pending.
    # Both take ~0.2 s with torch loaded (~320k objects): negligible at one sample per 50k frames.
    gc.collect()
    return {
        "frames": frames,
        "elapsed_s": round(elapsed_s, 1),
        "rss_mib": round(_proc_status_mib("VmRSS"), 1),
        "peak_rss_mib": round(_proc_status_mib("VmHWM"), 1),
        "gc_objects": len(gc.get_objects()),
        "open_fds": len(os.listdir("/proc/self/fd")),
    }


def _verdict(samples: list[dict[str, Any]], total_frames: int) -> dict[str, Any]:
    late = [s for s in samples if s["frames"] >= total_frames / 2]
    frames = np.array([s["frames"] for s in late], dtype=float)
    rss = np.array([s["rss_mib"] for s in late])
    growth = float(rss[-1] - rss[0])
    threshold = max(THRESHOLD_MIB, THRESHOLD_FRACTION * float(rss[0]))
    return {
        "from_frames": late[0]["frames"],
        "to_frames": late[-1]["frames"],
        "samples": len(late),
        "rss_growth_mib": round(growth, 1),
        "rss_slope_mib_per_100k_frames": round(float(np.polyfit(frames, rss, 1)[0]) * 100_000, 2),
        "gc_objects_growth": late[-1]["gc_objects"] - late[0]["gc_objects"],
        "open_fds_growth": late[-1]["open_fds"] - late[0]["open_fds"],
        "threshold_mib": round(threshold, 1),
        "flat": abs(growth) < threshold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames to train (default 1000000)")
    parser.add_argument("--every", type=int, default=50_000, help="frames between memory samples (default 50000)")
    parser.add_argument("--core", default="tlb", help="memory core (default tlb)")
    parser.add_argument("--env", default="MiniGrid-MemoryS7-v0", help="env id (default MiniGrid-MemoryS7-v0)")
    parser.add_argument(
        "--env-kwargs", default='{"view_size": 3}', help='env options as JSON (default {"view_size": 3})'
    )
    parser.add_argument("--run-dir", help="keep the run's logs and checkpoints here (default: a temporary directory)")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args()
    if args.every * 4 > args.frames:
        parser.error("--every must be at most a quarter of --frames, so the second half holds two samples or more")

    from agents import PPO  # after argument parsing: torch's import takes seconds

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = PPO(
            args.env,
            core=args.core,
            env_kwargs=json.loads(args.env_kwargs),
            run_dir=args.run_dir or tmp,
            vectorization="sync",
            torch_threads=1,
            device="cpu",  # a CUDA context would add its own, unrelated, host memory
        )
        t0 = time.perf_counter()
        samples = [_sample(0, 0.0)]
        next_sample = args.every

        def record(model: PPO, metrics: dict[str, float]) -> None:
            nonlocal next_sample
            # The last update always samples, so the verdict ends where the run does.
            if model.frames >= next_sample or model.frames >= args.frames:
                samples.append(_sample(model.frames, time.perf_counter() - t0))
                next_sample = (model.frames // args.every + 1) * args.every
                s = samples[-1]
                print(f"{s['frames']} frames, {s['elapsed_s']:.0f} s: RSS {s['rss_mib']:.1f} MiB", flush=True)

        model.learn(args.frames, callback=record, progress=False)
        wall_s = time.perf_counter() - t0
        model.close()
        cfg = model.config

    result = {
        "env": cfg.env,
        "env_kwargs": cfg.env_kwargs,
        "core": cfg.core,
        "frames": model.frames,
        **{k: getattr(cfg, k) for k in ("n_envs", "n_steps", "batch_size", "n_epochs", "eval_every", "eval_episodes")},
        "checkpoint_every_updates": cfg.checkpoint_every,
        "vectorization": cfg.vectorization,
        "torch_threads": cfg.torch_threads,
        "wall_s": round(wall_s, 1),
        "steps_per_s": round(model.frames / wall_s, 1),
        "samples": samples,
        "second_half": _verdict(samples, args.frames),
    }
    print(json.dumps(result, indent=2))
    verdict = result["second_half"]
    print("\nsummary:")
    print(f"  {'frames':>9} {'RSS MiB':>8} {'peak MiB':>9} {'objects':>9} {'fds':>4}")
    for s in samples:
        print(
            f"  {s['frames']:9d} {s['rss_mib']:8.1f} {s['peak_rss_mib']:9.1f} {s['gc_objects']:9d} {s['open_fds']:4d}"
        )
    print(
        f"  {result['frames']} frames in {wall_s / 60:.1f} min ({result['steps_per_s']:.0f} steps/s); "
        f"second half ({verdict['from_frames']}-{verdict['to_frames']} frames): "
        f"RSS {verdict['rss_growth_mib']:+.1f} MiB, slope {verdict['rss_slope_mib_per_100k_frames']:+.2f} MiB/100k "
        f"frames, objects {verdict['gc_objects_growth']:+d}, fds {verdict['open_fds_growth']:+d}: "
        f"{'flat' if verdict['flat'] else 'NOT flat'} (threshold {verdict['threshold_mib']} MiB)"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
