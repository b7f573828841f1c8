"""How a run ends other than well: errors a user can fix, phases that stop, lost peers.

``UsageError`` prints as one line (no traceback) and exits with code 2. Raise it on every
rank alike (all ranks see the same flags, files and shared verdicts), so that no rank waits
in a collective for another that has already left.
"""

from __future__ import annotations

import enum

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # checkpointed on SIGTERM/SIGUSR1: requeue and resume (EX_TEMPFAIL)


class UsageError(Exception):
    """Bad input: a flag, a file or a directory. The message names it and says what fixes it.

    ``everywhere``: raised identically on every rank (from the flags, or from a verdict
    shared by rank 0), so rank 0 alone prints it; otherwise each rank that raises prints it.
    """

    def __init__(self, message: str, *, everywhere: bool = True):
        super().__init__(message)
        self.everywhere = everywhere


class Preempted(Exception):
    """A stop signal arrived: the checkpoint is on disk; exit for requeue."""


class PhaseFailed(Exception):
    """A phase cannot go on (e.g. NaN loss): the message says which phase and epoch."""


class PeerFailed(Exception):
    """A rank of another group ended the job with an error of its own (said on its stderr),
    and this rank, stopped by that group's alarm, lost it: the message is that error, so the
    job names it once instead of each rank reporting the lost connection."""


class Outcome(enum.Enum):
    """How one rank's part of a phase ended, as the ranks tell each other (phase 1's groups
    finish apart and agree on one outcome before phase 2)."""

    OK = "ok"
    PREEMPTED = "preempted"
    FAILED = "failed"
    USAGE = "usage"


def is_outcome(error: BaseException) -> bool:
    """What a phase's ranks agree on; anything else is one rank's own trouble to report."""
    return isinstance(error, (Preempted, PhaseFailed)) or isinstance(error, UsageError) and error.everywhere


def outcome_of(error: BaseException | None) -> tuple[Outcome, str]:
    """(outcome, message) for what a rank's phase raised; other errors are not outcomes."""
    if error is None:
        return Outcome.OK, ""
    if isinstance(error, Preempted):
        return Outcome.PREEMPTED, ""
    if isinstance(error, PhaseFailed):
        return Outcome.FAILED, str(error)
    if isinstance(error, UsageError):
        return Outcome.USAGE, str(error)
    raise error


def deciding(verdicts: list[tuple[Outcome, str]]) -> tuple[Outcome, str]:
    """The verdict the phase ends with: the first of the gravest. A failure outranks a stop:
    groups stopped because another failed must not turn its exit 1 into a requeue (75)."""
    gravity = (Outcome.OK, Outcome.PREEMPTED, Outcome.FAILED, Outcome.USAGE)
    return max(verdicts, key=lambda verdict: gravity.index(verdict[0]))  # max keeps the first


def raise_outcome(outcome: Outcome, message: str) -> None:
    """Raise on this rank what another rank's outcome means (nothing for OK)."""
    if outcome is Outcome.PREEMPTED:
        raise Preempted()
    if outcome is Outcome.FAILED:
        raise PhaseFailed(message)
    if outcome is Outcome.USAGE:
        raise UsageError(message)


def peer_lost(error: BaseException) -> bool:
    """True for the errors a rank sees when *another* rank died or hung (gloo/NCCL/MPI/
    Horovod). Case-blind: gloo says "Timed out waiting 5000ms for recv", NCCL "timeout"."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "timed out",
                                   "timeout", "distbackenderror", "broken pipe", "econnreset",
                                   "horovodinternalerror"))
