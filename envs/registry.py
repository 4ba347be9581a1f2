"""From an env spec to a ready ``gymnasium.Env``: built-in ids, plug-ins, and one-line errors.

A spec is one of

- a registered Gymnasium id: ``"MiniGrid-MemoryS7-v0"``, ``"BabyAI-GoToLocal-v0"``, ``"CartPole-v1"``;
- the name of a plug-in registered in the ``tlb_rl.envs`` entry-point group: ``"tmaze"``;
- ``"package.module:ClassOrFactory"`` or ``"path/to/file.py:ClassOrFactory"``;
- a callable returning an env.

Everything that is not a Gymnasium id is a *plug-in*: the first time a process makes one with given
options, a separate instance goes through Gymnasium's env checker, so a broken plug-in fails with the
checker's message rather than deep inside a rollout.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
from gymnasium import spaces
from gymnasium.envs.registration import load_env_creator
from gymnasium.utils import env_checker, passive_env_checker

from envs.minigrid import is_minigrid, wrap_minigrid
from envs.seeding import SeededEpisodes
from envs.text import MISSION_LENGTH, TokenizeText, has_text
from envs.tuples import TupleToDict
from tlb_rl.errors import UserError

ENTRY_POINT_GROUP = "tlb_rl.envs"
"""Entry-point group in which packages register env plug-ins (name = "module:ClassOrFactory")."""

_BUILT_IN_FAMILIES = ("MiniGrid", "BabyAI")
_OBSERVATION_SPACES = "Box, Discrete, MultiDiscrete, MultiBinary, Text, or a Dict or Tuple of these"
_ACTION_SPACES = "Discrete, MultiDiscrete, or a float Box"
# Options make_env handles itself rather than passing to the env's constructor: view_size (MiniGrid),
# mission_length (token slots of text observations), max_episode_steps (a time limit).
_OUR_OPTIONS = ("view_size", "mission_length", "max_episode_steps")

EnvFactory = Callable[..., gym.Env]


@dataclass(frozen=True)
class EnvEntry:
    """One env a spec can name: ``tlb-rl envs`` lists them."""

    name: str
    family: str
    source: str


def _import_minigrid() -> None:
    # Importing minigrid registers the MiniGrid and BabyAI ids with Gymnasium.
    importlib.import_module("minigrid")


def plugin_entry_points() -> dict[str, str]:
    """Plug-ins registered by installed packages: name -> ``"module:ClassOrFactory"``."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def list_envs() -> list[EnvEntry]:
    """Every built-in MiniGrid/BabyAI id and every registered plug-in."""
    _import_minigrid()
    entries = [
        EnvEntry(env_id, family, "minigrid")
        for family in _BUILT_IN_FAMILIES
        for env_id in sorted(gym.registry)
        if env_id.startswith(family + "-")
    ]
    entries += [EnvEntry(name, "plug-in", value) for name, value in sorted(plugin_entry_points().items())]
    return entries


def describe_envs() -> str:
    """Human-readable :func:`list_envs`, for ``tlb-rl envs``."""
    entries = list_envs()
    lines = []
    for family in _BUILT_IN_FAMILIES:
        ids = ", ".join(e.name for e in entries if e.family == family)
        lines.append(f"{family} (options: view_size, mission_length, max_episode_steps):")
        lines.append(textwrap.fill(ids, 100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False))
    plugins = [e for e in entries if e.family == "plug-in"]
    lines.append(f"plug-ins (entry-point group '{ENTRY_POINT_GROUP}'):")
    width = max((len(e.name) for e in plugins), default=0)
    lines += [f"  {e.name:<{width}}  {e.source}" for e in plugins] or ["  (none installed)"]
    lines.append("Also accepted: any registered Gymnasium id, 'package.module:Factory', 'path/to/file.py:Factory'.")
    return "\n".join(lines)


def _import_file(path: Path) -> ModuleType:
    """Import a user's module file once per process (again if another file of that name is asked for)."""
    name = f"tlb_rl_plugin_{path.stem}"
    module = sys.modules.get(name)
    if module is None or Path(module.__file__) != path:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # as `import` does: dataclasses and pickling look the module up there
        module_spec.loader.exec_module(module)
    return module


def load_attribute(target: str, what: str = "env spec") -> Any:
    """The object named by ``"module:attr"`` or ``"path/file.py:attr"``; UserError (naming it ``what``) when it
    is not there."""
    where, _, attr = target.rpartition(":")
    path = Path(where).expanduser().resolve()
    is_file = where.endswith(".py") or "/" in where
    if is_file and not path.is_file():
        raise UserError(f"{what} '{target}': no file {path}")
    try:
        module = _import_file(path) if is_file else importlib.import_module(where)
    except Exception as err:
        raise UserError(f"{what} '{target}': cannot import '{where}': {type(err).__name__}: {err}") from err
    try:
        return functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        if what == "env spec" and attr in gym.registry:  # Gymnasium's own "module:EnvId" form
            return attr
        raise UserError(f"{what} '{target}': '{where}' has no attribute '{attr}'") from None


def _unknown_id(spec: str) -> UserError:
    known = [*plugin_entry_points(), *gym.registry]
    close = difflib.get_close_matches(spec, known, n=3, cutoff=0.6)
    hint = f"; closest known: {', '.join(close)}" if close else ""
    return UserError(f"unknown env '{spec}'{hint}. Run `tlb-rl envs` to list them, or give 'module:Factory'.")


def resolve(spec: str | EnvFactory) -> tuple[str, EnvFactory | str]:
    """The display name of ``spec`` and either a Gymnasium id (str) or a plug-in factory (callable)."""
    if callable(spec):
        return getattr(spec, "__qualname__", repr(spec)), spec
    if not isinstance(spec, str):
        raise UserError(f"env spec must be an id, 'module:Factory' or a callable, got {type(spec).__name__}")
    if ":" in spec:
        target = load_attribute(spec)
    elif spec in (entry_points := plugin_entry_points()):
        target = load_attribute(entry_points[spec])
    else:
        _import_minigrid()
        if spec not in gym.registry:
            raise _unknown_id(spec)
        target = spec
    if not (isinstance(target, str) or callable(target)):
        raise UserError(f"env spec '{spec}' names a {type(target).__name__}, not an env class or factory")
    return spec, target


def _gym_factory(env_id: str) -> Callable[..., Any]:
    entry_point = gym.spec(env_id).entry_point
    return entry_point if callable(entry_point) else load_env_creator(entry_point)


def _accepted_options(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword options ``factory`` takes, following ``**kwargs`` up the base classes; None if it takes any."""
    functions = (
        [c.__dict__["__init__"] for c in factory.__mro__ if "__init__" in c.__dict__ and c is not object]
        if inspect.isclass(factory)
        else [factory]
    )
    names: set[str] = set()
    for function in functions:
        params = list(inspect.signature(function).parameters.values())
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    # Every step passed **kwargs on: a class's chain ends at object, which takes none; a function takes any.
    return names if inspect.isclass(factory) else None


def _check_options(name: str, accepted: set[str] | None, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:
        takes = ", ".join(sorted(accepted | set(_OUR_OPTIONS)))
        raise UserError(f"env '{name}' has no option {', '.join(map(repr, unknown))}; it takes: {takes}")


def check_spaces(env: gym.Env) -> None:
    """Raise :class:`UserError` unless ``env``'s spaces are ones tlb-rl's policies handle.

    Text observations are supported because :func:`make_env` tokenises them, Tuples because it makes them Dicts.
    """
    observation, action = env.observation_space, env.action_space
    flat = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary, spaces.Text)
    parts = list(observation.spaces) if isinstance(observation, spaces.Tuple) else [observation]
    if isinstance(observation, spaces.Dict):
        parts = list(observation.values())
    if not parts or not all(isinstance(s, flat) for s in parts):
        raise UserError(
            f"env {_env_name(env)}: observation space {observation} is not supported; supported: {_OBSERVATION_SPACES}"
        )
    float_box = isinstance(action, spaces.Box) and action.dtype.kind == "f"
    one_dim = isinstance(action, spaces.MultiDiscrete) and action.nvec.ndim == 1
    if not (isinstance(action, spaces.Discrete) or one_dim or float_box):
        raise UserError(f"env {_env_name(env)}: action space {action} is not supported; supported: {_ACTION_SPACES}")


def _env_name(env: gym.Env) -> str:
    spec = env.unwrapped.spec
    return f"'{spec.id}'" if spec is not None else f"'{type(env.unwrapped).__name__}'"


def _construct(name: str, factory: EnvFactory, options: dict[str, Any]) -> gym.Env:
    try:
        env = factory(**options)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"env '{name}' could not be made: {type(err).__name__}: {err}") from err
    if not isinstance(env, gym.Env):
        raise UserError(f"env '{name}': the factory returned a {type(env).__name__}, not a gymnasium.Env")
    return env


# (spec, options) of the plug-ins this process has checked, so making 8 envs runs the slow checker once.
_CHECKED: set[str] = set()


# Gymnasium's env checker (gymnasium.utils.env_checker.check_env, in its order, without the render checks),
# run check by check so that each finding is sorted: those that would break training stop with one line; the
# others do not touch what training reads (our vector envs copy observations, infos are read the step they
# come) and become one warning each.
_BREAKING_CHECKS = (
    lambda env: env_checker.check_action_space(env.action_space),
    lambda env: env_checker.check_observation_space(env.observation_space),
    env_checker.check_seed_deprecation,
    env_checker.check_reset_return_info_deprecation,
    env_checker.check_reset_return_type,
)
_LATER_BREAKING_CHECKS = (
    env_checker.check_reset_options,
    passive_env_checker.env_reset_passive_checker,
    lambda env: passive_env_checker.env_step_passive_checker(env, env.action_space.sample()),
)
_HARMLESS_CHECKS = {
    env_checker.check_reset_seed_determinism: "exact resume will warn that it could not replay its episodes",
    env_checker.check_step_determinism: "exact resume will warn that it could not replay its episodes",
    env_checker.check_returned_data_not_reused: "tlb-rl copies observations and reads infos at once",
}


class EnvCheckWarning(UserWarning):
    """A finding of Gymnasium's env checker that does not affect training with tlb-rl."""


def _check_plugin(name: str, env: gym.Env) -> None:
    if not is_minigrid(env):  # a MiniGrid env's spaces are checked once wrapped
        check_spaces(env)
    try:
        env.reset(seed=0)
    except Exception as err:
        raise UserError(f"plug-in env '{name}' raised in reset(): {type(err).__name__}: {err}") from err
    for check in (*_BREAKING_CHECKS, *_HARMLESS_CHECKS, *_LATER_BREAKING_CHECKS):
        try:
            check(env)
        except Exception as err:
            first_line = (str(err).strip().splitlines() or [""])[0]
            # The checker's own findings are assertions; anything else was raised by the env's code.
            finding = first_line if isinstance(err, AssertionError) else f"{type(err).__name__}: {first_line}"
            if check not in _HARMLESS_CHECKS or not isinstance(err, AssertionError):
                raise UserError(
                    f"plug-in env '{name}' breaks the Gymnasium API (gymnasium env checker): {finding}"
                ) from err
            warnings.warn(
                f"plug-in env '{name}': {finding} (gymnasium env checker; training is unaffected: "
                f"{_HARMLESS_CHECKS[check]})",
                EnvCheckWarning,
                stacklevel=2,
            )


def _check_plugin_api(name: str, factory: EnvFactory, options: dict[str, Any]) -> None:
    """Check the spaces, reset and API of a fresh instance of a plug-in, once per process and options."""
    key = f"{name}|{factory!r}|{sorted(options.items())!r}"
    if key in _CHECKED:
        return
    env = _construct(name, factory, options)
    try:
        _check_plugin(name, env)
    finally:
        env.close()
    _CHECKED.add(key)


def build_env(spec: str | EnvFactory, seed: int | None, options: dict[str, Any], check_api: bool) -> gym.Env:
    """:func:`make_env`; ``check_api=False`` skips the plug-in checker (vector workers, already checked)."""
    name, target = resolve(spec)
    factory = _gym_factory(target) if isinstance(target, str) else target
    accepted = _accepted_options(factory)
    # An option the env itself names goes to the env, even if make_env has one of that name.
    ours = {k: options[k] for k in _OUR_OPTIONS if k in options and k not in (accepted or ())}
    options = {k: v for k, v in options.items() if k not in ours}
    _check_options(name, accepted, options)
    if isinstance(target, str):
        make = functools.partial(gym.make, target, max_episode_steps=ours.get("max_episode_steps"))
        env = _construct(name, make, options)
    else:
        if check_api:
            _check_plugin_api(name, target, options)
        env = _construct(name, target, options)
        if ours.get("max_episode_steps") is not None:
            env = gym.wrappers.TimeLimit(env, ours["max_episode_steps"])
    mission_length = ours.get("mission_length", MISSION_LENGTH)
    if is_minigrid(env):
        env = wrap_minigrid(env, view_size=ours.get("view_size"), mission_length=mission_length)
    elif "view_size" in ours:
        raise UserError(f"env '{name}': view_size applies to MiniGrid and BabyAI envs only")
    check_spaces(env)
    if isinstance(env.observation_space, spaces.Tuple):
        env = TupleToDict(env)
    if has_text(env.observation_space):
        env = TokenizeText(env, mission_length)
    elif "mission_length" in ours and not is_minigrid(env):
        raise UserError(f"env '{name}': mission_length applies to envs with text observations only")
    return SeededEpisodes(env, seed) if seed is not None else env
