"""What a running job tells its user: rank-0 log lines, a progress bar on a terminal or a
progress line every ``--log-every`` seconds in a batch log, and TensorBoard curves.

Rank 0 reports the world's phases; in the phases where groups train on their own, every
group's leader reports its group (its lines name the group), so a group that lags is seen
while it lags, not at composition. Losses are read from the device only when a line is due:
no per-step host sync.
"""

from __future__ import annotations

import select
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def say(text: str, stream=None) -> None:
    """Write `text` and its newline in one write and flush. The ranks share one pipe or
    terminal, and under PYTHONUNBUFFERED (a launcher's or a test's) `print` writes the text
    and the newline apart, so two group leaders' lines would interleave mid-line. A pipe
    keeps a write whole only up to PIPE_BUF bytes, so a longer text (a traceback) goes out
    in writes of whole lines, each at most PIPE_BUF: other ranks' lines may fall between
    them, never inside a line."""
    stream = sys.stdout if stream is None else stream
    for chunk in whole_line_chunks(text + "\n", select.PIPE_BUF):
        stream.write(chunk)
        stream.flush()


def whole_line_chunks(text: str, limit: int) -> list[str]:
    """`text` cut at line ends into pieces of at most `limit` UTF-8 bytes (a longer line
    stays one piece)."""
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        length = len(line.encode("utf-8", "backslashreplace"))
        if current and size + length > limit:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += length
    if current:
        chunks.append("".join(current))
    return chunks


def log(message: str, *, rank: int = 0) -> None:
    """Progress goes to stdout from rank 0 only (the rank of the comm passed in)."""
    if rank == 0:
        say(message)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StepProgress:
    """One epoch's progress on a reporting rank: a tqdm bar on a terminal, else a line every
    ``every`` seconds: phase, epoch, step/steps, images/s, running loss, ETA of the phase."""

    def __init__(self, label: str, epoch: int, epochs: int, steps: int, images_per_step: int,
                 every: float, terminal: bool, start_step: int = 0):
        self.label, self.epoch, self.epochs, self.steps = label, epoch, epochs, steps
        self.images_per_step, self.every = images_per_step, every
        self.step = start_step
        self.start = self.last = time.monotonic()
        self.first_step = start_step
        self.bar = None
        if terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=start_step, desc=f"{label} {epoch}/{epochs}", leave=False,
                            dynamic_ncols=True)

    def update(self, loss_sum: torch.Tensor | None = None, seen: int = 0) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.every <= 0 or now - self.last < self.every:
            return
        self.last = now
        rate = (self.step - self.first_step) / max(now - self.start, 1e-9)  # steps/s this epoch
        left = (self.steps - self.step + (self.epochs - self.epoch) * self.steps) / max(rate, 1e-9)
        loss = f" loss {float(loss_sum.sum()) / max(seen, 1) / loss_sum.numel():.4f}" if loss_sum is not None else ""
        say(f"[{self.label}] epoch {self.epoch}/{self.epochs} step {self.step}/{self.steps} "
            f"{rate * self.images_per_step:.0f} img/s{loss} ETA {_duration(left)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Reporter:
    """Where one rank's reports go: stdout (rank 0, and group leaders for their groups) and,
    with ``--tensorboard``, event files under OUT/tensorboard/<phase>/<net>/ written as the
    epochs end (phase 1 too, by each group's leader)."""

    def __init__(self, out: Path, *, world_rank: int, log_every: float, tensorboard: bool):
        self.out, self.world_rank, self.log_every = Path(out), world_rank, log_every
        self.tensorboard = tensorboard
        self.terminal = sys.stdout.isatty()
        self._writers: dict[str, object] = {}

    def epoch(self, label: str, *, leader: bool, world_phase: bool, epoch: int, epochs: int, steps: int,
              images_per_step: int, start_step: int = 0) -> StepProgress | None:
        """A progress reporter for one epoch, on the ranks that report this phase."""
        reports = self.world_rank == 0 if world_phase else leader
        if not reports:
            return None
        return StepProgress(label, epoch, epochs, steps, images_per_step, self.log_every,
                            self.terminal and self.world_rank == 0, start_step)

    def curves(self, phase: str, net: str, points: list[tuple[int, dict[str, float | None]]], *,
               rewrite: bool = False, last: bool = False) -> None:
        """Points on the curves of ``phase``/``net`` (the caller reports). ``rewrite``: they are
        the whole curve so far (none, or a resumed run's history): what earlier writers left
        there is hidden (TensorBoard's purge), so a run that stopped between a checkpoint and its
        points, started its phase afresh, or had no --tensorboard before, shows every epoch
        once. ``last``: the curve is complete (a net that finished earlier): its writer closes."""
        if not self.tensorboard:
            return
        key = f"{phase}/{net}"
        if key not in self._writers:
            from torch.utils.tensorboard import SummaryWriter
            self._writers[key] = SummaryWriter(str(self.out / "tensorboard" / phase / net),
                                               purge_step=1 if rewrite else None)
        writer = self._writers[key]
        for step, values in points:
            for name, value in values.items():
                if value is not None:
                    writer.add_scalar(name, value, step)
        writer.flush()
        if last:
            self._writers.pop(key).close()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
