"""The trained policies shipped in pretrained/ load and act as well as pretrained/manifest.json states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agents import get_algorithm
from tlb_rl.checkpoint import load_checkpoint

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
MANIFEST = json.loads((PRETRAINED / "manifest.json").read_text())
EPISODES = 40
MARGIN = 0.15
"""Success on 40 of the stated episodes may fall this far below the stated rate (at 0.95, 40 Bernoulli
episodes fall more than 0.15 below with probability < 1e-3)."""


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_policy_loads_and_reaches_its_stated_success(name: str) -> None:
    entry = MANIFEST[name]
    path = PRETRAINED / name
    assert path.stat().st_size < 1_000_000
    data = load_checkpoint(path)
    assert not {"optimizer", "rng", "rollout"} & set(data)  # weights and config only
    model = get_algorithm(data["algo"]).load(path)
    torch.manual_seed(0)
    result = model.evaluate(EPISODES, deterministic=entry["deterministic"])
    assert result["success_rate"] >= entry["success"] - MARGIN, (name, result["success_rate"])
