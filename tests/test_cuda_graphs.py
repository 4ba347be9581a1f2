"""``cuda_graphs=True``: the core's training pass replayed from CUDA graphs computes what the eager pass does,
PPO and BC with it take the eager gradient on the same data, and the option refuses what it cannot run.

The GPU tests are skipped on a machine without CUDA; benchmarks/gpu.sh runs them on one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cores import CONFIGS, EPISODE_CLOCK, assert_states_close, build, projection_loss

from agents import BC, PPO
from agents.bc import pack_episodes
from agents.buffer import RolloutBuffer
from agents.demos import generate_demos
from tlb_rl.cores import require_static
from tlb_rl.cores.graphs import MAX_SHAPES, CoreGraphs
from tlb_rl.errors import UserError

# By module path: the GPU machine runs the tests from a checkout, without the entry points that name "tmaze".
TMAZE = "envs.tmaze:TMazeEnv"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ATOL = 1e-5


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("lstm", "core 'lstm' cannot run as CUDA graphs: drop cuda_graphs=true, or use a core that compiles"),
        (EPISODE_CLOCK[0], "clock='episode' .* so it cannot run as CUDA graphs: drop cuda_graphs=true"),
    ],
)
def test_cuda_graphs_refuse_a_core_whose_ops_depend_on_the_data(config, message):
    with pytest.raises(UserError, match=message):
        require_static(build(config), CONFIGS[config][0], "cuda_graphs")


def test_cuda_graphs_refuse_a_run_on_the_cpu():
    with pytest.raises(UserError, match="cuda_graphs=true needs a CUDA device, and this run is on 'cpu'"):
        PPO(TMAZE, cuda_graphs=True, device="cpu", n_envs=2, n_steps=8, batch_size=16, vectorization="sync")


def _training_pass(core, graphs, x, state, starts):
    """Outputs, final state, and the gradients of a projection of the outputs (input's and parameters')."""
    core.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, new = graphs(x, state, starts) if graphs else core(x, state, starts, state_grad=False)
    projection_loss(y.cpu()).backward()
    grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in core.parameters()]
    return y.detach(), new, [g.clone() for g in grads]


@needs_cuda
@pytest.mark.parametrize("config", ["tlb-K4", "tlb-K3-parallel", "tlb-K5-L3R2-reads-output", "transformer", "none"])
def test_graphed_training_pass_equals_eager(config, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    core = build(config).cuda().train()
    graphs = CoreGraphs(core)
    B, T = 3, 11
    gen = torch.Generator().manual_seed(0)
    for call in range(3):  # the first call captures, the next ones replay on new data
        x = torch.randn(B, T, 5, generator=gen).cuda()
        starts = (torch.rand(B, T, generator=gen) < 0.2).cuda()
        state = {k: v + 0.1 * call if v.is_floating_point() else v for k, v in core.initial_state(B).items()}
        eager = _training_pass(core, None, x, state, starts)
        graphed = _training_pass(core, graphs, x, state, starts)
        torch.testing.assert_close(graphed[0], eager[0], atol=ATOL, rtol=0)
        assert_states_close(graphed[1], eager[1])
        for g, e in zip(graphed[2], eager[2], strict=True):
            torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    assert len(graphs._graphs) == 1


@needs_cuda
def test_graphed_pass_runs_eagerly_until_its_last_forward_is_backpropagated():
    """Two forwards before one backward: the second must not overwrite the first's activations in the graph."""
    core = build("tlb-K4").cuda().train()
    graphs = CoreGraphs(core)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 8, 5, generator=gen).cuda().requires_grad_(True) for _ in range(2)]
    starts = torch.zeros(2, 8, dtype=torch.bool, device="cuda")
    state = core.initial_state(2)
    ys = [graphs(x, state, starts)[0] for x in xs]
    (projection_loss(ys[0].cpu()) + projection_loss(ys[1].cpu(), seed=7)).backward()
    for x, seed in zip(xs, (123, 7), strict=True):
        x_ref = x.detach().clone().requires_grad_(True)
        projection_loss(core(x_ref, state, starts, state_grad=False)[0].cpu(), seed=seed).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=ATOL, rtol=0)


@needs_cuda
def test_graphs_stop_capturing_past_their_limit_of_shapes():
    core = build("none").cuda().train()
    graphs = CoreGraphs(core)
    for T in range(1, MAX_SHAPES + 3):
        x = torch.randn(2, T, 5, device="cuda", requires_grad=True)
        y, _ = graphs(x, core.initial_state(2), torch.zeros(2, T, dtype=torch.bool, device="cuda"))
        y.sum().backward()
    assert len(graphs._graphs) == MAX_SHAPES


def _grads(model) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.policy.parameters()]


# Whole runs are not compared: GPU kernels with atomic adds differ run to run, sampled actions then part, and
# Adam turns near-zero gradients into full steps. One gradient on the same data is compared instead.
@needs_cuda
@pytest.mark.parametrize("core", ["tlb", "transformer"])
def test_ppo_with_cuda_graphs_takes_the_eager_gradient(core, monkeypatch):
    kw = dict(core=core, device="cuda", n_envs=4, n_steps=16, batch_size=32, seq_len=8, vectorization="sync")
    model = PPO(TMAZE, cuda_graphs=True, **kw)
    model.learn(2 * 4 * 16, progress=False)  # two updates: capture, then replays, acting in between
    graphs = model.policy.core_graphs
    assert graphs is not None and len(graphs._graphs) == 1
    buffer = RolloutBuffer(16, 4, 8, model.device)
    model._collect(buffer)
    batch = next(buffer.minibatches(32, torch.Generator().manual_seed(0)))
    monkeypatch.setattr(model.optimizer, "step", lambda: None)
    grads = []
    for use in (graphs, None):
        model.policy.core_graphs = use
        model._gradient_step(batch)
        grads.append(_grads(model))
    for g, e in zip(*grads, strict=True):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


@needs_cuda
def test_bc_with_cuda_graphs_carries_its_state_and_takes_the_eager_gradient(tmp_path):
    generate_demos("BabyAI-GoToRedBallGrey-v0", 8, tmp_path / "demos", seed=0, progress=False)
    kw = dict(dataset=str(tmp_path / "demos"), device="cuda", val_fraction=0, batch_size=4, seq_len=8, eval_episodes=4)
    model = BC("BabyAI-GoToRedBallGrey-v0", cuda_graphs=True, **kw)
    model.learn(max_updates=6, progress=False)  # segments carrying the state from one to the next
    graphs = model.policy.core_graphs
    assert graphs is not None and len(graphs._graphs) == 1
    train, _ = model.load_dataset()
    segments = pack_episodes(train, np.arange(len(train)), 4, 8, model.device)
    grads, states = [], []
    model.policy.train()  # learn() ends in evaluation mode, where the mission's cuDNN GRU has no backward
    for use in (graphs, None):
        model.policy.core_graphs = use
        state = model.policy.initial_state(4)
        for segment in segments[:2]:
            model.policy.zero_grad(set_to_none=True)
            loss, _, state = model._loss(segment, state)
            loss.backward()
        grads.append(_grads(model))
        states.append(state)
    assert_states_close(*states)
    for g, e in zip(*grads, strict=True):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
