"""Who am I in this job? Rank discovery for every launcher, and our own local launcher.

Order matters: under ``mpirun`` inside a Slurm allocation every rank sees
``SLURM_PROCID=0``, and under torchrun too. So: ``RANK`` (torchrun, our ``--nproc``), then
Horovod's, then the MPI launchers' (``OMPI_COMM_WORLD_RANK``, ``PMI_RANK`` when ``PMI_SIZE``
> 1, ``PMIX_RANK``), and ``SLURM_PROCID`` of an srun step last.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import EXIT_FAILURE, EXIT_PREEMPTED, EXIT_USAGE, UsageError

LOCAL_LAUNCHER_ENV = "DD_MPI_LAUNCHER"
PR_SET_PDEATHSIG = 1  # prctl(2)
# A stop request (checkpoint, exit 75): forwarded to the ranks by run_local, caught by cli.StopSignal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def worker_ignores_stop_signals(_worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: Slurm's SIGTERM (time limit, preemption,
    scancel) reaches every process of the step, workers too, and a worker killed by it takes
    the step down ('DataLoader worker is killed by signal') before the rank can checkpoint.
    The rank decides when to stop; a worker ends with it (PyTorch's watchdog)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # local | torchrun | horovod | mpi | slurm | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        if env.get(name, "").strip().lstrip("-").isdigit():
            return int(env[name])
    return default


@dataclass(frozen=True)
class Launcher:
    """How one launcher tells a process its place: the variables it sets, tried in order."""

    name: str
    present: Callable[[Mapping[str, str]], bool]
    rank: tuple[str, ...]
    size: tuple[str, ...]
    local_rank: tuple[str, ...]
    local_size: tuple[str, ...]


# The registry, in the order that matters (module docstring).
LAUNCHERS = (
    Launcher("torchrun", lambda e: "RANK" in e and "WORLD_SIZE" in e,  # and our --nproc ("local")
             ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",)),
    Launcher("horovod", lambda e: "HOROVOD_RANK" in e,
             ("HOROVOD_RANK",), ("HOROVOD_SIZE",), ("HOROVOD_LOCAL_RANK",), ("HOROVOD_LOCAL_SIZE",)),
    Launcher("mpi", lambda e: "OMPI_COMM_WORLD_RANK" in e,  # Open MPI
             ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",),
             ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    Launcher("mpi", lambda e: _int(e, "PMI_SIZE", default=1) > 1 and "PMI_RANK" in e,  # MPICH / PMI
             ("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID", "SLURM_LOCALID"), ("MPI_LOCALNRANKS",)),
    Launcher("mpi", lambda e: "PMIX_RANK" in e and _int(e, "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", default=1) > 1,
             ("PMIX_RANK",), ("PMIX_SIZE", "OMPI_COMM_WORLD_SIZE"), ("PMIX_LOCAL_RANK",), ("PMIX_LOCAL_SIZE",)),
    # an srun step (SLURM_STEP_ID): the batch script itself also sees SLURM_PROCID=0 and the
    # job's SLURM_NTASKS, and a dd-train started there is alone (its --nproc starts the ranks)
    Launcher("slurm", lambda e: "SLURM_STEP_ID" in e and "SLURM_PROCID" in e and _int(e, "SLURM_NTASKS", default=1) > 1,
             ("SLURM_PROCID",), ("SLURM_NTASKS",), ("SLURM_LOCALID",), ()),
)


def started_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    """torchrun's agent (or our --nproc) set RANK and WORLD_SIZE, not a shell that kept them."""
    return "TORCHELASTIC_RUN_ID" in env or env.get(LOCAL_LAUNCHER_ENV) == "local"


def detect_launch(env: Mapping[str, str] = os.environ) -> LaunchInfo:
    """The launcher and this process's place in the world, from environment variables only.
    RANK/WORLD_SIZE that no torchrun set, beside an MPI launcher's per-process variables, were
    left in the shell (another job's, an export): every rank took the same stale rank."""
    master_addr = env.get("MASTER_ADDR") or None
    master_port = _int(env, "MASTER_PORT")
    others = [launcher for launcher in LAUNCHERS[1:] if launcher.present(env)]
    for launcher in LAUNCHERS:
        if not launcher.present(env) or (launcher is LAUNCHERS[0] and others and not started_by_torchrun(env)):
            continue
        name = launcher.name
        local_size = _int(env, *launcher.local_size, default=1)
        if name == "torchrun" and env.get(LOCAL_LAUNCHER_ENV) == "local":
            name = "local"
        if name == "slurm":  # srun gives no address: the job's first node, a port from the job id
            master_port = master_port or 15000 + _int(env, "SLURM_JOB_ID", default=0) % 15000  # as slurm/common.sh
            master_addr = master_addr or slurm_head_node(env)
            local_size = _slurm_tasks_on_this_node(env)
        return LaunchInfo(name, _int(env, *launcher.rank), _int(env, *launcher.size, default=1),
                          _int(env, *launcher.local_rank, default=0), local_size, master_addr, master_port)
    return LaunchInfo("single", 0, 1, 0, 1, master_addr, master_port)


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3": this node's share is what we need; the
    # first entry is right on homogeneous allocations, which is what GPU jobs use.
    first = env.get("SLURM_TASKS_PER_NODE", "1").split(",")[0].split("(")[0]
    return int(first) if first.isdigit() else 1


def slurm_head_node(env: Mapping[str, str]) -> str:
    """The first host of the job's node list (``scontrol show hostnames`` expands it)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return out[0] if out else "localhost"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0].split("[")[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_mask() -> tuple[str, list[int]]:
    """This rank's node and the CPUs it may run on (its affinity mask, as the launcher bound it)."""
    return socket.gethostname(), sorted(os.sched_getaffinity(0))


def share_of_node(masks: list[tuple[str, list[int]]], rank: int) -> float:
    """CPUs that ``rank`` may use without oversubscribing its node, from every rank's
    ``cpu_mask()``: each CPU of its mask counts 1/k where k ranks of its node may run on it.
    Right whatever the launcher bound: disjoint masks (srun's or mpirun's per-core binding)
    give each rank its own, one shared mask (torchrun, --nproc, unbound MPI) is split, and
    per-socket binding (Open MPI's default for more than 2 ranks) splits each socket."""
    host, mine = masks[rank]
    sharers: dict[int, int] = {}
    for other_host, cpus in masks:
        if other_host == host:
            for cpu in cpus:
                sharers[cpu] = sharers.get(cpu, 0) + 1
    return sum(1 / sharers[cpu] for cpu in mine)


def cpu_threads_per_rank(launch: LaunchInfo, masks: list[tuple[str, list[int]]] | None = None,
                         env: Mapping[str, str] = os.environ) -> int:
    """Cores this rank may use without oversubscribing the node (OMP_NUM_THREADS rule): its
    share of the node's CPUs from all ranks' masks (``share_of_node``; without them, its mask
    split over the node's ranks), at most what Slurm allotted. SLURM_CPUS_PER_TASK counts one
    Slurm task's CPUs: a rank's own under srun and the MPI launchers (a task per rank), shared
    by the node's ranks under torchrun and --nproc, which start them all inside one task
    (`srun --ntasks-per-node 1 -c 32 torchrun --nproc-per-node 4`)."""
    per_task = _int(env, "SLURM_CPUS_PER_TASK")
    if per_task:
        shared = launch.launcher in ("torchrun", "local")
        allotted = per_task // max(1, launch.local_world_size) if shared else per_task
    if masks is None:
        share = allotted if per_task else len(os.sched_getaffinity(0)) // max(1, launch.local_world_size)
    else:
        share = int(share_of_node(masks, launch.rank) + 1e-9)
        share = min(share, allotted) if per_task else share
    return max(1, share)


def data_workers(threads: int) -> int:
    """DataLoader workers for --workers' default: the rank's own CPUs (``cpu_threads_per_rank``)
    less the one that trains, at most 8 (decoding beyond that starves the training threads)."""
    return min(8, threads - 1)


LOCAL_RANKS_PER_CPU = 8  # past this a typo (--nproc 1000): every rank imports torch, and the node swaps


def check_local_ranks(nproc: int) -> None:
    """``--nproc`` starts its ranks on this machine alone: more than a few a CPU is a mistake."""
    cpus = len(os.sched_getaffinity(0))
    if nproc > LOCAL_RANKS_PER_CPU * cpus:
        raise UsageError(f"--nproc {nproc} would start {nproc} ranks on this machine's {cpus} CPUs: give at most "
                         f"{LOCAL_RANKS_PER_CPU * cpus} ({LOCAL_RANKS_PER_CPU} a CPU), or start more ranks on "
                         "several nodes with srun, mpiexec or torchrun")


def run_local(nproc: int, argv: list[str], grace_seconds: float = 10.0) -> int:
    """``dd-train --nproc K``: start K ranks on this machine, like torchrun, and watch them.

    If one rank fails (non-zero exit, or killed), the others are stopped at once, so a
    dead rank ends the job in seconds. SIGTERM/SIGUSR1/SIGINT are forwarded to every rank
    (they checkpoint and exit with the preemption code).
    """
    port = free_port()
    children = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   **{LOCAL_LAUNCHER_ENV: "local"})
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
        children.append(subprocess.Popen([sys.executable, "-m", "dd_mpi", *argv], env=env,
                                         preexec_fn=stop_when_parent_dies(os.getpid())))

    stop_signals = set()

    def forward(signum, _frame):
        stop_signals.add(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        code = _wait_all(children, grace_seconds, stop_signals)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == EXIT_PREEMPTED and not any(child.returncode == EXIT_PREEMPTED for child in children):
        # no rank had armed its handler (they say how to resume once they have): without a
        # word, a Ctrl-C at start-up looked like a job that ended by itself
        names = ", ".join(signal.Signals(s).name for s in sorted(stop_signals))
        print(f"dd-train: stopped by {names or 'signal'} while the ranks started up, before anything was "
              "trained: run the same command again", file=sys.stderr, flush=True)
    return code


def stop_when_parent_dies(launcher_pid: int) -> Callable[[], None] | None:
    """For a rank (or dd-scaling's run), before it starts: SIGTERM when the launcher dies
    (Linux's parent-death signal). A launcher killed outright (SIGKILL, the OOM killer) left
    its ranks training on to the end, unseen; now they checkpoint and exit as on any stop
    signal."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != launcher_pid:  # it died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


KILL_HINTS = {signal.SIGKILL: " (out of memory? the kernel's OOM killer sends it, as does kill -9)",
              signal.SIGSEGV: " (a crash in native code)", signal.SIGBUS: " (a crash in native code, or a "
                                                                          "memory-mapped file cut short)"}


def _say_killed(children: list[subprocess.Popen], stop_signals: set[int], said: set) -> set:
    """Name each rank that a signal killed (it could say nothing itself), except by a signal
    the job was sent, and those in ``said`` (named already, or killed by the launcher).
    Returns ``said`` with them."""
    said = set(said)
    for rank, child in enumerate(children):
        code = child.poll()
        if code is not None and code < 0 and -code not in stop_signals and child not in said:
            print(f"dd-train: rank {rank} was killed by {_signal_name(-code)}{KILL_HINTS.get(-code, '')}: "
                  "the other ranks stop", file=sys.stderr, flush=True)
            said.add(child)
    return said


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _wait_all(children: list[subprocess.Popen], grace_seconds: float, stop_signals: set[int] = frozenset()) -> int:
    """The job's exit code once every rank has ended. A rank killed by a stop signal the job
    was sent (``stop_signals``: it came before the rank could catch it, while it started up)
    counts as preempted, 75: it had nothing to checkpoint, and the job is to be run again.
    The gravest code wins, as ``errors.deciding`` ranks them: usage (2) > failure > preempted
    (75), so that a rank's failure is not requeued; ranks the launcher had to kill were only
    waiting on the others and add nothing."""
    while True:
        codes = [child.poll() for child in children]
        codes = [EXIT_PREEMPTED if c is not None and -c in stop_signals else c for c in codes]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            said = _say_killed(children, stop_signals, set())
            code = failed[0] if failed[0] > 0 else EXIT_FAILURE
            # ranks that stop in order (usage error, preemption) get time to write their
            # checkpoint; after a crash the others are only waiting on the dead rank
            killed = _stop(children, grace_seconds * (6 if code in (EXIT_USAGE, EXIT_PREEMPTED) else 1))
            _say_killed(children, stop_signals, said | set(killed))  # (another, meanwhile: the OOM killer's next)
            finals = [EXIT_PREEMPTED if -child.returncode in stop_signals else child.returncode
                      for child in children if child not in killed]
            failures = [c for c in finals if c not in (0, EXIT_PREEMPTED)]
            if EXIT_USAGE in failures:
                return EXIT_USAGE
            if failures:
                return failures[0] if failures[0] > 0 else EXIT_FAILURE
            return EXIT_PREEMPTED  # every rank that ended on its own stopped (75) or finished
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


def _stop(children: list[subprocess.Popen], grace_seconds: float) -> list[subprocess.Popen]:
    """Wait up to ``grace_seconds`` for every child to end, then kill the rest; returns those."""
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(c.poll() is None for c in children):
        time.sleep(0.1)  # let the others notice and exit on their own first
    killed = [child for child in children if child.poll() is None]
    for child in killed:
        child.kill()
    for child in children:
        child.wait()
    return killed
