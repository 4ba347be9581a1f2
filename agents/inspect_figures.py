"""Figures of an inspection (:mod:`agents.inspect`): one PNG per episode, the probe curve, the memory's
principal components, and a GIF of an episode with its memory beside the frame."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agents.inspect import Episode, principal_components


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _writes_by_step(episode: Episode) -> np.ndarray:
    """[N, T]: at the steps of each completed chunk, how much each slow vector read from them."""
    T, (N, K) = len(episode.memory), episode.writes[0].shape
    image = np.full((N, T), np.nan)
    for end, weights in zip(episode.chunk_ends, episode.writes, strict=True):
        first = end - K + 1  # the chunk's first step; steps before the episode were masked out
        image[:, max(first, 0) : end + 1] = weights[:, max(-first, 0) :]
    return image


def episode_figure(episode: Episode, path: Path) -> Path:
    """What the memory did in one episode: for TLB the fast stream's reads of the slow vectors, the slow
    update's reads of each chunk and its gate openings; for every core the memory's change per step."""
    plt = _pyplot()
    T = len(episode.memory)
    panels = ["change"]
    if episode.reads is not None:
        tlb = ["reads", *(["writes"] if episode.writes else []), *(["openings"] if episode.openings else [])]
        panels = [*tlb, *panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, T / 12), 1.9 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        if panel == "reads":
            im = ax.imshow(episode.reads.T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
            ax.set_ylabel("slow vector")
            ax.set_title("fast stream: how much each step read from each slow vector", fontsize=9)
        elif panel == "writes":
            im = ax.imshow(_writes_by_step(episode), aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
            ax.set_ylabel("slow vector")
            ax.set_title("slow update: how much each slow vector read from each step of its chunk", fontsize=9)
        elif panel == "openings":
            opened = np.array(episode.openings)  # [chunks, N]
            for n in range(opened.shape[1]):
                ax.plot(episode.chunk_ends[: len(opened)], opened[:, n], marker="o", ms=3, label=f"slow {n}")
            ax.set_ylim(0, 1)
            ax.set_xlim(-0.5, T - 0.5)
            ax.set_ylabel("gate opening")
            ax.set_title("share of each slow vector replaced at each chunk", fontsize=9)
            ax.legend(fontsize=6, ncol=8, loc="upper right")
            continue
        else:
            ax.plot(episode.change, lw=1)
            ax.set_xlim(-0.5, T - 0.5)
            ax.set_ylabel("relative change")
            ax.set_title("how much the memory changed at each step", fontsize=9)
            continue
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("step of the episode")
    outcome = "success" if episode.success else "failure"
    label = f", label {episode.labels[0]!r}" if episode.labels else ""
    fig.suptitle(f"episode seed {episode.seed}: {outcome}, {T} steps{label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def probe_figure(probe: dict[str, Any], name: str, path: Path) -> Path:
    """The probe's held-out R^2 against the step of the episode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(probe["steps"], probe["r2"], marker="o", ms=2, lw=1)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_ylim(min(-0.1, min(probe["r2"], default=0)), 1.05)
    ax.set_xlabel("step of the episode")
    ax.set_ylabel("held-out R^2")
    last = "n/a" if probe["last"] is None else f"{probe['last']:.2f}"
    title = f"linear probe of {name!r} from the memory (last step: {last}; {probe['episodes']} episodes)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pca_figure(episodes: list[Episode], path: Path) -> Path:
    """Every episode's memory on its two principal components, coloured by the episode's first label."""
    plt = _pyplot()
    paths, explained = principal_components(episodes)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    labels = sorted({repr(e.labels[0]) for e in episodes if e.labels})
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    for episode, xy in zip(episodes, paths, strict=True):
        key = repr(episode.labels[0]) if episode.labels else None
        ax.plot(xy[:, 0], xy[:, 1], lw=0.8, alpha=0.7, color=colours.get(key, "tab:blue"))
        ax.scatter(xy[-1:, 0], xy[-1:, 1], s=12, color=colours.get(key, "tab:blue"))
    for label, colour in colours.items():
        ax.plot([], [], color=colour, label=f"label {label}")
    if colours:
        ax.legend(fontsize=8)
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%})" if len(explained) > 1 else "PC 2")
    ax.set_title("the memory's trajectory per episode (dot: last step)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def episode_gif(episode: Episode, path: Path) -> Path:
    """The episode's frames, each with the memory after the policy read it drawn beside it: one cell per number,
    its colour the number's place between its lowest and highest value in the episode (so what changes shows)."""
    import imageio.v2 as imageio

    plt = _pyplot()
    memory = episode.memory
    low, high = memory.min(0), memory.max(0)
    scaled = (memory - low) / np.maximum(high - low, 1e-8)
    width = int(np.ceil(np.sqrt(memory.shape[1])))
    grid = np.zeros((len(memory), width * width))
    grid[:, : memory.shape[1]] = scaled
    shown = []
    for frame, values in zip(episode.frames, grid, strict=False):  # the last frame (after the end) has no memory
        cells = plt.cm.viridis(values.reshape(width, width))
        cells = (cells * 255).astype(np.uint8)[..., :3]
        scale = max(1, frame.shape[0] // width)
        panel = np.kron(cells, np.ones((scale, scale, 1), dtype=np.uint8))
        height = max(frame.shape[0], panel.shape[0])  # a memory of more numbers than the frame has rows
        canvas = np.zeros((height, frame.shape[1] + panel.shape[1] + 8, 3), dtype=np.uint8)
        canvas[: frame.shape[0], : frame.shape[1]] = frame[..., :3]
        canvas[: panel.shape[0], frame.shape[1] + 8 :] = panel
        shown.append(canvas)
    imageio.mimsave(str(path), shown, duration=0.2, loop=0)
    return path
