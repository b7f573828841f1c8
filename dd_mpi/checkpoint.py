"""Atomic checkpoints: a kill at any instant leaves the previous checkpoint intact.

Write to a temporary file in the same directory, fsync it, rename it over the old one
(atomic on POSIX), fsync the directory. ``last`` is written every epoch, ``best`` when
the test top-1 improves; ``final`` marks a finished phase (its presence is the proof).

Files in ``OUT/checkpoints/``: ``subnet{k}-final.pt`` per sub-network and
``subnet{k}-last.pt``/``-best.pt`` per group (``subnet{a}-{b}-*`` for sub-nets a..b trained
fused, ``subnet{a}+{c}-*`` for a set that is not a run), ``level{l}-net{j}-*`` for the nets
of an intermediate level, ``composed.pt`` (and ``level{l}-composed.pt``), ``finetune-*.pt``,
``baseline-*.pt``.
"""

from __future__ import annotations

import errno
import io
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(out: str | Path, phase: str, kind: str) -> Path:
    """``phase`` is ``subnet0``.., ``finetune``, ``baseline``, or ``composed`` (``kind``: "")."""
    name = f"{phase}.pt" if not kind else f"{phase}-{kind}.pt"
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
    """The checkpoint at ``path``, None if there is none, UsageError if it is unreadable.

    Only a file that does not deserialize is worth deleting: an I/O error (EIO/ESTALE on
    NFS, EACCES) or a lack of memory says nothing against the file, which may be good."""
    try:
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, MemoryError) as error:
        if isinstance(error, OSError) and error.errno == errno.EINVAL and _reads_through(path):
            raise _corrupt(path, error) from None  # torch's zip reader on some truncations (ESTALE/EIO: I/O)
        reason, fix = (("out of memory", "free memory on this node") if isinstance(error, MemoryError)
                       else (error.strerror or str(error), "check the file system"))
        raise UsageError(f"checkpoint {path} could not be read ({reason}): {fix}, then rerun",
                         everywhere=False) from None
    except Exception as error:  # truncated, corrupt, not a checkpoint
        raise _corrupt(path, error) from None


def _corrupt(path: Path, error: BaseException) -> UsageError:
    return UsageError(f"checkpoint {path} is unreadable ({type(error).__name__}): delete it to retrain that "
                      "phase, or point --out at another directory", everywhere=False)


def _reads_through(path: Path) -> bool:
    """Whether the file system gives every byte of ``path``: then an OSError came from the
    bytes themselves, and rerunning would meet it again."""
    try:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
        return True
    except OSError:
        return False


def settings_in_checkpoints(out: Path) -> tuple[dict, Path] | None:
    """The run's settings as a checkpoint of it holds them (every one saves the run's config),
    from the smallest that reads: what a resume is checked against when config.json is gone
    (a refused resume then wrote its own settings there, and the run could not go on under
    either set of flags)."""
    try:
        files = sorted((Path(out) / CHECKPOINT_DIR).glob("*.pt"), key=lambda p: p.stat().st_size)
    except OSError:  # (one renamed over meanwhile)
        return None
    for path in files:
        try:
            saved = load(path)
        except UsageError:  # damaged or unreadable: another may read
            continue
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            return saved["config"], path
    return None


def _size(value) -> str:
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}"
    return "×".join(map(str, value.shape)) or "a scalar"


FINAL_KEYS = ("model", "history", "test", "seconds")
LAST_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng", "test")


def fitting(saved: dict | None, path: Path, keys: tuple[str, ...], model: dict,
            settings_differ: Callable[[dict], list[str]]) -> dict | None:
    """``saved`` (None: none), once it is seen to hold ``keys``, weights of the shapes of
    ``model`` (a state dict), and settings (its ``config``) of which ``settings_differ`` finds
    none changed: another run's checkpoint copied in composed a wrong net on rank 0 while the
    other ranks died in a collective (another --width), or was resumed silently (another
    --seed), and a file that is no checkpoint raised KeyError."""
    if saved is None:
        return None
    refuse = (f"checkpoint {path} %s: delete it to retrain that phase, or point --out at the run it "
              "belongs to")
    missing = [k for k in keys if k not in saved] if isinstance(saved, dict) else list(keys)
    if missing or not isinstance(saved["model"], dict):
        raise UsageError(refuse % f"is not a dd_mpi checkpoint of this kind (no {', '.join(missing) or 'model'})",
                         everywhere=False)
    differences = [f"{name} is {_size(held)}, here {_size(model[name])}"
                   for name, held in saved["model"].items()
                   if name in model and (not isinstance(held, torch.Tensor) or held.shape != model[name].shape)]
    differences += [f"it has no {name}" for name in model if name not in saved["model"]]
    differences += [f"{name} is not in this run's" for name in saved["model"] if name not in model]
    if differences:
        raise UsageError(refuse % f"holds another network than this run's ({differences[0]}: another run's, "
                         "or another --arch/--width)", everywhere=False)
    changed = settings_differ(saved["config"]) if isinstance(saved.get("config"), dict) else []
    if changed:
        raise UsageError(refuse % f"was made with other settings than this run's ({'; '.join(changed)}): another "
                         "run's", everywhere=False)
    return saved


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


# ---------------------------------------------------------------------------------------
# What a phase's checkpoints hold
@dataclass
class PhaseState:
    """A group's training of its nets (one, or k fused), as ``last``/``best`` hold it: enough
    to continue exactly where it stopped, at an epoch's end or (after a stop signal) at the
    step it reached (``progress``)."""

    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    epoch: int  # whole epochs done
    progress: dict | None  # the epoch under way when a stop cut it short (train.EpochProgress)
    history: list[dict]  # metrics rows of the epochs done, every net's
    best: float  # the best mean test top-1 so far (-1: none yet)
    seconds: float  # training and evaluation so far
    tests: list[dict]  # the last evaluation, per net ({} before the first)
    rng: dict
    ranks: int  # the group's size: a resume on another size would change LR, steps and data
    config: dict
    phase: str
    nets: list[int]
    rank_buffers: list[dict] | None = None  # mid-epoch: every rank's BN statistics (averaged only at epochs' ends)
    precision: str | None = None  # fp32 | bf16 | fp16 as trained last (None: saved by an older dd_mpi)

    def to_dict(self) -> dict:
        state = dict(vars(self))
        state["test"] = self.tests[0] if len(self.tests) == 1 else self.tests  # one net: its dict
        del state["tests"]
        return state

    @classmethod
    def from_dict(cls, state: dict) -> PhaseState:
        test = state["test"]
        tests = test if isinstance(test, list) else [test]
        fields = {k: state.get(k) for k in cls.__dataclass_fields__ if k != "tests" and k in state}
        return cls(**{**fields, "tests": tests, "nets": state.get("nets") or [0]})


def final_state(*, model: dict, history: list[dict], test: dict, seconds: float, config: dict,
                phase: str, ranks: int, step_batch: int) -> dict:
    """One net's finished training (``<name>-final.pt``): its presence is the proof. ``ranks``
    and ``step_batch``: its group's size and the batch a step took over it (an array task's
    may differ from the final job's layout)."""
    return {"model": model, "history": history, "test": test, "seconds": seconds, "config": config,
            "phase": phase, "ranks": ranks, "step_batch": step_batch}
