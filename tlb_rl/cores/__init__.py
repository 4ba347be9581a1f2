"""Sequence cores: the swappable memory of a policy. ``make_core(name, input_dim, **hyperparameters)``."""

from __future__ import annotations

import difflib
import inspect

from tlb_rl.cores.base import Core, State
from tlb_rl.cores.brsm import BRSMCore
from tlb_rl.cores.feedforward import FeedForwardCore
from tlb_rl.cores.rnn import RNNCore
from tlb_rl.cores.tlb import TLBCore
from tlb_rl.cores.transformer import WindowTransformerCore
from tlb_rl.errors import UserError


def _lstm(input_dim: int, **kw) -> Core:
    return RNNCore(input_dim, cell="lstm", **kw)


def _gru(input_dim: int, **kw) -> Core:
    return RNNCore(input_dim, cell="gru", **kw)


CORES = {
    "tlb": TLBCore,
    "lstm": _lstm,
    "gru": _gru,
    "transformer": WindowTransformerCore,
    "brsm": BRSMCore,
    "none": FeedForwardCore,
}
"""Core names a config may use, each with the class (or factory) that builds it."""


def core_hyperparameters(name: str) -> dict[str, object]:
    """The hyperparameters core ``name`` accepts, with their defaults."""
    target = RNNCore if name in ("lstm", "gru") else CORES[name]
    params = inspect.signature(target).parameters
    skip = {"input_dim", "cell"}
    return {k: p.default for k, p in params.items() if k not in skip}


SAVED_BEFORE: dict[str, dict[str, object]] = {"lstm": {"input_norm": False}, "gru": {"input_norm": False}}
"""Options added with a default other than what the core did before them, each with that earlier behaviour: a
saved config lacking one was made without it (:func:`saved_core_kwargs`)."""


def saved_core_kwargs(name: str, hyperparameters: dict[str, object]) -> dict[str, object]:
    """The hyperparameters of a saved core as it ran: options added since it was saved take the earlier
    behaviour (:data:`SAVED_BEFORE`), not today's default."""
    return {**SAVED_BEFORE.get(name, {}), **hyperparameters}


def make_core(name: str, input_dim: int, **hyperparameters: object) -> Core:
    """Build the core registered as ``name``; its output width is ``core.output_dim``.

    :raises UserError: for an unknown name or a hyperparameter the core does not have.
    """
    if name not in CORES:
        close = difflib.get_close_matches(name, CORES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown core '{name}'{hint}; known cores: {', '.join(CORES)}")
    allowed = core_hyperparameters(name)
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        owners = [other for other in CORES if other != name and set(unknown) <= set(core_hyperparameters(other))]
        # A saved config holds every option of its core; switching its core alone carries them over.
        hint = f" (options of core '{owners[0]}': give core_kwargs={{}} when changing core)" if owners else ""
        raise UserError(
            f"core '{name}' has no hyperparameter {', '.join(map(repr, unknown))}; it takes: {', '.join(allowed)}"
            + hint
        )
    try:
        return CORES[name](input_dim, **hyperparameters)
    except (TypeError, ValueError) as e:  # a bad value, e.g. chunk_size=0 or d_model not divisible by n_heads
        raise UserError(f"core '{name}': {e}") from None


def parse_core_spec(spec: str) -> tuple[str, dict[str, object], bool]:
    """``NAME[:key=value...]``, as the benchmarks take cores on their command lines, -> the core's name, its
    hyperparameters (values read as YAML, as config overrides are) and whether ``compile=true`` is among them.

    :raises UserError: for an unknown name or a malformed ``key=value``.
    """
    from tlb_rl.config import apply_overrides

    name, *options = spec.split(":")
    if name not in CORES:
        raise UserError(f"unknown core '{name}' in '{spec}'; known cores: {', '.join(CORES)}")
    hyperparameters = apply_overrides({}, options)
    return name, hyperparameters, bool(hyperparameters.pop("compile", False))


STATIC_OPTIONS = {"compile": "be compiled", "cuda_graphs": "run as CUDA graphs"}
"""The agent options that need a core whose ops do not depend on the data, and what they do to it."""


def require_static(core: Core, name: str, option: str) -> None:
    """Raise a UserError unless ``core`` (registered as ``name``) runs the same ops whatever the data, as the
    agent option ``option`` (a key of :data:`STATIC_OPTIONS`) needs (``Core.compilable``, ``Core.static_error``)."""
    what = STATIC_OPTIONS[option]
    if not core.compilable:
        can = ", ".join(n for n, c in CORES.items() if getattr(c, "compilable", False))
        raise UserError(f"core '{name}' cannot {what}: drop {option}=true, or use a core that compiles ({can})")
    reason = core.static_error()
    if reason:
        raise UserError(f"core '{name}' {reason}, so it cannot {what}: drop {option}=true")


def compile_core(core: Core, name: str) -> None:
    """Compile ``core`` (registered as ``name``) in place with ``torch.compile``: an agent's ``compile=True``.
    Each input shape and grad mode is compiled on its first call (PPO: acting, training, evaluation).

    :raises UserError: for a core that torch.compile cannot trace whole (:func:`require_static`).
    """
    require_static(core, name, "compile")
    # Static shapes: every shape is compiled for itself, which is what lets TLB's layout depend on T alone;
    # dynamic shapes would trace the chunk loop symbolically. Not fullgraph (tests/test_compile.py checks that
    # the compilable cores trace whole, TLB on a GPU's path; on a CPU it breaks once, on purpose): past Dynamo's
    # limit of graphs per function (8; a notebook calling predict at many batch sizes) fullgraph raises, where
    # the default runs the new shapes eagerly. On a CPU a C++ wrapper calls the kernels instead of Python: the
    # default TLB's acting step 0.60 ms instead of 0.78 (eager 0.92).
    options = {"cpp_wrapper": True} if core.device.type == "cpu" else None
    core.compile(dynamic=False, options=options)


__all__ = [
    "CORES",
    "Core",
    "State",
    "compile_core",
    "core_hyperparameters",
    "make_core",
    "require_static",
    "saved_core_kwargs",
]
