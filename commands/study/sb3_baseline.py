"""sb3-contrib's RecurrentPPO as a study row: trained on our envs, written as a run directory like ours.

The run directory gets ``config.json``, ``metrics.jsonl`` (``validation/success_rate`` on the same held-out
validation seeds as our PPO, every ``eval_every`` frames, and ``time/fps``), ``checkpoints/best.zip`` and
``final_eval.json`` (best checkpoint, the same held-out evaluation seeds as ``tlb-rl train``). Observations
are flattened (``FlattenObservation`` over ``envs.make_env``), so its policy is an MLP + LSTM as in
``benchmarks/throughput.py``.

    python -m commands.study.sb3_baseline RUN_CONFIG.json RUN_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RecurrentPPOConfig:
    """A RecurrentPPO run; defaults are those measured in papers.md section 3 (8 envs, n_steps 128)."""

    env: str = "tmaze"
    env_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    total_frames: int = 100_000
    eval_every: int = 10_000
    """Frames between validation evaluations (a multiple of n_envs * n_steps)."""
    eval_episodes: int = 100
    """Episodes per validation evaluation and for the final evaluation."""
    measure: str = "success"
    """What picks the best checkpoint: ``success`` (rate) or ``return`` (mean episodic return)."""
    n_envs: int = 8
    n_steps: int = 128
    batch_size: int = 256
    n_epochs: int = 4
    learning_rate: float = 2.5e-4
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over ``total_frames``, update by update, as our PPO does."""
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    clip_range: float = 0.2
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    torch_threads: int | None = 1
    """``torch.set_num_threads`` (None: torch's default)."""


DIFFERENCES = (
    "policy: sb3-contrib's MlpLstmPolicy on flattened observations (separate 256-unit LSTMs for actor and "
    "critic, then 64x64 tanh MLPs); ours: an encoder chosen from the observation space and one core shared "
    "by actor and critic",
    "training sequences: episodes cut at rollout ends and padded, in minibatches of batch_size steps; ours: "
    "segments of seq_len steps that may hold several episodes, the core re-run from the state stored at "
    "each segment's start",
)
"""What still differs between the RecurrentPPO row and our PPO rows once the study's shared keys (rollout,
epochs, learning rate and its annealing, entropy and value weights, clipping, GAE, validation seeds) are
the same; the report lists these under its tables."""


def _lr_schedule(config: RecurrentPPOConfig) -> Any:
    """Our PPO's annealing in SB3's terms. SB3 computes the progress left after collecting a rollout; ours
    anneals by the frames before it, so the schedule adds one rollout back to match update for update."""
    if not config.anneal_lr:
        return config.learning_rate
    one_rollout = config.n_envs * config.n_steps / config.total_frames
    return lambda progress_remaining: config.learning_rate * max(0.0, min(1.0, progress_remaining + one_rollout))


def _make_env(config: RecurrentPPOConfig, **kwargs: Any) -> Any:
    import gymnasium as gym

    from envs import make_env

    return gym.wrappers.FlattenObservation(make_env(config.env, **config.env_kwargs, **kwargs))


def evaluate_recurrent(model: Any, config: RecurrentPPOConfig, seed_start: int, n_parallel: int = 8) -> dict:
    """Success rate over ``eval_episodes`` episodes on env seeds ``seed_start`` onwards, sampled actions."""
    from agents.evaluate import run_episodes

    state = None

    def act(obs: list[Any], starts: np.ndarray) -> np.ndarray:
        nonlocal state
        actions, state = model.predict(np.stack(obs), state=state, episode_start=starts, deterministic=False)
        return actions

    return run_episodes(act, lambda **kw: _make_env(config, **kw), config.eval_episodes, seed_start, n_parallel)


def train(config: RecurrentPPOConfig, run_dir: Path) -> dict:
    """Train RecurrentPPO with validation every ``eval_every`` frames; returns the final evaluation."""
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger

    from envs.seeding import EVAL_SEED_BASE, VALIDATION_SEED_BASE

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"algo": "recurrentppo", **dataclasses.asdict(config)}, indent=2))
    best = run_dir / "checkpoints" / "best.zip"
    vec = make_vec_env(lambda: _make_env(config), n_envs=config.n_envs, seed=config.seed)
    keys = ("n_steps", "batch_size", "n_epochs", "ent_coef", "vf_coef", "clip_range", "max_grad_norm", "gamma")
    hyper = {k: getattr(config, k) for k in (*keys, "gae_lambda")}
    lr = _lr_schedule(config)
    model = RecurrentPPO("MlpLstmPolicy", vec, seed=config.seed, device="cpu", learning_rate=lr, **hyper)
    # SB3's default logger makes an empty SB3-<time> folder in the temp dir on every learn(); the metrics
    # this run keeps are written by the callback below.
    model.set_logger(Logger(folder=None, output_formats=[]))

    class Validate(BaseCallback):
        """Evaluates on validation seeds once the frames trained on pass each multiple of eval_every.

        Checked where a rollout starts (after the previous update) and at the end, so the model evaluated
        at F frames has been updated on all F, as our PPO's is; evaluation time is not training time.
        """

        def _on_training_start(self) -> None:
            self.next_eval, self.best, self.clock = config.eval_every, -float("inf"), time.perf_counter()
            self.frames_at_clock = 0

        def _on_rollout_start(self) -> None:
            self._validate()

        def _on_training_end(self) -> None:
            self._validate()

        def _on_step(self) -> bool:
            return True

        def _validate(self) -> None:
            if self.num_timesteps < self.next_eval:
                return
            fps = (self.num_timesteps - self.frames_at_clock) / (time.perf_counter() - self.clock)
            result = evaluate_recurrent(self.model, config, VALIDATION_SEED_BASE)
            measured = result["success_rate"] if config.measure == "success" else result["mean_return"]
            if measured > self.best:
                self.best = measured
                self.model.save(best)
            row = {
                "frames": self.num_timesteps,
                "validation/success_rate": result["success_rate"],
                "validation/return": result["mean_return"],
                "time/fps": fps,
            }
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            while self.next_eval <= self.num_timesteps:
                self.next_eval += config.eval_every
            self.clock, self.frames_at_clock = time.perf_counter(), self.num_timesteps

    model.learn(config.total_frames, callback=Validate())
    vec.close()
    final_model = RecurrentPPO.load(best, device="cpu") if best.exists() else model
    result = evaluate_recurrent(final_model, config, EVAL_SEED_BASE)
    result["checkpoint"] = str(best)
    (run_dir / "final_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="JSON file with RecurrentPPOConfig keys")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    from tlb_rl.config import from_dict

    config = from_dict(RecurrentPPOConfig, json.loads(Path(args.config).read_text()), "RecurrentPPO")
    result = train(config, Path(args.run_dir))
    print(f"final evaluation on {result['episodes']} held-out episodes: success {result['success_rate']:.3f}")


if __name__ == "__main__":
    main()
