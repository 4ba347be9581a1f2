"""bRSM: boosted Recurrent Sparse Memory (Rawlinson, Gordon, Ahmad 2019, arXiv 1912.01116).

A sparse predictive autoencoder with a recurrent memory that is trained only with information local in
time: the recurrent state is detached before every step, so no gradient reaches an earlier step and the
training graph of a T-step call is T independent one-step graphs (no backpropagation through time).

One step, for a layer of m groups x n cells (n = 1 is the paper's best "flattened" variant)::

    sigma_t = W_a x_t (shared by the n cells of a group) + W_b r^_{t-1}          # [B, m*n]
    winners = top-k groups by max boosted cell, then the best boosted cell in each   (not differentiated)
    y_t     = tanh(mask_t * sigma_t)                                               # the core's output
    r_t     = max(decay * r_{t-1}, y_t), entries below `trace_floor` set to 0      # decaying trace
    r^_t    = r_t * k / sum(r_t)                                                    # next step's recurrent input
    p_t     = W_d r_t                                                               # prediction of x_{t+1}

Boosting: every unit keeps a duty cycle d (running fraction of steps it won, period `duty_cycle_period`)
and is ranked by its shifted pre-activation (sigma - min + 1, so all are positive) times
exp((k / (m*n) - d) * strength): rarely used cells win more often, which spreads the code over more cells.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tlb_rl.cores.base import Core, State, check_inputs, check_sizes, reset_rows


class BRSMCore(Core):
    """The bRSM layer as a sequence core; see the module docstring for the step.

    Training signal: :meth:`auxiliary_loss` is the MSE between the prediction p_t made at step t and the
    next input x_{t+1} (detached: a target the encoder could move would let it make its embeddings
    trivially predictable). Pairs whose step t+1 starts an episode are masked out, and so is the pair that
    crosses the end of the call (its target is not known yet): a call of T steps scores T - 1 pairs, so
    PPO's 64-128-step segments lose one pair in 64-128 and acting (T = 1, no gradient) computes nothing.
    The decoder reads the trace r_t, so the learned decay gets a gradient within the step.

    Output: y_t, detached by default as the paper's classifier reads it: the policy's heads then learn on
    top of a memory that only the prediction loss shapes. ``detach_output=False`` lets the policy's
    gradient reach the current step's sigma_t (still never an earlier step).

    Boosting: the duty cycles (buffer ``duty_cycle``) are updated after every time step of a training-mode
    forward call; RL has no epochs, so the boost strength is multiplied by ``boost_decay`` every
    ``boost_decay_steps`` training time steps (a PPO update with 4 epochs over 64-step segments in 4
    minibatches runs 1024 of them). The boost factors the winners are ranked with (buffer ``boost``) are
    refreshed from these only by :meth:`refresh_boost`, which switching the core to eval mode calls: PPO
    and BC do that before every rollout or evaluation, so a whole PPO update re-runs its rollout with the
    boost factors that acted in it (its first minibatch reproduces the rollout's log-probs), and one call
    of T steps equals T calls of one step in both modes, buffers included. A training loop that never
    switches to eval mode calls :meth:`refresh_boost` itself, once per batch or epoch.

    :param input_dim: width of the inputs x_t.
    :param m: number of groups.
    :param n: cells per group (1: flattened, every cell is its own group).
    :param k: winning groups per step (exactly k cells are active).
    :param boost_strength: initial boost strength (the paper's 1.2).
    :param boost_decay: factor applied to the boost strength every ``boost_decay_steps`` (the paper's 0.85
        per epoch).
    :param boost_decay_steps: training time steps between two boost-strength decays.
    :param duty_cycle_period: steps over which a duty cycle averages (the paper's ~1000).
    :param max_decay: cap of the learned per-cell trace decay.
    :param trace_floor: trace entries below this are set to 0, so the memory stays sparse.
    :param aux_coef: weight of the next-input prediction loss.
    :param detach_output: hand the policy the detached activity (default, as in the paper).
    """

    def __init__(
        self,
        input_dim: int,
        m: int = 256,
        n: int = 1,
        k: int = 25,
        boost_strength: float = 1.2,
        boost_decay: float = 0.85,
        boost_decay_steps: int = 1000,
        duty_cycle_period: int = 1000,
        max_decay: float = 0.95,
        trace_floor: float = 0.01,
        aux_coef: float = 1.0,
        detach_output: bool = True,
    ):
        super().__init__()
        check_sizes(m=m, n=n, k=k, boost_decay_steps=boost_decay_steps, duty_cycle_period=duty_cycle_period)
        if k > m:
            raise ValueError(f"k (winning groups) must be at most m = {m}, got {k}")
        if not 0.0 < max_decay < 1.0:
            raise ValueError(f"max_decay must be in (0, 1), got {max_decay}")
        self.input_dim, self.m, self.n, self.k = input_dim, m, n, k
        self.output_dim = units = m * n
        self.max_decay, self.trace_floor, self.aux_coef = max_decay, trace_floor, aux_coef
        self.boost_decay, self.boost_decay_steps, self.period = boost_decay, boost_decay_steps, duty_cycle_period
        self.detach_output = detach_output
        self.w_a = nn.Linear(input_dim, m)  # feed-forward weights, shared by the cells of a group
        self.w_b = nn.Linear(units, units)  # recurrent weights, per cell
        self.w_d = nn.Linear(units, input_dim)  # decoder: the trace predicts the next input
        # Per-cell decay = max_decay * sigmoid(logit), started at 0.9 so a cue survives a few dozen steps.
        self.decay_logit = nn.Parameter(torch.full((units,), math.log(0.9 / (max_decay - 0.9))))
        self.register_buffer("duty_cycle", torch.zeros(units))
        self.register_buffer("boost_strength", torch.tensor(float(boost_strength)))
        self.register_buffer("train_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("boost", self.boost_factor())
        self._aux: torch.Tensor | None = None

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return {"trace": torch.zeros(batch_size, self.output_dim, device=device or self.device)}

    def decay(self) -> torch.Tensor:
        """The per-cell trace decay, in (0, max_decay)."""
        return self.max_decay * torch.sigmoid(self.decay_logit)

    def boost_factor(self) -> torch.Tensor:
        """exp((target density - duty cycle) * strength) per unit: > 1 for cells that win too rarely."""
        return torch.exp((self.k / self.output_dim - self.duty_cycle) * self.boost_strength)

    @torch.no_grad()
    def refresh_boost(self) -> None:
        """Rank winners with the boost factors of the current duty cycles and strength from now on."""
        self.boost.copy_(self.boost_factor())

    def train(self, mode: bool = True) -> BRSMCore:
        if not mode:
            self.refresh_boost()  # the start of a rollout or an evaluation: the boost's "epoch boundary"
        return super().train(mode)

    def winners(self, sigma: torch.Tensor) -> torch.Tensor:
        """Binary mask [B, m*n] of the k winning cells: the top-k groups, then the best cell of each."""
        B = sigma.shape[0]
        pi = (sigma - sigma.min(-1, keepdim=True).values + 1.0) * self.boost  # positive, boosted
        best, cell = pi.view(B, self.m, self.n).max(-1)  # [B, m]: each group's best cell
        groups = best.topk(self.k, -1).indices  # [B, k]
        mask = torch.zeros(B, self.m, self.n, device=sigma.device)
        mask[torch.arange(B, device=sigma.device)[:, None], groups, cell.gather(1, groups)] = 1.0
        return mask.view(B, -1)

    @torch.no_grad()
    def _update_boosting(self, mask: torch.Tensor) -> None:
        """One training step's duty-cycle update (nupic's rule, with the batch as that many samples) and
        the boost-strength schedule."""
        B = min(mask.shape[0], self.period)
        self.duty_cycle.mul_((self.period - B) / self.period).add_(mask.sum(0) / self.period)
        self.train_steps += 1
        if self.train_steps % self.boost_decay_steps == 0:
            self.boost_strength.mul_(self.boost_decay)

    def forward(
        self, x: torch.Tensor, state: State, episode_starts: torch.Tensor, *, state_grad: bool = True
    ) -> tuple[torch.Tensor, State]:
        check_inputs(x, episode_starts, self.input_dim)
        T = x.shape[1]
        z_a = self.w_a(x).repeat_interleave(self.n, -1)  # [B, T, m*n]: one value per group, for each cell
        decay, trace = self.decay(), state["trace"]
        ys, traces = [], []
        for t in range(T):  # inherent: step t's winners depend on the trace of step t-1
            prev = reset_rows(trace, episode_starts[:, t]).detach()  # the state is detached every step
            recurrent = prev * (self.k / prev.sum(-1, keepdim=True).clamp_min(1e-6))  # sums to k (or is 0)
            sigma = z_a[:, t] + self.w_b(recurrent)  # [B, m*n]
            mask = self.winners(sigma.detach())  # the selection is not differentiated
            y = torch.tanh(mask * sigma)
            trace = torch.maximum(decay * prev, y)
            trace = trace * (trace >= self.trace_floor)
            if self.training:
                self._update_boosting(mask)
            ys.append(y)
            traces.append(trace)
        y, traces = torch.stack(ys, 1), torch.stack(traces, 1)  # [B, T, m*n]
        self._aux = None
        if torch.is_grad_enabled() and T > 1:
            valid = ~episode_starts[:, 1:]  # [B, T-1]: pairs (t, t+1) inside one episode and this call
            err = F.mse_loss(self.w_d(traces[:, :-1]), x[:, 1:].detach(), reduction="none").mean(-1)
            self._aux = self.aux_coef * (err * valid).sum() / valid.sum().clamp_min(1)
        return (y.detach() if self.detach_output else y), {"trace": trace.detach()}

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The next-input prediction loss of the last forward call (None without gradient or with T = 1)."""
        return self._aux
