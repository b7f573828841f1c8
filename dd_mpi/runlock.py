"""One job per run at a time: rank 0's claim on ``--out``.

A job submitted twice, or an array task resubmitted while it still ran, trained into the same
checkpoints as the first. Rank 0 now holds a ``flock`` on ``OUT/.dd_mpi.lock`` (array tasks
share it, and each holds its sub-network's ``.dd_mpi.lock-subnetK`` alone), for the life of its
process: the kernel drops it when the process ends, even by SIGKILL.

What makes it safe to refuse on it:

- the file is opened read-write (``a+``): NFS emulates flock with byte-range locks, which need
  a file opened for reading (shared) or writing (exclusive);
- children forked after the claim (DataLoader workers) close their copy at once, or they would
  keep it for the seconds they outlive a killed rank 0;
- a job that continues a run (``--resume``, a restart, an array task) waits for the lock before
  it refuses: an NFS or Lustre lock of a lost node lives until its lease ends (~90 s), and a
  requeued job starts on the next node meanwhile;
- a file system without locks (ENOLCK, EOPNOTSUPP, ENOSYS) claims nothing, with a note.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .progress import log

LOCK_NAME = ".dd_mpi.lock"
STOPPED = "stopped while waiting for --out's lock"  # claim's verdict when a stop signal came meanwhile
_POLL_SECONDS = 0.5
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
_held: list[IO] = []  # the open lock files of this process's claim


def _drop_in_child() -> None:
    for handle in _held:  # the parent keeps its claim: only this copy of the file is closed
        try:
            handle.close()
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


def release() -> None:
    """Give the claim up (the process's end does it too). A run after another in one Python
    process (tests, dd_mpi called from a notebook) releases the earlier one's first."""
    while _held:
        _held.pop().close()


def _open(path: Path) -> IO:
    """The lock file, read-write (NFS's flock needs it), and writable by all when this user made
    it: another user's --resume of a shared run would meet EACCES. Read-only where only that
    is allowed (a local flock takes it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return open(path, "rb")  # noqa: SIM115 -- held open for the life of the process
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o666)  # (past the umask)
    except OSError:
        pass
    return os.fdopen(fd, "a+")


def claim(out: Path, only_group: int | None, wait_seconds: float,
          should_stop: Callable[[], bool] = lambda: False) -> str | None:
    """Claim ``out`` for this job: the whole run, or (``only_group``) one sub-network of it.
    Waits up to ``wait_seconds`` for another job's claim to end, unless ``should_stop`` (then
    STOPPED: a requeue signal must not become a refusal). Returns why ``out`` is busy, else
    None."""
    release()
    claims = [(LOCK_NAME, fcntl.LOCK_EX)] if only_group is None else \
        [(LOCK_NAME, fcntl.LOCK_SH), (f"{LOCK_NAME}-subnet{only_group}", fcntl.LOCK_EX)]
    deadline = time.monotonic() + wait_seconds
    for name, mode in claims:
        path = out / name
        handle = _open(path)
        said = False
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                _held.append(handle)
                break
            except BlockingIOError:
                pass
            except OSError as error:
                handle.close()
                read_only = error.errno == errno.EBADF and handle.mode == "rb"  # (NFS: an exclusive lock needs write)
                if error.errno not in _NO_LOCKS and not read_only:
                    raise
                why = f"{path} is read-only to this user" if read_only else "its file system has no file locks"
                log(f"--out {out}: {why}, so a second job on this run would not be noticed: submit each run once")
                return None
            what = "the run" if name == LOCK_NAME else f"sub-network {only_group}"
            if should_stop() or time.monotonic() >= deadline:
                handle.close()
                release()
                if should_stop():
                    return STOPPED
                return (f"--out {out}: another job is training {what} there now ({path} is locked): "
                        f"wait for it to end, or cancel it (if none runs there any more, remove {path})")
            if not said:
                log(f"--out {out}: another job holds {what} ({path} is locked): waiting up to "
                    f"{wait_seconds:.0f} s for it to end (a lost node's lock lasts until its lease ends)")
                said = True
            time.sleep(_POLL_SECONDS)
    return None
