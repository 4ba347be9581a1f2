"""What a policy's memory does during episodes: :meth:`agents.base.Agent.inspect` and ``tlb-rl inspect``.

Episodes run step by step as in evaluation (held-out seeds), and every step keeps:

- the core's memory after the step (``Core.memory``: TLB's slow vectors, an LSTM's h and c, ...) and how
  much it changed;
- a quantity the env reports in ``info`` (the probe target: the T-maze's ``cue``), with each observation;
- for TLB, from the acting pass itself (``tlb_rl.cores.record``, no second implementation): how much the
  step read from each slow vector, and at each completed chunk how much each slow vector read from each
  step of the chunk and how far its gate opened.

From these, :func:`linear_probe` answers "does the memory hold the cue after L steps?" with a number per
step, :func:`chunk_split` how a TLB policy does when an episode crosses a chunk boundary (where all it
carries passes through the slow vectors), and :func:`principal_components` gives the memory's trajectory;
``inspect_figures`` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agents.evaluate import episode_success
from envs.seeding import EVAL_SEED_BASE
from tlb_rl.cores.record import recording
from tlb_rl.cores.tlb import TLBCore
from tlb_rl.encoders import obs_to_tensor
from tlb_rl.errors import UserError
from tlb_rl.spaces import clip_to_space, stack_observations

if TYPE_CHECKING:
    from agents.base import Agent

PROBE_PENALTY = 1.0
"""The probe's ridge penalty, in units of the memory's total variance over all steps of all episodes: a label
counts as read where it moves the memory about as much as the memory varies over an episode. A scale is
needed because in a deterministic env (the T-maze's corridor) nothing but the label varies between episodes
at a given step, so any trace of it, however small, would be read perfectly without a penalty. Measured
on the T-maze (docs/results.md): an untrained TLB's slow vectors hold the cue at the junction at 0.90 with a
penalty of 1e-3 (its slow update is residual, so what the first chunk writes is carried), 0.06 with 1."""


@dataclass
class Episode:
    """One inspected episode; arrays over its T steps."""

    seed: int
    success: bool
    memory: np.ndarray  # [T, F] the memory after each step
    change: np.ndarray  # [T] |m_t - m_(t-1)| / |m_(t-1)|, from the initial memory at t = 0
    labels: list[Any]  # [T] info[probe] with each step's observation (empty without a probe)
    reads: np.ndarray | None = None  # TLB: [T, N] each step's cross-attention over the slow vectors
    chunk_ends: list[int] = field(default_factory=list)  # TLB: the steps at which a chunk completed
    writes: list[np.ndarray] = field(default_factory=list)  # TLB: per completed chunk, [N, K] over its steps
    openings: list[np.ndarray] = field(default_factory=list)  # TLB, gated: per completed chunk, [N]
    frames: list[np.ndarray] = field(default_factory=list)  # rgb frames, where rendering was asked


def _label(info: dict[str, Any], key: str | None) -> Any:
    """``info[key]`` as a plain number, bool or string (None where the info lacks it)."""
    if key is None or key not in info:
        return None
    value = info[key]
    if isinstance(value, np.ndarray | np.generic) and np.size(value) == 1:
        value = np.asarray(value).item()
    if not isinstance(value, int | float | bool | str):
        raise UserError(f"info[{key!r}] is {type(value).__name__}: the probe reads a number, bool or string per step")
    return value


@torch.inference_mode()
@torch.compiler.set_stance("force_eager")  # a compiled core records nothing (tlb_rl.cores.record)
def run_inspection(
    agent: Agent,
    n_episodes: int = 16,
    probe: str | None = None,
    seed_start: int = EVAL_SEED_BASE,
    n_parallel: int = 8,
    deterministic: bool | None = None,
    render: bool = False,
) -> list[Episode]:
    """Play ``n_episodes`` held-out episodes, ``n_parallel`` at a time, keeping what the memory does per step.

    :param probe: a key of the env's ``info`` to record with every observation (``reset`` and ``step`` infos).
    :param render: keep rgb frames of the first episode (the env must render ``rgb_array``).
    """
    policy, core = agent.policy.eval(), agent.policy.core
    if not core.has_memory:
        raise UserError(f"core {agent.config.core!r} has no memory to inspect")
    device = policy.critic.weight.device
    deterministic = agent.deterministic if deterministic is None else deterministic
    n = min(n_parallel, n_episodes)
    envs = [
        agent.make_eval_env(render_mode="rgb_array") if render and i == 0 else agent.make_eval_env() for i in range(n)
    ]
    seeds = list(range(seed_start, seed_start + n))
    next_seed = seed_start + n
    first = [env.reset(seed=s) for env, s in zip(envs, seeds, strict=True)]
    obs = [o for o, _ in first]
    steps: list[list[dict[str, Any]]] = [[{"label": _label(info, probe)}] for _, info in first]
    state = policy.initial_state(n, device)
    previous = core.memory(state).float().cpu().numpy()
    starts = np.ones(n, dtype=bool)
    active = np.ones(n, dtype=bool)
    returns = np.zeros(n)
    episodes: list[Episode] = []
    frames = [envs[0].render()] if render else []
    tlb = core if isinstance(core, TLBCore) else None
    cross = [layer.attn for layer in tlb.layers if layer.cross] if tlb else []
    initial = core.memory(policy.initial_state(1, device)).float().cpu().numpy()[0]
    while active.any():
        begins = torch.as_tensor(starts, device=device)
        position = tlb.chunk_position(state, begins).cpu().numpy() if tlb else None  # the step's place in its chunk
        batch = obs_to_tensor(stack_observations(obs), device)
        with recording() as rec:
            actions, _, _, state = policy.act(batch, state, begins, deterministic)
        memory = core.memory(state).float().cpu().numpy()
        before = np.where(starts[:, None], initial, previous)
        change = np.linalg.norm(memory - before, axis=1) / np.maximum(np.linalg.norm(before, axis=1), 1e-8)
        reads = np.mean([rec[a][0][:, :, 0].mean(1).cpu().numpy() for a in cross], 0) if tlb else None  # [n, N]
        previous, starts = memory, np.zeros(n, dtype=bool)
        actions = actions.cpu().numpy()
        for i in np.flatnonzero(active):
            step = steps[i][-1]
            step.update(memory=memory[i], change=change[i])
            if tlb is not None:
                step["read"] = reads[i]
                if position[i] == tlb.K - 1:  # this step completed its chunk: the slow update ran
                    step["write"] = rec[tlb.update.attn][0][i].mean(0).cpu().numpy()  # [N, K]
                    if (tlb, "opening") in rec:
                        step["opening"] = rec[(tlb, "opening")][0][i].cpu().numpy()
            obs[i], reward, terminated, truncated, info = envs[i].step(clip_to_space(actions[i], envs[i].action_space))
            returns[i] += reward
            if i == 0 and render:
                frames.append(envs[0].render())
            if not (terminated or truncated):
                steps[i].append({"label": _label(info, probe)})
                continue
            episodes.append(_episode(seeds[i], steps[i], episode_success(returns[i], info), tlb is not None))
            if i == 0 and render:  # frames of env 0's first episode only
                episodes[-1].frames, render = frames, False
            starts[i], returns[i] = True, 0.0
            if next_seed < seed_start + n_episodes:
                obs[i], info = envs[i].reset(seed=next_seed)
                steps[i] = [{"label": _label(info, probe)}]
                seeds[i], next_seed = next_seed, next_seed + 1
            else:
                active[i] = False
    for env in envs:
        env.close()
    episodes.sort(key=lambda e: e.seed)
    if probe is not None and all(label is None for e in episodes for label in e.labels):
        raise UserError(f"the env's info has no {probe!r} on any step: name a key its reset() or step() info holds")
    return episodes


def _episode(seed: int, steps: list[dict[str, Any]], success: bool, tlb: bool) -> Episode:
    writes = [(t, s) for t, s in enumerate(steps) if "write" in s]
    return Episode(
        seed=seed,
        success=success,
        memory=np.stack([s["memory"] for s in steps]),
        change=np.array([s["change"] for s in steps]),
        labels=[s["label"] for s in steps] if any(s["label"] is not None for s in steps) else [],
        reads=np.stack([s["read"] for s in steps]) if tlb else None,
        chunk_ends=[t for t, _ in writes],
        writes=[s["write"] for _, s in writes],
        openings=[s["opening"] for _, s in writes if "opening" in s],
    )


def _targets(labels: list[Any]) -> np.ndarray:
    """Labels as regression targets [n, k]: one column per class for a few discrete values, else the value."""
    values = list(dict.fromkeys(labels))  # the classes, as the set of labels counts them
    if len(values) <= 10:
        return np.array([[label == v for v in values] for label in labels], dtype=np.float64)
    return np.asarray(labels, dtype=np.float64)[:, None]


def _ridge_r2(x: np.ndarray, y: np.ndarray, penalty: float) -> float:
    """Held-out R^2 of ridge regression from x [n, F] to y [n, k], over two folds stratified by y."""
    folds = np.empty(len(x), dtype=int)
    folds[np.lexsort(y.T[::-1])] = np.arange(len(x)) % 2  # alternate along the sorted targets
    sse = sst = 0.0
    for k in (0, 1):
        train, test = folds != k, folds == k
        mx, my = x[train].mean(0), y[train].mean(0)
        xc, yc = x[train] - mx, y[train] - my
        # The dual form, an n x n system: n (episodes) is usually below F (the memory's size).
        alpha = np.linalg.solve(xc @ xc.T / len(xc) + penalty * np.eye(len(xc)), yc / len(xc))
        prediction = (x[test] - mx) @ (xc.T @ alpha) + my
        sse += float(((y[test] - prediction) ** 2).sum())
        sst += float(((y[test] - my) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


def linear_probe(episodes: list[Episode], penalty: float = PROBE_PENALTY, min_episodes: int = 8) -> dict[str, Any]:
    """How well a linear read-out of the memory recovers the probed quantity, per step of the episodes.

    For each step t (counted from the episode's start) reached by at least ``min_episodes`` episodes whose
    label varies, a ridge regression (``penalty`` times the memory's total variance) from the memory
    at t to the label, scored on held-out episodes: R^2, 0 at chance and 1 when the label is read perfectly.
    ``last``: the same at every episode's final step (the T-maze's choice).
    """
    labelled = [e for e in episodes if e.labels]
    if not labelled:
        raise UserError("no probe labels: run the inspection with a probe key the env's info holds")
    every = np.concatenate([e.memory for e in labelled])
    scale = np.sqrt(every.var(0).sum()) or 1.0  # the memory's total variation over all steps

    def score(rows: list[tuple[np.ndarray, Any]]) -> float | None:
        rows = [(m, label) for m, label in rows if label is not None]
        if len(rows) < min_episodes or len({label for _, label in rows}) < 2:
            return None
        x = np.stack([m for m, _ in rows]) / scale
        r2 = _ridge_r2(x.astype(np.float64), _targets([label for _, label in rows]), penalty)
        return r2 if np.isfinite(r2) else None

    longest = max(len(e.labels) for e in labelled)
    curve = [(t, score([(e.memory[t], e.labels[t]) for e in labelled if t < len(e.labels)])) for t in range(longest)]
    curve = [(t, r2) for t, r2 in curve if r2 is not None]
    return {
        "steps": [t for t, _ in curve],
        "r2": [r2 for _, r2 in curve],
        "last": score([(e.memory[-1], e.labels[-1]) for e in labelled]),
        "episodes": len(labelled),
        "penalty": penalty,
    }


def chunk_split(episodes: list[Episode]) -> dict[str, dict[str, float | int | None]] | None:
    """Success of a TLB policy's episodes that lie inside one chunk of its clock, and of those that cross a
    chunk boundary (None for other cores).

    Inside one chunk, a step reaches every earlier step of its episode through the fast attention; across a
    boundary, what the episode's later steps need from before it reaches them through the slow vectors only. A
    policy that wins the first and loses the second has not learned its slow path (docs/results.md, the T-maze
    with swapped arms). An episode crosses when a chunk completes before its last step. A group without
    episodes has a success rate of None.
    """
    if not episodes or episodes[0].reads is None:
        return None
    groups: dict[str, list[bool]] = {"inside_one_chunk": [], "across_chunks": []}
    for e in episodes:
        crosses = any(t < len(e.memory) - 1 for t in e.chunk_ends)
        groups["across_chunks" if crosses else "inside_one_chunk"].append(e.success)
    return {
        name: {"episodes": len(wins), "success_rate": float(np.mean(wins)) if wins else None}
        for name, wins in groups.items()
    }


def principal_components(episodes: list[Episode], k: int = 2) -> tuple[list[np.ndarray], np.ndarray]:
    """Each episode's memory projected on the top ``k`` principal components of all steps [T, k], and the share
    of the memory's variance each component explains."""
    every = np.concatenate([e.memory for e in episodes]).astype(np.float64)
    mean = every.mean(0)
    _, s, vt = np.linalg.svd(every - mean, full_matrices=False)
    explained = s**2 / max(float((s**2).sum()), 1e-12)
    return [(e.memory - mean) @ vt[:k].T for e in episodes], explained[:k]
