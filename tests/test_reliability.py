"""Reliability, as real processes under the real launchers: resume, --only-group, dead and
hung ranks, stop signals, bad input, and checkpoints that survive a kill mid-write.

    .venv/bin/python -m pytest -q tests/test_reliability.py

Runs are tiny (ResNet20 at width 1, synthetic data, a few hundred samples) but made of real
ranks: 4 under ``--nproc``, ``torchrun --standalone`` or ``mpiexec``, gloo on CPU. Where a
test must act "during phase k" it waits for a checkpoint of that phase written by *this*
job (so the ranks are past start-up and their signal handlers are set) and acts then.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dd_mpi import runlock
from dd_mpi.checkpoint import CHECKPOINT_DIR, checkpoint_path, load
from dd_mpi.pipeline import GroupAlarm

import datagen
from helpers import BIN, explain, launcher_command, launcher_free_env, python_path, read_metrics, read_report, run_dd

# Every run below trains the same nets as the reference run unless it says otherwise.
RUN = ["--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "--width", "1",
       "--subnets", "2", "--subnet-epochs", "2", "--finetune-epochs", "2", "--baseline-epochs", "2",
       "--train-samples", "512", "--test-samples", "64", "--batch-size", "32", "--strategy", "both",
       "--deterministic"]
STOP_SOON = ["--signal-check-steps", "1"]  # not a shaping flag: a resumed run may differ in it
PHASES = ("subnet0", "subnet1", "finetune", "baseline")
LAST_KEYS = {"model", "optimizer", "scheduler", "epoch", "history", "rng", "config", "seconds", "test"}
KILL_BOUND = 60  # seconds from the kill to the launcher's exit (the contract: <= 60 s by default)
RANK_VARIABLE = {"local": "RANK", "torchrun": "RANK", "mpiexec": "PMI_RANK"}
EXIT_PREEMPTED = 75


# --- jobs we start and watch: output to a file (no pipe to fill), ranks found by pid ---------
class Job:
    """A launcher started in the background; its ranks are its descendants running dd_mpi."""

    def __init__(self, args: list[str], *, launcher: str = "local", nproc: int = 4, log: Path,
                 env: dict | None = None):
        self.launcher, self.log = launcher, log
        full_env = launcher_free_env(**(env or {}))
        self.started_ns = time.time_ns()
        with open(log, "w") as handle:
            self.proc = subprocess.Popen(launcher_command(launcher, nproc) + list(args), stdout=handle,
                                         stderr=subprocess.STDOUT, env=full_env)
        self.ranks: dict[int, int] = {}  # rank -> pid, as last seen

    def find_ranks(self, count: int, timeout: float = 120) -> dict[int, int]:
        """The pid of every rank (by its rank variable, among this job's descendants)."""
        deadline = time.monotonic() + timeout
        variable = RANK_VARIABLE[self.launcher]
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = {}
            for pid in descendants(self.proc.pid):
                environ = read_proc(pid, "environ")
                if b"dd_mpi" not in read_proc(pid, "cmdline"):
                    continue
                for entry in environ.split(b"\0"):
                    if entry.startswith(f"{variable}=".encode()) and entry[len(variable) + 1:].isdigit():
                        found[int(entry[len(variable) + 1:])] = pid
            if len(found) == count:
                self.ranks = found
                return found
            time.sleep(0.1)
        raise AssertionError(f"found ranks {sorted(found)} of {count}\n{self.output()}")

    def wait_for_new(self, path: Path, timeout: float = 300) -> None:
        """Until this job has written ``path`` (an older file of the same name doesn't count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_mtime_ns >= self.started_ns:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before writing "
                                     f"{path.name}\n{self.output()}")
            time.sleep(0.02)
        raise AssertionError(f"no {path.name} after {timeout}s\n{self.output()}")

    def signal_ranks(self, signum: int) -> None:
        for pid in self.ranks.values():
            os.kill(pid, signum)

    def finish(self, timeout: float = 300) -> tuple[int, float]:
        """The launcher's exit code and when it came (seconds since this call)."""
        t0 = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job did not end within {timeout}s\n{self.output()}") from None
        return code, time.monotonic() - t0

    def kill(self) -> None:
        """Clean-up after a failed test: the launcher and the ranks we saw, by pid."""
        for pid in [self.proc.pid, *self.ranks.values(), *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-8000:]


def read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = read_proc(int(entry.name), "stat").decode(errors="replace")
            if stat:
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    stat = read_proc(pid, "stat").decode(errors="replace")
    return bool(stat) and stat[stat.rindex(")") + 2] != "Z"  # a zombie has already ended


def wait_gone(pids, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture
def jobs():
    """Jobs a test starts; any still running when it ends (a failed assert) are killed."""
    started: list[Job] = []
    yield started
    for job in started:
        if job.proc.poll() is None:
            job.kill()


def start(jobs: list, args: list[str], tmp_path: Path, name: str, **kwargs) -> Job:
    job = Job(args, log=tmp_path / f"{name}.log", **kwargs)
    jobs.append(job)
    return job


def run_ok(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = run_dd(args, **kwargs)
    assert result.returncode == 0, explain(result)
    return result


def models_equal(a: Path, b: Path, phase: str) -> bool:
    sa, sb = load(checkpoint_path(a, phase, "final"))["model"], load(checkpoint_path(b, phase, "final"))["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def metric_rows(out: Path) -> list[tuple]:
    return sorted((r["phase"], r["group"] or 0, r["epoch"], r["loss"]) for r in read_metrics(out))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("dd-train: error:")]


def snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted 4-rank run (DD and baseline): what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_ok([*RUN, "--out", str(out)], nproc=4)
    return out


# ---------------------------------------------------------------------------------------
# Contract 1: the checkpoint files and what they hold
@pytest.mark.slow
def test_checkpoints_are_all_there_and_complete(reference):
    ckpt = reference / CHECKPOINT_DIR
    expected = {f"{phase}-{kind}.pt" for phase in PHASES for kind in ("last", "best", "final")}
    assert {p.name for p in ckpt.glob("*.pt")} == expected | {"composed.pt"}
    assert not [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    for phase in PHASES:
        last = load(checkpoint_path(reference, phase, "last"))
        assert LAST_KEYS <= set(last) and last["epoch"] == 2 and len(last["history"]) == 2
        assert last["config"]["arch"] == "resnet20" and last["test"]["samples"] == 64
        final = load(checkpoint_path(reference, phase, "final"))
        assert all(torch.equal(final["model"][k], last["model"][k]) for k in final["model"])
    assert set(load(checkpoint_path(reference, "composed", ""))) >= {"model", "config"}


# ---------------------------------------------------------------------------------------
# Contracts 2 and 5: stop signals at several points, resume, bit-identical weights
@pytest.mark.timing
@pytest.mark.slow
def test_stopped_three_times_and_resumed_equals_the_uninterrupted_run(reference, tmp_path, jobs):
    """Stopped in phase 1 (SIGTERM to the --nproc parent, which forwards it), in phase 3
    (SIGUSR1 to every rank) and in the baseline (SIGINT, Ctrl-C, to the parent): each time exit 75
    with the phase's last checkpoint intact; the last --resume finishes, and every final
    net equals the uninterrupted run's bit for bit."""
    out = tmp_path / "run"
    stops = [("subnet0", "parent", signal.SIGTERM), ("finetune", "ranks", signal.SIGUSR1),
             ("baseline", "parent", signal.SIGINT)]
    for i, (phase, target, signum) in enumerate(stops):
        resume = ["--resume"] if i else []
        job = start(jobs, [*RUN, *STOP_SOON, *resume, "--out", str(out)], tmp_path, f"stop{i}")
        job.find_ranks(4)
        job.wait_for_new(checkpoint_path(out, phase, "last"))  # its first epoch is done
        if target == "parent":
            job.proc.send_signal(signum)
        else:
            job.signal_ranks(signum)
        code, seconds = job.finish()
        assert code == EXIT_PREEMPTED, job.output()
        assert "stopped by signal after checkpointing" in job.output()
        assert seconds < 60
        assert not checkpoint_path(out, phase, "final").exists()  # it stopped inside the phase
        # in its second epoch: cut short (epoch 1 kept), or just complete (epoch 2 kept)
        assert load(checkpoint_path(out, phase, "last"))["epoch"] in (1, 2)
        for name in PHASES:  # whatever exists is whole
            for kind in ("last", "best", "final"):
                if checkpoint_path(out, name, kind).exists():
                    assert load(checkpoint_path(out, name, kind))["model"]
    result = run_ok([*RUN, "--resume", "--out", str(out)], nproc=4)
    assert "subnet0: finished earlier" in result.stdout and "subnet1: finished earlier" in result.stdout
    assert re.search(r"baseline: resuming after epoch [12]", result.stdout)
    for phase in PHASES:
        assert models_equal(reference, out, phase), f"{phase} differs from the uninterrupted run"
    assert metric_rows(out) == metric_rows(reference)  # same epochs, same losses, none twice
    assert read_report(out)["transfer_T"]["top1"] == read_report(reference)["transfer_T"]["top1"]


@pytest.mark.timing
@pytest.mark.slow
@pytest.mark.mpi
def test_stopped_under_mpiexec_between_phases_and_resumed_equals_the_reference(reference, tmp_path, jobs):
    """SIGUSR1 to mpiexec (which forwards it) as soon as the composed net is written, i.e.
    during phase 2 or early phase 3; the resume (under mpiexec too) ends where the
    uninterrupted --nproc run ended: the result does not depend on the launcher."""
    if not (BIN / "mpiexec").exists():
        pytest.skip("pip's MPICH (mpiexec) is not installed: pip install 'dd_mpi[mpi]'")
    out = tmp_path / "run"
    job = start(jobs, [*RUN, *STOP_SOON, "--out", str(out)], tmp_path, "stop", launcher="mpiexec")
    job.find_ranks(4)
    job.wait_for_new(checkpoint_path(out, "composed", ""))
    job.proc.send_signal(signal.SIGUSR1)
    code, _ = job.finish()
    assert code == EXIT_PREEMPTED, job.output()
    assert not checkpoint_path(out, "finetune", "final").exists()
    run_ok([*RUN, "--resume", "--out", str(out)], launcher="mpiexec", nproc=4)
    for phase in PHASES:
        assert models_equal(reference, out, phase), f"{phase} differs from the uninterrupted run"


# ---------------------------------------------------------------------------------------
# Contracts 3 and 4: a rank raises; the job ends; its group is re-run alone; --resume ends it
FAULT = """\
import os
if os.environ.get("RANK", os.environ.get("PMI_RANK")) == os.environ.get("DD_TEST_FAIL_RANK"):
    import dd_mpi.train  # before the pipeline imports train_epoch from it

    def failing_epoch(*args, **kwargs):
        raise RuntimeError("injected failure on purpose")

    dd_mpi.train.train_epoch = failing_epoch
"""


def fault_env(tmp_path: Path, rank: int) -> dict:
    """A sitecustomize that makes ``rank``'s first training epoch raise (phase 1, group 1)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(FAULT)
    return {"PYTHONPATH": python_path(site), "DD_TEST_FAIL_RANK": str(rank)}


def check_one_traceback(result: subprocess.CompletedProcess, out: Path) -> None:
    """Rank 2 raised in phase 1: the job failed, in bounded time, with its traceback once."""
    assert result.returncode not in (0, 2, EXIT_PREEMPTED), explain(result)
    output = result.stdout + result.stderr
    assert output.count("[rank 2] RuntimeError: injected failure on purpose") == 1, explain(result)
    assert output.count("dd-train: rank 2 failed") == 1 and "rank 0 failed" not in output
    assert output.count(f"dd_mpi{os.sep}cli.py\", line") == 1  # one rank's traceback, not P
    assert result.seconds < 120, f"the job took {result.seconds:.0f}s to end"
    assert not checkpoint_path(out, "subnet1", "last").exists()
    assert not (out / "report.json").exists()


@pytest.mark.timing
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("mpiexec", marks=pytest.mark.mpi)])
def test_an_exception_on_one_rank_ends_the_job_with_one_traceback(tmp_path, launcher):
    """(Under --nproc: the first step of the next test.)"""
    out = tmp_path / "run"
    result = run_dd([*RUN, "--strategy", "dd", "--out", str(out)], launcher=launcher,
                    env=fault_env(tmp_path, 2), timeout=300)
    check_one_traceback(result, out)


@pytest.mark.timing
@pytest.mark.slow
def test_a_failed_group_is_rerun_alone_then_the_job_resumes(tmp_path):
    out = tmp_path / "run"
    args = [*RUN, "--strategy", "dd", "--out", str(out)]
    failed = run_dd(args, nproc=4, env=fault_env(tmp_path, 2), timeout=300)  # group 1 = ranks 2, 3
    check_one_traceback(failed, out)
    assert failed.returncode == 1
    # its sub-network alone, on however many ranks: here 1 (the job had 2 per group)
    alone = run_ok([*args, "--only-group", "1"], nproc=1)
    assert "--resume" in alone.stdout and not (out / "report.json").exists()
    subnet1 = checkpoint_path(out, "subnet1", "final").read_bytes()
    # the task resubmitted as it was (no --resume): its finished sub-net is loaded, not retrained
    again = run_ok([*args, "--only-group", "1"], nproc=1)
    assert "subnet1: finished earlier" in again.stdout, explain(again)
    assert checkpoint_path(out, "subnet1", "final").read_bytes() == subnet1
    assert "trained on" not in again.stdout  # (the same size of group)
    # the job the task's last line names (`--resume --out` alone was refused: other settings)
    told = re.search(r"run `dd-train ([^`]*)` \(the run.s flags; .*\) with all ranks to compose", alone.stdout)
    assert told, explain(alone)
    resumed = run_ok(shlex.split(told[1]), nproc=4)
    assert "subnet1: finished earlier" in resumed.stdout, explain(resumed)
    # the layout gives it 2 ranks: the log and the report say how it really trained
    assert re.search(r"subnet1: finished earlier, loaded \S+ \(trained on 1 rank at a batch of \d+ a step: its group "
                     r"here has 2\)", resumed.stdout), explain(resumed)
    assert checkpoint_path(out, "subnet1", "final").read_bytes() == subnet1  # loaded, not retrained
    report = read_report(out)
    assert [s["index"] for s in report["sub_nets"]] == [0, 1] and report["transfer_T"]["top1"] >= 0
    subnet0, subnet1 = report["sub_nets"]
    assert "trained_on" not in subnet0 and subnet1["ranks"] == [2, 3]
    assert subnet1["trained_on"]["ranks"] == 1 and subnet1["trained_on"]["step_batch"] > 0
    assert checkpoint_path(out, "finetune", "final").exists()


@pytest.mark.timing
@pytest.mark.slow
def test_the_ranks_stop_when_their_launcher_is_killed(tmp_path, jobs):
    """dd-train --nproc K killed outright (SIGKILL, the OOM killer) left its ranks training on
    to the end, unseen. The kernel now sends each SIGTERM when it dies (the parent-death
    signal): they checkpoint and exit, as on any stop signal."""
    out = tmp_path / "run"
    job = start(jobs, [*RUN, "--strategy", "dd", "--subnet-epochs", "50", *STOP_SOON, "--out", str(out)],
                tmp_path, "orphaned", nproc=2)
    ranks = job.find_ranks(2)
    job.wait_for_new(checkpoint_path(out, "subnet0", "last"))  # past start-up: the stop handlers are set
    job.proc.kill()
    job.proc.wait()
    assert wait_gone(list(ranks.values()), timeout=KILL_BOUND) == [], job.output()
    assert job.output().count(": stop requested") == 2, job.output()  # each group checkpointed
    assert not checkpoint_path(out, "subnet0", "final").exists()


@pytest.mark.timing
@pytest.mark.slow
def test_two_jobs_never_train_one_run_at_once(tmp_path, jobs):
    """A job submitted twice, or an array task resubmitted while it still ran, trained the same
    sub-network into the same checkpoints. Rank 0 holds a lock in --out (flock: the kernel
    drops it when the process ends, even by SIGKILL): array tasks of other sub-nets share the
    run's; a second task of the same sub-net, or a whole run, waits for it (half of
    --io-timeout) and is refused."""
    out = tmp_path / "run"
    args = [*RUN, "--strategy", "dd", "--subnet-epochs", "500", "--out", str(out)]
    task = start(jobs, [*args, "--only-group", "0"], tmp_path, "task0", nproc=1)  # (one process)
    task.wait_for_new(checkpoint_path(out, "subnet0", "last"))
    again = run_dd([*args, "--only-group", "0", "--io-timeout", "4"], nproc=1, timeout=120)
    assert again.returncode == 2 and error_lines(again.stderr) == [
        f"dd-train: error: --out {out}: another job is training sub-network 0 there now "
        f"({out / '.dd_mpi.lock-subnet0'} is locked): wait for it to end, or cancel it (if none runs there "
        f"any more, remove {out / '.dd_mpi.lock-subnet0'})"], explain(again)
    assert "waiting up to 2 s for it to end" in again.stdout, explain(again)
    # a stop signal while it waits (Slurm's, before a requeue) ends it as a stop (75), not a refusal (2)
    waiting = start(jobs, [*args, "--only-group", "0", "--io-timeout", "600"], tmp_path, "waiting", nproc=1)
    deadline = time.monotonic() + 120
    while "waiting up to 300 s" not in waiting.output() and time.monotonic() < deadline and waiting.proc.poll() is None:
        time.sleep(0.1)
    waiting.proc.send_signal(signal.SIGTERM)
    code, _ = waiting.finish(timeout=60)
    assert code == EXIT_PREEMPTED and "Traceback" not in waiting.output(), waiting.output()
    whole = run_dd([*args, "--resume", "--io-timeout", "30"], nproc=2, timeout=120)  # (rank 1 waits 30 s for 0)
    assert whole.returncode == 2 and "another job is training the run there now" in whole.stderr, explain(whole)
    assert task.proc.poll() is None  # the first job trains on
    assert runlock.claim(out, 1, wait_seconds=0) is None  # another sub-net's task may train beside it
    runlock.release()
    task.kill()  # SIGKILL: no clean-up, and yet the lock is free
    assert wait_gone([task.proc.pid]) == []
    assert runlock.claim(out, 0, wait_seconds=0) is None and runlock.claim(out, None, wait_seconds=0) is None
    runlock.release()
    assert not checkpoint_path(out, "subnet0", "final").exists()


HOLD_AND_FORK = """
import multiprocessing, sys, time
from pathlib import Path
from dd_mpi import runlock
assert runlock.claim(Path(sys.argv[1]), None, wait_seconds=0) is None
worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))  # as DataLoader's
worker.start()
print(worker.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.timing
def test_a_continuing_job_waits_for_the_lock_and_forked_workers_do_not_keep_it(tmp_path):
    """The claim is the process's own: a DataLoader worker forked after it closes its copy (it
    kept the lock for the seconds it outlived a killed rank 0, and a restart was refused). A
    new job is refused at once; a continuing one waits, and starts when the holder dies."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    worker = int(holder.stdout.readline())
    killer = threading.Timer(1.0, holder.kill)
    try:  # writable by all: another user's --resume of a shared run opens it read-write (NFS's flock)
        assert (tmp_path / runlock.LOCK_NAME).stat().st_mode & 0o777 == 0o666
        assert "another job is training the run there now" in runlock.claim(tmp_path, None, wait_seconds=0)
        killer.start()
        started = time.monotonic()
        assert runlock.claim(tmp_path, None, wait_seconds=120) is None  # while the worker still lives
        assert alive(worker) and time.monotonic() - started < 60
        runlock.release()
    finally:
        killer.cancel()  # (a failed assert before it fired: no thread left to kill a reaped pid)
        holder.kill()
        holder.wait()
        os.kill(worker, signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# Contract 4: a rank killed with SIGKILL (or frozen) ends the whole job, non-zero, in bounded time
KILL_RUN = ["--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "--width", "1",
            "--subnets", "2", "--strategy", "dd", "--train-samples", "1024", "--test-samples", "64",
            "--batch-size", "32"]
KILL_EPOCHS = {"subnet0": ["--subnet-epochs", "3", "--finetune-epochs", "1"],  # phase 1 lasts
               "finetune": ["--subnet-epochs", "1", "--finetune-epochs", "4"]}  # phase 3 lasts


@pytest.mark.timing
@pytest.mark.slow
@pytest.mark.parametrize("launcher, phase", [
    ("local", "subnet0"), ("torchrun", "subnet0"), pytest.param("mpiexec", "subnet0", marks=pytest.mark.mpi),
    ("local", "finetune")], ids=["local-phase1", "torchrun-phase1", "mpiexec-phase1", "local-phase3"])
def test_a_killed_rank_ends_the_job(tmp_path, jobs, launcher, phase):
    """kill -9 rank 2 after the phase's first epoch. In phase 1 it belongs to group 1, so
    group 0 never talks to it until phase 1 ends: the launcher must end the job, and each
    launcher is tried. In phase 3 its peers' own collective fails and they end, one line each,
    whatever started them (one launcher is enough)."""
    out = tmp_path / "run"
    job = start(jobs, [*KILL_RUN, *KILL_EPOCHS[phase], "--out", str(out)], tmp_path, "job",
                launcher=launcher)
    ranks = job.find_ranks(4)
    job.wait_for_new(checkpoint_path(out, phase, "last"))
    os.kill(ranks[2], signal.SIGKILL)
    code, seconds = job.finish(timeout=KILL_BOUND + 120)
    print(f"\n{launcher} {phase}: killed rank 2 -> launcher exit {code} after {seconds:.1f}s")
    assert code != 0, job.output()
    assert seconds <= KILL_BOUND, f"the job took {seconds:.0f}s to end after the kill"
    assert not wait_gone(ranks.values()), "ranks outlived the job"
    assert f"dd_mpi{os.sep}cli.py\", line" not in job.output()  # the others: one line each, no traceback
    assert not (out / "report.json").exists()
    if launcher == "local":  # (torchrun and mpiexec say it their own way)
        assert job.output().count("dd-train: rank 2 was killed by SIGKILL (out of memory?") == 1, job.output()


@pytest.mark.timing
@pytest.mark.slow
def test_a_frozen_rank_is_timed_out(tmp_path, jobs):
    """SIGSTOP rank 2 in phase 3: its peers' allreduce gives up after --timeout, they exit,
    and the launcher ends the stopped rank."""
    out = tmp_path / "run"
    job = start(jobs, [*KILL_RUN, *KILL_EPOCHS["finetune"], "--timeout", "5", "--out", str(out)],
                tmp_path, "job")
    ranks = job.find_ranks(4)
    job.wait_for_new(checkpoint_path(out, "finetune", "last"))
    os.kill(ranks[2], signal.SIGSTOP)
    code, seconds = job.finish(timeout=180)
    print(f"\nlocal: froze rank 2 (--timeout 5) -> exit {code} after {seconds:.1f}s")
    assert code == 1, job.output()
    assert 5 <= seconds <= 45
    assert not wait_gone(ranks.values())
    assert "lost contact with another rank" in job.output() and "Traceback" not in job.output()


@pytest.mark.timing
@pytest.mark.slow
def test_a_rank_told_to_stop_that_loses_a_peer_says_it_stopped(tmp_path, jobs):
    """A stop reaches every rank, and one that is still starting up ends at once (it cannot
    checkpoint yet): its peers then lose it while stopping, and must say they stopped, not
    that contact was lost. Here rank 2 is frozen while rank 0 is told to stop (so rank 0 waits
    on it in a collective with its flag set), then killed."""
    out = tmp_path / "run"
    job = start(jobs, [*KILL_RUN, *KILL_EPOCHS["finetune"], "--out", str(out)], tmp_path, "job")
    ranks = job.find_ranks(4)
    job.wait_for_new(checkpoint_path(out, "finetune", "last"))
    os.kill(ranks[2], signal.SIGSTOP)
    os.kill(ranks[0], signal.SIGUSR1)
    time.sleep(1)
    os.kill(ranks[2], signal.SIGKILL)
    code, _ = job.finish(timeout=180)
    assert code == 1, job.output()  # a killed rank is a failure, whatever the others say
    assert "rank 0: stopped by signal; another rank ended before it could checkpoint" in job.output()
    assert "rank 0: lost contact" not in job.output() and "rank 1: lost contact" in job.output()
    assert not wait_gone(ranks.values())


@pytest.mark.timing
@pytest.mark.slow
def test_sigterm_to_the_whole_step_with_dataloader_workers_checkpoints_and_exits_75(tmp_path):
    """Slurm signals every process of the step, DataLoader workers too (images over 64 px are
    decoded by workers): the workers ignore it and the rank checkpoints and exits 75, which
    requeues the job. (PyTorch's own worker handler died on SIGTERM, and the rank with it:
    exit 1, no checkpoint, no requeue.)"""
    datagen.write_imagefolder(tmp_path / "data", classes=("cat", "dog"), per_class=60, val_per_class=4, size=96)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dd_mpi", "--device", "cpu", "--dataset", "imagefolder", "--data-dir",
           str(tmp_path / "data"), "--image-size", "32", "--arch", "resnet20", "--width", "1", "--batch-size", "8",
           "--threads", "1", "--signal-check-steps", "1", "--strategy", "baseline", "--baseline-epochs", "50",
           "--workers", "1", "--out", str(out)]
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=launcher_free_env(),
                               start_new_session=True)  # a step of its own: the signal goes to every process
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_path(out, "baseline", "last").exists():  # training, its worker running
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGTERM)
        code = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    output = (tmp_path / "job.log").read_text()
    assert code == 75, output
    assert "killed by signal" not in output and "Traceback" not in output
    assert load(checkpoint_path(out, "baseline", "last"))["epoch"] < 50  # what it reached, resumable


SLOW_COMPOSED_WRITE = """\
import time
import dd_mpi.checkpoint as checkpoint
save = checkpoint.save

def slow_save(path, state):  # a slow shared file system, for composed.pt only
    if path.name == "composed.pt":
        time.sleep(12)
    return save(path, state)

checkpoint.save = slow_save
"""


@pytest.mark.timing
@pytest.mark.slow
def test_the_ranks_wait_for_rank_0s_composed_net_as_long_as_io_timeout_allows(tmp_path):
    """Rank 0 composes and writes composed.pt while the others wait for it: a wait on a file
    write, bounded by --io-timeout (30 min by default), not by --timeout (here 5 s: it once
    ended a healthy job with 'lost contact' when the write took longer)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_COMPOSED_WRITE)
    result = run_dd([*RUN, "--strategy", "dd", "--subnet-epochs", "1", "--finetune-epochs", "1", "--train-samples",
                     "128", "--timeout", "5", "--out", str(tmp_path / "run")], nproc=2,
                    env={"PYTHONPATH": python_path(tmp_path / "site")}, timeout=300)
    assert result.returncode == 0, explain(result)
    assert result.seconds > 12 and (tmp_path / "run" / "report.json").exists()


# ---------------------------------------------------------------------------------------
# Contract 6: bad input -> one line, non-zero, within seconds, nothing a later run would trust
@pytest.mark.slow
@pytest.mark.parametrize("launcher, nproc, flags, needle", [  # (P not divisible by N: test_pipeline)
    ("local", 4, ["--subnets", "4", "--width", "0.625"], "--subnets 4 does not divide"),
    pytest.param("mpiexec", 4, ["--subnets", "4", "--width", "0.625"], "--subnets 4 does not divide",
                 marks=pytest.mark.mpi),
    ("torchrun", 2, ["--lr", "0"], "--lr 0.0 is invalid"),
    ("local", 4, ["--subnets", "0"], "--subnets 0 is invalid"),
    ("local", 4, ["--arch", "resnet21"], "--arch 'resnet21' is unknown"),
    ("local", 4, ["--dataset", "mnist"], "--dataset 'mnist' is unknown"),
    ("local", 4, ["--preset", "nope"], "--preset 'nope' is unknown"),
    ("local", 4, ["--finetune-epochs", "-1"], "--finetune-epochs -1 is invalid"),
    ("local", 4, ["--batch-size", "0"], "--batch-size 0 is invalid"),
    ("local", 3, ["--global-batch-size", "128"], "--global-batch-size 128 is not divisible by the 3 ranks"),
])
def test_bad_flags_fail_fast_with_one_line(tmp_path, launcher, nproc, flags, needle):
    """Rank 0 says it, the others exit quietly; under torchrun, which stops all ranks when
    the first one exits (perhaps before rank 0 has got that far), every rank says it."""
    out = tmp_path / "run"
    result = run_dd([*RUN, *flags, "--out", str(out)], launcher=launcher, nproc=nproc, timeout=300)
    assert result.returncode == 2 or (launcher == "torchrun" and result.returncode == 1), explain(result)
    lines = error_lines(result.stderr)
    if launcher == "torchrun":
        assert 1 <= len(lines) <= nproc and len(set(lines)) == 1, explain(result)
    else:
        assert len(lines) == 1, explain(result)
    assert needle in lines[0], explain(result)
    assert result.seconds < 60
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.mpi
def test_a_rendezvous_port_in_use_under_mpiexec_is_one_line(tmp_path):
    """MASTER_ADDR/MASTER_PORT exported in the shell (for an earlier job; two jobs on a node),
    the port held by another process: rank 0's DistNetworkError traceback, while the other
    ranks joined whoever listened there and hung past --timeout and --io-timeout."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_dd([*RUN, "--io-timeout", "60", "--out", str(tmp_path / "run")], launcher="mpiexec", nproc=2,
                        timeout=120, env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert result.returncode == 2, explain(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and f"rank 0 cannot open the rendezvous at 127.0.0.1:{port} (" in lines[0], explain(result)
    assert "Traceback" not in result.stderr, explain(result)


@pytest.mark.slow
@pytest.mark.mpi
def test_a_master_addr_that_does_not_resolve_is_one_line_under_mpiexec(tmp_path):
    """The store's clients retried an unresolvable MASTER_ADDR for --io-timeout (30 min),
    printing only c10d's warnings."""
    result = run_dd([*RUN, "--out", str(tmp_path / "run")], launcher="mpiexec", nproc=2, timeout=120,
                    env={"MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29631"})
    assert result.returncode == 2, explain(result)  # (it hung past run_dd's timeout: the client retried)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("dd-train: error: MASTER_ADDR no-such-host.invalid does not "
                                                   "resolve on rank 0 ("), explain(result)
    assert lines[0].endswith("unset MASTER_ADDR and MASTER_PORT (the ranks then agree on rank 0's)"), explain(result)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", pytest.param("mpiexec", marks=pytest.mark.mpi)])
def test_rank_variables_left_in_the_shell_are_not_taken_for_a_launcher(tmp_path, launcher):
    """RANK/WORLD_SIZE left in a shell (no torchrun set them): under mpiexec both ranks were
    rank 0 and waited for a rank 1 up to --io-timeout; `--nproc 2` took itself for one of
    torchrun's ranks, said --nproc was ignored, and hung."""
    stale = {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "1"}
    result = run_dd([*RUN, "--strategy", "dd", "--io-timeout", "60", "--out", str(tmp_path / "run")],
                    launcher=launcher, nproc=2, timeout=300, env=stale)
    if launcher == "mpiexec":  # its own variables win; torchrun's restart counter is no restart
        assert result.returncode == 0, explain(result)
        assert read_report(tmp_path / "run")["launcher"] == "mpi"
    else:
        assert result.returncode == 2 and result.seconds < 60, explain(result)
        assert error_lines(result.stderr) == [
            "dd-train: error: --nproc 2 starts ranks of its own, but RANK=0 WORLD_SIZE=2 in the environment say this "
            "process is one rank of a launcher's job (left in this shell?): `unset RANK WORLD_SIZE LOCAL_RANK` to "
            "start the ranks here, or leave --nproc out under a launcher"], explain(result)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["under-a-file", "a-file", "tensorboard-a-file", "another-run",
                                  "another-run-resumed-wrongly"])
def test_an_unusable_out_is_refused(tmp_path, reference, case):
    if case == "under-a-file":  # root ignores permissions: a path whose parent is a file
        (tmp_path / "file").write_text("x")
        out, extra, needle = tmp_path / "file" / "run", [], "is not writable"
    elif case == "a-file":
        (tmp_path / "file").write_text("x")
        out, extra, needle = tmp_path / "file", [], "is a file, not a folder"
    elif case == "tensorboard-a-file":  # found after the first epoch, by a traceback on every rank
        (tmp_path / "tb").mkdir()
        (tmp_path / "tb" / "tensorboard").write_text("x")
        out, extra, needle = tmp_path / "tb", ["--tensorboard"], "--tensorboard: "
    elif case == "another-run":
        out, extra, needle = reference, [], "holds a run already (config.json): pass --resume"
    else:
        out, extra, needle = reference, ["--resume", "--width", "2"], "--width: 1.0 -> 2.0"
    before = snapshot(reference)
    result = run_dd([*RUN, *extra, "--out", str(out)], nproc=2, timeout=300)
    assert result.returncode == 2, explain(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and needle in lines[0] and str(out) in lines[0], explain(result)
    assert snapshot(reference) == before
    assert not (tmp_path / "file" / "run").exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def garble(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(5000))


def widen(path: Path) -> None:
    """Another run's checkpoint copied in: its first weight twice as wide (another --width)."""
    saved = load(path)
    name = next(iter(saved["model"]))
    saved["model"][name] = torch.cat([saved["model"][name]] * 2)
    torch.save(saved, path)


def reseed(path: Path) -> None:
    """Another run's checkpoint of the same shapes copied in: the same flags but --seed 7."""
    saved = load(path)
    saved["config"]["seed"] = 7
    torch.save(saved, path)


def not_a_checkpoint(path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, path)  # reads, but holds none of a checkpoint's keys


@pytest.mark.slow
@pytest.mark.parametrize("victim, damage, expected", [
    ("finetune-last", truncate, "is unreadable"),
    ("subnet1-final", garble, "is unreadable"),
    ("subnet1-final", widen, "holds another network than this run's (conv1.weight is 16×3×3×3, here 8×3×3×3"),
    ("finetune-last", widen, "holds another network than this run's (conv1.weight is 32×3×3×3, here 16×3×3×3"),
    ("subnet1-final", not_a_checkpoint, "is not a dd_mpi checkpoint of this kind (no model, history"),
    ("subnet1-final", reseed, "was made with other settings than this run's (--seed: 7 -> 0): another run's"),
    ("finetune-last", reseed, "was made with other settings than this run's (--seed: 7 -> 0): another run's"),
])
def test_a_corrupt_checkpoint_is_refused_on_resume(tmp_path, reference, victim, damage, expected):
    """A run stopped in phase 3 (its later files removed), then one checkpoint damaged, or
    replaced by another run's (it composed a wrong net on rank 0 while the others died in a
    collective) or by a file that is no checkpoint (KeyError)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("finetune-final", "baseline-last", "baseline-best", "baseline-final"):
        (out / CHECKPOINT_DIR / f"{name}.pt").unlink()
    (out / "report.json").unlink()
    path = out / CHECKPOINT_DIR / f"{victim}.pt"
    damage(path)
    damaged = path.read_bytes()
    result = run_dd([*RUN, "--resume", "--out", str(out)], nproc=2, timeout=300)
    assert result.returncode == 2, explain(result)
    lines = error_lines(result.stderr)
    assert lines and len(set(lines)) == 1 and f"{path} {expected}" in lines[0], explain(result)
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == damaged  # left for the user to look at
    assert not checkpoint_path(out, "finetune", "final").exists() and not (out / "report.json").exists()


@pytest.mark.slow
def test_resuming_a_phase_on_another_number_of_ranks_is_refused(tmp_path, reference):
    """The fine-tune stopped after epoch 1 on 4 ranks; resumed on 2 it would scale its LR,
    steps and data split differently: refused, naming the ranks, nothing changed."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("finetune-final", "baseline-last", "baseline-best", "baseline-final"):
        (out / CHECKPOINT_DIR / f"{name}.pt").unlink()
    (out / "report.json").unlink()
    last = checkpoint_path(out, "finetune", "last")
    before = last.read_bytes()
    result = run_dd([*RUN, "--resume", "--out", str(out)], nproc=2, timeout=300)
    assert result.returncode == 2, explain(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "finetune was trained on 4 ranks and would resume on 2" in lines[0], explain(result)
    assert last.read_bytes() == before
    assert not checkpoint_path(out, "finetune", "final").exists() and not (out / "report.json").exists()


@pytest.mark.slow
def test_an_array_task_on_another_number_of_ranks_is_refused_naming_its_flag(tmp_path, reference):
    """An array task resubmitted on fewer ranks than its sub-network was trained on: refused as
    a resume would be, but naming the flag the task was given (it has no --resume)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    checkpoint_path(out, "subnet1", "final").unlink()  # its task died before it finished
    last = checkpoint_path(out, "subnet1", "last")
    before = last.read_bytes()
    result = run_dd([*RUN, "--only-group", "1", "--out", str(out)], nproc=1, timeout=300)
    assert result.returncode == 2, explain(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "--only-group 1: subnet1 was trained on 2 ranks and would resume on 1" in lines[0], \
        explain(result)
    assert last.read_bytes() == before and not checkpoint_path(out, "subnet1", "final").exists()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["subnet", "finetune"])
def test_a_diverging_loss_stops_the_run_and_keeps_the_good_checkpoints(tmp_path, phase):
    out = tmp_path / "run"
    args = [*RUN, "--strategy", "dd", "--train-samples", "512", f"--{phase}-lr", "1e12", "--out", str(out)]
    result = run_dd(args, nproc=2, timeout=300)
    assert result.returncode == 1, explain(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "epoch 1: the loss or the weights became NaN/inf" in lines[0], explain(result)
    assert f"lower --{phase}-lr and start a new run" in lines[0] and "Traceback" not in result.stderr
    names = {p.name for p in (out / CHECKPOINT_DIR).glob("*.pt")} if (out / CHECKPOINT_DIR).exists() else set()
    if phase == "subnet":
        assert lines[0].startswith("dd-train: error: subnet")
        assert not {n for n in names if n.startswith("subnet")}
    else:
        assert lines[0].startswith("dd-train: error: finetune epoch 1")
        assert not {n for n in names if n.startswith("finetune")}
        for k in range(2):  # phase 1's results stay, whole
            assert torch.isfinite(load(checkpoint_path(out, f"subnet{k}", "final"))["model"]["conv1.weight"]).all()
    assert not (out / "report.json").exists()


DIVERGE_AT_ONCE = """\
import os
if os.environ.get("RANK") == os.environ.get("DD_TEST_FAIL_RANK"):
    import dd_mpi.train  # before the pipeline imports train_epoch from it
    from dd_mpi.train import NonFiniteLoss

    def diverging(*args, **kwargs):  # what train_epoch raises on a NaN loss; here before a step
        raise NonFiniteLoss("injected")

    dd_mpi.train.train_epoch = diverging
"""


def phase_1_with_rank_3_failing(tmp_path, out, epochs, sitecustomize):
    """4 sub-nets on 4 ranks, rank 3 sabotaged by ``sitecustomize``: the job must exit 1."""
    args = [*RUN, "--subnets", "4", "--strategy", "dd", "--train-samples", "256", "--subnet-epochs", str(epochs),
            "--finetune-epochs", "1", "--signal-check-steps", "2", "--out", str(out)]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(sitecustomize)
    failed = run_dd(args, nproc=4, timeout=300, env={"PYTHONPATH": python_path(site), "DD_TEST_FAIL_RANK": "3"})
    assert failed.returncode == 1, explain(failed)
    assert "another group failed" in failed.stdout, explain(failed)
    return args, failed


def assert_stopped_early_with_progress(out, epochs, failed):
    """The other groups stopped before their last epoch, their progress checkpointed."""
    for j in range(3):
        assert not checkpoint_path(out, f"subnet{j}", "final").exists(), explain(failed)
        assert load(checkpoint_path(out, f"subnet{j}", "last"))["epoch"] < epochs, explain(failed)


@pytest.mark.slow
def test_a_group_that_fails_stops_the_other_groups_and_a_rerun_continues_them(tmp_path):
    """Phase 1's groups train apart. When one failed, the others used to train to the end of
    the phase before the verdict told them; now they stop at their next signal check with
    their progress checkpointed. The job exits 1 with the failing group's line (not 75, which
    would requeue it), and a rerun with --resume goes on from every group's checkpoint.
    The failure comes at once, so that no start-up lag on a busy machine lets the others
    finish their 8 epochs first (that would only pass the old behaviour off as the new)."""
    out, epochs = tmp_path / "run", 8
    args, failed = phase_1_with_rank_3_failing(tmp_path, out, epochs, DIVERGE_AT_ONCE)
    lines = error_lines(failed.stderr)
    assert len(lines) == 1 and lines[0].startswith("dd-train: error: subnet3 epoch 1: the loss or the weights "
                                                   "became NaN/inf"), explain(failed)
    assert_stopped_early_with_progress(out, epochs, failed)
    assert not checkpoint_path(out, "subnet3", "last").exists()
    assert len(list(out.glob(f"{GroupAlarm.PREFIX}*"))) == 1
    resumed = run_dd([*args, "--resume"], nproc=4, timeout=300)
    assert resumed.returncode == 0, explain(resumed)
    assert "another group failed" not in resumed.stdout, explain(resumed)
    assert not list(out.glob(f"{GroupAlarm.PREFIX}*"))  # the failed run's, removed at the start
    for j in range(4):
        assert [row["epoch"] for row in load(checkpoint_path(out, f"subnet{j}", "final"))["history"]] == \
            list(range(1, epochs + 1))


CRASH_AT_ONCE = """\
import os
if os.environ.get("RANK") == os.environ.get("DD_TEST_FAIL_RANK"):
    import dd_mpi.train

    def crashing(*args, **kwargs):  # a rank's own trouble, not an outcome the ranks agree on
        raise RuntimeError("injected: out of memory")

    dd_mpi.train.train_epoch = crashing
"""


@pytest.mark.slow
def test_a_group_whose_rank_crashes_stops_the_other_groups_too(tmp_path):
    """A rank's own error (out of memory, an unreadable image) ends the job with its
    traceback. It used to leave the other groups training until the launcher killed them,
    losing the epoch they were in; now it raises the alarm first, and they stop at their
    next signal check with their progress checkpointed."""
    out, epochs = tmp_path / "run", 8
    _, failed = phase_1_with_rank_3_failing(tmp_path, out, epochs, CRASH_AT_ONCE)
    assert "[rank 3] RuntimeError: injected: out of memory" in failed.stderr, explain(failed)
    assert_stopped_early_with_progress(out, epochs, failed)
    # the others do not report losing rank 3, they name its error
    assert error_lines(failed.stderr) == ["dd-train: error: rank 3: RuntimeError: injected: out of memory"], \
        explain(failed)
    assert "lost contact" not in failed.stderr, explain(failed)


# ---------------------------------------------------------------------------------------
# Contract 7: a kill during a checkpoint write leaves the previous checkpoint intact
WRITER = """\
import sys, torch
from pathlib import Path
from dd_mpi.checkpoint import save
path = Path(sys.argv[1])
for i in range(1, 10 ** 6):
    save(path, {"i": i, "model": {"w": torch.full((4_000_000,), float(i))}})  # 16 MB
    print(i, flush=True)
"""


@pytest.mark.timing
@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_last_one_whole(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "ckpt" / "subnet0-last.pt"
    rng = random.Random(7)
    seen = set()
    for _ in range(5):
        with open(tmp_path / "writer.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while (tmp_path / "writer.log").read_text().count("\n") < 1 and time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "writer.log").read_text()
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.5))  # somewhere inside a later write, most likely
        finally:
            proc.kill()
            proc.wait()
        state = load(path)  # loads: never half a file
        i = state["i"]
        assert torch.equal(state["model"]["w"], torch.full((4_000_000,), float(i)))
        seen.add(i)
        for stray in path.parent.iterdir():  # a killed write's temp file: hidden, never *.pt
            assert stray == path or (stray.name.startswith(f".{path.name}.") and stray.suffix == ".tmp")
    assert len(seen) > 1, "every kill landed before the second write: the test saw nothing"
