"""Experts that play an env's episodes for demonstrations (:func:`agents.demos.generate_demos`).

An expert is a callable ``expert(env)``, called after each reset with the wrapped env, that returns the
episode's policy: a function of no arguments giving the next action. It may read the unwrapped env's full
state (an expert is privileged; the policy cloned from it sees only the observations). Built in:

- BabyAI levels: the BabyAI bot (``minigrid.utils.baby_ai_bot.BabyAIBot``).
- MiniGrid's Memory envs: :func:`memory_expert`, which first turns and walks back until it sees the cue
  object, then takes the shortest path to the matching one. The cue is behind the agent when an episode
  starts, so a policy that clones it learns to look before it has to remember.

Any other env takes ``expert="module:function"`` or ``"path/file.py:function"`` (``tlb-rl demos --expert``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import gymnasium as gym

from envs.memory_cue import cue_cell
from envs.registry import load_attribute
from tlb_rl.errors import UserError

Expert = Callable[[gym.Env], Callable[[], int]]


def babyai_bot(env: gym.Env) -> Callable[[], int]:
    """The BabyAI bot, planning on the unwrapped level."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    bot = BabyAIBot(env.unwrapped)
    return lambda: int(bot.replan())


# MiniGrid's actions and directions (minigrid.core.actions.Actions, DIR_TO_VEC)
LEFT, RIGHT, FORWARD = 0, 1, 2
STEPS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # direction 0 faces +x (right), 1 +y (down), 2 -x, 3 -y


def memory_expert(env: gym.Env) -> Callable[[], int]:
    """MiniGrid-Memory: look at the cue object in the start room, then go to the matching object's cell."""
    level = env.unwrapped
    cue = cue_cell(level)
    seen = False

    def act() -> int:
        nonlocal seen
        seen = seen or bool(level.agent_sees(*cue))
        if not seen:  # face the start room (direction 2) and walk towards it until the cue comes into view
            return FORWARD if level.agent_dir == 2 else LEFT
        return _shortest_path_action(level, tuple(level.success_pos), avoid=tuple(level.failure_pos))

    return act


def _shortest_path_action(level: gym.Env, goal: tuple[int, int], avoid: tuple[int, int]) -> int:
    """The first action of a shortest turn/forward path from the agent's pose to ``goal`` (breadth first)."""
    start = (*level.agent_pos, level.agent_dir)
    first: dict[tuple[int, int, int], int | None] = {start: None}
    queue = deque([start])
    while queue:
        x, y, d = pose = queue.popleft()
        if (x, y) == goal:
            action = first[pose]
            assert action is not None, "the agent is already at the goal"
            return action
        dx, dy = STEPS[d]
        cell = level.grid.get(x + dx, y + dy)
        moves = [(LEFT, (x, y, (d - 1) % 4)), (RIGHT, (x, y, (d + 1) % 4))]
        if (x + dx, y + dy) != avoid and (cell is None or cell.can_overlap()):
            moves.append((FORWARD, (x + dx, y + dy, d)))
        for action, nxt in moves:
            if nxt not in first:
                first[nxt] = action if first[pose] is None else first[pose]
                queue.append(nxt)
    raise RuntimeError(f"no path from {start[:2]} to {goal}")


def find_expert(env: gym.Env, spec: str | None) -> tuple[str, Expert]:
    """The expert ``spec`` names (``module:function``), or the built-in one for ``env``; its name for the header.

    :raises UserError: no built-in expert for the env and none named, or a name that is not a callable.
    """
    if spec is not None:
        if ":" not in spec:
            raise UserError(f"expert '{spec}': give it as module:function or path/file.py:function")
        expert = load_attribute(spec, "expert")
        if not callable(expert):
            raise UserError(f"expert '{spec}' names a {type(expert).__name__}, not a function of the env")
        return spec, expert
    from minigrid.envs import MemoryEnv
    from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel

    level = env.unwrapped
    if isinstance(level, RoomGridLevel):
        return "minigrid.utils.baby_ai_bot.BabyAIBot", babyai_bot
    if isinstance(level, MemoryEnv):
        return "agents.experts:memory_expert", memory_expert
    raise UserError(
        f"no built-in expert plays {type(level).__name__} (built in: the BabyAI bot for BabyAI levels, "
        "one for MiniGrid-Memory); give one with --expert module:function (agents/experts.py says how)"
    )


__all__ = ["Expert", "babyai_bot", "find_expert", "memory_expert"]
