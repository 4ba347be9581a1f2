"""Behaviour cloning of expert demonstrations into a sequence policy (the same encoder + core + heads as PPO).

    model = BC("BabyAI-GoToLocal-v0", core="tlb", dataset="demos/gotolocal", n_demos=5000)
    model.learn()
    model.evaluate(500)

Training uses teacher forcing over whole episodes: each epoch the training episodes are shuffled and packed
end to end into ``batch_size`` streams, with ``episode_starts`` marking where each begins (the cores reset
their memory there). The streams are cut into segments of ``seq_len`` steps; the core state at the end of a
segment is carried, detached, into the next one, so an episode longer than a segment is still seen whole.
The loss is the cross-entropy of the bot's actions. Validation success on held-out env seeds (never a demo
seed) picks ``best.pt`` and stops training early.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch

from agents.demos import DemoDataset, load_demos
from agents.evaluate import EVAL_SEED_BASE, VALIDATION_SEED_BASE, evaluate
from agents.ppo import resolve_device
from envs import make_env
from tlb_rl.checkpoint import load_checkpoint, save_checkpoint
from tlb_rl.config import AgentConfig, from_dict, to_dict
from tlb_rl.cores import State
from tlb_rl.encoders import obs_to_tensor
from tlb_rl.errors import TrainingError, UserError
from tlb_rl.logger import RunLogger
from tlb_rl.policy import SequencePolicy
from tlb_rl.spaces import policy_spaces_from_dict, policy_spaces_to_dict


@dataclass
class BCConfig(AgentConfig):
    """Everything a BC run depends on; a YAML config under configs/bc/ holds a subset of these keys.

    The keys every agent has (env, env_kwargs, core, core_kwargs, encoder_kwargs, seed, device,
    torch_threads, run_dir) are documented in :class:`tlb_rl.config.AgentConfig`.
    """

    env: str = "BabyAI-GoToRedBallGrey-v0"
    """Environment the demonstrations come from and the policy is evaluated on."""
    dataset: str = ""
    """Directory written by ``tlb-rl demos``."""
    n_demos: int | None = None
    """Use the first ``n_demos`` episodes of the dataset, validation split included (None: all)."""
    val_fraction: float = 0.05
    """Share of those episodes held out for the validation loss (0: none)."""
    seq_len: int = 32
    """Steps per training segment; the core state is carried from one segment to the next."""
    batch_size: int = 64
    """Parallel streams of packed episodes; a gradient step sees ``batch_size * seq_len`` steps."""
    learning_rate: float = 1e-3
    """Adam's step size."""
    max_grad_norm: float = 1.0
    """Clip of the global gradient norm."""
    max_updates: int = 10_000
    """Gradient steps at most."""
    eval_every: int = 200
    """Gradient steps between evaluations (validation loss, success on held-out validation seeds)."""
    eval_episodes: int = 100
    """Episodes per validation evaluation (env seeds from 500,000)."""
    patience: int = 5
    """Stop after this many evaluations without a better validation success (0: never stop early)."""
    test_episodes: int = 500
    """Episodes of the final evaluation of ``best.pt`` (env seeds from 1,000,000)."""
    deterministic: bool = True
    """Evaluate with the most likely action (the bot's choice), not a sampled one."""

    def __post_init__(self) -> None:
        at_least = {"n_demos": 1, "seq_len": 1, "batch_size": 1, "max_updates": 1, "eval_every": 1}
        at_least |= {"eval_episodes": 1, "patience": 0, "test_episodes": 1}
        self.check_ranges("BC", at_least, positive=("learning_rate", "max_grad_norm"))
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"BC key 'val_fraction' must be in [0, 1), got {self.val_fraction}")


class Segment(NamedTuple):
    """``seq_len`` steps of every stream: observations [B, T, ...], actions [B, T], starts and mask [B, T]."""

    obs: dict[str, torch.Tensor]
    actions: torch.Tensor
    episode_starts: torch.Tensor
    mask: torch.Tensor


def pack_episodes(
    dataset: DemoDataset, order: np.ndarray, n_streams: int, seq_len: int, device: torch.device
) -> list[Segment]:
    """Lay the episodes ``order`` end to end into ``n_streams`` streams and cut them into segments.

    Each episode goes to the currently shortest stream, so streams end close together; the tail of each
    stream is padded (``mask`` False) to a multiple of ``seq_len``. Only the observations before each action
    are used (the one after an episode's last action is never trained on).
    """
    n_streams = min(n_streams, len(order))
    streams: list[list[int]] = [[] for _ in range(n_streams)]
    fill = np.zeros(n_streams, dtype=np.int64)
    for i in order:
        s = int(fill.argmin())
        streams[s].append(int(i))
        fill[s] += dataset.lengths[i]
    L = int(math.ceil(fill.max() / seq_len) * seq_len)
    step_idx = np.zeros((n_streams, L), dtype=np.int64)  # row of actions/rewards
    obs_idx = np.zeros((n_streams, L), dtype=np.int64)  # row of per-step observations
    ep_idx = np.zeros((n_streams, L), dtype=np.int64)  # episode (for per-episode keys)
    starts = np.zeros((n_streams, L), dtype=bool)
    mask = np.zeros((n_streams, L), dtype=bool)
    for s, episodes in enumerate(streams):
        t = 0
        for i in episodes:
            n = dataset.lengths[i]
            step_idx[s, t : t + n] = dataset.step_start[i] + np.arange(n)
            obs_idx[s, t : t + n] = dataset.obs_start[i] + np.arange(n)
            ep_idx[s, t : t + n] = i
            starts[s, t] = True
            mask[s, t : t + n] = True
            t += n
    obs = {k: v[ep_idx] if k in dataset.per_episode else v[obs_idx] for k, v in dataset.obs.items()}  # [B, L, ...]
    obs_t = obs_to_tensor(obs, device)
    actions = torch.as_tensor(dataset.actions[step_idx], device=device)
    starts_t, mask_t = torch.as_tensor(starts, device=device), torch.as_tensor(mask, device=device)
    return [
        Segment(
            {k: v[:, t : t + seq_len] for k, v in obs_t.items()},
            actions[:, t : t + seq_len],
            starts_t[:, t : t + seq_len],
            mask_t[:, t : t + seq_len],
        )
        for t in range(0, L, seq_len)
    ]


class BC:
    """Behaviour cloning with a sequence policy.

    :param env: a Gymnasium id (the demonstrations' env).
    :param core: the memory core's name.
    :param hyperparameters: any other field of :class:`BCConfig` (``dataset`` is needed to train).
    """

    def __init__(self, env: str = "BabyAI-GoToRedBallGrey-v0", core: str = "tlb", **hyperparameters: Any):
        self._setup(from_dict(BCConfig, {"env": env, "core": core, **hyperparameters}, "BC"), None)

    @classmethod
    def from_config(cls, config: BCConfig) -> BC:
        model = cls.__new__(cls)
        model._setup(config, None)
        return model

    def _setup(self, config: BCConfig, spaces: tuple[gym.Space, gym.Space] | None) -> None:
        self.config = cfg = config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = resolve_device(cfg.device, cfg.batch_size)
        if spaces is None:
            probe = make_env(cfg.env, **cfg.env_kwargs)
            spaces = (probe.observation_space, probe.action_space)
            probe.close()
        self.observation_space, self.action_space = spaces
        torch.manual_seed(cfg.seed)
        self.policy = SequencePolicy(*spaces, cfg.core, cfg.core_kwargs, cfg.encoder_kwargs).to(self.device)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.learning_rate, fused=True)
        self.updates = self.epochs = self.frames = 0
        self.best_score: tuple[float, float] = (-1.0, -math.inf)  # (validation success, -validation loss)
        self.stale_evals = 0
        self._rng = np.random.default_rng(cfg.seed)

    @property
    def run_dir(self) -> Path | None:
        return Path(self.config.run_dir) if self.config.run_dir else None

    # ------------------------------------------------------------------ data
    def load_dataset(self) -> tuple[DemoDataset, DemoDataset | None]:
        """The training and validation episodes of the configured dataset, checked against the env."""
        cfg = self.config
        if not cfg.dataset:
            raise UserError("BC needs a dataset: set dataset=DIR (made by `tlb-rl demos`)")
        data = load_demos(cfg.dataset, env=cfg.env)
        if data.header.get("env_kwargs", {}) != cfg.env_kwargs:
            raise UserError(
                f"demonstrations in {cfg.dataset} were made with env_kwargs {data.header.get('env_kwargs')}, "
                f"but the config has {cfg.env_kwargs}"
            )
        if data.observation_space != self.observation_space or data.action_space != self.action_space:
            raise UserError(
                f"demonstrations in {cfg.dataset} have spaces {data.observation_space} / {data.action_space}, "
                f"but the env has {self.observation_space} / {self.action_space}"
            )
        n = len(data) if cfg.n_demos is None else cfg.n_demos
        if n > len(data):
            raise UserError(f"n_demos={n} asked for, but {cfg.dataset} holds {len(data)} episodes")
        n_val = round(n * cfg.val_fraction) if cfg.val_fraction > 0 else 0
        n_val = min(max(n_val, 1 if cfg.val_fraction > 0 else 0), n - 1)
        return data.subset(np.arange(n - n_val)), data.subset(np.arange(n - n_val, n)) if n_val else None

    # ------------------------------------------------------------------ training
    def learn(self, progress: bool = True, data: tuple[DemoDataset, DemoDataset | None] | None = None) -> BC:
        """Train until ``max_updates`` gradient steps, or until validation success stops improving.

        :param data: the (training, validation) split of :meth:`load_dataset`, if already loaded.
        """
        cfg = self.config
        train, val = data or self.load_dataset()
        run_dir = self.run_dir
        if run_dir is not None:
            self._prepare_run_dir(run_dir)
        segments = self._epoch(train)
        # Frames (the x axis) count demonstration steps trained on; a packed update holds about this many.
        steps_per_update = int(train.lengths.sum()) / len(segments)
        logger = RunLogger(run_dir, int(cfg.max_updates * steps_per_update), progress, start_frames=self.frames)
        stats: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        try:
            while True:
                state = self.policy.initial_state(segments[0].actions.shape[0])
                for segment in segments:
                    step, state = self._gradient_step(segment, state)
                    for k, v in step.items():
                        stats.setdefault(k, []).append(v)
                    self.updates += 1
                    self.frames += int(step["n"])
                    if self.updates % cfg.eval_every == 0 or self.updates == cfg.max_updates:
                        metrics = {k: float(np.mean(v)) for k, v in stats.items() if k != "n"}
                        metrics["train/epoch"] = self.epochs
                        metrics["time/steps_per_s"] = sum(stats["n"]) / (time.perf_counter() - t0)
                        stats = {}
                        metrics.update(self._validate(val))
                        logger.log(self.frames, metrics)
                        if run_dir is not None:
                            self.save(run_dir / "checkpoints" / "latest.pt")
                        t0 = time.perf_counter()
                    if self.updates >= cfg.max_updates or self._stop_early():
                        return self
                self.epochs += 1
                segments = self._epoch(train)
        finally:
            logger.close()

    def _epoch(self, train: DemoDataset) -> list[Segment]:
        """The training episodes in a fresh random order, packed into segments."""
        order = self._rng.permutation(len(train))
        return pack_episodes(train, order, self.config.batch_size, self.config.seq_len, self.device)

    def _stop_early(self) -> bool:
        return self.config.patience > 0 and self.stale_evals >= self.config.patience

    def _gradient_step(self, segment: Segment, state: State) -> tuple[dict[str, float], State]:
        """One cross-entropy step on a segment; returns the detached state to carry into the next segment."""
        self.policy.train()
        loss, accuracy, state = self._loss(segment, state)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at update {self.updates + 1}; stopping")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm, foreach=True)
        self.optimizer.step()
        stats = {
            "train/loss": loss.item(),
            "train/accuracy": accuracy,
            "train/grad_norm": grad_norm.item(),
            "n": float(segment.mask.sum()),
        }
        return stats, {k: v.detach() for k, v in state.items()}

    def _loss(self, segment: Segment, state: State) -> tuple[torch.Tensor, float, State]:
        """Masked mean cross-entropy of the demonstrated actions, and the share of them the policy's mode picks."""
        dist, _, state = self.policy(segment.obs, state, segment.episode_starts)
        B, T = segment.mask.shape
        actions = segment.actions.reshape(B * T)
        mask = segment.mask.reshape(B * T).float()
        loss = -(dist.log_prob(actions) * mask).sum() / mask.sum().clamp(min=1)
        aux = self.policy.core.auxiliary_loss()
        if aux is not None:
            loss = loss + aux
        with torch.no_grad():
            accuracy = ((dist.mode() == actions).float() * mask).sum() / mask.sum().clamp(min=1)
        return loss, accuracy.item(), state

    @torch.no_grad()
    def validation_loss(self, val: DemoDataset) -> tuple[float, float]:
        """Cross-entropy and action accuracy on the held-out demonstrations."""
        cfg = self.config
        self.policy.eval()
        segments = pack_episodes(val, np.arange(len(val)), cfg.batch_size, cfg.seq_len, self.device)
        state = self.policy.initial_state(segments[0].actions.shape[0])
        total = correct = n = 0.0
        for segment in segments:
            loss, accuracy, state = self._loss(segment, state)
            k = float(segment.mask.sum())
            total, correct, n = total + loss.item() * k, correct + accuracy * k, n + k
        return total / n, correct / n

    def _validate(self, val: DemoDataset | None) -> dict[str, float]:
        """Validation loss and success on held-out seeds; keeps ``best.pt`` and counts evaluations without gain."""
        metrics: dict[str, float] = {}
        val_loss = math.nan
        if val is not None:
            val_loss, val_acc = self.validation_loss(val)
            metrics.update({"validation/loss": val_loss, "validation/accuracy": val_acc})
        result = self.evaluate(seed_start=VALIDATION_SEED_BASE, n_episodes=self.config.eval_episodes)
        metrics.update(
            {
                "validation/success_rate": result["success_rate"],
                "validation/return": result["mean_return"],
                "validation/length": result["mean_length"],
            }
        )
        score = (result["success_rate"], -val_loss if val is not None else 0.0)
        if score > self.best_score:
            self.best_score, self.stale_evals = score, 0
            if self.run_dir is not None:
                self.save(self.run_dir / "checkpoints" / "best.pt")
        else:
            self.stale_evals += 1
        return metrics

    def _prepare_run_dir(self, run_dir: Path) -> None:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write to run directory {run_dir}: {e.strerror}") from None

    # ------------------------------------------------------------------ evaluation
    def make_eval_env(self, **kwargs: Any) -> gym.Env:
        return make_env(self.config.env, **self.config.env_kwargs, **kwargs)

    def evaluate(
        self,
        n_episodes: int | None = None,
        gif_path: str | Path | None = None,
        deterministic: bool | None = None,
        seed_start: int = EVAL_SEED_BASE,
    ) -> dict[str, Any]:
        """Success rate and returns on env seeds ``seed_start`` onwards (default: the held-out test seeds).

        :param deterministic: None takes the config's choice.
        """
        self.policy.eval()
        return evaluate(
            self.policy,
            self.make_eval_env,
            self.config.test_episodes if n_episodes is None else n_episodes,
            seed_start,
            n_parallel=16,
            deterministic=self.config.deterministic if deterministic is None else deterministic,
            gif_path=gif_path,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the policy (the part PPO's ``init_from`` reads), optimizer and progress to ``path``."""
        save_checkpoint(
            {
                "algo": "bc",
                "config": to_dict(self.config),
                "spaces": policy_spaces_to_dict(self.observation_space, self.action_space),
                "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "progress": {
                    "updates": self.updates,
                    "epochs": self.epochs,
                    "frames": self.frames,
                    "best_score": list(self.best_score),
                    "stale_evals": self.stale_evals,
                },
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> BC:
        """Load a model saved by :meth:`save`; ``overrides`` replace the saved config's values."""
        data = load_checkpoint(path)
        if data.get("algo") != "bc":
            raise UserError(f"{path} is a '{data.get('algo')}' checkpoint, not a BC one")
        missing = {"config", "spaces", "policy", "optimizer", "progress"} - set(data)
        if missing:
            raise UserError(f"checkpoint {path} is incomplete: it has no {', '.join(sorted(missing))}")
        config = from_dict(BCConfig, {**data["config"], **overrides}, "BC")
        model = cls.__new__(cls)
        model._setup(config, policy_spaces_from_dict(data["spaces"]))
        try:
            model.policy.load_state_dict(data["policy"])
            model.optimizer.load_state_dict(data["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint {path} does not fit its config (core or spaces differ): {msg}") from None
        progress = data["progress"]
        model.updates, model.epochs, model.frames = progress["updates"], progress["epochs"], progress["frames"]
        model.best_score = tuple(progress["best_score"])  # type: ignore[assignment]
        model.stale_evals = progress["stale_evals"]
        return model


def train_from_cli(config_path: str | None, overrides: list[str], progress: bool = True, gif: bool = True) -> Path:
    """``tlb-rl bc``: train, evaluate ``best.pt`` on ``test_episodes`` held-out seeds, plot, write a GIF."""
    from tlb_rl.config import apply_overrides, load_yaml
    from tlb_rl.plots import plot_learning_curve

    config = from_dict(BCConfig, apply_overrides(load_yaml(config_path) if config_path else {}, overrides), "BC")
    if config.run_dir is None:
        name = Path(config_path).stem if config_path else "bc"
        n = f"-n{config.n_demos}" if config.n_demos else ""
        config.run_dir = str(Path("runs") / f"{name}-{config.core}{n}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    model = BC.from_config(config)
    data = model.load_dataset()  # a bad dataset stops here, before a run directory is announced
    run_dir = model.run_dir
    assert run_dir is not None
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tb'})", file=sys.stderr)
    try:
        model.learn(progress=progress, data=data)
    except KeyboardInterrupt:
        model.save(run_dir / "checkpoints" / "latest.pt")
        print(f"\ninterrupted after {model.updates} updates; checkpoint saved in {run_dir}", file=sys.stderr)
        sys.exit(130)
    best = run_dir / "checkpoints" / "best.pt"
    model = BC.load(best)
    probe = model.make_eval_env()
    can_render = "rgb_array" in probe.metadata.get("render_modes", [])
    probe.close()
    result = model.evaluate(gif_path=run_dir / "episode.gif" if gif and can_render else None)
    result.update({"checkpoint": str(best), "updates": model.updates, "n_demos": config.n_demos})
    (run_dir / "final_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"final evaluation on {result['episodes']} held-out episodes: success {result['success_rate']:.3f}  "
        f"({run_dir / 'final_eval.json'})"
    )
    print(f"learning curve: {plot_learning_curve(run_dir)}")
    return run_dir


__all__ = ["BC", "BCConfig", "pack_episodes", "train_from_cli"]
