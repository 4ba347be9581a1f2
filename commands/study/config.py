"""A study's YAML config and the grid of runs it expands to (agent x core x seed x env, plus baselines).

    name: quick                      # the study directory is studies/<name> unless --out says otherwise
    seeds: [0, 1, 2]
    threshold: 0.9                   # success rate for "frames to threshold"
    ppo: {n_envs: 8, vectorization: sync, torch_threads: 1}   # PPOConfig keys every PPO run shares
    bc: {torch_threads: 1}           # BCConfig keys every BC run shares
    agents: [{name: ppo}]            # each: name, algo (ppo or bc), optional config (a YAML file), overrides,
                                     # cores (those it runs with; default all)
    cores: [tlb, lstm, none]         # or a mapping core -> core_kwargs
    baselines: {recurrentppo: {n_steps: 128}}   # optional external rows, with their hyperparameters
    envs:
      - name: tmaze-L10
        env: tmaze
        env_kwargs: {corridor_length: 10}
        total_frames: 60000
        eval_every: 5280
        ppo: {n_steps: 132, batch_size: 264}   # per-env PPO keys (e.g. a rollout that holds whole episodes)
        bc: {dataset: demos/tmaze-L10}          # per-env BC keys: where `tlb-rl demos` wrote the demonstrations

A config may start from another: ``extends: other.yaml`` (a path relative to the config's own directory) takes
every key of that study that the config does not set itself, except ``name``; the sections of algorithm keys,
``ppo`` and ``bc``, merge key by key, so a config can change one of them. ``tlb-rl compare`` also takes
``key=value`` overrides after the config (``seeds=[3,4]``, ``ppo.torch_threads=2``), applied last.

A run's config is, later entries winning: the agent's ``config`` file, the study's section for its algorithm
(``ppo`` or ``bc``), the env's section, the agent's ``overrides``, then what the grid fixes (env, env_kwargs,
core, core_kwargs, seed) and the env's budget in the algorithm's own keys (``Agent.budget_keys``: PPO's
``total_frames``/``eval_every``; for BC, whose frames count demonstration steps trained on, ``max_updates``
and ``eval_every_updates`` in gradient steps of ``batch_size * seq_len`` steps). Every run is validated
before anything starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tlb_rl.config import apply_overrides, from_dict, load_yaml
from tlb_rl.errors import UserError

ALGORITHM_SECTIONS = ("ppo", "bc")
"""Study keys that hold an algorithm's config keys, shared by every run of that algorithm."""

BASELINES = ("recurrentppo",)
"""External baselines a study can add as rows (sb3-contrib's RecurrentPPO)."""


@dataclass
class EnvEntry:
    """One environment of the study, with its budget and evaluation schedule."""

    name: str
    """Label in the report and the run directories."""
    env: str
    """Anything ``envs.make_env`` takes."""
    total_frames: int
    """Budget of every run on this env."""
    eval_every: int
    """Frames between validation evaluations: the points of the learning curves."""
    env_kwargs: dict = field(default_factory=dict)
    """Options of the env."""
    measure: str = "success"
    """``success`` (rate) where the env defines success, else ``return`` (mean episodic return, normalised by
    ``return_range``): the curves, the threshold, the best checkpoint and the tables all use it."""
    return_range: list | None = None
    """``[lowest, highest]`` episodic return, which maps returns onto [0, 1] (needed with ``measure: return``)."""
    ppo: dict = field(default_factory=dict)
    """PPOConfig keys for the PPO runs on this env."""
    bc: dict = field(default_factory=dict)
    """BCConfig keys for the BC runs on this env (``dataset`` at least)."""


@dataclass
class AgentEntry:
    """An agent configuration: a row family of the grid, crossed with every core."""

    name: str = "ppo"
    """Label in the report (rows read ``<core>-<name>``)."""
    algo: str = "ppo"
    """The trainer: a name in ``agents.ALGORITHMS`` (ppo, bc)."""
    config: str | None = None
    """A YAML config to start from (e.g. configs/ppo/tmaze.yaml)."""
    overrides: dict = field(default_factory=dict)
    """Keys that make this agent what it is; they win over the study's and the env's."""
    cores: list[str] | None = None
    """The study's cores this agent runs with (None: all). Two agents may share a name where their cores differ,
    e.g. ``{name: ppo, cores: [tlb], overrides: {compile: true}}`` beside ``{name: ppo, cores: [lstm]}``."""


@dataclass
class StudyConfig:
    """A whole study, as read from configs/compare/*.yaml."""

    envs: list[EnvEntry]
    """Environments."""
    name: str = "study"
    """Name of the study directory under studies/."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Training seeds (env i of a run with seed s is seeded s + i)."""
    threshold: float = 0.9
    """Success rate that "frames to threshold" counts to."""
    agents: list[AgentEntry] = field(default_factory=lambda: [AgentEntry()])
    """Agent configurations."""
    cores: dict[str, dict] = field(default_factory=lambda: {"tlb": {}, "lstm": {}})
    """Memory cores, each with its core_kwargs."""
    ppo: dict = field(default_factory=dict)
    """PPOConfig keys every PPO run shares."""
    bc: dict = field(default_factory=dict)
    """BCConfig keys every BC run shares."""
    baselines: dict[str, dict] = field(default_factory=dict)
    """External baselines (``recurrentppo``) and their hyperparameters."""

    def cores_of(self, agent: AgentEntry) -> list[str]:
        """The cores ``agent`` runs with, in the study's order."""
        return [core for core in self.cores if agent.cores is None or core in agent.cores]


@dataclass
class RunSpec:
    """One cell of the grid: everything needed to run it and to find it again."""

    run_id: str
    """``<env>/<row>/s<seed>``: also the run directory under the study's runs/."""
    env_name: str
    row: str
    """Report row, e.g. ``tlb-ppo`` or ``sb3-recurrentppo``."""
    seed: int
    algo: str
    """``ppo``, ``bc`` or a baseline's name."""
    config: dict[str, Any]
    """The keys the study sets (PPOConfig or BCConfig keys; run_dir is set by the runner). The run directory's
    config.json holds the full config, defaults included."""

    def fingerprint(self) -> str:
        """A hash of the study's keys: a finished run is reused only if it was asked for with the same ones
        (a default changed in the code since does not count: code versions are not tracked)."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]


def _entries(cls: type, items: Any, where: str) -> list:
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise UserError(f"study key '{where}' must be a list of mappings")
    return [from_dict(cls, item, f"{where}[{i}]") for i, item in enumerate(items)]


def _read_extended(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"study config {path}: 'extends' must be the path of another study config, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise UserError(f"study config {path}: extends '{base}', which is not a file ({base_path})")
    if base_path.resolve() in chain:
        raise UserError(f"study config {path}: 'extends: {base}' leads back to itself")
    inherited = _read_extended(base_path, (*chain, base_path.resolve()))
    inherited.pop("name")
    merged = {**inherited, **data}
    for section in ALGORITHM_SECTIONS:
        if isinstance(inherited.get(section), dict) and isinstance(data.get(section), dict):
            merged[section] = _merge(inherited[section], data[section])
    return merged


def read_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A study config's mapping with ``extends`` resolved and ``key=value`` ``overrides`` applied, unvalidated."""
    path = Path(path)
    data = apply_overrides(_read_extended(path, (path.resolve(),)), list(overrides))
    if "extends" in data:
        raise UserError("'extends' belongs in a study config's file, not in an override")
    return data


def study_source(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """What a study directory keeps of its config (``study.yaml``): the file as written where it stands alone,
    else the mapping it resolves to, so the directory does not depend on other files."""
    text = Path(path).read_text()
    if not overrides and "extends" not in (yaml.safe_load(text) or {}):
        return text
    given = " ".join([str(path), *overrides])
    return f"# {given}, resolved\n" + yaml.safe_dump(read_study(path, overrides), sort_keys=False)


def load_study(path: str | Path, runnable: bool = True, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read and validate a study config, and (``runnable``) every run's PPOConfig or BCConfig, env and dataset.

    :param runnable: False for a report: it expands (and so validates) the runs itself, and needs neither
        the envs nor the BC rows' dataset directories (a report re-rendered after the demonstrations were
        deleted must still work).
    :param overrides: ``key=value`` strings applied last (``seeds=[3,4]``, ``ppo.torch_threads=2``).
    """
    data = read_study(path, overrides)
    if "envs" not in data:
        raise UserError(f"study config {path} has no 'envs' list")
    data["envs"] = _entries(EnvEntry, data["envs"], "envs")
    if "agents" in data:
        data["agents"] = _entries(AgentEntry, data["agents"], "agents")
    if isinstance(data.get("cores"), list):
        data["cores"] = {name: {} for name in data["cores"]}
    study = from_dict(StudyConfig, data, "study")
    _check(study)
    if not runnable:
        return study
    runs = expand(study)  # validates every run's config now, before any run starts
    from agents import ALGORITHMS
    from envs import make_env

    for run in runs:
        if run.algo in ALGORITHMS:
            ALGORITHMS[run.algo].check_inputs(run.config, f"{run.algo.upper()} run {run.run_id}")

    for env in study.envs:  # an unknown env id or option fails here in one line, not in every run twice
        make_env(env.env, **env.env_kwargs).close()
    return study


def _check(study: StudyConfig) -> None:
    if not study.seeds or len(set(study.seeds)) != len(study.seeds) or not all(isinstance(s, int) for s in study.seeds):
        raise UserError("study key 'seeds' must list distinct seeds")
    if not 0 < study.threshold <= 1:
        raise UserError(f"study key 'threshold' must be in (0, 1], got {study.threshold}")
    names = [e.name for e in study.envs]
    if len(set(names)) != len(names):
        raise UserError(f"study envs need distinct names, got {names}")
    for agent in study.agents:
        if agent.cores == []:
            raise UserError(f"agent '{agent.name}': cores [] names no core; leave the key out to run all of them")
        unknown = sorted(set(agent.cores or ()) - set(study.cores))
        if unknown:
            raise UserError(f"agent '{agent.name}': cores {unknown} not among the study's {list(study.cores)}")
    rows = [f"{core}-{a.name}" for a in study.agents for core in study.cores_of(a)]
    if len(set(rows)) != len(rows):
        raise UserError(f"study agents need distinct names where they share a core, got rows {rows}")
    for env in study.envs:
        if env.total_frames < 1 or not 0 < env.eval_every <= env.total_frames:
            raise UserError(f"env '{env.name}': need total_frames >= 1 and 0 < eval_every <= total_frames")
        if env.measure not in ("success", "return"):
            raise UserError(f"env '{env.name}': measure must be success or return, got '{env.measure}'")
        valid_range = (
            isinstance(env.return_range, list)
            and len(env.return_range) == 2
            and all(isinstance(x, (int, float)) for x in env.return_range)
            and env.return_range[0] < env.return_range[1]
        )
        if env.measure == "return" and not valid_range:
            raise UserError(
                f"env '{env.name}': measure 'return' needs return_range: [lowest, highest] episodic return "
                f"(got {env.return_range}), so that curves and the threshold lie on [0, 1]"
            )
    from agents import ALGORITHMS

    for agent in study.agents:
        if agent.algo not in ALGORITHMS:
            raise UserError(f"agent '{agent.name}': unknown algo '{agent.algo}'; known: {', '.join(ALGORITHMS)}")
    unknown = set(study.baselines) - set(BASELINES)
    if unknown:
        raise UserError(f"unknown baseline(s) {sorted(unknown)}; known: {', '.join(BASELINES)}")


def _merge(*layers: dict) -> dict:
    """Later layers win; nested mappings (env_kwargs, core_kwargs) merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
    return out


def agent_config(study: StudyConfig, agent: AgentEntry, core: str, env: EnvEntry, seed: int) -> dict[str, Any]:
    """The config keys the study sets for one grid cell (validated; the config class's defaults fill the rest).

    Layers, later winning: the agent's YAML, the study's and the env's section for the algorithm, the agent's
    overrides, then the cell (env, core, seed) and the env's budget in the algorithm's own keys.
    """
    from agents import get_algorithm

    cls = get_algorithm(agent.algo)
    base = load_yaml(agent.config) if agent.config else {}
    cell = {"env": env.env, "env_kwargs": env.env_kwargs, "core": core, "core_kwargs": study.cores[core], "seed": seed}
    if env.measure != "success":  # a success-measured run keeps the keys (and fingerprint) it had before
        cell["measure"] = env.measure
    merged = _merge(base, getattr(study, agent.algo, {}), getattr(env, agent.algo, {}), agent.overrides, cell)
    merged.pop("run_dir", None)
    where = f"{cls.algo.upper()} config of {agent.name}/{core} on {env.name}"
    if isinstance(merged.get("init_from"), str):  # each cell starts from its own run of an earlier study
        try:
            merged["init_from"] = merged["init_from"].format(core=core, seed=seed, env=env.name)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(
                f"{where}: init_from '{merged['init_from']}' may name {{core}}, {{seed}} and {{env}} only ({e})"
            ) from None
    config = from_dict(cls.config_class, merged, where)
    merged.update(cls.budget_keys(config, env.total_frames, env.eval_every, where))
    return merged


def baseline_config(study: StudyConfig, name: str, env: EnvEntry, seed: int) -> dict[str, Any]:
    """The keys of a baseline run (hyperparameters from the study, budget and env from the grid), validated."""
    from commands.study.sb3_baseline import RecurrentPPOConfig

    # The baseline shares the PPO rows' keys it knows (rollout length, learning rate, validation episodes...),
    # so both see the same cut between cue and choice; its own keys in the study win.
    known = {f.name for f in dataclasses.fields(RecurrentPPOConfig)}
    shared = {k: v for k, v in _merge(study.ppo, env.ppo).items() if k in known}
    merged = {
        **shared,
        **study.baselines[name],
        "env": env.env,
        "env_kwargs": env.env_kwargs,
        **({"measure": env.measure} if env.measure != "success" else {}),
        "seed": seed,
        "total_frames": env.total_frames,
        "eval_every": env.eval_every,
    }
    config = from_dict(RecurrentPPOConfig, merged, f"baseline {name} on {env.name}")
    if env.eval_every % (config.n_envs * config.n_steps):
        raise UserError(
            f"baseline {name} on {env.name}: eval_every ({env.eval_every}) must be a multiple of "
            f"n_envs * n_steps ({config.n_envs * config.n_steps})"
        )
    return merged


def expand(study: StudyConfig) -> list[RunSpec]:
    """Every run of the study, seed-major, so an interrupted study has whole seeds done first."""
    runs = []
    for seed in study.seeds:
        for env in study.envs:
            for agent in study.agents:
                for core in study.cores_of(agent):
                    row = f"{core}-{agent.name}"
                    config = agent_config(study, agent, core, env, seed)
                    runs.append(RunSpec(f"{env.name}/{row}/s{seed}", env.name, row, seed, agent.algo, config))
            for name in study.baselines:
                config = baseline_config(study, name, env, seed)
                runs.append(RunSpec(f"{env.name}/sb3-{name}/s{seed}", env.name, f"sb3-{name}", seed, name, config))
    return runs
