"""Shared pytest set-up: the ``--run-expensive`` option that un-skips tests marked ``expensive``."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-expensive",
        action="store_true",
        default=False,
        help="also run the tests marked 'expensive' (minutes each)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-expensive"):
        return
    skip = pytest.mark.skip(reason="expensive: run with --run-expensive")
    for item in items:
        if "expensive" in item.keywords:
            item.add_marker(skip)
