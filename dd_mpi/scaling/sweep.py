"""Sweeps of dd-train over (P, N) pairs: one run after another on this machine (--local), or
one Slurm job per pair submitted by slurm/scaling_study.sh (--slurm).

The package does not know where the repository is (an installed dd_mpi has no slurm/ beside
it), so the study script is named by --study-script, or found in ./slurm or $DD_MPI_SLURM_DIR.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import RunConfig, build_parser, parse_config, read_saved_config
from ..plan import checked_layouts, default_groups
from ..errors import UsageError
from ..launch import stop_when_parent_dies
from ..report import software_versions
from ..reporting import run_stack
from .collect import WORKLOAD, find_runs, refuse_mixed_workloads, workload_differences
from .errors import ScalingError

STUDY_SCRIPT_NAME = "scaling_study.sh"
# what a kept run must share with the sweep beyond what dd-train's --resume compares: its speed
SPEED_ONLY = tuple(k for k in WORKLOAD if k not in RunConfig.SHAPING and k != "levels")
SLURM_DIR_ENV = "DD_MPI_SLURM_DIR"  # a slurm/ directory holding scaling_study.sh


def valid_pairs(nprocs: list[int], subnets: list[int]) -> list[tuple[int, int]]:
    """The (P, N) pairs a sweep runs: all of them (dd-train lays any N out on any P: G =
    gcd(N, P) groups of P/G ranks, each training N/G sub-nets fused)."""
    return [(p, n) for p in nprocs for n in subnets]


FORBIDDEN_PASSTHROUGH = ("--nproc", "--subnets", "--out", "--resume")
PRINT_ONLY = ("-h", "--help", "--version", "--print-config")  # dd-train prints and trains nothing


def check_passthrough(dd_args: list[str]) -> None:
    for arg in dd_args:
        if arg.split("=", 1)[0] in PRINT_ONLY:
            raise ScalingError(f"{arg.split('=', 1)[0]} after -- would make every run print and exit without "
                               f"training: run `dd-train {arg}` on its own, and sweep without it")
        if arg.split("=", 1)[0] in FORBIDDEN_PASSTHROUGH:
            raise ScalingError(f"{arg.split('=', 1)[0]} is set by dd-scaling per run: use --nprocs/--nodes, "
                               "--subnets and --out of dd-scaling instead")


def refuse_bad_runs(pairs: list[tuple[int, int]], out: Path, dd_args: list[str]) -> None:
    """Every run's flags as dd-train checks them before it starts (values, the layout of N on
    P), checked before the first: a typo would otherwise fail every run of the sweep in turn."""
    for p, n in pairs:
        try:
            checked_layouts(parse_config(run_argv(p, n, dd_args, out / f"P{p}-N{n}")), p)
        except UsageError as error:
            raise ScalingError(f"the run P={p} N={n}: {error}") from None


def refuse_bad_flags(dd_args: list[str]) -> None:
    """The dd-train flags as its parser reads them (names, types): a job script adds its preset,
    so the values are checked by each job, but a typo is said before anything is submitted."""
    try:
        build_parser().parse_args(dd_args)
    except UsageError as error:
        raise ScalingError(f"the dd-train arguments: {error}") from None


def run_argv(p: int, n: int, dd_args: list[str], run_dir: Path) -> list[str]:
    """dd-train's flags for the (P, N) run of a sweep (without --resume)."""
    return ["--nproc", str(p), "--subnets", str(n), "--strategy", "both", *dd_args, "--out", str(run_dir)]


def refuse_other_settings(pairs: list[tuple[int, int]], out: Path, dd_args: list[str]) -> None:
    """A finished run is kept only if it was made with the settings asked for now (dd-train's
    own --resume check, and the settings that move its speed): a sweep rerun with other flags
    into the same --out would otherwise report the old runs as the new study, and mix them
    into its efficiencies. The finished runs under --out that this sweep does not name are
    collected with it at the end: they are checked too, before anything runs."""
    wanted = {}
    for p, n in pairs:
        run_dir = out / f"P{p}-N{n}"
        try:
            cfg = wanted[run_dir] = parse_config(run_argv(p, n, dd_args, run_dir))
        except UsageError as error:
            raise ScalingError(f"the dd-train arguments: {error}") from None
        finished = (run_dir / "report.json").is_file()
        if not finished and not (run_dir / "config.json").is_file():
            continue  # nothing of it yet (or a run stopped before its start was written: dd-train checks)
        saved = read_saved_config(run_dir / "config.json")
        differences = (["config.json is missing or unreadable"] if saved is None
                       else cfg.incompatible_with(saved, default_groups(cfg, p))
                       + workload_differences(saved, cfg.to_dict(), SPEED_ONLY))
        if differences:  # (an unfinished one would be refused by its own --resume, but only in its turn)
            raise ScalingError(f"{run_dir} holds {'a finished' if finished else 'an unfinished'} run made with other "
                               f"settings ({'; '.join(differences)}): sweep into a new --out, or remove that run "
                               "to run it again")
    kept = find_runs([out]) if wanted and any(out.rglob("report.json")) else []  # (what the collect reads)
    if kept:
        first = next(iter(wanted.values())).to_dict()
        here = {k: v for k, v in software_versions().items() if k != "python"}  # what the new runs will say
        named = {path.resolve() for path in wanted}  # (their flags were compared with config.json above)
        for run in kept:
            theirs = run_stack(run.report)
            differences = ([] if run.path.resolve() in named else
                           workload_differences(first, run.report.get("config") or {})) + [
                f"{k} {theirs[k]!r} vs {v!r} here" for k, v in here.items() if k in theirs and theirs[k] != v]
            if differences:
                raise ScalingError(f"{run.path} holds a run of another workload ({'; '.join(differences)}), "
                                   "which this sweep's collect would refuse after its runs: sweep into a new --out, "
                                   "or move that run")
        refuse_mixed_workloads(kept)  # and among themselves (their chips)


def local_sweep(nprocs: list[int], subnets: list[int], out: Path, dd_args: list[str], *,
                timeout: float) -> list[Path]:
    """Run dd-train for every valid (P, N) on this machine, one run at a time."""
    check_passthrough(dd_args)
    pairs = valid_pairs(nprocs, subnets)
    refuse_bad_runs(pairs, out, dd_args)
    refuse_other_settings(pairs, out, dd_args)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONUNBUFFERED"] = "1"
    done, failed = [], []
    with stop_signals_raise():
        for p, n in pairs:
            run_dir = out / f"P{p}-N{n}"
            (done if run_pair(p, n, run_dir, dd_args, env, timeout) else failed).append(run_dir)
    if failed:
        print(f"{len(failed)} of {len(pairs)} runs failed: {', '.join(map(str, failed))}", flush=True)
    return done  # the caller compares with the number of pairs


def run_pair(p: int, n: int, run_dir: Path, dd_args: list[str], env: dict, timeout: float) -> bool:
    """The (P, N) run, kept if finished, else run (or resumed): whether it finished."""
    if (run_dir / "report.json").is_file():
        print(f"[P={p} N={n}] {run_dir}: finished earlier, kept", flush=True)
        return True
    resume = ["--resume"] if (run_dir / "config.json").is_file() else []
    cmd = [sys.executable, "-m", "dd_mpi", *run_argv(p, n, dd_args, run_dir), *resume]
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[P={p} N={n}] $ {shlex.join(['dd-train', *cmd[3:]])}", flush=True)
    start = time.monotonic()
    with open(run_dir / "dd-train.log", "a") as log:
        rc = run_with_timeout(cmd, log, env, timeout)
    if (run_dir / "report.json").is_file():  # (also when the timeout struck as it closed: the report
        # is written whole, and last)
        print(f"[P={p} N={n}] done in {time.monotonic() - start:.0f} s", flush=True)
        return True
    tail = (run_dir / "dd-train.log").read_text()[-1500:]
    print(f"[P={p} N={n}] FAILED (exit {rc}); {run_dir / 'dd-train.log'} ends:\n{tail}", flush=True)
    return False


class SweepStopped(Exception):
    """A stop signal reached dd-scaling: the run in progress was stopped (checkpointed)."""


@contextlib.contextmanager
def stop_signals_raise():
    """SIGTERM and SIGHUP (a job's end, a closed terminal, `timeout`) stop a sweep as Ctrl-C
    does: each run has its own process group (so that a timeout can stop it whole), which no
    signal sent to dd-scaling reaches, and a stopped dd-scaling left it training on, orphaned.
    (Killed outright, dd-scaling cannot pass anything on: the run then has the parent-death
    signal, as dd-train's ranks have it from their launcher.)"""
    def stop(signum, frame):
        raise SweepStopped(signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_with_timeout(cmd: list[str], log, env: dict, timeout: float) -> int | str:
    """Run one dd-train job in its own process group; past the timeout, stop the whole group
    (the launcher and its ranks): SIGTERM first (ranks checkpoint), SIGKILL 30 s later. A stop
    signal to dd-scaling is passed on to the group, which is waited for (a second one kills it)."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=stop_when_parent_dies(os.getpid()))
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return f"timeout after {timeout:g} s"
    except (KeyboardInterrupt, SweepStopped) as stop:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait()
        except (KeyboardInterrupt, SweepStopped):  # asked twice: now
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise SweepStopped(str(stop) or "SIGINT") from None


def find_study_script(given: Path | None) -> Path:
    """--study-script if given, else slurm/scaling_study.sh under the working directory, else
    $DD_MPI_SLURM_DIR/scaling_study.sh; a missing script stops the sweep before anything runs."""
    if given is not None:
        if not given.is_file():
            raise ScalingError(f"--study-script {given}: no such file")
        return given
    candidates = [Path("slurm") / STUDY_SCRIPT_NAME]
    if os.environ.get(SLURM_DIR_ENV):
        candidates.append(Path(os.environ[SLURM_DIR_ENV]) / STUDY_SCRIPT_NAME)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    looked = " or ".join(str(Path.cwd() / path) for path in candidates)
    raise ScalingError(f"--slurm: no {looked}: pass --study-script PATH (the repository's "
                       f"slurm/{STUDY_SCRIPT_NAME}), or set {SLURM_DIR_ENV} to the repository's slurm directory")


def slurm_command(nodes: list[int], subnets: list[int], tasks_per_node: int, out: Path, dd_args: list[str],
                  *, sbatch_opts: list[str], study_script: Path,
                  script: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """The environment and argv of slurm/scaling_study.sh for this sweep."""
    check_passthrough(dd_args)
    refuse_bad_flags(dd_args)
    env = {"NODES": " ".join(map(str, nodes)), "SUBNETS": " ".join(map(str, subnets)),
           "TASKS_PER_NODE": str(tasks_per_node), "STUDY": str(out)}
    if script is not None:
        env["SCRIPT"] = str(script)
    return env, ["bash", str(study_script), *sbatch_opts, "--", "--strategy", "both", *dd_args]
