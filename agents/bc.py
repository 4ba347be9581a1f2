"""Behaviour cloning of expert demonstrations into a sequence policy (the same encoder + core + heads as PPO).

    model = BC("BabyAI-GoToLocal-v0", core="tlb", dataset="demos/gotolocal", n_demos=5000)
    model.learn()
    model.evaluate(500)

Training uses teacher forcing over whole episodes: each epoch the training episodes are shuffled and packed
end to end into ``batch_size`` streams, with ``episode_starts`` marking where each begins (the cores reset
their memory there). The streams are cut into segments of ``seq_len`` steps; the core state at the end of a
segment is carried, detached, into the next one, so an episode longer than a segment is still seen whole.
The loss is the cross-entropy of the bot's actions. Validation success on held-out env seeds (never a demo
seed) picks ``best.pt`` and stops training early (``patience``).

A checkpoint holds where training stands in its epoch (the shuffle's random state, the segments done, the
carried core state), so a run resumed from it (``tlb-rl train --resume``, a study's next sitting) continues
exactly as the uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from agents.base import Agent, AgentConfig
from agents.dataset import DemoDataset, load_demos
from agents.resume import restore_rng, rng_snapshot
from tlb_rl.cores import State
from tlb_rl.encoders import obs_to_tensor
from tlb_rl.errors import TrainingError, UserError
from tlb_rl.logger import RunLogger


@dataclass
class BCConfig(AgentConfig):
    """Everything a BC run depends on; a YAML config under configs/bc/ holds a subset of these keys.

    The keys every agent has (env, core, seed, device, run_dir, eval_episodes, early stopping, init_from ...)
    are documented in :class:`agents.base.AgentConfig`.
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
    eval_every_updates: int = 200
    """Gradient steps between evaluations (validation loss, success on held-out validation seeds)."""
    patience: int = 5
    """Stop after this many evaluations without a better validation success (0: never stop early)."""
    test_episodes: int = 500
    """Episodes of the final evaluation of ``best.pt`` (env seeds from 1,000,000)."""
    deterministic: bool = True
    """Evaluate with the most likely action (the bot's choice), not a sampled one."""

    def __post_init__(self) -> None:
        at_least = {"n_demos": 1, "seq_len": 1, "batch_size": 1, "max_updates": 1, "eval_every_updates": 1}
        at_least |= {"test_episodes": 1}
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


class BC(Agent):
    """Behaviour cloning with a sequence policy.

    :param env: a Gymnasium id (the demonstrations' env).
    :param core: the memory core's name.
    :param hyperparameters: any other field of :class:`BCConfig` (``dataset`` is needed to train).
    """

    algo = "bc"
    config_class = BCConfig
    resumable = True
    eval_parallel = 16
    offline = True
    config: BCConfig

    def __init__(self, env: str = "BabyAI-GoToRedBallGrey-v0", core: str = "tlb", **hyperparameters: Any):
        super().__init__(env, core, **hyperparameters)

    @classmethod
    def budget_keys(cls, config: BCConfig, total_frames: int, eval_every: int, where: str) -> dict[str, int]:
        steps = config.batch_size * config.seq_len  # demonstration steps of a full gradient step
        if total_frames % steps or eval_every % steps:
            raise UserError(
                f"{where}: total_frames ({total_frames}) and eval_every ({eval_every}) must be multiples "
                f"of batch_size * seq_len ({steps}): BC counts them in gradient steps"
            )
        if not config.dataset:
            raise UserError(f"{where}: no dataset; make one with `tlb-rl demos` and set `bc: {{dataset: DIR}}`")
        return {"max_updates": total_frames // steps, "eval_every_updates": eval_every // steps}

    @classmethod
    def check_inputs(cls, config: dict[str, Any], where: str) -> None:
        super().check_inputs(config, where)
        dataset = config.get("dataset", "")
        if not Path(dataset).is_dir():
            raise UserError(f"{where}: dataset '{dataset}' is not a directory; make one with `tlb-rl demos`")

    def sequences_per_step(self) -> int:
        return self.config.batch_size

    def _init_training_state(self) -> None:
        self.epochs = 0
        self._rng = np.random.default_rng(self.config.seed)
        self._data: tuple[DemoDataset, DemoDataset | None] | None = None
        # Where training stands in the current epoch: what an exact resume needs beyond weights and optimiser.
        self._shuffle: dict[str, Any] | None = None  # the shuffler's state before this epoch's permutation
        self._layout: list[int] = []  # training episodes, batch_size, seq_len the epoch was packed for
        self._position = 0  # segments of the epoch trained on
        self._carried: State = {}  # the core state going into the next segment ({}: a fresh one)
        self._stats: dict[str, list[float]] = {}  # per-update statistics since the last evaluation

    @property
    def test_episodes(self) -> int:
        return self.config.test_episodes

    @property
    def deterministic(self) -> bool:
        return self.config.deterministic

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

    def prepare(self) -> None:
        if self._data is None:
            self._data = self.load_dataset()

    # ------------------------------------------------------------------ training
    def learn(
        self, max_updates: int | None = None, callback: Callable[..., bool | None] | None = None, progress: bool = True
    ) -> BC:
        """Train until ``max_updates`` gradient steps in all (default: the config's), or an early stop.

        :param callback: called as ``callback(model, metrics)`` after every evaluation; returning False stops.
        """
        cfg = self.config
        limit = max_updates or cfg.max_updates
        self.prepare()
        assert self._data is not None
        train, val = self._data
        run_dir = self.run_dir
        if run_dir is not None:
            self.make_run_dir()
        segments = self._resume_epoch(train)
        # Frames (the x axis) count demonstration steps trained on; a packed update holds about this many.
        steps_per_update = int(train.lengths.sum()) / len(segments)
        logger = RunLogger(run_dir, int(limit * steps_per_update), progress, start_frames=self.frames)
        try:
            with self._interrupt_after_update():
                self._train_epochs(train, val, segments, limit, logger, callback)
        finally:
            logger.close()
        if run_dir is not None and self._stop_requested:
            self.save(run_dir / "checkpoints" / "latest.pt")
        self._raise_if_interrupted()
        return self

    def _train_epochs(
        self,
        train: DemoDataset,
        val: DemoDataset | None,
        segments: list[Segment],
        limit: int,
        logger: RunLogger,
        callback: Callable[..., bool | None] | None,
    ) -> None:
        """Gradient steps over freshly shuffled epochs, evaluating every ``eval_every_updates``, until a stop."""
        cfg, run_dir, stats = self.config, self.run_dir, self._stats
        t0 = time.perf_counter()
        while True:
            state = self._carried or self.policy.initial_state(segments[0].actions.shape[0])
            for segment in segments[self._position :]:
                step, state = self._gradient_step(segment, state)
                self._position, self._carried = self._position + 1, state
                for k, v in step.items():
                    stats.setdefault(k, []).append(v)
                self.updates += 1
                self.frames += int(step["n"])
                if self.updates % cfg.eval_every_updates == 0 or self.updates == limit:
                    metrics = {k: float(np.mean(v)) for k, v in stats.items() if k != "n"}
                    metrics["train/epoch"] = self.epochs
                    metrics["time/steps_per_s"] = sum(stats["n"]) / (time.perf_counter() - t0)
                    stats.clear()
                    metrics.update(self._validate_bc(val))
                    logger.log(self.frames, metrics)
                    if run_dir is not None:
                        self.save(run_dir / "checkpoints" / "latest.pt")
                    if callback is not None and callback(self, metrics) is False:
                        return
                    t0 = time.perf_counter()
                if self.updates >= limit or self._should_stop() or self._stop_requested:
                    return
            self.epochs += 1
            segments = self._epoch(train)

    def _epoch(self, train: DemoDataset) -> list[Segment]:
        """The training episodes in a fresh random order, packed into segments."""
        cfg = self.config
        self._shuffle = copy.deepcopy(self._rng.bit_generator.state)
        self._layout = [len(train), cfg.batch_size, cfg.seq_len]
        self._position, self._carried = 0, {}
        order = self._rng.permutation(len(train))
        return pack_episodes(train, order, cfg.batch_size, cfg.seq_len, self.device)

    def _resume_epoch(self, train: DemoDataset) -> list[Segment]:
        """The epoch training stopped in (the same order, drawn again from the saved shuffle), else a new one."""
        if self._shuffle is None:
            return self._epoch(train)
        cfg = self.config
        position, carried = self._position, self._carried
        if self._layout != [len(train), cfg.batch_size, cfg.seq_len]:
            print(
                "warning: the dataset split, batch_size or seq_len changed since the checkpoint; training goes on "
                "from a new epoch, not exactly as the uninterrupted run would",
                file=sys.stderr,
            )
            return self._epoch(train)
        self._rng.bit_generator.state = self._shuffle
        segments = self._epoch(train)
        self._position, self._carried = position, carried
        return segments

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
        return stats, state

    def _loss(self, segment: Segment, state: State) -> tuple[torch.Tensor, float, State]:
        """Masked mean cross-entropy of the demonstrated actions, and the share of them the policy's mode picks."""
        # the state goes on to the next segment without a gradient path back to this one (truncated BPTT)
        dist, _, state = self.policy(segment.obs, state, segment.episode_starts, state_grad=False)
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

    def _validate_bc(self, val: DemoDataset | None) -> dict[str, float]:
        """Validation loss (the tie-break of equal success) and success on held-out seeds."""
        metrics: dict[str, float] = {}
        val_loss = math.nan
        if val is not None:
            val_loss, val_acc = self.validation_loss(val)
            metrics.update({"validation/loss": val_loss, "validation/accuracy": val_acc})
        metrics.update(self._validate(-val_loss if val is not None else 0.0))
        return metrics

    # ------------------------------------------------------------------ persistence
    def _progress(self) -> dict[str, Any]:
        return {**super()._progress(), "epochs": self.epochs}

    def _extra_checkpoint(self) -> dict[str, Any]:
        epoch = {"shuffle": self._shuffle, "layout": self._layout, "position": self._position}
        epoch |= {"core_state": self._carried, "stats": self._stats}
        return {"epoch": epoch, "rng": rng_snapshot()}

    def _restore(self, data: dict[str, Any]) -> None:
        super()._restore(data)
        self.epochs = data["progress"]["epochs"]
        if "epoch" in data:  # checkpoints written before BC resumed start their next run from a new epoch
            epoch = data["epoch"]
            self._shuffle, self._layout, self._position = epoch["shuffle"], epoch["layout"], epoch["position"]
            self._carried = {k: v.to(self.device) for k, v in epoch["core_state"].items()}
            self._stats = epoch["stats"]
            restore_rng(data["rng"])


__all__ = ["BC", "BCConfig", "pack_episodes"]
