"""TLB's training pass captured as CUDA graphs, against eager TLB and torch's cuDNN LSTM (needs a GPU).

TLB's forward and backward run the same ops whatever the data (tests/test_cores.py checks it), so
``torch.cuda.make_graphed_callables`` can replay them without launching each kernel from Python. For each
shape: eager TLB fwd+bwd, graphed TLB fwd+bwd (outputs checked against eager), and a one-layer cuDNN LSTM
with as many parameters (no episode starts: its fused path), medians over ``--repeats``. The state comes back
detached (``state_grad=False``), as PPO and BC call the core: no backward through it.

    python benchmarks/cuda_graph.py [--shapes 16x128,16x1024] [--cores tlb,tlb:slow_update=sequential]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from tlb_rl.cores import make_core, parse_core_spec
from tlb_rl.cores.graphs import TrainingPass

INPUT_DIM = 128


def timed(run: Callable[[], None], repeats: int) -> float:
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(spec: str, B: int, T: int, repeats: int) -> dict[str, float]:
    name, hyperparameters, compiled = parse_core_spec(spec)
    if compiled:
        raise SystemExit(f"{spec}: this benchmark captures the eager core as a CUDA graph; drop compile=true")
    core = make_core(name, INPUT_DIM, **hyperparameters).cuda()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, INPUT_DIM, generator=gen).cuda()
    starts = (torch.rand(B, T, generator=gen) < 1 / 30).cuda()
    proj = torch.randn(core.output_dim, generator=gen).cuda()
    state = core.initial_state(B)
    keys = list(state)

    def eager() -> None:
        core.zero_grad(set_to_none=True)
        y, _ = core(x, state, starts, state_grad=False)
        (y * proj).sum().backward()

    graphed = torch.cuda.make_graphed_callables(TrainingPass(core, keys), (x, starts, *state.values()))

    def replay() -> None:
        core.zero_grad(set_to_none=True)
        y = graphed(x, starts, *state.values())[0]
        (y * proj).sum().backward()

    with torch.no_grad():
        diff = (graphed(x, starts, *state.values())[0] - core(x, state, starts, state_grad=False)[0]).abs().max().item()
    n_params = sum(p.numel() for p in core.parameters())
    hidden = max(h for h in range(1, 512) if 4 * h * (INPUT_DIM + h) + 8 * h <= n_params)
    lstm = nn.LSTM(INPUT_DIM, hidden, batch_first=True).cuda()

    def cudnn() -> None:
        lstm.zero_grad(set_to_none=True)
        y, _ = lstm(x)
        y.sum().backward()

    return {
        "eager_ms": round(timed(eager, repeats), 2),
        "graphed_ms": round(timed(replay, repeats), 2),
        "graphed_vs_eager_max_abs_diff": diff,
        "cudnn_lstm_hidden": hidden,
        "cudnn_lstm_ms": round(timed(cudnn, repeats), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="16x128,16x1024", help="comma-separated BxT (default %(default)s)")
    parser.add_argument("--cores", default="tlb,tlb:slow_update=parallel", help="NAME[:key=value...], comma-sep.")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graph.py needs a CUDA GPU")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for spec in args.cores.split(","):
        for shape in args.shapes.split(","):
            B, T = (int(v) for v in shape.split("x"))
            r = measure(spec, B, T, args.repeats)
            result["runs"][f"{spec}@{shape}"] = r
            print(
                f"{spec} [{B}, {T}]: eager {r['eager_ms']} ms, graphed {r['graphed_ms']} ms, cuDNN LSTM "
                f"(hidden {r['cudnn_lstm_hidden']}) {r['cudnn_lstm_ms']} ms; graphed/LSTM "
                f"x{r['graphed_ms'] / r['cudnn_lstm_ms']:.2f}",
                flush=True,
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
