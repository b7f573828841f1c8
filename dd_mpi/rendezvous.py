"""Before the first collective: the MPI world (if an MPI launcher started us), the address
every rank meets at, and the device and precision of this rank."""

from __future__ import annotations

import os
import platform
import socket

import torch

from .errors import UsageError
from .launch import LaunchInfo, free_port
from .models import ModelSpec, build_model, count_parameters

BYTES_PER_FP32 = 4


def mpi_world_for(launch: LaunchInfo):
    """COMM_WORLD when an MPI launcher started us; a loud error if srun gave singletons."""
    if launch.launcher not in ("mpi", "slurm"):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        if launch.launcher == "mpi":
            raise UsageError("launched by an MPI launcher but mpi4py is missing: pip install 'dd_mpi[mpi]'")
        return None
    size = MPI.COMM_WORLD.Get_size()
    if launch.launcher == "slurm":
        if size == 1 and os.environ.get("PMI_FD") is None and os.environ.get("PMI_PORT") is None:
            return None  # plain srun, no PMI: torch.distributed alone, rendezvous by node list
        if size == 1:
            raise UsageError(f"srun started {launch.world_size} tasks but each sees an MPI world of "
                             "size 1: launch with `srun --mpi=pmi2` (pip's MPICH) or your site's PMI")
    if size != launch.world_size:
        under_srun = "SLURM_STEP_ID" in os.environ
        hint = ("srun and this MPI do not share a PMI: launch with `srun --mpi=pmi2` (pip's MPICH) "
                "or your site's PMI" if under_srun else
                "use the mpiexec of the MPI that mpi4py was built against")
        raise UsageError(f"the launcher started {launch.world_size} ranks but MPI sees {size}"
                         f"{' (every rank alone in a world of its own)' if size == 1 else ''}: {hint}")
    return MPI.COMM_WORLD


def agreed_address(launch: LaunchInfo, mpi_world) -> tuple[str | None, int | None]:
    """MASTER_ADDR/PORT as the launcher gave them; under MPI without them, rank 0's address
    and a free port, sent to all (collective: every rank calls it)."""
    addr, port = launch.master_addr, launch.master_port
    if mpi_world is not None and (addr is None or port is None):
        hosts = set(mpi_world.allgather(socket.gethostname()))
        proposal = ("127.0.0.1" if len(hosts) == 1 else reachable_address()), free_port()
        addr, port = mpi_world.bcast(proposal if launch.rank == 0 else None, root=0)
    return addr, port


def reachable_address() -> str:
    """This host's address as other nodes see it: not the 127.0.1.1 that Debian's /etc/hosts
    gives the host name, but an address of its own host name that is not loopback, else the
    name itself (the other nodes resolve it)."""
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        return name
    outside = sorted(a for a in addresses if not a.startswith("127."))
    return outside[0] if outside else name


def pick_device(requested: str, launch: LaunchInfo) -> torch.device:
    """One GPU per local rank (all of a node's GPUs visible: --gpus-per-node), else the CPU.
    Whether a GPU is visible depends on the node: each rank that sees none says so."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no GPU is visible: use --device cpu",
                         everywhere=False)
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        local = launch.local_rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def pick_precision(requested: str, device: torch.device, device_flag: str) -> str:
    """fp32 | bf16 | fp16 for --precision on this device: auto is bf16 where the GPU runs it
    natively (Ampere and later), fp16 with loss scaling on older GPUs (V100, T4), fp32 on CPU.
    ``device_flag``: --device; under auto, the CPU is this node's lot, not every rank's."""
    if requested == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a GPU (its loss scaling is CUDA's): use --precision "
                         "fp32 or bf16 on the CPU", everywhere=device_flag != "auto")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def check_the_net_fits(spec: ModelSpec, flag: str, momentum: float, device_flag: str, launch: LaunchInfo) -> None:
    """Refuse a net (``flag``: what made it so large) whose weights alone cannot train in the
    memory of the device this rank will use (``device_flag``: --device). On the CPU the kernel
    overcommits: the build then filled memory for minutes until the OOM killer ended the job,
    exit 137 and no word. Activations come on top: a net that passes may still not fit, but
    one that fails here never would. It depends on the node (its memory, its ranks): the first
    rank of each node says it (ranks elsewhere may pass and wait at the rendezvous)."""
    with torch.device("meta"):
        weights = count_parameters(build_model(spec))
    held = ["weights", "gradients"] + (["momentum"] if momentum else [])  # (SGD keeps none at 0)
    need = BYTES_PER_FP32 * len(held) * weights
    if device_flag != "cpu" and torch.cuda.is_available():  # (as pick_device will choose)
        index = launch.local_rank % max(1, torch.cuda.device_count())
        have, whose = torch.cuda.get_device_properties(index).total_memory, f"GPU {index} has"
    else:
        ranks = max(1, launch.local_world_size)
        have = node_memory() // ranks
        whose = "this node's memory gives each rank" if ranks > 1 else "this node has"
    if need > have:
        raise UsageError(f"{flag} makes {spec.arch} {weights:.3g} weights, which take at least {need / 2**30:,.1f} "
                         f"GiB to train (fp32 {', '.join(held)}), and {whose} {have / 2**30:,.1f} GiB: choose a "
                         "smaller width", everywhere=launch.local_rank != 0)


def node_memory(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int:
    """Bytes this process may use: the machine's memory, or the least limit of its memory
    cgroup and the cgroups above it where lower (Slurm's --mem confines a job's tasks to one;
    v2's memory.max, v1's memory.limit_in_bytes)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open(proc_cgroup) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return total
    for line in lines:  # "0::/path" (v2), "4:memory:/path" (v1)
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_file = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, limit_file = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            try:
                with open(os.path.join(base, *parts[:depth], limit_file)) as handle:
                    text = handle.read().strip()
            except OSError:
                continue
            if text.isdigit():  # ("max": none)
                total = min(total, int(text))
    return total


def processor_name(device: torch.device) -> str:
    """The chip this rank computes on (its GPU's name, else its CPU's model): a scaling
    study's times are comparable only on the same one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "Processor", "cpu model")):  # x86, arm, others
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
