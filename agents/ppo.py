"""PPO with a swappable sequence-memory core (TLB by default), in the style of Stable-Baselines3's API.

    model = PPO("MiniGrid-MemoryS7-v0", core="tlb", env_kwargs={"view_size": 3})
    model.learn(1_000_000)
    action, state = model.predict(obs, state, episode_start)

Rollouts store each env's core state where a training segment begins; the update re-runs the core over
whole segments with the current parameters, so no hidden state is stale inside a segment.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from agents.base import Agent, AgentConfig, spec_name
from agents.buffer import RolloutBatch, RolloutBuffer, explained_variance
from agents.evaluate import episode_success
from agents.resume import Carry, restore_rng, restore_rollout, rng_snapshot, rollout_snapshot
from envs import make_vec_env
from envs.seeding import VALIDATION_SEED_BASE
from tlb_rl.cores import State
from tlb_rl.encoders import obs_to_tensor
from tlb_rl.errors import TrainingError, UserError
from tlb_rl.logger import RunLogger
from tlb_rl.spaces import clip_to_space, stack_observations


@dataclass
class PPOConfig(AgentConfig):
    """Everything a PPO run depends on; a YAML config under configs/ppo/ holds a subset of these keys.

    The keys every agent has (env, core, seed, device, run_dir, eval_episodes, early stopping, init_from ...)
    are documented in :class:`agents.base.AgentConfig`.
    """

    total_frames: int = 1_000_000
    """Environment steps to train for, summed over envs."""
    n_envs: int = 8
    """Parallel environments."""
    n_steps: int = 128
    """Steps per env in one rollout."""
    seq_len: int | None = None
    """Length of the training segments the rollout is cut into (None: whole rollouts, ``n_steps``)."""
    batch_size: int = 256
    """Steps per minibatch (a multiple of ``seq_len``)."""
    n_epochs: int = 4
    """Passes over each rollout."""
    learning_rate: float = 2.5e-4
    """Adam's step size (at the start, when annealed)."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over ``total_frames``."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE's lambda: 0 is one-step TD, 1 Monte Carlo."""
    clip_range: float = 0.2
    """PPO's clip of the probability ratio."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss, the mean squared error of the values (as in SB3)."""
    max_grad_norm: float = 0.5
    """Clip of the global gradient norm."""
    normalize_advantage: bool = True
    """Normalise advantages per minibatch."""
    target_kl: float | None = None
    """Stop an update's epochs early once the approximate KL exceeds this."""
    vectorization: str = "auto"
    """``sync`` (one process), ``async`` (a process per env) or ``auto``."""
    eval_every: int = 100_000
    """Frames between evaluations on held-out validation seeds, which pick ``best.pt`` (0: none)."""
    checkpoint_every: int = 20
    """Updates between checkpoints of the latest state."""

    def __post_init__(self) -> None:
        at_least = {"total_frames": 1, "n_envs": 1, "n_steps": 1, "batch_size": 1, "n_epochs": 1}
        at_least |= {"checkpoint_every": 1, "eval_every": 0, "seq_len": 1}
        self.check_ranges("PPO", at_least, positive=("learning_rate", "clip_range", "max_grad_norm"))
        if self.vectorization not in ("auto", "sync", "async"):
            raise UserError(f"vectorization must be auto, sync or async, got '{self.vectorization}'")


class PPO(Agent):
    """Proximal Policy Optimization with a sequence policy.

    :param env: anything ``envs.make_env`` takes (an id, ``module:Factory``, a callable).
    :param core: the memory core's name.
    :param hyperparameters: any other field of :class:`PPOConfig`.
    """

    algo = "ppo"
    config_class = PPOConfig
    resumable = True
    adam_eps = 1e-5
    config: PPOConfig

    def __init__(self, env: Any = "MiniGrid-MemoryS7-v0", core: str = "tlb", **hyperparameters: Any):
        super().__init__(env, core, **hyperparameters)

    @classmethod
    def budget_keys(cls, config: PPOConfig, total_frames: int, eval_every: int, where: str) -> dict[str, int]:
        frames_per_update = config.n_envs * config.n_steps
        if eval_every % frames_per_update:
            # PPO evaluates after the first update past each multiple of eval_every.
            raise UserError(
                f"{where}: eval_every ({eval_every}) must be a multiple of n_envs * n_steps ({frames_per_update})"
            )
        return {"total_frames": total_frames, "eval_every": eval_every}

    def sequences_per_step(self) -> int:
        return self.config.n_envs

    def _init_training_state(self) -> None:
        cfg = self.config
        if cfg.n_steps % self.seq_len or cfg.batch_size % self.seq_len:
            raise UserError(
                f"seq_len ({self.seq_len}) must divide n_steps ({cfg.n_steps}) and batch_size ({cfg.batch_size})"
            )
        self.envs: gym.vector.VectorEnv | None = None
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self._carry: Carry | None = None
        self._episode_stats = _EpisodeStats(cfg.n_envs)
        self._saved_rollout: dict[str, Any] | None = None  # a loaded checkpoint's in-flight rollout

    @property
    def seq_len(self) -> int:
        return self.config.seq_len or self.config.n_steps

    # ------------------------------------------------------------------ acting
    def predict(
        self,
        obs: Any,
        state: State | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, State]:
        """Actions for a batch of observations (leading dim = envs), SB3-style.

        :param state: the state returned by the previous call (None: fresh episodes).
        :param episode_start: [envs] bools, true where an episode begins with this observation.
        :return: actions as a numpy array and the new core state.
        """
        obs_t = obs_to_tensor(obs, self.device)
        n = next(iter(obs_t.values())).shape[0] if isinstance(obs_t, dict) else obs_t.shape[0]
        if state is None:
            state = self.policy.initial_state(n, self.device)
            episode_start = np.ones(n, dtype=bool)
        starts = torch.as_tensor(
            np.zeros(n, dtype=bool) if episode_start is None else episode_start, device=self.device
        ).bool()
        self.policy.eval()
        actions, _, _, state = self.policy.act(obs_t, state, starts, deterministic)
        # act's tensors are inference tensors; a user may edit the state in place or backpropagate through it.
        return clip_to_space(actions.cpu().numpy(), self.action_space), {k: v.clone() for k, v in state.items()}

    # ------------------------------------------------------------------ training
    def learn(
        self, total_frames: int | None = None, callback: Callable[..., bool | None] | None = None, progress: bool = True
    ) -> PPO:
        """Train until ``total_frames`` frames (default: the config's) have been collected in all, or an early
        stop (``target_success``, ``patience``).

        :param callback: called as ``callback(model, metrics)`` after every update; returning False stops.
        """
        cfg = self.config
        total = total_frames or cfg.total_frames
        run_dir = self.run_dir
        if run_dir is not None:
            self.make_run_dir()
        self._ensure_envs()
        buffer = RolloutBuffer(cfg.n_steps, cfg.n_envs, self.seq_len, self.device)
        logger = RunLogger(run_dir, total, progress, start_frames=self.frames)
        next_eval = (self.frames // cfg.eval_every + 1) * cfg.eval_every if cfg.eval_every else math.inf
        try:
            with self._interrupt_after_update():
                while self.frames < total and not self._stop_requested and not self._should_stop():
                    t0 = time.perf_counter()
                    self._collect(buffer)
                    t1 = time.perf_counter()
                    metrics = self._update(buffer, total)
                    t2 = time.perf_counter()
                    self.frames += cfg.n_steps * cfg.n_envs
                    self.updates += 1
                    metrics.update(self._episode_stats.flush())
                    metrics["time/fps"] = cfg.n_steps * cfg.n_envs / (t2 - t0)
                    metrics["time/rollout_s"], metrics["time/update_s"] = t1 - t0, t2 - t1
                    if self.frames >= next_eval:
                        metrics.update(self._validate())
                        next_eval = (self.frames // cfg.eval_every + 1) * cfg.eval_every
                    logger.log(self.frames, metrics)
                    if run_dir is not None and self.updates % cfg.checkpoint_every == 0:
                        self.save(run_dir / "checkpoints" / "latest.pt")
                    if callback is not None and callback(self, metrics) is False:
                        break
        finally:
            logger.close()
        if run_dir is not None:
            self.save(run_dir / "checkpoints" / "latest.pt")
        self._raise_if_interrupted()
        return self

    def _ensure_envs(self) -> gym.vector.VectorEnv:
        cfg = self.config
        if self.envs is None:
            envs = make_vec_env(
                self.env_spec, cfg.n_envs, seed=cfg.seed, vectorization=cfg.vectorization, **cfg.env_kwargs
            )
            # A loaded model may meet an env other than the one it was built for.
            for kind, have, want in [
                ("observation", envs.single_observation_space, self.observation_space),
                ("action", envs.single_action_space, self.action_space),
            ]:
                if have != want:
                    envs.close()
                    raise UserError(f"env '{cfg.env}' has {kind} space {have}, but the model was built for {want}")
            self.envs = envs
            if self._saved_rollout is not None:
                expected = self.policy.initial_state(cfg.n_envs, "cpu")
                restored = restore_rollout(
                    self._saved_rollout, envs, expected, cfg.core, spec_name(self.env_spec), cfg.env_kwargs, self.device
                )
                if restored is not None:
                    self._carry, self._episode_stats.ret, self._episode_stats.length = restored
                self._saved_rollout = None
        return self.envs

    def _rollout_snapshot(self) -> dict[str, Any] | None:
        if self._carry is None or self.envs is None:
            return None
        stats = self._episode_stats
        env = spec_name(self.env_spec)
        return rollout_snapshot(self.envs, self._carry, env, self.config.env_kwargs, stats.ret, stats.length)

    def close(self) -> None:
        """Close the environments (their worker processes, if any); a later ``learn`` replays their episodes."""
        if self.envs is not None:
            self._saved_rollout, self._carry = self._rollout_snapshot(), None
            self.envs.close()
            self.envs = None

    def _collect(self, buffer: RolloutBuffer) -> None:
        cfg, envs, dev = self.config, self.envs, self.device
        assert envs is not None
        if self._carry is None:
            # A resumed run restarts its episodes on fresh seeds, all below the evaluation seeds.
            obs, _ = envs.reset(seed=(cfg.seed + 7919 * self.updates) % (VALIDATION_SEED_BASE - cfg.n_envs))
            with torch.inference_mode():  # as every later acting state is: a compiled core then traces acting once
                state = self.policy.initial_state(cfg.n_envs, dev)
            self._carry = Carry(obs, state, torch.ones(cfg.n_envs, dtype=torch.bool, device=dev))
        obs, state, starts = self._carry
        self.policy.eval()
        for t in range(cfg.n_steps):
            obs_t = obs_to_tensor(obs, dev)
            prev_state = state
            actions, log_probs, values, state = self.policy.act(obs_t, state, starts)
            # The env gets actions inside its bounds; the buffer keeps the sampled ones for their log-prob.
            act_np = clip_to_space(actions.cpu().numpy(), self.action_space)
            obs, rewards, terminated, truncated, info = envs.step(act_np)
            rewards_t = torch.as_tensor(rewards, dtype=torch.float32, device=dev)
            if truncated.any():
                rewards_t += cfg.gamma * self._final_values(info, truncated & ~terminated, state)
            dones = np.logical_or(terminated, truncated)
            next_starts = torch.as_tensor(dones, device=dev)  # an episode that ended starts anew next step
            buffer.add(t, obs_t, prev_state, starts, actions, log_probs, values, rewards_t, next_starts)
            self._episode_stats.step(rewards, dones, info)
            starts = next_starts
        last_values = self.policy.value(obs_to_tensor(obs, dev), state, starts)
        buffer.finish(last_values, cfg.gamma, cfg.gae_lambda)
        self._carry = Carry(obs, state, starts)

    # Eager even with compile=True: the batch is the truncated rows, and each new size would be another graph.
    @torch.compiler.set_stance("force_eager")
    def _final_values(self, info: dict[str, Any], rows: np.ndarray, state: State) -> torch.Tensor:
        """gamma-free V(final observation) for the truncated rows, 0 elsewhere: truncation is no end of task."""
        idx = np.flatnonzero(rows)
        out = torch.zeros(len(rows), device=self.device)
        if len(idx) == 0:
            return out
        stacked = stack_observations(list(info["final_obs"][idx]))
        rows_t = torch.as_tensor(idx, device=self.device)
        sub_state = {k: v[rows_t] for k, v in state.items()}
        no_start = torch.zeros(len(idx), dtype=torch.bool, device=self.device)
        out[rows_t] = self.policy.value(obs_to_tensor(stacked, self.device), sub_state, no_start)
        return out

    def _update(self, buffer: RolloutBuffer, total: int) -> dict[str, float]:
        cfg = self.config
        if cfg.anneal_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.learning_rate * max(0.0, 1.0 - self.frames / total)
        self.policy.train()
        stats: dict[str, list[float]] = {}
        for _ in range(cfg.n_epochs):
            epoch_kl = []
            for batch in buffer.minibatches(cfg.batch_size, self._generator):
                for k, v in self._gradient_step(batch).items():
                    stats.setdefault(k, []).append(v)
                epoch_kl.append(stats["train/approx_kl"][-1])
            if cfg.target_kl is not None and np.mean(epoch_kl) > cfg.target_kl:
                break
        metrics = {k: float(np.mean(v)) for k, v in stats.items()}
        metrics["train/explained_variance"] = explained_variance(buffer.values.flatten(), buffer.returns.flatten())
        metrics["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _gradient_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One clipped-PPO step on a minibatch of segments."""
        cfg = self.config
        dist, values, _ = self.policy(batch.obs, batch.states, batch.episode_starts, state_grad=False)
        B, T = batch.episode_starts.shape
        log_probs = dist.log_prob(batch.actions.reshape(B * T, *batch.actions.shape[2:])).view(B, T)
        adv = batch.advantages
        if cfg.normalize_advantage and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        log_ratio = log_probs - batch.log_probs
        ratio = log_ratio.exp()
        policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range) * adv).mean()
        value_loss = F.mse_loss(values, batch.returns)  # SB3's weighting: vf_coef * MSE (CleanRL halves it)
        entropy = dist.entropy().mean()
        loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
        aux = self.policy.core.auxiliary_loss()
        if aux is not None:
            loss = loss + aux
        if not torch.isfinite(loss):
            self._numerical_fault(f"the loss became {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm, foreach=True)
        if not torch.isfinite(grad_norm):
            self._numerical_fault(f"the gradient norm became {grad_norm.item()}")
        self.optimizer.step()
        with torch.no_grad():
            approx_kl = ((ratio - 1) - log_ratio).mean().item()
            clip_fraction = ((ratio - 1).abs() > cfg.clip_range).float().mean().item()
        return {
            "train/policy_loss": policy_loss.item(),
            "train/value_loss": value_loss.item(),
            "train/entropy": entropy.item(),
            "train/approx_kl": approx_kl,
            "train/clip_fraction": clip_fraction,
            "train/grad_norm": grad_norm.item(),
            **({"train/aux_loss": aux.item()} if aux is not None else {}),
        }

    def _numerical_fault(self, what: str) -> None:
        where = f" ({self.run_dir / 'checkpoints' / 'latest.pt'})" if self.run_dir is not None else ""
        raise TrainingError(
            f"{what} in update {self.updates + 1} (frames {self.frames}); training stopped before the bad step, "
            f"and the last checkpoint{where} is the last good state"
        )

    # ------------------------------------------------------------------ persistence
    def _extra_checkpoint(self) -> dict[str, Any]:
        return {"rollout": self._rollout_snapshot(), "rng": rng_snapshot(self._generator)}

    def _restore(self, data: dict[str, Any]) -> None:
        super()._restore(data)
        if "rng" in data:  # not in a weights-only file
            restore_rng(data["rng"], self._generator)
        self._saved_rollout = data.get("rollout")


class _EpisodeStats:
    """Returns, lengths and successes of the episodes that finished since the last flush."""

    def __init__(self, n_envs: int):
        self.ret, self.length = np.zeros(n_envs), np.zeros(n_envs, dtype=int)
        self.finished: list[tuple[float, int, bool]] = []

    def step(self, rewards: np.ndarray, dones: np.ndarray, info: dict[str, Any]) -> None:
        self.ret += rewards
        self.length += 1
        for i in np.flatnonzero(dones):
            # Same-step autoreset: the finished episode's info is under "final_info".
            final = info.get("final_info", {})
            reported = "is_success" in final and final["_is_success"][i]
            env_info = {"is_success": final["is_success"][i]} if reported else {}
            self.finished.append((float(self.ret[i]), int(self.length[i]), episode_success(self.ret[i], env_info)))
            self.ret[i], self.length[i] = 0.0, 0

    def flush(self) -> dict[str, float]:
        if not self.finished:
            return {}
        r, n, s = zip(*self.finished, strict=True)
        self.finished = []
        return {
            "rollout/return": float(np.mean(r)),
            "rollout/length": float(np.mean(n)),
            "rollout/success_rate": float(np.mean(s)),
            "rollout/episodes": float(len(r)),
        }


__all__ = ["PPO", "PPOConfig"]
