"""Errors a user can fix. They print as one line (no traceback) and exit with code 2.

Raise them on every rank alike (all ranks see the same flags, files and shared verdicts),
so that no rank waits in a collective for another that has already left.
"""


class UsageError(Exception):
    """Bad input: a flag, a file or a directory. The message names it and says what fixes it.

    ``everywhere``: raised identically on every rank (from the flags, or from a verdict
    shared by rank 0), so rank 0 alone prints it; otherwise each rank that raises prints it.
    """

    def __init__(self, message: str, *, everywhere: bool = True):
        super().__init__(message)
        self.everywhere = everywhere


EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # checkpointed on SIGTERM/SIGUSR1: requeue and resume (EX_TEMPFAIL)
