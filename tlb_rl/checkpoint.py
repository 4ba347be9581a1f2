"""Checkpoints: written atomically, loaded without executing code.

A checkpoint is a ``torch.save`` of a dict of tensors, numbers, strings, lists and dicts only, read back
with ``weights_only=True``; anything else in the file (a pickled object that would run code) is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from tlb_rl.errors import UserError

FORMAT_VERSION = 1


def save_checkpoint(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves either the old or the new file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write checkpoint to {path.parent}: {e.strerror}") from None
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is as readable as any other output
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **data}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    :raises UserError: if the file is missing, corrupt, or holds anything but plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        # torch warns on stderr about pickles it did not write; the error below says all there is to say
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds objects other than plain data ({_why(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a tlb-rl checkpoint ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a tlb-rl checkpoint (format version {FORMAT_VERSION} expected)")
    return data


def _why(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, without torch's advice to load the file unsafely."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global| Please |\n|$)", str(error), re.S)
    return (found.group(1).strip() if found else "unsupported content")[:200]
