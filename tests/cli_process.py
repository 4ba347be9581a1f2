"""Helpers for the tests that start the real console command in a child process and wait for its checkpoints."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def tlb_rl(*args: str, cwd: Path) -> subprocess.Popen:
    """``tlb-rl ARGS`` as a child process (the same entry point as the console script)."""
    code = "import sys; from commands.cli import main; sys.argv[0] = 'tlb-rl'; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


def wait_for(path: Path, proc: subprocess.Popen, replaced_times: int = 0) -> None:
    """Wait until ``path`` exists and has been replaced ``replaced_times`` more times (or the process ended)."""
    seen: set[int] = set()
    while len(seen) <= replaced_times:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the process ended early (rc {proc.returncode}): {err[-2000:]}")
        with contextlib.suppress(FileNotFoundError):
            seen.add(path.stat().st_ino)  # os.replace gives every new checkpoint a new inode
        time.sleep(0.02)
