"""Recording what a core computes, from the forward pass that acts: attention weights and gate openings.

    with recording() as rec:
        y, state = core(x, state, starts)
    rec[core.update.attn]   # the slow update's attention weights of this call, [B, H, N, K]

Inside the block, the modules that compute something worth seeing add it under their own key (a module, or
a (module, name) pair); outside one, :func:`record` costs one check and computes nothing. Weights are
recorded beside the result, which is computed as always, so recording does not change what the core does.
A recording sees the cores called in its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

_local = threading.local()


def _active() -> list[dict[Hashable, list[torch.Tensor]]]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextmanager
def recording() -> Iterator[dict[Hashable, list[torch.Tensor]]]:
    """Collect, per key, every tensor the cores record inside the block, in call order (detached)."""
    records: dict[Hashable, list[torch.Tensor]] = {}
    _active().append(records)
    try:
        yield records
    finally:
        _active().pop()


def record(key: Hashable, value: Callable[[], torch.Tensor]) -> None:
    """Add ``value()`` under ``key`` when a recording is on; ``value`` is not called otherwise. A compiled core
    records nothing: its graph would bake in whether a recording was on when it was traced."""
    if torch.compiler.is_compiling():
        return
    stack = _active()
    if stack:
        stack[-1].setdefault(key, []).append(value().detach())
