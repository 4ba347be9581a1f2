"""The demonstration format: a compact file keeps what the policy saw and what the expert did.

    dataset = load_demos("demos/gotolocal", env="BabyAI-GoToLocal-v0")
    obs, actions = dataset.episode(0)

A dataset is one directory with ``demos.npz``: every step's arrays concatenated over episodes (no padding),
episode offsets, the env seeds that produced them, and a JSON header (env, spaces, generator, failures).
Observations are those of the wrapped env (:func:`envs.make_env`), so a policy trains on exactly what it
sees when it acts; each episode keeps ``length + 1`` observations (the last one follows the final action) so
that it converts to Minari without loss. Observation keys that never change inside an episode (BabyAI's
mission) are stored once per episode. Why not Minari's HDF5 directly: see ``demos_to_minari``.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from tlb_rl.errors import UserError
from tlb_rl.spaces import space_from_dict, space_to_dict

FORMAT = "tlb-rl-demos"
FORMAT_VERSION = 1
DATA_FILE = "demos.npz"


@dataclass
class DemoEpisode:
    """One episode as the policy saw it: ``obs`` has ``len(actions) + 1`` rows per key."""

    seed: int
    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    success: bool
    error: str | None = None


class DemoDataset:
    """Demonstrations in memory: every key's steps concatenated over episodes, plus offsets.

    ``obs[k]`` has one row per observation (``length + 1`` per episode) or, for the keys in
    ``per_episode``, one row per episode; ``actions``/``rewards`` one row per step.
    """

    def __init__(
        self,
        obs: dict[str, np.ndarray],
        per_episode: list[str],
        actions: np.ndarray,
        rewards: np.ndarray,
        lengths: np.ndarray,
        seeds: np.ndarray,
        header: dict[str, Any],
    ):
        self.obs, self.per_episode = obs, per_episode
        self.actions, self.rewards = actions, rewards
        self.lengths, self.seeds = lengths.astype(np.int64), seeds.astype(np.int64)
        self.header = header
        self.step_start = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.obs_start = self.step_start + np.arange(len(self.lengths))  # each episode has one more observation

    @property
    def env(self) -> str:
        return self.header["env"]

    @property
    def observation_space(self) -> gym.Space:
        return space_from_dict(self.header["observation_space"])

    @property
    def action_space(self) -> gym.Space:
        return space_from_dict(self.header["action_space"])

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def from_episodes(
        cls, episodes: list[DemoEpisode], spaces: tuple[gym.Space, gym.Space], header: dict[str, Any]
    ) -> DemoDataset:
        if not episodes:
            raise UserError("no successful episode to store")
        keys = list(episodes[0].obs)
        per_episode = [k for k in keys if all((e.obs[k] == e.obs[k][:1]).all() for e in episodes)]
        obs = {
            k: np.stack([e.obs[k][0] for e in episodes])
            if k in per_episode
            else np.concatenate([e.obs[k] for e in episodes])
            for k in keys
        }
        header = {
            **header,
            "observation_space": space_to_dict(spaces[0]),
            "action_space": space_to_dict(spaces[1]),
        }
        return cls(
            obs,
            per_episode,
            np.concatenate([e.actions for e in episodes]),
            np.concatenate([e.rewards for e in episodes]),
            np.asarray([len(e.actions) for e in episodes]),
            np.asarray([e.seed for e in episodes]),
            header,
        )

    def episode(self, i: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Observations (``length + 1`` rows per key) and actions of episode ``i``."""
        n, s, o = self.lengths[i], self.step_start[i], self.obs_start[i]
        obs = {
            k: np.repeat(v[i : i + 1], n + 1, axis=0) if k in self.per_episode else v[o : o + n + 1]
            for k, v in self.obs.items()
        }
        return obs, self.actions[s : s + n]

    def subset(self, indices: np.ndarray) -> DemoDataset:
        """The episodes at ``indices`` (in that order) as a new dataset."""
        indices = np.asarray(indices, dtype=np.int64)
        steps = np.concatenate([np.arange(self.step_start[i], self.step_start[i] + self.lengths[i]) for i in indices])
        rows = np.concatenate([np.arange(self.obs_start[i], self.obs_start[i] + self.lengths[i] + 1) for i in indices])
        obs = {k: v[indices] if k in self.per_episode else v[rows] for k, v in self.obs.items()}
        return DemoDataset(
            obs,
            self.per_episode,
            self.actions[steps],
            self.rewards[steps],
            self.lengths[indices],
            self.seeds[indices],
            self.header,
        )

    # ------------------------------------------------------------------ storage
    def save(self, out: str | Path) -> Path:
        """Write ``out/demos.npz`` (compressed; written to a temporary name, then renamed)."""
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write demonstrations to {out}: {e.strerror}") from None
        header = {
            **self.header,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "episodes": len(self),
            "steps": int(self.lengths.sum()),
            "per_episode_keys": self.per_episode,
        }
        arrays = {f"obs/{k}": v for k, v in self.obs.items()}
        tmp = out / f".{DATA_FILE}.tmp.npz"
        np.savez_compressed(
            tmp,
            header=np.asarray(json.dumps(header)),
            actions=self.actions,
            rewards=self.rewards,
            lengths=self.lengths,
            seeds=self.seeds,
            **arrays,
        )
        tmp.replace(out / DATA_FILE)
        self.header = header
        return out / DATA_FILE


def load_demos(path: str | Path, env: str | None = None) -> DemoDataset:
    """Read a dataset written by :func:`generate_demos` (a directory or its ``demos.npz``).

    :param env: the env the caller needs; a dataset of another env is refused.
    :raises UserError: a missing, truncated, corrupt or wrong-env dataset, in one line.
    """
    path = Path(path)
    file = path / DATA_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no demonstrations at {path}: expected {file}; make them with `tlb-rl demos --out {path}`")
    try:
        with np.load(file, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != FORMAT:
                raise UserError(f"{file} is not a tlb-rl demonstrations file (format {header.get('format')!r})")
            arrays = {k: data[k] for k in data.files if k != "header"}
    except UserError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, json.JSONDecodeError) as e:
        raise UserError(
            f"demonstrations file {file} is truncated or corrupt ({type(e).__name__}); regenerate it with tlb-rl demos"
        ) from None
    if header.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{file} has format version {header.get('format_version')}, expected {FORMAT_VERSION}")
    if env is not None and header.get("env") != env:
        raise UserError(f"demonstrations in {path} are of '{header.get('env')}', but '{env}' was asked for")
    obs = {k.removeprefix("obs/"): v for k, v in arrays.items() if k.startswith("obs/")}
    dataset = DemoDataset(
        obs,
        header["per_episode_keys"],
        arrays["actions"],
        arrays["rewards"],
        arrays["lengths"],
        arrays["seeds"],
        header,
    )
    expected = {"episodes": len(dataset), "steps": int(dataset.lengths.sum())}
    found = {"episodes": header.get("episodes"), "steps": len(dataset.actions)}
    if expected != found or any(
        len(v) != (len(dataset) if k in dataset.per_episode else found["steps"] + len(dataset)) for k, v in obs.items()
    ):
        raise UserError(f"demonstrations file {file} is inconsistent: header says {found}, arrays hold {expected}")
    return dataset


# ---------------------------------------------------------------------- Minari
def demos_to_minari(dataset: DemoDataset, dataset_id: str, data_path: str | Path | None = None) -> Path:
    """Export to a Minari dataset (HDF5, raw arrays; needs ``pip install "minari[hdf5]"``, not jax).

    Minari's HDF5 was measured too large and slow to be the working format (2,500 GoToLocal episodes: 65 MB,
    25 s to write, 16 s to read back, i.e. ~26 KB per 5-step episode and ~2.6 GB for 100k) against this
    module's file (0.25 MB, 0.3 s; 25k episodes load in 0.9 s), so Minari is the exchange format only.

    :param data_path: Minari's datasets root (default: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``).
    :return: the directory Minari wrote.
    """
    minari, EpisodeBuffer = _minari()
    import os

    if data_path is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(data_path).resolve())
    buffers = []
    for i in range(len(dataset)):
        obs, actions = dataset.episode(i)
        n = len(actions)
        s = dataset.step_start[i]
        rewards = dataset.rewards[s : s + n].astype(np.float64)
        buffers.append(
            EpisodeBuffer(
                id=i,
                seed=int(dataset.seeds[i]),
                observations=dict(obs),
                actions=actions,
                rewards=list(rewards),
                terminations=[False] * (n - 1) + [True],
                truncations=[False] * n,
                infos={},
            )
        )
    created = minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        observation_space=dataset.observation_space,
        action_space=dataset.action_space,
        algorithm_name=dataset.header.get("generator"),
        description=json.dumps({k: dataset.header[k] for k in ("env", "env_kwargs")}),
        data_format="hdf5",
        jpeg_encoding=False,  # JPEG would change the symbolic codes of the image
    )
    return Path(created.spec.data_path).parent


def demos_from_minari(dataset_id: str, data_path: str | Path | None = None) -> DemoDataset:
    """Import a Minari dataset written by :func:`demos_to_minari` (or any with the same spaces and env)."""
    minari, _ = _minari()
    import os

    if data_path is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(data_path).resolve())
    try:
        source = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot load Minari dataset '{dataset_id}': {e}") from None
    meta = json.loads(source.storage.metadata.get("description") or "{}")
    if "env" not in meta:
        raise UserError(f"Minari dataset '{dataset_id}' does not say which env it was made on (its description)")
    seeds = [m.get("seed") for m in source.storage.get_episode_metadata(source.episode_indices)]
    episodes = [
        DemoEpisode(
            seed=-1 if seed is None else int(seed),
            obs={k: np.asarray(v) for k, v in ep.observations.items()},
            actions=np.asarray(ep.actions, dtype=np.int64),
            rewards=np.asarray(ep.rewards, dtype=np.float32),
            success=True,
        )
        for ep, seed in zip(source.iterate_episodes(), seeds, strict=True)
    ]
    header = {
        **meta,
        "generator": source.storage.metadata.get("algorithm_name"),
        "imported_from": f"minari:{dataset_id}",
    }
    return DemoDataset.from_episodes(episodes, (source.observation_space, source.action_space), header)


def _minari() -> tuple[Any, Any]:
    try:
        import minari
        from minari.data_collector import EpisodeBuffer
    except ImportError:
        raise UserError('Minari is not installed: pip install "minari[hdf5]"') from None
    return minari, EpisodeBuffer


__all__ = ["DATA_FILE", "DemoDataset", "DemoEpisode", "demos_from_minari", "demos_to_minari", "load_demos"]
