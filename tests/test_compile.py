"""``compile=True``: a compiled core computes what the eager one does, and an agent with it trains, saves and loads.

Compiling takes most of this file's ~55 s (the TLB core most of it), so the cores are tiny and the
agent test uses the memoryless core, whose graph compiles in seconds: what it checks (the flag's wiring, the
checkpoint's keys) does not depend on the core.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from agents import PPO
from tlb_rl.cores import CORES, compile_core, make_core
from tlb_rl.cores import tlb as tlb_module
from tlb_rl.cores.record import recording
from tlb_rl.errors import UserError

ATOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Dynamo keeps compiled graphs per function across tests and runs new shapes eagerly past its limit of graphs
    # per function: a comparison with eager would then pass without testing anything.
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.mark.parametrize("mid_chunk", [True, False], ids=["clocks-1-3-1", "clocks-0"])
def test_compiled_tlb_computes_what_eager_does(mid_chunk):
    torch.manual_seed(0)
    eager = make_core("tlb", 5, d_model=16, chunk_size=4, n_slow=2, n_heads=2)
    compiled = copy.deepcopy(eager)
    compile_core(compiled, "tlb")
    B, T = 3, 10 if mid_chunk else 8
    x, starts = torch.randn(B, T, 5, requires_grad=True), torch.rand(B, T) < 0.2
    state = eager.initial_state(B)  # clock 0: the layout without a chunk of padding
    if mid_chunk:  # rows at clocks 1, 3, 1: a chunk of padding, and each row's steps in another place
        before, before_starts = torch.randn(B, 3, 5), torch.rand(B, 3) < 0.3
        with torch.no_grad():
            _, one = eager(before[:, :1], state, before_starts[:, :1])
            _, three = eager(before, state, before_starts)
        odd = torch.arange(B) % 2 == 1
        state = {k: torch.where(odd.view(-1, *[1] * (v.dim() - 1)), three[k], v) for k, v in one.items()}
        assert state["chunk_len"].tolist() == [1, 3, 1]

    outputs = {}
    for name, core in (("eager", eager), ("compiled", compiled)):
        y, final = core(x, state, starts)
        (y.square().sum() + final["slow"].sum()).backward()
        outputs[name] = y.detach(), final, x.grad.clone(), [p.grad.clone() for p in core.parameters()]
        x.grad = None
    (y1, s1, gx1, gp1), (y2, s2, gx2, gp2) = outputs["eager"], outputs["compiled"]
    torch.testing.assert_close(y2, y1, atol=ATOL, rtol=1e-4)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(gx2, gx1, atol=1e-4, rtol=1e-3)
    for a, b in zip(gp2, gp1, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)

    # The acting step, one call per step under inference mode, as PPO acts.
    with torch.inference_mode():
        s1 = s2 = state
        for t in range(T):
            y1, s1 = eager(x[:, t : t + 1], s1, starts[:, t : t + 1])
            y2, s2 = compiled(x[:, t : t + 1], s2, starts[:, t : t + 1])
            torch.testing.assert_close(y2, y1, atol=ATOL, rtol=1e-4)

    # A compiled core records nothing: its graph cannot look at whether a recording is on.
    with torch.inference_mode(), recording() as rec:
        compiled(x[:, :1], state, starts[:, :1])
    assert rec == {}


@pytest.mark.parametrize(
    "name, hyperparameters",
    [
        ("tlb", dict(d_model=16, chunk_size=4, n_slow=2, n_heads=2)),
        ("tlb", dict(d_model=16, chunk_size=4, n_slow=2, n_heads=2, slow_update="parallel")),
        ("tlb", dict(d_model=16, chunk_size=3, n_slow=2, n_layers=3, cross_every=1, n_heads=2, gated=False)),
        ("tlb", dict(d_model=16, chunk_size=5, n_slow=2, n_layers=3, cross_every=2, n_heads=2, slow_reads="output")),
        ("transformer", dict(d_model=16, window=4, n_heads=2)),
        ("none", dict(hidden_size=16)),
    ],
)
def test_compilable_cores_trace_whole(name, hyperparameters, monkeypatch):
    # compile_core does not ask for fullgraph (see there), so a graph break would only cost speed: caught here.
    # Dynamo's "eager" backend traces as inductor would, without compiling kernels. TLB is traced on the path a
    # GPU takes (no host read); on a CPU it reads its clock once, on purpose (next test).
    assert CORES[name].compilable
    monkeypatch.setattr(tlb_module, "_static", lambda t: True)
    core = torch.compile(make_core(name, 5, **hyperparameters), fullgraph=True, dynamic=False, backend="eager")
    x, starts = torch.randn(2, 9, 5), torch.rand(2, 9) < 0.2
    y, state = core(x, core.initial_state(2), starts)
    y.sum().backward()
    with torch.inference_mode():
        for t in range(3):
            _, state = core(x[:, t : t + 1], state, starts[:, t : t + 1])


def test_compiled_tlb_on_a_cpu_breaks_once_to_read_its_clock():
    """One graph break in a sequence call (the clock read that spares a chunk of padding), none in a step."""
    core = torch.compile(make_core("tlb", 5, d_model=16, chunk_size=4, n_slow=2, n_heads=2), backend="eager")
    x, starts = torch.randn(2, 8, 5), torch.rand(2, 8) < 0.2
    counters.clear()
    core(x, core.initial_state(2), starts)
    assert ["_any" in reason for reason in counters["graph_break"]] == [True]
    counters.clear()
    with torch.inference_mode():
        core(x[:, :1], core.initial_state(2), starts[:, :1])
    assert not counters["graph_break"]


def test_agent_compiles_its_core_and_saves_plain_weights(tmp_path):
    model = PPO("tmaze", core="none", compile=True, n_envs=2, n_steps=8, batch_size=16, vectorization="sync")
    assert model.policy.core._compiled_call_impl is not None  # what nn.Module.compile sets
    model.learn(32, progress=False)
    model.save(tmp_path / "m.pt")
    assert PPO.load(tmp_path / "m.pt").policy.core._compiled_call_impl is not None  # the saved config compiles
    # Loaded without compiling: the checkpoint holds the module's own keys, not a compiled wrapper's.
    loaded = PPO.load(tmp_path / "m.pt", compile=False)
    assert loaded.config.compile is False and loaded.policy.core._compiled_call_impl is None
    env = model.make_eval_env()
    obs = np.stack([env.reset(seed=s)[0] for s in (3, 4)])
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize("core", ["lstm", "brsm"])
def test_compile_refuses_a_core_it_cannot_trace(core):
    with pytest.raises(
        UserError, match=rf"core '{core}' cannot be compiled: drop compile=true.*\(tlb, transformer, none\)"
    ):
        PPO("tmaze", core=core, compile=True, n_envs=2, n_steps=8, batch_size=16, vectorization="sync")
