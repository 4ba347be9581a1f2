"""What bRSM promises beyond the core contract (tests/test_cores.py runs that on it too): k-winners
sparsity, the boosting rule, gradients local in time, train-mode step/sequence equivalence, and a
prediction loss that learns."""

from __future__ import annotations

import copy

import pytest
import torch

from tlb_rl.cores import make_core
from tlb_rl.cores.brsm import BRSMCore

IN = 6


@pytest.fixture(autouse=True)
def one_thread():
    """bRSM steps through time in many small ops: one thread runs them faster, and a busy machine's other
    work slows them less."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(seed: int = 0, **hp) -> BRSMCore:
    torch.manual_seed(seed)
    return make_core("brsm", IN, **{"m": 10, "k": 3, **hp})


def no_starts(B: int, T: int) -> torch.Tensor:
    return torch.zeros(B, T, dtype=torch.bool)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("n", [1, 4])
def test_exactly_k_units_active_one_per_winning_group(n, mode):
    core = build(n=n).train(mode == "train")
    B, T = 5, 30
    gen = torch.Generator().manual_seed(1)
    starts = torch.rand(B, T, generator=gen) < 0.1
    with torch.no_grad():
        y, _ = core(torch.randn(B, T, IN, generator=gen), core.initial_state(B), starts)
    active = (y != 0).view(B, T, core.m, n)
    assert (active.sum((-1, -2)) == core.k).all(), "every step has exactly k active cells"
    assert (active.sum(-1) <= 1).all(), "at most one cell per group"


def test_winners_follow_boosted_values():
    """A group that loses on raw pre-activation wins once a low duty cycle boosts it (n = 2: the best
    boosted cell of the group is the one that fires)."""
    core = build(m=4, n=2, k=1)
    sigma = torch.tensor([[0.0, 0.1, 0.0, 0.2, 0.0, 1.0, 0.0, 0.3]])  # group 2, cell 1 leads unboosted
    assert core.winners(sigma).nonzero()[:, 1].tolist() == [5]
    core.duty_cycle.copy_(torch.tensor([0.5, 0.5, 0.5, 0.0, 0.9, 0.9, 0.5, 0.5]))  # group 1's cell 1 is starved
    assert core.winners(sigma).nonzero()[:, 1].tolist() == [5], "boost factors change only when refreshed"
    core.refresh_boost()
    assert core.winners(sigma).nonzero()[:, 1].tolist() == [3]
    core.boost_strength.zero_()  # no boosting: raw order again
    core.eval()  # which refreshes too
    assert core.winners(sigma).nonzero()[:, 1].tolist() == [5]


def test_duty_cycles_and_boost_follow_the_rule():
    core = build(duty_cycle_period=20, boost_decay_steps=7, boost_strength=1.5, boost_decay=0.5)
    B, T, P = 3, 16, 20
    x = torch.randn(B, T, IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        core.eval()
        core(x, core.initial_state(B), no_starts(B, T))
        assert torch.count_nonzero(core.duty_cycle) == 0 and core.train_steps == 0, "eval mode changes nothing"
        core.train()
        boost = core.boost.clone()
        y, _ = core(x, core.initial_state(B), no_starts(B, T))
        assert torch.equal(core.boost, boost), "a training call ranks with the boost factors it started with"
    expected = torch.zeros(core.output_dim)
    for t in range(T):  # d <- d (P - B) / P + (cells active in the batch) / P, after every step
        expected = expected * (P - B) / P + (y[:, t] != 0).float().sum(0) / P
    torch.testing.assert_close(core.duty_cycle, expected)
    assert core.train_steps == T
    assert core.boost_strength.item() == pytest.approx(1.5 * 0.5 ** (T // 7))
    torch.testing.assert_close(core.boost_factor(), torch.exp((3 / 10 - expected) * 1.5 * 0.5 ** (T // 7)))
    assert core.boost_factor()[expected == 0].gt(1).all() and core.boost_factor()[expected > 0.3].lt(1).all()
    core.eval()  # PPO's next rollout ranks with the new factors
    torch.testing.assert_close(core.boost, core.boost_factor())


def test_train_mode_one_call_equals_many_calls_including_boosting():
    core = build(n=2, duty_cycle_period=10, boost_decay_steps=4).train()
    B, T = 4, 13
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, IN, generator=gen)
    starts = torch.rand(B, T, generator=gen) < 0.2
    stepped = copy.deepcopy(core)
    y_all, s_all = core(x, core.initial_state(B), starts)
    state, ys = stepped.initial_state(B), []
    for t in range(T):
        y, state = stepped(x[:, t : t + 1], state, starts[:, t : t + 1])
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_all, atol=1e-5, rtol=0)
    torch.testing.assert_close(state["trace"], s_all["trace"], atol=1e-5, rtol=0)
    for name, buf in core.named_buffers():
        torch.testing.assert_close(dict(stepped.named_buffers())[name], buf, atol=1e-6, rtol=0)
    assert core.boost_strength < 1.2, "the boost strength decayed in this test"


def _capture_predictions(core: BRSMCore) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    core.w_d.register_forward_hook(lambda module, args, result: out.append(result))
    return out


@pytest.mark.parametrize("n", [1, 3])
def test_no_gradient_reaches_inputs_of_earlier_steps(n):
    """Both what the policy reads (attached output) and the prediction of x_{t+1} made at step t depend,
    through gradients, on x_t only, although their values depend on earlier inputs."""
    core = build(n=n, detach_output=False).train()
    B, T = 2, 9
    x = torch.randn(B, T, IN, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    predictions = _capture_predictions(core)
    y, _ = core(x, core.initial_state(B), no_starts(B, T))
    (pred,) = predictions  # [B, T-1, IN]
    r = torch.randn(core.output_dim, generator=torch.Generator().manual_seed(5))
    for t in range(T - 1):
        for what, value in (("output", (y[0, t] * r).sum()), ("prediction", pred[0, t].sum())):
            (grad,) = torch.autograd.grad(value, x, retain_graph=True)
            assert torch.count_nonzero(grad[0, t]) > 0, f"{what} {t} ignores its own input"
            assert torch.count_nonzero(grad[0, :t]) == 0, f"{what} {t}: gradient reaches an earlier step"
            assert torch.count_nonzero(grad[0, t + 1 :]) == 0 and torch.count_nonzero(grad[1]) == 0
    (grad,) = torch.autograd.grad(core.auxiliary_loss(), x)
    assert torch.count_nonzero(grad[:, -1]) == 0, "the target x_{t+1} is detached"
    # ... while the value of a later step does depend on an earlier input (the memory is in the trace)
    x2 = x.detach().clone()
    x2[0, 0] += 1.0
    with torch.no_grad():
        y2, _ = core.eval()(x2, core.initial_state(B), no_starts(B, T))
        y1, _ = core(x.detach(), core.initial_state(B), no_starts(B, T))
    assert not torch.allclose(y2[0, 1:], y1[0, 1:])


def test_output_is_detached_by_default_and_the_option_attaches_it():
    x = torch.randn(2, 5, IN)
    y, _ = build().train()(x, build().initial_state(2), no_starts(2, 5))
    assert not y.requires_grad
    core = build(detach_output=False).train()
    y, _ = core(x, core.initial_state(2), no_starts(2, 5))
    y.sum().backward()
    assert torch.count_nonzero(core.w_a.weight.grad) > 0 and core.w_d.weight.grad is None


def test_auxiliary_loss_masks_pairs_across_episode_starts_and_needs_two_steps():
    core = build().train()
    x = torch.randn(1, 4, IN, generator=torch.Generator().manual_seed(6))
    predictions = _capture_predictions(core)
    starts = torch.tensor([[True, False, True, False]])  # scored pairs: (0, 1) and (2, 3)
    core(x, core.initial_state(1), starts)
    err = ((predictions[0] - x[:, 1:]) ** 2).mean(-1)[0]
    torch.testing.assert_close(core.auxiliary_loss(), (err[0] + err[2]) / 2)
    core(x[:, :1], core.initial_state(1), starts[:, :1])
    assert core.auxiliary_loss() is None
    with torch.no_grad():
        core(x, core.initial_state(1), starts)
    assert core.auxiliary_loss() is None


def test_decay_is_capped_and_learned():
    core = build(max_decay=0.95)
    with torch.no_grad():
        core.decay_logit.fill_(50.0)
    assert core.decay().max() <= 0.95 and core.decay().min() > 0.9
    core = build().train()
    core(torch.randn(3, 12, IN), core.initial_state(3), no_starts(3, 12))
    core.auxiliary_loss().backward()
    assert torch.count_nonzero(core.decay_logit.grad) > 0


def test_auxiliary_loss_decreases_on_a_repeating_sequence():
    """Episodes of three steps repeat, B A D or C A E (first step drawn at random per row and episode):
    after A, only the trace of the step before says whether D or E comes. The best predictor without
    memory says (D + E) / 2 there; bRSM must do far better."""
    core = build(m=32, k=4)
    opt = torch.optim.Adam(core.parameters(), lr=1e-2)
    a, b, c, d, e = torch.randn(5, IN, generator=torch.Generator().manual_seed(7))
    memoryless = ((d - e) ** 2 / 4).mean().item() / 2  # its MSE: error on one of the two scored pairs
    gen = torch.Generator().manual_seed(8)
    starts = torch.zeros(16, 12, dtype=torch.bool)
    starts[:, ::3] = True  # 4 episodes per row; the pair across an episode start is not scored
    losses = []
    for _ in range(150):
        first_b = torch.rand(16, 4, 1, 1, generator=gen) < 0.5
        x = torch.where(first_b, torch.stack([b, a, d]), torch.stack([c, a, e])).view(16, 12, IN)
        core(x, core.initial_state(16), starts)
        loss = core.auxiliary_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        core.refresh_boost()  # a loop that never switches to eval mode refreshes the boost itself
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.25 * memoryless < 0.2 * first, f"aux loss {first:.3f} -> {last:.3f} (memoryless {memoryless:.3f})"


def test_bad_sizes_are_user_errors():
    from tlb_rl.errors import UserError

    with pytest.raises(UserError, match="k"):
        make_core("brsm", IN, m=4, k=5)
    with pytest.raises(UserError, match="max_decay"):
        make_core("brsm", IN, max_decay=1.0)
