"""The job scripts in slurm/ submitted to a real Slurm controller, as users submit them.

`.ci/slurm_up.sh` starts a one-node cluster on localhost (slurm/NOTES.md: how it behaves).
The scripts ask for 4 GPUs per node; here they run on CPU with the overrides a user of a
CPU-only cluster would give: ``--gpus-per-node=0 --cpus-per-task=1`` on sbatch's command
line, ``--device cpu --dataset synthetic`` and a tiny config after the script name.

    bash .ci/slurm_up.sh && .venv/bin/python -m pytest -q tests/test_slurm.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import check_run_report, launcher_free_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "slurm"
# Written by phase 1 once sub-network 0 has finished an epoch: the preemption test signals
# the job only after it, so there is something to resume from.
PHASE1_CHECKPOINT = "checkpoints/subnet0-last.pt"
TIMEOUT = 600  # seconds per job: 2 shared cores, other suites may run beside us
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

# sbatch options: the scripts' '#SBATCH --gpus-per-node=4' neutralised, one CPU per rank
ON_CPU = ["--nodes=1", "--ntasks=4", "--cpus-per-task=1", "--gpus-per-node=0"]
# dd-train flags after the script name: they follow the preset, so they win
TINY_ANY_N = ["--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "--width", "1",
              "--strategy", "dd", "--subnet-epochs", "1", "--finetune-epochs", "1",
              "--baseline-epochs", "0", "--train-samples", "256", "--test-samples", "128",
              "--batch-size", "32"]
TINY = [*TINY_ANY_N, "--subnets", "2"]
OVER_PMI = "mpi"  # the launcher a job reports: common.sh's srun --mpi=pmi2 gives every rank MPICH's PMI variables


@pytest.fixture(scope="module", autouse=True)
def controller():
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not on PATH: start a local cluster with `bash .ci/slurm_up.sh`")
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                timeout=30).stdout.split()
    except subprocess.TimeoutExpired:
        states = []
    if not set(states) & {"idle", "mix", "alloc"}:
        pytest.skip(f"the Slurm controller does not answer or has no usable node "
                    f"(sinfo: {states or 'no answer'}): run `bash .ci/slurm_up.sh`")


def job_env(**extra: str) -> dict:
    """The test's environment minus any enclosing job's or launcher's, with our venv first:
    sbatch hands it to the job (--export=ALL), and common.sh finds dd-train on PATH."""
    return launcher_free_env(**extra)


def job_info(job_id: str) -> dict:
    """`scontrol show job` as a dict ({} once the controller has forgotten the job)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                         text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}


class Submission:
    """`sbatch --wait --parsable ...` in the background, its job's states recorded while it
    waits: finished jobs leave the controller after MinJobAge (5 s here), so the final state
    is caught on the way rather than asked for afterwards."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        self.proc = subprocess.Popen(["sbatch", "--wait", "--parsable", *args], cwd=cwd,
                                     env=env or job_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.job_id = self.proc.stdout.readline().strip().split(";")[0]
        assert self.job_id.isdigit(), f"sbatch did not submit: {self.proc.communicate()}"
        self.seen: list[dict] = []

    def poll(self) -> dict:
        info = job_info(self.job_id)
        if info:
            self.seen.append(info)
        return info

    def wait(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                subprocess.run(["scancel", self.job_id])
                self.proc.kill()
                pytest.fail(f"job {self.job_id} still running after {timeout} s")
            self.poll()
            time.sleep(0.5)
        # sbatch --wait can return while the controller still says COMPLETING (a cancelled
        # step's last task is still being reaped): follow to the final state
        self.follow(60, until=FINAL)
        self.stderr = self.proc.stderr.read()
        return self.proc.returncode

    def follow(self, seconds: float, until: tuple[str, ...] = ()) -> None:
        """Record the job's states for ``seconds`` (or until one in ``until``, or until the
        controller forgets it), also after ``sbatch --wait`` has returned."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.poll() or self.state in until:
                return
            time.sleep(0.5)

    @property
    def state(self) -> str:
        return self.seen[-1]["JobState"] if self.seen else "unknown (never seen)"


def read_log(path: Path) -> str:
    assert path.exists(), f"no job log {path.name}; files: {sorted(p.name for p in path.parent.iterdir())}"
    return path.read_text()


# --- one run of a paper script -------------------------------------------------------------
def test_resnet110_script_runs_tiny_on_cpu(tmp_path):
    job = Submission([*ON_CPU, str(SLURM / "resnet110.sh"), *TINY], cwd=tmp_path)
    rc = job.wait()
    log = read_log(tmp_path / f"resnet110-{job.job_id}.out")  # --output=%x-%j.out, in the submit dir
    assert rc == 0, f"sbatch exit {rc}\n{job.stderr}\n{log[-4000:]}"
    assert job.state == "COMPLETED", log[-4000:]
    assert "--preset cifar10-resnet110" in log  # the script's preset, our flags after it
    # default --out: runs/<job name>-<job id>, relative to the submit directory
    check_run_report(tmp_path / "runs" / f"resnet110-{job.job_id}", world_size=4, subnets=2, strategy="dd",
                     launcher=OVER_PMI)


def test_a_script_under_a_path_with_spaces_finds_common_sh_when_submitted_from_elsewhere(tmp_path):
    """sbatch runs a spooled copy: the script finds common.sh beside the submitted file, whose
    path Slurm gives as `Command=PATH ARGS` (a path with a space was once cut at it)."""
    scripts = tmp_path / "my repo" / "slurm"
    shutil.copytree(SLURM, scripts)
    (tmp_path / "elsewhere").mkdir()
    job = Submission(["--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--gpus-per-node=0", str(scripts / "resnet32.sh"),
                      *TINY, "--print-config"], cwd=tmp_path / "elsewhere")
    rc = job.wait()
    log = read_log(tmp_path / "elsewhere" / f"resnet32-{job.job_id}.out")
    assert rc == 0 and job.state == "COMPLETED", f"sbatch exit {rc}\n{log[-3000:]}"
    assert "common.sh" not in log and "arch: resnet20" in log, log[-3000:]


def test_a_job_without_dd_train_on_its_path_says_so_once(tmp_path):
    """`sbatch --export=NONE` (some sites' default) drops the activated environment: srun's
    "execve(): dd-train: No such file or directory", once a task, and exit 2 with no fix."""
    repo = tmp_path / "repo"  # a checkout without .venv, the scripts' fallback
    shutil.copytree(SLURM, repo / "slurm")
    job = Submission(["--export=NONE", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--gpus-per-node=0",
                      f"--output={tmp_path}/%x-%j.out", str(repo / "slurm" / "resnet32.sh"), *TINY], cwd=tmp_path)
    rc = job.wait()
    log = read_log(tmp_path / f"resnet32-{job.job_id}.out")
    assert rc == 2, f"sbatch exit {rc}\n{log[-3000:]}"
    assert log.strip() == ("dd_mpi: error: dd-train is not on PATH in the job (sbatch --export=NONE, or a site's "
                           "default, drops the environment you activated): activate dd_mpi's environment in the "
                           f"SITE SETUP of {repo}/slurm/common.sh, or install it in {repo}/.venv"), log


def test_a_job_on_two_nodes(tmp_path):
    """The localhost cluster has two nodes (.ci/slurm_up.sh): a 2-node job of 2 ranks each, as
    the scripts ask for GPUs (--ntasks-per-node, --gpus-per-node neutralised): ranks numbered
    node by node, each node's local ranks from 0, one sub-net per rank, groups contiguous."""
    if len(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()) < 2:
        pytest.skip("the Slurm cluster has one node: start the two-node one with `bash .ci/slurm_up.sh`")
    # DD_SRUN_MPI=none: pip's MPICH under srun --mpi=pmi2 hangs in MPI_Init when two Slurm nodes
    # share one host (slurm/NOTES.md); torch.distributed then meets at MASTER_ADDR alone
    job = Submission(["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                      str(SLURM / "resnet32.sh"), *TINY_ANY_N, "--subnets", "4"], cwd=tmp_path,
                     env=job_env(DD_SRUN_MPI="none"))
    rc = job.wait()
    log = read_log(tmp_path / f"resnet32-{job.job_id}.out")
    assert rc == 0 and job.state == "COMPLETED", f"sbatch exit {rc}\n{log[-4000:]}"
    report = check_run_report(tmp_path / "runs" / f"resnet32-{job.job_id}", world_size=4, subnets=4, strategy="dd",
                              launcher="slurm")  # (DD_SRUN_MPI=none: no PMI, Slurm's own variables)
    assert [p["node"] for p in report["ranks"]] == ["0", "0", "1", "1"]  # SLURM_NODEID
    assert [p["local_rank"] for p in report["ranks"]] == [0, 1, 0, 1]
    assert report["groups"] == [[0], [1], [2], [3]]


@pytest.mark.timing
def test_failing_run_fails_the_job(tmp_path):
    # 3 rank groups cannot split 4 ranks: dd-train exits 2 on every rank
    job = Submission([*ON_CPU, str(SLURM / "resnet32.sh"), *TINY, "--subnets", "3", "--groups", "3"], cwd=tmp_path)
    rc = job.wait()
    log = read_log(tmp_path / f"resnet32-{job.job_id}.out")
    assert rc == 2, f"sbatch exit {rc}, expected dd-train's usage error 2\n{log[-3000:]}"
    assert job.state == "FAILED", log[-3000:]
    assert "--groups 3" in log  # dd-train's one-line reason names the flag


@pytest.mark.timing
def test_ranks_that_get_no_shared_mpi_world_fail_at_once(tmp_path):
    """srun's PMI withheld from MPI (a site MPI without pmi2, say): each rank comes up alone
    in a world of size 1. dd-train must say so in one line, not train 2 separate jobs."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun --mpi=pmi2 env -u PMI_FD dd-train " + " ".join(TINY)
                      + f" --out {tmp_path / 'run'}\n")
    job = Submission(["--ntasks=2", "--cpus-per-task=1", "--gpus-per-node=0", "--output=%x-%j.out",
                      "--job-name=alone", str(script)], cwd=tmp_path)
    rc = job.wait(timeout=120)
    log = read_log(tmp_path / f"alone-{job.job_id}.out")
    assert rc == 2, f"sbatch exit {rc}\n{log[-3000:]}"
    errors = [line for line in log.splitlines() if line.startswith("dd-train: error")]
    assert len(errors) == 1 and "MPI sees 1" in errors[0] and "srun --mpi=pmi2" in errors[0], log
    assert not (tmp_path / "run" / "report.json").exists()


# --- preemption: USR1 to the batch shell, or a time limit; checkpoint, requeue, resume -------
def start_preemptible(tmp_path, sbatch_options: list[str], epochs: int) -> tuple[Submission, Path, Path]:
    """A job that trains long enough to be stopped, once phase 1 has a checkpoint."""
    out = tmp_path / "out"
    args = [*TINY, "--subnet-epochs", str(epochs), "--finetune-epochs", "2", "--train-samples", "1024",
            "--signal-check-steps", "2", "--out", str(out)]
    job = Submission([*ON_CPU, *sbatch_options, str(SLURM / "resnet110.sh"), *args], cwd=tmp_path)
    log_path = tmp_path / f"resnet110-{job.job_id}.out"
    deadline = time.monotonic() + TIMEOUT
    while not (out / PHASE1_CHECKPOINT).exists():
        assert job.proc.poll() is None, f"job ended before {PHASE1_CHECKPOINT}\n{read_log(log_path)}"
        assert time.monotonic() < deadline, f"no {PHASE1_CHECKPOINT} after {TIMEOUT} s"
        time.sleep(0.5)
    return job, out, log_path


def wait_for_requeue(job: Submission, log_path: Path) -> None:
    """Until the job is pending again under its id with Restarts=1: it requeued itself."""
    deadline = time.monotonic() + TIMEOUT
    while not (job.poll().get("JobState") == "PENDING" and job.seen[-1].get("Restarts") == "1"):
        assert job.seen and job.state not in FINAL, f"job ended instead of requeueing\n{read_log(log_path)}"
        assert time.monotonic() < deadline, f"not requeued: {job.seen[-1:]}\n{read_log(log_path)}"
        time.sleep(0.5)


def resume_after_requeue(job: Submission, log_path: Path) -> str:
    """Wait for the requeue, start it at once (Slurm holds a requeued job ~2 min; a few
    seconds after the old step's slurmstepd has gone, slurm/NOTES.md), and return the job's
    log once it has finished."""
    wait_for_requeue(job, log_path)
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
    if job.proc.poll() is None:
        rc = job.wait()
    else:  # after a time-out `sbatch --wait` returns before the job requeues itself: follow it
        job.follow(TIMEOUT, until=FINAL)
        rc = 0 if job.state == "COMPLETED" else 1
    log = read_log(log_path)  # --open-mode=append: both runs in one log
    assert rc == 0, f"job ended {job.state}\n{log[-5000:]}"
    assert job.state == "COMPLETED" and job.seen[-1]["Restarts"] == "1", log[-5000:]
    assert f"job {job.job_id} restart 0:" in log and f"job {job.job_id} restart 1:" in log
    assert re.search(r"dd-train .*--resume$", log, re.M), "the restarted run was not given --resume"
    return log


def check_resumed_without_loss(out: Path, log: str, epochs: int) -> None:
    """The restarted run went on from the checkpoint: every epoch of every phase recorded
    exactly once, the complete report, and the log saying where it resumed."""
    check_run_report(out, world_size=4, subnets=2, strategy="dd", launcher=OVER_PMI, fresh=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for group in (0, 1):
        mine = [r["epoch"] for r in rows if r["phase"] == "subnet" and r["group"] == group]
        assert mine == list(range(1, epochs + 1)), f"sub-net {group} epochs {mine}"
    assert [r["epoch"] for r in rows if r["phase"] == "finetune"] == [1, 2]
    resumed = [int(n) for n in re.findall(r"^subnet\d: resuming after epoch (\d+)(?:, at step \d+ of epoch \d+)?$",
                                          log, re.M)]
    assert len(resumed) == 2 and all(0 < n < epochs for n in resumed), log[-3000:]


@pytest.mark.timing
def test_signal_checkpoints_requeues_and_resumes(tmp_path):
    job, out, log_path = start_preemptible(tmp_path, [], epochs=20)
    # what --signal=B:USR1@120 does before the time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True)
    log = resume_after_requeue(job, log_path)
    assert "after SIGUSR1" in log and "requeueing" in log
    check_resumed_without_loss(out, log, epochs=20)


@pytest.mark.timing
def test_time_limit_checkpoints_and_requeues(tmp_path):
    """A plain time limit (no lead signal: URG is ignored by the shell): Slurm's TERM reaches
    every rank and the batch shell; the job checkpoints and, because the reason is the time
    limit, requeues itself. The requeued job is cancelled: its --resume is the same as after
    the lead signal's requeue (test_signal_checkpoints_requeues_and_resumes), and running it
    to the end here cost two minutes of CI.

    slurmctld enforces time limits on a ~30 s timer, so TERM comes 60-90 s after the start;
    400 epochs (~0.8 s each here, unloaded) keep the first run busy well past that."""
    epochs = 400
    job, out, log_path = start_preemptible(tmp_path, ["--time=1", "--signal=B:URG@1"], epochs=epochs)
    try:
        wait_for_requeue(job, log_path)
    finally:
        subprocess.run(["scancel", job.job_id], timeout=30)
    log = read_log(log_path)
    assert "after SIGTERM, reason TimeLimit" in log and "requeueing" in log, log[-3000:]
    assert f"job {job.job_id} restart 0:" in log and "stopped by signal after checkpointing" in log, log[-3000:]
    stops = re.findall(r"^subnet(\d): stop requested(?:; epoch (\d+) is| during epoch (\d+):) checkpointed", log, re.M)
    assert sorted(group for group, *_ in stops) == ["0", "1"], log[-3000:]  # each sub-net, mid-phase
    assert all(0 < int(done or during) < epochs for _, done, during in stops), stops
    assert (out / PHASE1_CHECKPOINT).exists() and not (out / "report.json").exists()


@pytest.mark.timing
def test_scancel_checkpoints_and_stays_cancelled(tmp_path):
    """`scancel` sends the same TERM as a time limit: the ranks checkpoint, and the job must
    not requeue itself (a user could never cancel it)."""
    job, out, log_path = start_preemptible(tmp_path, [], epochs=200)
    subprocess.run(["scancel", job.job_id], check=True)
    job.wait()
    job.follow(30, until=("CANCELLED",))  # through COMPLETING, and no requeue after it
    log = read_log(log_path)
    assert job.state in ("CANCELLED", "COMPLETING"), (job.seen[-1:], log[-3000:])
    assert all(seen["Restarts"] == "0" and seen["JobState"] != "PENDING" for seen in job.seen[1:]), log[-3000:]
    assert "requeueing job" not in log and not (out / "report.json").exists()
    assert (out / PHASE1_CHECKPOINT).exists()  # the stop's checkpoint (or the one before) is intact


# --- phase 1 as a job array, then compose + fine-tune ---------------------------------------
def test_the_array_has_a_task_per_sub_network_of_a_preset(tmp_path):
    """N comes from dd-train's own reading of the flags: food101-resnet50-n8 splits into 8
    (the array once counted only an explicit --subnets, else 4, and left 4 sub-nets to the
    final job). Submitted held, read back from the controller, cancelled."""
    result = subprocess.run(["bash", str(SLURM / "dd_array_submit.sh"), "--hold", "--nodes=1", "--ntasks=1",
                             "--cpus-per-task=1", "--gpus-per-node=0", "--", "--preset", "food101-resnet50-n8",
                             "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")],
                            cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120)
    ids = dict(re.findall(r"(\w+)=(\S+)", result.stdout.strip().splitlines()[-1])) if result.stdout.strip() else {}
    try:
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert "tasks 0-7 of 8 sub-networks" in result.stdout
        assert job_info(ids["array"])["ArrayTaskId"] == "0-7"
    finally:
        subprocess.run(["scancel", *(ids.get(k, "") for k in ("array", "final") if ids.get(k))], timeout=30)


@pytest.mark.parametrize("array", [["--array", "2"], ["-a", "2"], ["--array=2"]])
def test_a_resubmitted_task_is_the_arrays_alone_and_the_final_job_no_array(tmp_path, array):
    """`--array 2` and `-a 2` once reached both submissions: the final job became task 2 of an
    array, trained sub-net 2 again and never composed."""
    result = subprocess.run(["bash", str(SLURM / "dd_array_submit.sh"), "--hold", *array, "--nodes=1",
                             "--ntasks=1", "--cpus-per-task=1", "--gpus-per-node=0", "--", *TINY,
                             "--subnets", "4", "--out", str(tmp_path / "out")],
                            cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120)
    ids = dict(re.findall(r"(\w+)=(\S+)", result.stdout.strip().splitlines()[-1])) if result.stdout.strip() else {}
    try:
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert "tasks 2 of 4 sub-networks" in result.stdout
        assert job_info(ids["array"])["ArrayTaskId"] == "2"
        assert "ArrayTaskId" not in job_info(ids["final"])
    finally:
        subprocess.run(["scancel", *(ids.get(k, "") for k in ("array", "final") if ids.get(k))], timeout=30)


def test_a_final_job_sbatch_refuses_takes_the_array_back(tmp_path):
    """The final job asks a node per sub-network: 4 on this 2-node cluster, which sbatch
    refuses. The array stayed queued, to train 4 sub-networks nothing would compose."""
    result = subprocess.run(["bash", str(SLURM / "dd_array_submit.sh"), "--hold", "--cpus-per-task=1",
                             "--gpus-per-node=0", "--", *TINY_ANY_N, "--subnets", "4", "--out", str(tmp_path / "out")],
                            cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120)
    array = re.search(r"phase 1: job array (\d+)", result.stdout)
    assert result.returncode == 1 and array, f"{result.stdout}\n{result.stderr}"
    assert f"sbatch refused the final job (above; it asks --nodes=4, a node per sub-network, unless the options " \
           f"give --nodes): cancelled the array {array[1]}" in result.stderr
    assert job_info(array[1]).get("JobState") in (None, "CANCELLED"), job_info(array[1])


@pytest.mark.timing
def test_an_array_task_requeues_itself_alone(tmp_path):
    """The last task of an array has the array's id as its SLURM_JOB_ID, and `scontrol requeue
    ARRAYID` requeues every task: its preemption requeued its running sibling too. And an
    admin's `scontrol requeue` (Slurm requeues the job itself) was logged as a cancel."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SLURM / "dd_array_submit.sh"), "--nodes=1", "--ntasks=1", "--cpus-per-task=1",
                             "--gpus-per-node=0", "--", *TINY, "--subnet-epochs", "1000", "--signal-check-steps", "2",
                             "--out", str(out)],
                            cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    ids = dict(re.findall(r"(\w+)=(\S+)", result.stdout.strip().splitlines()[-1]))
    array = ids["array"]
    tasks = [f"{array}_{k}" for k in range(2)]
    logs = [tmp_path / f"dd_array-{task}.out" for task in tasks]
    deadline = time.monotonic() + TIMEOUT

    def wait_for(what: str, ready) -> None:
        while not ready():
            assert time.monotonic() < deadline, f"{what}: {[job_info(t) for t in tasks]}\n" + "\n".join(
                log.read_text()[-2000:] for log in logs if log.exists())
            time.sleep(0.5)

    def restarted(task: str) -> bool:  # requeued once; then started at once (not after Slurm's ~2 min)
        info = job_info(task)
        return info.get("JobState") == "PENDING" and info.get("Restarts") == "1"

    try:
        wait_for("no checkpoint of both sub-nets", lambda: all(
            (out / "checkpoints" / f"subnet{k}-last.pt").exists() for k in range(2)))
        # the task that has the array's own id, and its sibling
        (named,) = [t for t in tasks if job_info(t)["JobId"] == array]
        (sibling,) = [t for t in tasks if t != named]
        subprocess.run(["scontrol", "requeue", sibling], check=True, timeout=30)  # the admin's
        wait_for(f"{sibling} not requeued", lambda: restarted(sibling))
        time.sleep(5)
        subprocess.run(["scontrol", "update", f"JobId={sibling}", "StartTime=now"], check=True, timeout=30)
        sibling_log = logs[tasks.index(sibling)]
        wait_for(f"{sibling} did not resume", lambda: "resuming after epoch" in sibling_log.read_text())
        subprocess.run(["scancel", "--signal=USR1", "--batch", named], check=True, timeout=30)  # its preemption
        wait_for(f"{named} not requeued", lambda: restarted(named))
        after = job_info(sibling)
        assert after["JobState"] == "RUNNING" and after["Restarts"] == "1", after  # not requeued again
        sibling_text, named_text = sibling_log.read_text(), logs[tasks.index(named)].read_text()
        assert f"Slurm requeued job {sibling} itself; it resumes from the checkpoints in --out" in sibling_text
        assert "not requeueing" not in sibling_text and "restart 2:" not in sibling_text, sibling_text[-3000:]
        assert re.search(rf"after SIGUSR1, reason \w+\): requeueing job {named}$", named_text, re.M), named_text[-3000:]
    finally:
        subprocess.run(["scancel", array, ids["final"]], timeout=30)


def test_the_final_job_submitted_by_hand_without_the_arrays_out_says_so(tmp_path):
    """dd_array.sh as a plain job composes what the array trained in --out. Submitted by hand
    without the array's --out, it named a run directory of its own and trained every
    sub-network itself in that one job: now it says so, exit 2, and trains nothing."""
    result = subprocess.run(["sbatch", "--wait", *ON_CPU, str(SLURM / "dd_array.sh"), *TINY], cwd=tmp_path,
                            env=job_env(), capture_output=True, text=True, timeout=TIMEOUT)
    (log_path,) = tmp_path.glob("dd_array-*.out")
    log = read_log(log_path)
    assert result.returncode == 2, f"{result.stdout}{result.stderr}\n{log[-3000:]}"
    lines = [line for line in log.splitlines() if line.startswith("dd_array.sh: error: ")]
    assert len(lines) == 1 and "holds no sub-network checkpoint of the array" in lines[0], log[-3000:]
    assert "--resume" not in log and not list(tmp_path.rglob("*.pt")), log[-3000:]


def test_the_final_job_with_a_bad_flag_says_dd_trains_line_only(tmp_path):
    result = subprocess.run(["sbatch", "--wait", *ON_CPU, str(SLURM / "dd_array.sh"), *TINY, "--bogus", "1"],
                            cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=TIMEOUT)
    (log_path,) = tmp_path.glob("dd_array-*.out")
    log = read_log(log_path)
    assert result.returncode == 2, f"{result.stdout}{result.stderr}\n{log[-3000:]}"
    errors = [line for line in log.splitlines() if "error: " in line]
    assert errors == ["dd-train: error: unrecognized arguments: --bogus 1 (dd-train --help lists the flags)"], log


def test_job_array_then_dependent_compose_and_finetune(tmp_path):
    """The run directory is relative and looks like a date: --print-config's YAML quotes it
    ('2024-06-01'), and the final job once read it from there, quotes and all, and found no
    sub-network checkpoint in a directory of that name."""
    out = tmp_path / "2024-06-01"
    cmd = ["bash", str(SLURM / "dd_array_submit.sh"), "--wait", "--nodes=1", "--ntasks=2",
           "--cpus-per-task=1", "--gpus-per-node=0", "--", *TINY, "--out", out.name]
    result = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True,
                            timeout=2 * TIMEOUT)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.out")}
    explain = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}\n" + "\n".join(
        f"== {name}\n{text[-2000:]}" for name, text in sorted(logs.items()))
    assert result.returncode == 0, explain
    ids = dict(re.findall(r"(\w+)=(\S+)", result.stdout.strip().splitlines()[-1]))
    assert ids["out"] == out.name, explain
    for k in range(2):  # task k trained sub-network k, on its own 2 ranks
        assert f"--only-group {k}" in logs[f"dd_array-{ids['array']}_{k}.out"], explain
        assert (out / "checkpoints" / f"subnet{k}-final.pt").exists(), explain
    assert "--resume" in logs[f"dd_array-{ids['final']}.out"], explain
    check_run_report(out, world_size=2, subnets=2, strategy="dd", launcher=OVER_PMI)

    # Sub-network 1's task failed (its checkpoints gone, so nothing composed): resubmit it
    # alone; sub-network 0 is not retrained, the final job composes both again.
    kept = (out / "checkpoints" / "subnet0-final.pt").stat().st_mtime_ns
    for path in [*(out / "checkpoints").glob("subnet1-*"), *(out / "checkpoints").glob("finetune-*"),
                 out / "checkpoints" / "composed.pt", out / "report.json"]:
        path.unlink()
    again = subprocess.run([*cmd[:3], "--array=1", *cmd[3:]], cwd=tmp_path, env=job_env(),
                           capture_output=True, text=True, timeout=2 * TIMEOUT)
    assert again.returncode == 0, f"{again.stdout}\n{again.stderr}"
    ids = dict(re.findall(r"(\w+)=(\S+)", again.stdout.strip().splitlines()[-1]))
    assert sorted(p.name for p in tmp_path.glob(f"dd_array-{ids['array']}_*.out")) == [f"dd_array-{ids['array']}_1.out"]
    assert (out / "checkpoints" / "subnet0-final.pt").stat().st_mtime_ns == kept
    check_run_report(out, world_size=2, subnets=2, strategy="dd", launcher=OVER_PMI, fresh=False)


# --- scaling study: one run per (nodes, N), then the report job -----------------------------------
def test_scaling_study_tiny_sweep(tmp_path):
    study = tmp_path / "study"
    env = job_env(NODES="1", SUBNETS="1 2", TASKS_PER_NODE="2", STUDY=str(study))
    cmd = ["bash", str(SLURM / "scaling_study.sh"), "--wait", "--cpus-per-task=1",
           "--gpus-per-node=0", "--", *TINY_ANY_N]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=2 * TIMEOUT)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.out")}
    explain = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}\n" + "\n".join(
        f"== {name}\n{text[-2000:]}" for name, text in sorted(logs.items()))
    assert result.returncode == 0, explain
    ids = dict(re.findall(r"(\w+)=(\S+)", result.stdout.strip().splitlines()[-1]))
    assert len(ids["runs"].split(",")) == 2 and ids["study"] == str(study), explain
    for n in (1, 2):
        check_run_report(study / f"nodes1-N{n}", world_size=2, subnets=n, strategy="dd", launcher=OVER_PMI)
    assert f"scaling-report-{ids['report']}.out" in logs, explain

    # Run again (a run had failed: its report gone): the finished run is kept, the other
    # resumed. Each dd-train refused its --out, and the report job said COMPLETED on the old runs.
    (study / "nodes1-N1" / "report.json").unlink()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2 * TIMEOUT)
    explain = f"exit {again.returncode}\n{again.stdout}\n{again.stderr}"
    assert again.returncode == 0, explain
    assert f"run: {study}/nodes1-N2 finished earlier, kept" in again.stdout, explain
    assert re.search(rf"run: job \d+, 1 node\(s\), N=1, {study}/nodes1-N1 \(resumed\)", again.stdout), explain
    ids = dict(re.findall(r"(\w+)=(\S+)", again.stdout.strip().splitlines()[-1]))
    assert len(ids["runs"].split(",")) == 1, explain
    check_run_report(study / "nodes1-N1", world_size=2, subnets=1, strategy="dd", launcher=OVER_PMI, fresh=False)
