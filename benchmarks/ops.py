"""How many aten ops each core runs: the device-independent cost of a small model.

Single ops cost microseconds of dispatch on a CPU and a kernel launch on a GPU, so for models this small
the op count, not the arithmetic, sets the time. For every core (input width 128, default sizes):

- one forward + backward over [B=2, T=128] from a fresh state (the shape of a PPO minibatch here), with no
  episode start, one about every 30 steps, and one about every 6 steps (MiniGrid-MemoryS7's episodes);
- one acting step at batch 8 (a T=1 call under ``torch.inference_mode()``), averaged over 32 steps.

"aten events" counts every aten op torch.profiler records, views and ops called inside other ops included
(the count in which the LSTM's fwd+bwd without starts is ~130); "top-level" counts only the ops Python
called. The summary gives TLB's counts against the LSTM's.

``compile=true`` (``--cores tlb:compile=true``) counts a core compiled as an agent's ``compile=true`` compiles it,
but with inductor's kernel profiling on and its Python wrapper (not the C++ one), so that each of its fused
kernels is an event beside the aten ops it calls (matrix products) and those outside the graph: "aten events"
is then every kernel the pass runs on a CPU, fused ones included ("top-level": aten ops and fused kernels
that no aten op called). On a GPU inductor fuses into Triton kernels instead, so the count is a CPU one.

    python benchmarks/ops.py [--cores tlb,tlb:slow_update=sequential,lstm] [--json-out ops.json]

Core settings race as in throughput.py: ``NAME:key=value:...``. JSON to stdout, summary to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from tlb_rl.cores import CORES, Core, make_core, parse_core_spec
from tlb_rl.errors import UserError

INPUT_DIM = 128
TRAIN_B, TRAIN_T = 2, 128
ACT_B, ACT_STEPS = 8, 32
START_RATES = {"no_starts": 0.0, "starts_every_30": 1 / 30, "starts_every_6": 1 / 6}


def count_ops(run: Callable[[], None]) -> tuple[int, int]:
    """(aten events, top-level aten ops) of one call of ``run``, after a warm-up call."""
    run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler warns when it has nothing to say about devices
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    events = [e for e in prof.events() if e.name.startswith("aten::") or _fused_kernel(e.name)]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events), len(top)


def _fused_kernel(name: str) -> bool:
    """A kernel inductor generated (named so by ``cpp.enable_kernel_profile``), e.g. graph_1_cpp_fused_add_gelu_3."""
    return name.startswith("graph_") and "_cpp_fused_" in name


def train_pass(core: Core, starts: torch.Tensor) -> Callable[[], None]:
    x = torch.randn(*starts.shape, INPUT_DIM, generator=torch.Generator().manual_seed(2))
    proj = torch.randn(core.output_dim, generator=torch.Generator().manual_seed(3))

    def run() -> None:
        core.zero_grad(set_to_none=True)
        y, _ = core(x, core.initial_state(starts.shape[0]), starts, state_grad=False)  # as PPO and BC train
        aux = core.auxiliary_loss()
        loss = (y * proj).sum()
        (loss if aux is None else loss + aux).backward()

    return run


def acting(core: Core) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(ACT_STEPS, ACT_B, 1, INPUT_DIM, generator=gen)
    starts = torch.rand(ACT_STEPS, ACT_B, 1, generator=gen) < START_RATES["starts_every_30"]

    def run() -> None:
        with torch.inference_mode():
            state = core.initial_state(ACT_B)
            for t in range(ACT_STEPS):
                _, state = core(x[t], state, starts[t])

    return run


def build(spec: str) -> Core:
    name, hyperparameters, compiled = parse_core_spec(spec)
    core = make_core(name, INPUT_DIM, **hyperparameters)
    if compiled:
        if not core.compilable:
            raise SystemExit(f"core '{name}' does not compile")
        # tlb_rl.cores.compile_core's settings, but inductor's Python wrapper with kernel profiling: every fused
        # kernel is then a profiler event.
        core.compile(dynamic=False, options={"cpp.enable_kernel_profile": True})
    return core


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", default=",".join(CORES), help="comma-separated NAME[:key=value...] (default: all)")
    parser.add_argument("--json-out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        cores = {spec: build(spec).train() for spec in args.cores.split(",")}
    except UserError as e:
        parser.error(str(e))
    gen = torch.Generator().manual_seed(1)
    starts = {k: torch.rand(TRAIN_B, TRAIN_T, generator=gen) < p for k, p in START_RATES.items()}
    result: dict = {
        "train_shape": [TRAIN_B, TRAIN_T],
        "act_batch": ACT_B,
        "episode_starts": {k: int(v.sum()) for k, v in starts.items()},
        "torch": torch.__version__,
        "cores": {},
    }
    for spec, core in cores.items():
        row = {}
        for case, s in starts.items():
            row[f"fwd_bwd_{case}"], row[f"fwd_bwd_{case}_top_level"] = count_ops(train_pass(core, s))
        events, top = count_ops(acting(core))
        row["act_step"], row["act_step_top_level"] = round(events / ACT_STEPS, 1), round(top / ACT_STEPS, 1)
        result["cores"][spec] = row
    if "tlb" in result["cores"] and "lstm" in result["cores"]:
        tlb, lstm = result["cores"]["tlb"], result["cores"]["lstm"]
        result["tlb_vs_lstm"] = {k: round(tlb[k] / lstm[k], 2) for k in tlb}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    summarize(result)
    return result


def summarize(result: dict) -> None:
    out = sys.stderr
    cases = list(START_RATES)
    print(f"\naten events (top-level ops) per fwd+bwd on {result['train_shape']}, and per acting step:", file=out)
    print(f"{'core':<28}" + "".join(f"{c:>22}" for c in [*cases, "act_step"]), file=out)
    for spec, row in result["cores"].items():
        cells = [f"{row[f'fwd_bwd_{c}']} ({row[f'fwd_bwd_{c}_top_level']})" for c in cases]
        cells.append(f"{row['act_step']} ({row['act_step_top_level']})")
        print(f"{spec:<28}" + "".join(f"{c:>22}" for c in cells), file=out)
    if "tlb_vs_lstm" in result:
        r = result["tlb_vs_lstm"]
        print(
            "TLB / LSTM, aten events: "
            + ", ".join(f"{c} x{r[f'fwd_bwd_{c}']}" for c in cases)
            + f", acting x{r['act_step']}",
            file=out,
        )


if __name__ == "__main__":
    main()
