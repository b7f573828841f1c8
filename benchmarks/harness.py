"""Shared by the benchmarks: the machine line, running dd-train, reading its outputs.

Every benchmark prints the exact command and the machine first (timings mean nothing
without them) and its headline ratio last. Bad input ends a script before any work, as
one line naming the flag and what fixes it, exit 2: ``dd_mpi.argtypes.OneLineParser`` for the
script's own flags (with the argparse types there), ``check_dd_train`` for the dd-train flags
it passes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from dd_mpi.config import RunConfig, parse_config
from dd_mpi.errors import EXIT_PREEMPTED, EXIT_USAGE, UsageError
from dd_mpi.plan import checked_layouts

REPO = Path(__file__).resolve().parent.parent
# an --eval-every / --subnet-eval-every beyond any run's epochs: evaluate after the last only
AFTER_THE_LAST_EPOCH = "1000000"


def check_dd_train(parser: argparse.ArgumentParser, dd_args: list[str], nproc: int | None = None) -> RunConfig:
    """dd-train's flags read as dd-train reads them, and with ``nproc`` its run's layout on that
    many ranks checked as dd-train checks it before it starts: a bad one ends the script here,
    like a bad flag of its own, not after the runs before it."""
    try:
        cfg = parse_config(dd_args)
        if nproc is not None:
            checked_layouts(cfg, nproc)
    except UsageError as error:
        parser.error(f"dd-train flags: {error}")
    return cfg


def out_dir(parser: argparse.ArgumentParser, out: Path | None, name: str) -> Path:
    """--out, resolved (default runs/bench-NAME-TIME); refused if it is there but no directory."""
    path = (out if out is not None else default_out(name)).resolve()
    if path.exists() and not path.is_dir():
        parser.error(f"--out {out}: is a file, not a directory: give a directory for the runs")
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, usable cores, load (other jobs skew timings), GPU if any, torch."""
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_model()}, {cores} cores (load average {load:.1f} at start){gpu}, torch {torch.__version__}"


def print_header(title: str) -> None:
    print(f"# {title}")
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print("machine: " + machine(), flush=True)


def run_dd_train(args: list[str], nproc: int, out: Path, *, timeout: float = 7200) -> tuple[dict, list[dict]]:
    """One dd-train job on ``nproc`` local ranks; returns (report.json, metrics.jsonl rows).
    Its output goes to OUT/log.txt; on failure the tail is shown and we stop."""
    cmd = [sys.executable, "-m", "dd_mpi", "--nproc", str(nproc), *last_flags_win(args), "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    print("  $ " + shlex.join(["dd-train", *cmd[3:]]), flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dd_train_env())
    (out / "log.txt").write_text(result.stdout + result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("dd-train: error: ")]
    if result.returncode == EXIT_USAGE and errors:  # bad input found at its start: its one line
        print(f"{errors[-1]} (log: {out / 'log.txt'})", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if result.returncode == EXIT_PREEMPTED:  # (Ctrl-C, a job's end: it checkpointed, it did not fail)
        print(f"dd-train was stopped by a signal (exit {EXIT_PREEMPTED}; log: {out / 'log.txt'}): the benchmark "
              "stops, and starts afresh when run again", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    if result.returncode != 0:
        sys.exit(f"dd-train failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    print(f"    done in {time.perf_counter() - start:.0f} s wall (incl. start-up), outputs in {out}", flush=True)
    report = json.loads((out / "report.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return report, metrics


def dd_train_env() -> dict[str, str]:
    """dd-train's environment. It runs in the caller's working directory, so the relative paths
    the user gave (--config, --data-dir) mean what they meant; REPO first on PYTHONPATH makes
    ``-m dd_mpi`` this checkout's copy, whatever else the venv has installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}  # we are no rank
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def last_flags_win(args: list[str]) -> list[str]:
    """A preset followed by flags that override it, as dd-train reads it: each flag once, at
    its first place, with its last value (``--x``/``--no-x`` are one flag). Same run, and the
    printed command says what ran instead of listing ``--arch resnet20 ... --arch resnet32``."""
    items: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):  # a stray value: keep it where it is
            items[f"#{i}"] = [token]
            i += 1
            continue
        name = token.split("=", 1)[0]
        if "=" in token or i + 1 == len(args) or args[i + 1].startswith("--"):
            item = [token]  # --flag=value or a switch
            i += 1
        else:
            item = [token, args[i + 1]]
            i += 2
        key = name.replace("--no-", "--", 1) if len(item) == 1 and "=" not in token else name
        items[key] = item  # a dict keeps the first insertion's place
    return [token for item in items.values() for token in item]


def default_out(name: str) -> Path:
    """Under the working directory, as dd-train's own default (it went into the repository's)."""
    return Path("runs") / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def digits_args(root: Path | None = None, *, write: bool = True) -> list[str]:
    """dd-train flags for scikit-learn's digits as an ImageFolder (benchmarks/digits.py): the
    small real image set every speed and accuracy conclusion is checked on. Written unless
    ``write`` is false (the flags alone, to check them before any work)."""
    path = root if root is not None else REPO / "runs" / "digits"
    if write:
        from digits import write_digits
        path = write_digits(path)
    return ["--dataset", "imagefolder", "--data-dir", str(path)]
