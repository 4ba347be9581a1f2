"""PPO with a swappable sequence-memory core (TLB by default), in the style of Stable-Baselines3's API.

    model = PPO("MiniGrid-MemoryS7-v0", core="tlb", env_kwargs={"view_size": 3})
    model.learn(1_000_000)
    action, state = model.predict(obs, state, episode_start)

Rollouts store each env's core state where a training segment begins; the update re-runs the core over
whole segments with the current parameters, so no hidden state is stale inside a segment.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from agents.buffer import RolloutBatch, RolloutBuffer, explained_variance
from agents.evaluate import EVAL_SEED_BASE, VALIDATION_SEED_BASE, episode_success, evaluate
from envs import make_env, make_vec_env
from tlb_rl.checkpoint import load_checkpoint, save_checkpoint
from tlb_rl.config import AgentConfig, from_dict, to_dict
from tlb_rl.cores import State
from tlb_rl.encoders import obs_to_tensor
from tlb_rl.errors import TrainingError, UserError
from tlb_rl.logger import RunLogger
from tlb_rl.policy import SequencePolicy
from tlb_rl.spaces import clip_to_space, policy_spaces_from_dict, policy_spaces_to_dict, stack_observations


@dataclass
class PPOConfig(AgentConfig):
    """Everything a PPO run depends on; a YAML config under configs/ppo/ holds a subset of these keys.

    The keys every agent has (env, env_kwargs, core, core_kwargs, encoder_kwargs, seed, device,
    torch_threads, run_dir) are documented in :class:`tlb_rl.config.AgentConfig`.
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
    """Weight of the value loss."""
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
    eval_episodes: int = 100
    """Episodes per evaluation."""
    checkpoint_every: int = 20
    """Updates between checkpoints of the latest state."""
    init_from: str | None = None
    """A PPO or BC checkpoint whose policy weights training starts from (same core, spaces and encoder)."""

    def __post_init__(self) -> None:
        at_least = {"total_frames": 1, "n_envs": 1, "n_steps": 1, "batch_size": 1, "n_epochs": 1}
        at_least |= {"checkpoint_every": 1, "eval_every": 0, "eval_episodes": 1, "seq_len": 1}
        self.check_ranges("PPO", at_least, positive=("learning_rate", "clip_range", "max_grad_norm"))
        if self.vectorization not in ("auto", "sync", "async"):
            raise UserError(f"vectorization must be auto, sync or async, got '{self.vectorization}'")


def _spec_name(env: Any) -> str:
    """A string for the config: the spec itself, or where a callable spec is defined."""
    if isinstance(env, str):
        return env
    return f"{getattr(env, '__module__', '?')}:{getattr(env, '__qualname__', repr(env))}"


AUTO_CUDA_MIN_BATCH = 32
"""``device="auto"`` takes the GPU only from this many sequences per step (envs acting, streams training). A
policy of ~150k parameters is launch-bound on a GPU: on an H200 TLB-PPO with 8 envs ran 765 steps/s on the
GPU and 742 on the machine's 16 CPU cores, LSTM-PPO no faster either; with 64 envs the GPU pulled ahead."""


def resolve_device(name: str, batch: int) -> torch.device:
    """The torch device for config value ``name`` (auto, cpu, cuda, cuda:N) and ``batch`` sequences per step."""
    if name == "auto":
        use_cuda = torch.cuda.is_available() and batch >= AUTO_CUDA_MIN_BATCH
        return torch.device("cuda" if use_cuda else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but this machine has no CUDA GPU; use device=cpu or auto")
    return device


class PPO:
    """Proximal Policy Optimization with a sequence policy.

    :param env: anything ``envs.make_env`` takes (an id, ``module:Factory``, a callable).
    :param core: the memory core's name.
    :param hyperparameters: any other field of :class:`PPOConfig`.
    """

    def __init__(self, env: Any = "MiniGrid-MemoryS7-v0", core: str = "tlb", **hyperparameters: Any):
        config = from_dict(PPOConfig, {"env": _spec_name(env), "core": core, **hyperparameters}, "PPO")
        self._setup(config, env, None)

    @classmethod
    def from_config(cls, config: PPOConfig, env: Any = None) -> PPO:
        """A new model from a validated config (``env`` replaces ``config.env``, e.g. by a callable)."""
        model = cls.__new__(cls)
        model._setup(config, env, None)
        return model

    def _setup(self, config: PPOConfig, env: Any, spaces: tuple[gym.Space, gym.Space] | None) -> None:
        """Build everything from ``config``; ``env`` (None: ``config.env``) and ``spaces`` (None: probe it)."""
        self.config = cfg = config
        self.env_spec = env if env is not None else config.env
        if cfg.n_steps % self.seq_len or cfg.batch_size % self.seq_len:
            raise UserError(
                f"seq_len ({self.seq_len}) must divide n_steps ({cfg.n_steps}) and batch_size ({cfg.batch_size})"
            )
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = resolve_device(cfg.device, cfg.n_envs)
        self.envs: gym.vector.VectorEnv | None = None
        fresh = spaces is None  # not loaded from a checkpoint
        if spaces is None:
            probe = make_env(self.env_spec, **cfg.env_kwargs)
            spaces = (probe.observation_space, probe.action_space)
            probe.close()
        self.observation_space, self.action_space = spaces
        torch.manual_seed(cfg.seed)
        self.policy = SequencePolicy(*spaces, cfg.core, cfg.core_kwargs, cfg.encoder_kwargs).to(self.device)
        # fused: one kernel per parameter instead of ~10 small ops (3.0 -> 0.7 ms per step for TLB-PPO on CPU)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.learning_rate, eps=1e-5, fused=True)
        self.frames = self.updates = 0
        self.best_success = -1.0
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self._carry: tuple[Any, State, torch.Tensor] | None = None  # obs, core state, episode starts
        self._episode_stats = _EpisodeStats(cfg.n_envs)
        self._saved_rollout: dict[str, Any] | None = None  # a loaded checkpoint's in-flight rollout
        self._stop_requested = False
        if cfg.init_from and fresh:
            self._load_policy_weights(cfg.init_from)

    def _load_policy_weights(self, path: str) -> None:
        data = load_checkpoint(path)
        missing = {"policy", "spaces"} - set(data)
        if missing:
            raise UserError(f"init_from checkpoint {path} has no {', '.join(sorted(missing))}")
        saved = policy_spaces_from_dict(data["spaces"])
        if saved != (self.observation_space, self.action_space):
            raise UserError(f"init_from checkpoint {path} was made for other spaces than env '{self.config.env}'")
        try:
            self.policy.load_state_dict(data["policy"])
        except RuntimeError as e:
            lines = str(e).strip().splitlines()  # torch's first line is a header; the second names the keys
            raise UserError(
                f"init_from checkpoint {path} does not fit this policy (core '{self.config.core}', core_kwargs, "
                f"encoder_kwargs must match the saved ones): {lines[-1 if len(lines) < 2 else 1].strip()[:160]}"
            ) from None

    @property
    def seq_len(self) -> int:
        return self.config.seq_len or self.config.n_steps

    @property
    def run_dir(self) -> Path | None:
        return Path(self.config.run_dir) if self.config.run_dir else None

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
        """Train until ``total_frames`` frames (default: the config's) have been collected in all.

        :param callback: called as ``callback(model, metrics)`` after every update; returning False stops.
        """
        cfg = self.config
        total = total_frames or cfg.total_frames
        run_dir = self.run_dir
        if run_dir is not None:
            self._prepare_run_dir(run_dir)
        self._ensure_envs()
        buffer = RolloutBuffer(cfg.n_steps, cfg.n_envs, self.seq_len, self.device)
        logger = RunLogger(run_dir, total, progress, start_frames=self.frames)
        next_eval = (self.frames // cfg.eval_every + 1) * cfg.eval_every if cfg.eval_every else math.inf
        try:
            with self._interrupt_after_update():
                while self.frames < total and not self._stop_requested:
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
                        metrics.update(self._evaluate_and_keep_best())
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
        if self._stop_requested:
            self._stop_requested = False
            raise KeyboardInterrupt
        return self

    @contextlib.contextmanager
    def _interrupt_after_update(self) -> Iterator[None]:
        """A first Ctrl-C ends training after the current update (so the checkpoint is exact); a second stops now.

        Only in the main thread, where Python delivers signals.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            print("\nstopping after this update (Ctrl-C again to stop at once)", file=sys.stderr)

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

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
                self._restore_rollout(self._saved_rollout)
                self._saved_rollout = None
        return self.envs

    def _rollout_snapshot(self) -> dict[str, Any] | None:
        """The in-flight rollout as plain data: each env's seed stream and episode actions, core states."""
        if self._carry is None or self.envs is None:
            return None
        obs, state, starts = self._carry
        envs = [
            {"stream": e["stream"], "episode": e["episode"], "actions": torch.as_tensor(e["actions"])}
            for e in self.envs.call("snapshot")
        ]
        return {
            "env_spec": _spec_name(self.env_spec),
            "env_kwargs": self.config.env_kwargs,
            "envs": envs,
            "obs": {k: torch.as_tensor(v) for k, v in obs.items()} if isinstance(obs, dict) else torch.as_tensor(obs),
            "core_state": state,
            "episode_starts": starts,
            "episode_return": torch.as_tensor(self._episode_stats.ret),
            "episode_length": torch.as_tensor(self._episode_stats.length),
        }

    def _restore_rollout(self, saved: dict[str, Any]) -> None:
        """Rebuild the envs' episodes (reset with their seeds, replay their actions) and the core states."""
        cfg, envs = self.config, self.envs
        assert envs is not None
        same_setting = (
            len(saved["envs"]) == cfg.n_envs
            and saved["env_spec"] == _spec_name(self.env_spec)
            and saved["env_kwargs"] == cfg.env_kwargs
        )
        if not same_setting:
            return  # other envs than the saved ones: start fresh episodes, as a new run would
        expected = self.policy.initial_state(cfg.n_envs, "cpu")
        saved_state = saved["core_state"]
        if set(saved_state) != set(expected) or any(saved_state[k].shape != v.shape for k, v in expected.items()):
            print(
                f"warning: the checkpoint's core state does not fit core '{cfg.core}' (saved by another version of "
                "tlb-rl?); the weights are restored, the envs start fresh episodes",
                file=sys.stderr,
            )
            return
        envs.set_attr("restore_from", [{**e, "actions": e["actions"].numpy()} for e in saved["envs"]])
        obs, _ = envs.reset()
        if not _same_observations(obs, saved["obs"]):
            print(
                f"warning: env '{cfg.env}' did not replay its episodes exactly (it is not deterministic given "
                "its seed and actions); training goes on, but not exactly as the uninterrupted run would",
                file=sys.stderr,
            )
        state = {k: v.to(self.device) for k, v in saved["core_state"].items()}
        self._carry = (obs, state, saved["episode_starts"].to(self.device))
        self._episode_stats.ret = saved["episode_return"].numpy().copy()
        self._episode_stats.length = saved["episode_length"].numpy().copy()

    def close(self) -> None:
        """Close the environments (their worker processes, if any); a later ``learn`` replays their episodes."""
        if self.envs is not None:
            self._saved_rollout, self._carry = self._rollout_snapshot(), None
            self.envs.close()
            self.envs = None

    def _prepare_run_dir(self, run_dir: Path) -> None:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write to run directory {run_dir}: {e.strerror}") from None

    def _collect(self, buffer: RolloutBuffer) -> None:
        cfg, envs, dev = self.config, self.envs, self.device
        assert envs is not None
        if self._carry is None:
            # A resumed run restarts its episodes on fresh seeds, all below the evaluation seeds.
            obs, _ = envs.reset(seed=(cfg.seed + 7919 * self.updates) % (VALIDATION_SEED_BASE - cfg.n_envs))
            self._carry = (
                obs,
                self.policy.initial_state(cfg.n_envs, dev),
                torch.ones(cfg.n_envs, dtype=torch.bool, device=dev),
            )
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
        self._carry = (obs, state, starts)

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
        dist, values, _ = self.policy(batch.obs, batch.states, batch.episode_starts)
        B, T = batch.episode_starts.shape
        log_probs = dist.log_prob(batch.actions.reshape(B * T, *batch.actions.shape[2:])).view(B, T)
        adv = batch.advantages
        if cfg.normalize_advantage and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        log_ratio = log_probs - batch.log_probs
        ratio = log_ratio.exp()
        policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range) * adv).mean()
        value_loss = 0.5 * F.mse_loss(values, batch.returns)
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

    # ------------------------------------------------------------------ evaluation
    def make_eval_env(self, **kwargs: Any) -> gym.Env:
        return make_env(self.env_spec, **self.config.env_kwargs, **kwargs)

    def evaluate(
        self,
        n_episodes: int | None = None,
        gif_path: str | Path | None = None,
        deterministic: bool = False,
        seed_start: int = EVAL_SEED_BASE,
    ) -> dict[str, Any]:
        """Success rate and returns on held-out env seeds (``seed_start`` onwards; never training seeds)."""
        self.policy.eval()
        return evaluate(
            self.policy,
            self.make_eval_env,
            self.config.eval_episodes if n_episodes is None else n_episodes,
            seed_start,
            deterministic=deterministic,
            gif_path=gif_path,
        )

    def _evaluate_and_keep_best(self) -> dict[str, float]:
        result = self.evaluate(seed_start=VALIDATION_SEED_BASE)
        if self.run_dir is not None and result["success_rate"] > self.best_success:
            self.best_success = result["success_rate"]
            self.save(self.run_dir / "checkpoints" / "best.pt")
        return {
            "validation/success_rate": result["success_rate"],
            "validation/return": result["mean_return"],
            "validation/length": result["mean_length"],
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the model, optimizer and progress to ``path`` (atomically)."""
        save_checkpoint(
            {
                "algo": "ppo",
                "config": to_dict(self.config),
                "spaces": policy_spaces_to_dict(self.observation_space, self.action_space),
                "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "progress": {"frames": self.frames, "updates": self.updates, "best_success": self.best_success},
                "rollout": self._rollout_snapshot(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "generator": self._generator.get_state(),
                },
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path, env: Any = None, **overrides: Any) -> PPO:
        """Load a model saved by :meth:`save`; ``env`` and ``overrides`` replace the saved config's values."""
        data = load_checkpoint(path)
        if data.get("algo") != "ppo":
            raise UserError(f"{path} is a '{data.get('algo')}' checkpoint, not a PPO one")
        missing = {"config", "spaces", "policy", "optimizer", "progress", "rng"} - set(data)
        if missing:
            raise UserError(f"checkpoint {path} is incomplete: it has no {', '.join(sorted(missing))}")
        config = from_dict(PPOConfig, {**data["config"], **overrides}, "PPO")
        model = cls.__new__(cls)
        spaces = policy_spaces_from_dict(data["spaces"])
        model._setup(config, env, spaces)
        try:
            model.policy.load_state_dict(data["policy"])
            model.optimizer.load_state_dict(data["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint {path} does not fit its config (core or spaces differ): {msg}") from None
        for group in model.optimizer.param_groups:  # a learning_rate override wins over the saved one
            group["lr"] = config.learning_rate
        progress = data["progress"]
        model.frames, model.updates = progress["frames"], progress["updates"]
        model.best_success = progress["best_success"]
        torch.set_rng_state(data["rng"]["torch"])
        if data["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(data["rng"]["cuda"])
        model._generator.set_state(data["rng"]["generator"])
        model._saved_rollout = data.get("rollout")
        return model


def _same_observations(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same_observations(a[k], b[k]) for k in a)
    return bool(np.array_equal(np.asarray(a), torch.as_tensor(b).numpy()))


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
