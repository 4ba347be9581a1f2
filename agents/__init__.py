"""Algorithms that train a ``tlb_rl`` sequence policy, and the registry the CLI and the studies find them in.

A new algorithm is a subclass of :class:`agents.base.Agent` in its own module plus one entry here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agents.base import Agent, AgentConfig
from agents.bc import BC, BCConfig
from agents.ppo import PPO, PPOConfig
from tlb_rl.checkpoint import load_checkpoint
from tlb_rl.errors import UserError

ALGORITHMS: dict[str, type[Agent]] = {cls.algo: cls for cls in (PPO, BC)}
"""Algorithm names (``tlb-rl train --algo``, a study agent's ``algo``, a checkpoint's ``algo``) and classes."""


def get_algorithm(name: str) -> type[Agent]:
    """The agent class registered as ``name``, or a UserError listing the known ones."""
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm '{name}'; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def load_model(path: str | Path, **overrides: Any) -> Agent:
    """A saved model of whichever algorithm its checkpoint names (``overrides`` as in :meth:`Agent.load`)."""
    return get_algorithm(load_checkpoint(path).get("algo", "?")).load(path, **overrides)


__all__ = ["ALGORITHMS", "BC", "PPO", "Agent", "AgentConfig", "BCConfig", "PPOConfig", "get_algorithm", "load_model"]
