"""Every env of the POPGym package makes and trains through the plug-in path, with no code of ours per env."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

popgym_envs = pytest.importorskip("popgym.envs")

from agents import PPO  # noqa: E402
from envs.registry import EnvCheckWarning  # noqa: E402

SPECS = sorted(f"{cls.__module__}:{cls.__name__}" for cls in popgym_envs.ALL)


@pytest.mark.parametrize("spec", SPECS, ids=[s.split(":")[1] for s in SPECS])
def test_popgym_env_trains(spec: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EnvCheckWarning)  # the suite's shared info dicts: checked below
        model = PPO(
            spec,
            core="lstm",
            core_kwargs={"hidden_size": 16},
            n_envs=2,
            n_steps=64,
            batch_size=128,
            total_frames=256,
            eval_every=0,
            vectorization="sync",
            seed=0,
            torch_threads=1,
        )
    model.learn(progress=False)
    model.close()
    assert model.frames == 256 and model.updates == 2
    result = model.evaluate(n_episodes=2)
    assert result["episodes"] == 2 and np.isfinite(result["mean_return"])


def test_harmless_checker_findings_warn_once(monkeypatch) -> None:
    from envs import make_env, registry

    monkeypatch.setattr(registry, "_CHECKED", set())  # as in a fresh process
    with pytest.warns(EnvCheckWarning, match="share an object.*training is unaffected"):
        make_env("popgym.envs.count_recall:CountRecallEasy", seed=3).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EnvCheckWarning)
        make_env("popgym.envs.count_recall:CountRecallEasy", seed=4).close()  # checked once per process
