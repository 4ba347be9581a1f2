"""How fast each sequence core is on CPU, and TLB against an LSTM with as many parameters.

For every registered core at its default sizes (input width 128):
- the number of parameters;
- forward + backward of a [B=16, T=128] sequence, with no episode start and with episode starts at random
  places (about one per 30 steps of each row): the training pass PPO and BC run;
- one acting step at batch 8: a T=1 call under ``torch.inference_mode()`` carrying the state, averaged
  over a run of steps (with the same rate of episode starts).
Then the default TLB against the single-layer LSTM whose hidden size gives the closest parameter count,
as time ratios. The issue's target: TLB's forward + backward at most 1.5x that LSTM's.

All timings are interleaved (each repeat times every case once, in turn) so that load from other
processes falls on all cores alike; each figure is the median over ``--repeats`` after warm-up.

    python benchmarks/cores.py [--repeats 7] [--threads N] [--device cuda] [--shape 16x1024] [--json-out r.json]

Settings of one core race as in throughput.py: ``--cores tlb,tlb:slow_update=sequential,lstm``; ``compile=true``
compiles a core as an agent's ``compile=true`` does (``--cores tlb,tlb:compile=true,lstm``; warm-up compiles).
Every TLB row is set against the LSTM with as many parameters as the default TLB.

A/B against another version of a core's file, timed in the same interleaved rounds (rows ``NAME@baseline``
and the ratio current / baseline in the summary):

    git show 1602aba~1:tlb_rl/cores/tlb.py > /tmp/tlb_before.py   # TLB before 2026-11-27
    python benchmarks/cores.py --cores tlb --baseline-file /tmp/tlb_before.py

The JSON goes to stdout (and to ``--json-out``), the human summary to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from tlb_rl.cores import CORES, Core, compile_core, make_core, parse_core_spec
from tlb_rl.errors import UserError

INPUT_DIM = 128
TRAIN_B, TRAIN_T = 16, 128
ACT_B, ACT_STEPS = 8, 32
START_RATE = 1 / 30
TARGET_RATIO = 1.5


def n_params(core: Core) -> int:
    return sum(p.numel() for p in core.parameters())


def lstm_params(hidden: int, input_dim: int = INPUT_DIM) -> int:
    """Parameters of a one-layer torch LSTM: 4 gates, each with input and recurrent weights and two biases."""
    return 4 * hidden * (input_dim + hidden) + 8 * hidden


def lstm_hidden_matching(n: int, input_dim: int = INPUT_DIM) -> int:
    """Hidden size of the one-layer LSTM whose parameter count is closest to n."""
    b = 4 * input_dim + 8  # the positive root of 4h² + bh = n, then the closer of its two neighbours
    h = int((-b + math.sqrt(b * b + 16 * n)) / 8)
    return min((max(1, h), h + 1), key=lambda k: abs(lstm_params(k, input_dim) - n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_case(core: Core, starts: torch.Tensor, seed: int) -> Callable[[], None]:
    """One forward + backward over [B, T] (the shape of ``starts``) from a fresh state (and the core's own loss,
    as PPO adds it), finished on the device."""
    gen = torch.Generator().manual_seed(seed)
    device = core.device
    x = torch.randn(*starts.shape, INPUT_DIM, generator=gen).to(device)
    proj = torch.randn(core.output_dim, generator=gen).to(device)
    starts = starts.to(device)
    # As PPO and BC train: no gradient through the returned state (a core from an older --baseline-file may not
    # take the argument; it then pays for that gradient as the code it comes from did).
    options = {"state_grad": False} if "state_grad" in inspect.signature(core.forward).parameters else {}

    def run() -> None:
        core.zero_grad(set_to_none=True)
        y, _ = core(x, core.initial_state(starts.shape[0]), starts, **options)
        loss = (y * proj).sum()  # a projection: the sum of a LayerNorm output has no gradient
        aux = core.auxiliary_loss()  # bRSM learns from its own loss; its output is detached by default
        (loss if aux is None else loss + aux).backward()
        _sync(device)

    return run


def act_case(core: Core, seed: int) -> Callable[[], None]:
    """ACT_STEPS acting steps (T=1 calls) at batch ACT_B, carrying the state."""
    gen = torch.Generator().manual_seed(seed)
    device = core.device
    x = torch.randn(ACT_STEPS, ACT_B, 1, INPUT_DIM, generator=gen).to(device)
    starts = torch.rand(ACT_STEPS, ACT_B, 1, generator=gen) < START_RATE
    starts[0] = True
    starts = starts.to(device)

    def run() -> None:
        with torch.inference_mode():
            state = core.initial_state(ACT_B)
            for t in range(ACT_STEPS):
                _, state = core(x[t], state, starts[t])
        _sync(device)

    return run


def build(spec: str, device: torch.device) -> Core:
    """A core from ``NAME[:key=value...]`` at input width INPUT_DIM on ``device``."""
    name, hyperparameters, compiled = parse_core_spec(spec)
    core = make_core(name, INPUT_DIM, **hyperparameters).to(device)
    if compiled:
        compile_core(core, name)
    return core


def baseline_cores(path: str, current: dict[str, Core]) -> dict[str, Core]:
    """The cores of ``current`` built again, with the same settings, from the classes that file ``path`` defines.

    The file is imported as a module, so it may import ``tlb_rl`` (an earlier ``tlb.py`` does); a core is
    taken when the file defines the class its name is registered with (``RNNCore`` for lstm and gru).
    """
    module_spec = importlib.util.spec_from_file_location("_cores_baseline", path)
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"--baseline-file {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    found = {}
    for spec, core in current.items():
        name, hyperparameters, compiled = parse_core_spec(spec)
        cls = getattr(module, type(core).__name__, None)
        if isinstance(cls, type) and issubclass(cls, Core):
            cell = {"cell": name} if name in ("lstm", "gru") else {}
            found[f"{spec}@baseline"] = baseline = cls(INPUT_DIM, **cell, **hyperparameters).to(core.device)
            if compiled:
                compile_core(baseline, name)
    if not found:
        raise SystemExit(f"--baseline-file {path} defines none of the classes of the cores {', '.join(current)}")
    return found


def measure(cases: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every case, interleaved: each round times every case once."""
    for run in cases.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for key, run in cases.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per case, after warm-up (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file (default: stdout only)")
    parser.add_argument(
        "--cores", default=",".join(CORES), help="comma-separated NAME[:key=value...] (default: every core)"
    )
    parser.add_argument("--baseline-file", default=None, help="also time the cores this file defines (A/B)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--shape", default=f"{TRAIN_B}x{TRAIN_T}", help="fwd+bwd batch x time (default %(default)s)")
    args = parser.parse_args(argv)
    specs = args.cores.split(",")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B, T = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)

    gen = torch.Generator().manual_seed(1)
    random_starts = torch.rand(B, T, generator=gen) < START_RATE
    no_starts = torch.zeros(B, T, dtype=torch.bool)

    try:
        cores = {spec: build(spec, device) for spec in specs}
    except UserError as e:
        parser.error(str(e))
    baselines = baseline_cores(args.baseline_file, cores) if args.baseline_file else {}
    if "tlb" in cores:
        lstm_h = lstm_hidden_matching(n_params(cores["tlb"]))
        cores["lstm_equal_params"] = make_core("lstm", INPUT_DIM, hidden_size=lstm_h)
        assert n_params(cores["lstm_equal_params"]) == lstm_params(lstm_h)
    cores |= baselines
    cores = {k: c.to(device) for k, c in cores.items()}

    cases: dict[str, Callable[[], None]] = {}
    for key, core in cores.items():
        cases[f"{key}/train_no_starts"] = train_case(core.train(), no_starts, seed=2)
        cases[f"{key}/train_starts"] = train_case(core, random_starts, seed=2)
        cases[f"{key}/act"] = act_case(core, seed=3)
    load_before = os.getloadavg()
    times = measure(cases, args.repeats)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    spread = {k: 1e3 * (max(v) - min(v)) for k, v in times.items()}

    result: dict = {
        "setup": {
            "input_dim": INPUT_DIM,
            "train_shape": [B, T],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "act_batch": ACT_B,
            "act_steps_per_repeat": ACT_STEPS,
            "episode_start_rate": round(START_RATE, 4),
            "episode_starts_in_train_sequence": int(random_starts.sum()),
            "repeats": args.repeats,
            "statistic": "median",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_1min_before": round(load_before[0], 2),
        },
        "cores": {},
    }
    for key, core in cores.items():
        result["cores"][key] = {
            "params": n_params(core),
            "output_dim": core.output_dim,
            "fwd_bwd_ms_no_starts": round(ms[f"{key}/train_no_starts"], 2),
            "fwd_bwd_ms_starts": round(ms[f"{key}/train_starts"], 2),
            "act_step_ms": round(ms[f"{key}/act"] / ACT_STEPS, 4),
            "fwd_bwd_spread_ms_no_starts": round(spread[f"{key}/train_no_starts"], 2),
        }
    result["vs_baseline"] = {
        key.removesuffix("@baseline"): {
            case: round(ms[f"{key.removesuffix('@baseline')}/{case}"] / ms[f"{key}/{case}"], 3)
            for case in ("train_no_starts", "train_starts", "act")
        }
        for key in baselines
    }
    if "tlb" in cores:
        result["tlb_vs_equal_params_lstm"] = {
            key: tlb_vs_lstm(result, ms, key, lstm_h) for key in cores if key.split(":")[0].startswith("tlb")
        }

    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    summarize(result)
    return result


def tlb_vs_lstm(result: dict, ms: dict[str, float], key: str, lstm_h: int) -> dict:
    tlb, lstm = result["cores"][key], result["cores"]["lstm_equal_params"]
    ratio_no = ms[f"{key}/train_no_starts"] / ms["lstm_equal_params/train_no_starts"]
    ratio_st = ms[f"{key}/train_starts"] / ms["lstm_equal_params/train_starts"]
    return {
        "tlb_params": tlb["params"],
        "lstm_hidden_size": lstm_h,
        "lstm_params": lstm["params"],
        "fwd_bwd_ratio_no_starts": round(ratio_no, 3),
        "fwd_bwd_ratio_starts": round(ratio_st, 3),
        "act_step_ratio": round(ms[f"{key}/act"] / ms["lstm_equal_params/act"], 3),
        "target_fwd_bwd_ratio": TARGET_RATIO,
        "meets_target": bool(max(ratio_no, ratio_st) <= TARGET_RATIO),
    }


def summarize(result: dict) -> None:
    s = result["setup"]
    out = sys.stderr
    print(
        f"\n{s['device']}, {s['threads']} torch threads, torch {s['torch']}, median of {s['repeats']} "
        f"(1-min load average before: {s['load_average_1min_before']})",
        file=out,
    )
    print(
        f"{'core':<18}{'params':>10}{'fwd+bwd ms':>12}{'w/ starts':>11}{'act ms/step':>13}   "
        f"(fwd+bwd: [{s['train_shape'][0]}, {s['train_shape'][1]}]; act: batch {s['act_batch']})",
        file=out,
    )
    for key, c in result["cores"].items():
        print(
            f"{key:<18}{c['params']:>10,}{c['fwd_bwd_ms_no_starts']:>12.1f}{c['fwd_bwd_ms_starts']:>11.1f}"
            f"{c['act_step_ms']:>13.3f}",
            file=out,
        )
    for name, r in result["vs_baseline"].items():
        print(
            f"{name} / {name}@baseline: fwd+bwd x{r['train_no_starts']:.2f} without starts, "
            f"x{r['train_starts']:.2f} with; acting x{r['act']:.2f}",
            file=out,
        )
    if "tlb_vs_equal_params_lstm" not in result:
        return
    for key, cmp_ in result["tlb_vs_equal_params_lstm"].items():
        verdict = "meets" if cmp_["meets_target"] else "misses"
        print(
            f"{key} ({cmp_['tlb_params']:,} params) / LSTM hidden {cmp_['lstm_hidden_size']} "
            f"({cmp_['lstm_params']:,} params): fwd+bwd x{cmp_['fwd_bwd_ratio_no_starts']:.2f} without starts, "
            f"x{cmp_['fwd_bwd_ratio_starts']:.2f} with; acting x{cmp_['act_step_ratio']:.2f}. "
            f"Target <= x{cmp_['target_fwd_bwd_ratio']}: {verdict} it.",
            file=out,
        )


if __name__ == "__main__":
    main()
