"""The layers import downwards only: tlb_rl (library) <- envs <- agents <- commands (CLI, studies)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "tlb_rl": {"envs", "agents", "commands"},
    "envs": {"agents", "commands"},
    "agents": {"commands"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, lazily inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_packages_import_only_the_layers_below(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_algorithms_are_found_through_the_registry() -> None:
    from agents import ALGORITHMS, Agent, get_algorithm
    from tlb_rl.errors import UserError

    assert set(ALGORITHMS) == {"ppo", "bc"}
    assert all(issubclass(cls, Agent) and cls.algo == name for name, cls in ALGORITHMS.items())
    with pytest.raises(UserError, match="unknown algorithm 'sac'; known: ppo, bc"):
        get_algorithm("sac")
