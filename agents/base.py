"""What every agent shares: set-up, run directory, evaluation and the best checkpoint, save/load, the finish.

An algorithm subclasses :class:`Agent`, names its config class, and writes its own training loop as
``learn(..., callback=None, progress=True)``; it calls :meth:`Agent._validate` at its evaluation points and
stops when :meth:`Agent._should_stop` says so. An entry in ``agents.ALGORITHMS`` makes it a choice of
``tlb-rl train --algo`` and of a study's rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import gymnasium as gym
import torch

from agents.evaluate import evaluate
from envs import make_env
from envs.seeding import EVAL_SEED_BASE, VALIDATION_SEED_BASE
from tlb_rl.checkpoint import load_checkpoint, save_checkpoint
from tlb_rl.config import from_dict, to_dict
from tlb_rl.cores import compile_core, require_static, saved_core_kwargs
from tlb_rl.errors import UserError
from tlb_rl.policy import SequencePolicy
from tlb_rl.spaces import policy_spaces_from_dict, policy_spaces_to_dict

if TYPE_CHECKING:
    from agents.inspect import Episode

A = TypeVar("A", bound="Agent")

MEASURES = ("success", "return")
"""What validation can maximise: the success rate, or the mean return where an env defines no success."""

AUTO_CUDA_MIN_BATCH = 32
"""``device="auto"`` takes the GPU only from this many sequences per step (envs acting, streams training). A
policy of ~150k parameters is launch-bound on a GPU: on an H200 TLB-PPO with 8 envs ran 765 steps/s on the
GPU and 742 on the machine's 16 CPU cores, LSTM-PPO no faster either; with 64 envs the GPU pulled ahead."""


@dataclass
class AgentConfig:
    """The keys every agent's config has; :class:`agents.PPOConfig` and :class:`agents.BCConfig` add their own."""

    env: str = "MiniGrid-MemoryS7-v0"
    """Environment: a Gymnasium id, ``module:Factory``, ``file.py:Factory`` or a plug-in name."""
    env_kwargs: dict = field(default_factory=dict)
    """Options of the environment (e.g. ``view_size: 3`` for MiniGrid)."""
    core: str = "tlb"
    """Memory core: tlb, lstm, gru, transformer, brsm, none."""
    core_kwargs: dict = field(default_factory=dict)
    """Hyperparameters of the core (see ``tlb_rl.cores``). The model's config, its ``config.json`` and its
    checkpoints hold every one, defaults included, so a saved run keeps its network when a default changes."""
    encoder_kwargs: dict = field(default_factory=dict)
    """Options of the observation encoder (held in full, like ``core_kwargs``)."""
    seed: int = 0
    """Seeds torch and the agent's sampling and shuffling (and for PPO the envs: env i gets seed + i)."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto``: CUDA when there is one and at least 32 sequences run per step (PPO's
    ``n_envs``, BC's ``batch_size``); below that a small policy is launch-bound and no faster on a GPU."""
    torch_threads: int | None = None
    """``torch.set_num_threads`` (None: torch's default)."""
    run_dir: str | None = None
    """Directory for logs, checkpoints, plots (None: keep nothing on disk)."""
    eval_episodes: int = 100
    """Episodes per validation evaluation (env seeds from 500,000), which picks ``best.pt``."""
    patience: int = 0
    """Stop after this many validation evaluations without a better ``measure`` (0: never stop early)."""
    target_success: float | None = None
    """Stop once a validation evaluation's success rate reaches this (None: train the whole budget)."""
    measure: str = "success"
    """What picks ``best.pt``: ``success`` (rate) or ``return`` (mean episodic return, for envs without success)."""
    init_from: str | None = None
    """A PPO or BC checkpoint whose policy weights training starts from (same core, spaces and encoder). In a
    study config it may name its cell's ``{core}``, ``{seed}`` and ``{env}`` (the env's name in the study), so each
    run starts from its own run of an earlier study."""
    compile: bool = False
    """Compile the core with ``torch.compile`` (tlb, transformer, none). Each input shape and grad mode compiles on
    its first call: ~80 s in all for TLB-PPO on a CPU the first time (inductor caches kernels on disk); TLB-PPO
    then trained 1.2x faster on a CPU (docs/benchmarks.md). For runs longer than a few minutes."""

    cuda_graphs: bool = False
    """On a GPU, replay the core's training pass (forward + backward of each minibatch) from CUDA graphs
    (``tlb_rl.cores.graphs``): TLB-PPO's update 3.7x faster on an H200, where eager TLB is launch-bound
    (docs/benchmarks.md). Needs ``device`` on CUDA and a core that compiles (tlb, transformer, none); not
    together with ``compile``. Captures each minibatch shape once, in a second or two."""

    def check_ranges(self, agent: str, at_least: dict[str, int], positive: tuple[str, ...] = ()) -> None:
        """Raise a :class:`UserError` naming the first key below its bound (None values are not checked).

        :param agent: the agent's name in the message ("PPO key 'n_envs' must be ...").
        """
        bounds = {**at_least, "torch_threads": 1, "eval_episodes": 1, "patience": 0}
        for key, low in bounds.items():
            value = getattr(self, key)
            if value is not None and value < low:
                raise UserError(f"{agent} key '{key}' must be at least {low}, got {value}")
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"{agent} key '{key}' must be positive, got {getattr(self, key)}")
        if self.measure not in MEASURES:
            raise UserError(f"{agent} key 'measure' must be one of {', '.join(MEASURES)}, got '{self.measure}'")
        if self.target_success is not None and not 0 < self.target_success <= 1:
            raise UserError(f"{agent} key 'target_success' must be in (0, 1], got {self.target_success}")


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


def env_spaces(spec: Any, env_kwargs: dict[str, Any]) -> tuple[gym.Space, gym.Space]:
    """The observation and action spaces of env ``spec`` with ``env_kwargs``, from one env made and closed."""
    probe = make_env(spec, **env_kwargs)
    spaces = (probe.observation_space, probe.action_space)
    probe.close()
    return spaces


def spec_name(env: Any) -> str:
    """A string for the config: the env spec itself, or where a callable spec is defined."""
    if isinstance(env, str):
        return env
    return f"{getattr(env, '__module__', '?')}:{getattr(env, '__qualname__', repr(env))}"


class Agent:
    """A sequence policy (encoder + memory core + heads) with its optimiser, progress and run directory.

    :param env: anything ``envs.make_env`` takes (an id, ``module:Factory``, a callable).
    :param core: the memory core's name.
    :param hyperparameters: any other field of the agent's config class.
    """

    algo: ClassVar[str]
    """The name in ``agents.ALGORITHMS``, the CLI's ``--algo`` and checkpoints."""
    config_class: ClassVar[type[AgentConfig]]
    resumable: ClassVar[bool] = False
    """Whether ``learn`` after ``load`` continues exactly as the uninterrupted run (``tlb-rl train --resume``)."""
    eval_parallel: ClassVar[int] = 8
    """Evaluation episodes played at a time (sampled actions depend on it, so it is fixed per algorithm)."""
    adam_eps: ClassVar[float] = 1e-8
    offline: ClassVar[bool] = False
    """Trains on recorded demonstrations: its frames count demonstration steps, not environment steps."""

    def __init__(self, env: Any = None, core: str = "tlb", **hyperparameters: Any):
        values = {"core": core, **hyperparameters}
        if env is not None:
            values["env"] = spec_name(env)
        self._setup(from_dict(self.config_class, values, self.algo.upper()), env, None)

    @classmethod
    def from_config(cls: type[A], config: AgentConfig, env: Any = None) -> A:
        """A new model from a validated config (``env`` replaces ``config.env``, e.g. by a callable)."""
        model = cls.__new__(cls)
        model._setup(config, env, None)
        return model

    def _setup(self, config: Any, env: Any, spaces: tuple[gym.Space, gym.Space] | None) -> None:
        """Build everything from ``config``; ``env`` (None: ``config.env``) and ``spaces`` (None: probe it)."""
        self.config = cfg = config
        self.env_spec = env if env is not None else cfg.env
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = resolve_device(cfg.device, self.sequences_per_step())
        fresh = spaces is None  # not loaded from a checkpoint, whose weights win over init_from
        if spaces is None:
            spaces = env_spaces(self.env_spec, cfg.env_kwargs)
        self.observation_space, self.action_space = spaces
        torch.manual_seed(cfg.seed)
        self.policy = SequencePolicy(*spaces, cfg.core, cfg.core_kwargs, cfg.encoder_kwargs).to(self.device)
        resolved = {"core_kwargs": dict(self.policy.core_kwargs), "encoder_kwargs": dict(self.policy.encoder_kwargs)}
        self.config = cfg = replace(cfg, **resolved)
        if cfg.compile and cfg.cuda_graphs:
            raise UserError("compile=true and cuda_graphs=true do not go together: drop one")
        if cfg.compile:
            compile_core(self.policy.core, cfg.core)
        if cfg.cuda_graphs:
            if self.device.type != "cuda":
                raise UserError(
                    f"cuda_graphs=true needs a CUDA device, and this run is on '{self.device}': drop it "
                    "(load(..., cuda_graphs=False) for a model trained with it)"
                )
            require_static(self.policy.core, cfg.core, "cuda_graphs")
            self.policy.use_cuda_graphs()
        # fused: one kernel per parameter instead of ~10 small ops (3.0 -> 0.7 ms per step for TLB-PPO on CPU)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.learning_rate, eps=self.adam_eps, fused=True)
        self.frames = self.updates = 0
        self.best_score: tuple[float, ...] = (-math.inf,)
        self.stale_evals = 0
        self.last_success = -1.0
        self._stop_requested = False
        self._init_training_state()
        if cfg.init_from and fresh:
            self.load_policy_weights(cfg.init_from)

    @classmethod
    def budget_keys(cls, config: Any, total_frames: int, eval_every: int, where: str) -> dict[str, int]:
        """The config keys that give a study's run its budget of ``total_frames``, evaluating every ``eval_every``
        frames exactly (the report compares curves at those multiples); a UserError where that cannot be."""
        raise NotImplementedError

    @classmethod
    def check_inputs(cls, config: dict[str, Any], where: str) -> None:
        """Check, before any run of a study starts, what a config names outside itself (e.g. a dataset)."""
        init_from = config.get("init_from")
        if init_from and not Path(init_from).is_file():
            raise UserError(f"{where}: init_from '{init_from}' is not a file (a checkpoint of an earlier run)")

    def sequences_per_step(self) -> int:
        """Sequences the policy runs at once, for ``device="auto"``."""
        raise NotImplementedError

    def _init_training_state(self) -> None:
        """The algorithm's own state beyond the policy and optimiser (samplers, buffers)."""

    @property
    def run_dir(self) -> Path | None:
        return Path(self.config.run_dir) if self.config.run_dir else None

    def prepare(self) -> None:
        """Check what ``learn`` needs beyond the config (e.g. a dataset), so a mistake fails before any output."""

    def close(self) -> None:
        """Release what ``learn`` opened (env processes)."""

    # ------------------------------------------------------------------ run directory and stopping
    def make_run_dir(self) -> None:
        """Create the run directory with its ``checkpoints/`` and write ``config.json``; one line if it cannot."""
        run_dir = self.run_dir
        assert run_dir is not None, "the config has no run_dir"
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write to run directory {run_dir}: {e.strerror}") from None

    @contextlib.contextmanager
    def _interrupt_after_update(self) -> Iterator[None]:
        """A first Ctrl-C or SIGTERM ends training after the current update (so the checkpoint is exact); a
        second stops now. SIGTERM is what a scheduler, ``timeout``, ``docker stop`` or a study stopping its runs
        sends.

        Only in the main thread, where Python delivers signals. ``learn`` raises KeyboardInterrupt after saving.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            name = signal.Signals(signum).name
            print(f"\n{name}: stopping after this update ({name} again to stop at once)", file=sys.stderr)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _raise_if_interrupted(self) -> None:
        if self._stop_requested:
            self._stop_requested = False
            raise KeyboardInterrupt

    def _should_stop(self) -> bool:
        """Early stop: the validation success reached ``target_success``, or ``patience`` ran out."""
        cfg = self.config
        reached = cfg.target_success is not None and self.last_success >= cfg.target_success
        return reached or (cfg.patience > 0 and self.stale_evals >= cfg.patience)

    # ------------------------------------------------------------------ evaluation
    @property
    def test_episodes(self) -> int:
        """Episodes of the final evaluation and of :meth:`evaluate` by default."""
        return self.config.eval_episodes

    @property
    def deterministic(self) -> bool:
        """Whether evaluations take the most likely action unless told otherwise."""
        return False

    def make_eval_env(self, **kwargs: Any) -> gym.Env:
        return make_env(self.env_spec, **self.config.env_kwargs, **kwargs)

    def set_env(self, env: Any = None, env_kwargs: dict[str, Any] | None = None) -> None:
        """Play another env, or this one with other options, from now on (evaluation, inspection, later training),
        as SB3's ``set_env``: e.g. a policy trained on a 100-step corridor, on a 500-step one. The policy stays.

        :param env: an env spec as :func:`envs.make_env` takes it; None keeps the current one.
        :param env_kwargs: all of the env's options; None keeps the current ones.
        :raises UserError: the env gives the policy other observation or action spaces than it was built for.
        """
        spec = self.env_spec if env is None else env
        kwargs = dict(self.config.env_kwargs if env_kwargs is None else env_kwargs)
        spaces = env_spaces(spec, kwargs)
        if spaces != (self.observation_space, self.action_space):
            raise UserError(
                f"env '{spec_name(spec)}' with {kwargs} has spaces {spaces[0]} / {spaces[1]}, but the policy was built "
                f"for {self.observation_space} / {self.action_space}"
            )
        self.close()  # envs opened for training are of the old setting
        self.env_spec = spec
        self.config = replace(self.config, env_kwargs=kwargs, **({"env": spec} if isinstance(spec, str) else {}))

    def renders_frames(self) -> bool:
        """Whether the env renders rgb_array frames (for GIFs)."""
        env = self.make_eval_env()
        renders = "rgb_array" in env.metadata.get("render_modes", [])
        env.close()
        return renders

    def evaluate(
        self,
        n_episodes: int | None = None,
        gif_path: str | Path | None = None,
        deterministic: bool | None = None,
        seed_start: int = EVAL_SEED_BASE,
    ) -> dict[str, Any]:
        """Success rate and returns on held-out env seeds (``seed_start`` onwards; never training seeds).

        :param n_episodes: None: :attr:`test_episodes`.
        :param deterministic: None: the agent's default (:attr:`deterministic`).
        """
        self.policy.eval()
        return evaluate(
            self.policy,
            self.make_eval_env,
            self.test_episodes if n_episodes is None else n_episodes,
            seed_start,
            n_parallel=self.eval_parallel,
            deterministic=self.deterministic if deterministic is None else deterministic,
            gif_path=gif_path,
        )

    def inspect(
        self,
        n_episodes: int = 16,
        probe: str | None = None,
        seed_start: int = EVAL_SEED_BASE,
        deterministic: bool | None = None,
        render: bool = False,
    ) -> list[Episode]:
        """Play held-out episodes and keep, per step, what the memory holds and does (see :mod:`agents.inspect`):
        the core's memory and its change, ``info[probe]`` with each observation, and for TLB its attention and
        gates. ``agents.inspect.linear_probe`` and ``principal_components`` analyse the result, and
        ``agents.inspect_figures`` draws it, as ``tlb-rl inspect`` does.

        :param render: keep the first episode's rgb frames (for ``inspect_figures.episode_gif``).
        """
        from agents.inspect import run_inspection

        return run_inspection(self, n_episodes, probe, seed_start, self.eval_parallel, deterministic, render)

    def _validate(self, *tiebreak: float) -> dict[str, float]:
        """Evaluate on the validation seeds; a better (measure, *tiebreak) is saved as ``best.pt``. Only a better
        measure renews ``patience``: a tie-break (BC's validation loss, which keeps falling slowly on a plateau
        of success, even at a run stuck on the action prior) picks among equal checkpoints, and never keeps a run
        going on its own."""
        result = self.evaluate(self.config.eval_episodes, seed_start=VALIDATION_SEED_BASE)
        self.last_success = result["success_rate"]
        measured = result["success_rate"] if self.config.measure == "success" else result["mean_return"]
        score = (measured, *tiebreak)
        self.stale_evals = 0 if measured > self.best_score[0] else self.stale_evals + 1
        if score > self.best_score:
            self.best_score = score
            if self.run_dir is not None:
                self.save(self.run_dir / "checkpoints" / "best.pt")
        return {
            "validation/success_rate": result["success_rate"],
            "validation/return": result["mean_return"],
            "validation/length": result["mean_length"],
        }

    def finish(self, gif: bool = True) -> dict[str, Any]:
        """After training: evaluate ``best.pt`` (else the latest state) on :attr:`test_episodes` held-out seeds,
        write ``final_eval.json`` and, where the env renders, a GIF of one episode into the run directory."""
        run_dir = self.run_dir
        assert run_dir is not None, "finish() needs a run directory"
        best = run_dir / "checkpoints" / "best.pt"
        # Eager: one evaluation, at a batch size training may not have compiled, gains less than compiling costs.
        model = (
            type(self).load(best, env=self.env_spec, run_dir=str(run_dir), compile=False, cuda_graphs=False)
            if best.exists()
            else self
        )
        result = model.evaluate(gif_path=run_dir / "episode.gif" if gif and model.renders_frames() else None)
        result["checkpoint"] = str(best if best.exists() else run_dir / "checkpoints" / "latest.pt")
        result.update(frames=model.frames, updates=model.updates)
        (run_dir / "final_eval.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    # ------------------------------------------------------------------ persistence
    def _progress(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "updates": self.updates,
            "best_score": list(self.best_score),
            "stale_evals": self.stale_evals,
            "last_success": self.last_success,
        }

    def _extra_checkpoint(self) -> dict[str, Any]:
        """What the algorithm saves beyond config, spaces, policy, optimiser and progress."""
        return {}

    def _restore(self, data: dict[str, Any]) -> None:
        """Take back what :meth:`_extra_checkpoint` and :meth:`_progress` saved."""
        progress = data["progress"]
        self.frames, self.updates = progress["frames"], progress["updates"]
        # Checkpoints written before agents shared this class kept PPO's best as "best_success" and no
        # early-stop counters; they load as they were (a run saved then resumes, evaluates and finishes).
        self.best_score = tuple(progress.get("best_score", [progress.get("best_success", -1.0)]))
        self.stale_evals = progress.get("stale_evals", 0)
        self.last_success = progress.get("last_success", -1.0)

    def save(self, path: str | Path, weights_only: bool = False) -> None:
        """Write the model, optimiser and progress to ``path`` (atomically, loadable without executing code).

        :param weights_only: keep only what acting needs (config, spaces, policy weights in float16, progress):
            a file a quarter of the full checkpoint's size to share or ship, which :meth:`load` reads (into
            float32; training from it starts a fresh optimiser).
        """
        config, weights = to_dict(self.config), self.policy.state_dict()
        if weights_only:
            weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
        data = {
            "algo": self.algo,
            "config": {**config, "run_dir": None} if weights_only else config,
            "spaces": policy_spaces_to_dict(self.observation_space, self.action_space),
            "policy": weights,
            "progress": self._progress(),
        }
        if not weights_only:
            data |= {"optimizer": self.optimizer.state_dict(), **self._extra_checkpoint()}
        save_checkpoint(data, path)

    @classmethod
    def load(cls: type[A], path: str | Path, env: Any = None, **overrides: Any) -> A:
        """Load a model saved by :meth:`save`; ``env`` and ``overrides`` replace the saved config's values."""
        data = load_checkpoint(path)
        if data.get("algo") != cls.algo:
            raise UserError(f"{path} is a '{data.get('algo')}' checkpoint, not a {cls.algo.upper()} one")
        missing = {"config", "spaces", "policy", "progress"} - set(data)
        if missing:
            raise UserError(f"checkpoint {path} is incomplete: it has no {', '.join(sorted(missing))}")
        values = {**data["config"], **overrides}
        if values.get("core") == data["config"].get("core"):  # the saved core: as it ran, whatever today's defaults
            values["core_kwargs"] = saved_core_kwargs(values["core"], values.get("core_kwargs") or {})
        config = from_dict(cls.config_class, values, cls.algo.upper())
        model = cls.__new__(cls)
        model._setup(config, env, policy_spaces_from_dict(data["spaces"]))
        try:
            model.policy.load_state_dict(data["policy"])
            if "optimizer" in data:  # not in a weights-only file
                model.optimizer.load_state_dict(data["optimizer"])
            model._restore(data)
        except (RuntimeError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint {path} does not fit its config or this version of tlb-rl: {msg}") from None
        for group in model.optimizer.param_groups:  # a learning_rate override wins over the saved one
            group["lr"] = config.learning_rate
        return model

    def load_policy_weights(self, path: str) -> None:
        """Start from the policy weights of another run's checkpoint (same core, spaces and encoder)."""
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
