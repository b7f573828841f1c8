"""Atomic checkpoints: a kill at any instant leaves the previous checkpoint intact.

Write to a temporary file in the same directory, fsync it, rename it over the old one
(atomic on POSIX), fsync the directory. ``last`` is written every epoch, ``best`` when
the test top-1 improves; ``final`` marks a finished phase (its presence is the proof).

Files in ``OUT/checkpoints/``: ``subnet{k}-last.pt``/``-best.pt``/``-final.pt`` per
sub-network, ``composed.pt``, ``finetune-*.pt``, ``baseline-*.pt``.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(out: str | Path, phase: str, kind: str) -> Path:
    """``phase`` is ``subnet0``.., ``finetune``, ``baseline`` or ``composed`` (kind ignored)."""
    name = f"{phase}.pt" if phase == "composed" else f"{phase}-{kind}.pt"
    return Path(out) / CHECKPOINT_DIR / name


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: Path) -> dict | None:
    """The checkpoint at ``path``, None if there is none, UsageError if it is unreadable."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, corrupt, not a checkpoint
        raise UsageError(f"checkpoint {path} is unreadable ({type(error).__name__}): delete it "
                         "to retrain that phase, or point --out at another directory",
                         everywhere=False) from None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
