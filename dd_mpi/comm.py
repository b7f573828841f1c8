"""The world of P ranks, its split into N sub-network groups, and the collectives we use.

A ``Comm`` is a set of ranks (the world, or one group) with the few operations training
needs; it is always passed explicitly. The torch engine (default) does gradients with DDP
over a ``torch.distributed`` group (NCCL on GPU, gloo on CPU); where the job was started by
an MPI launcher, an MPI communicator split the same way carries the phase-2 gather and
broadcast and can abort the whole job. Horovod's engine lives in ``engine_horovod``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UsageError
from .launch import LaunchInfo, free_port


def group_layout(world_size: int, subnets: int) -> list[list[int]]:
    """Ranks of each sub-network group: contiguous blocks, so a group spans few nodes."""
    if subnets < 1:
        raise UsageError(f"--subnets {subnets} is invalid: use 1 or more sub-networks")
    if world_size % subnets:
        raise UsageError(
            f"the job has {world_size} ranks, not a multiple of --subnets {subnets}: launch a "
            f"multiple of {subnets} ranks (e.g. {subnets * max(1, world_size // subnets)}) or change --subnets")
    size = world_size // subnets
    return [list(range(k * size, (k + 1) * size)) for k in range(subnets)]


def group_of(rank: int, layout: Sequence[Sequence[int]]) -> int:
    return next(k for k, ranks in enumerate(layout) if rank in ranks)


@dataclass
class Comm:
    """A set of ranks that train one model together (the world, or one sub-network group)."""

    ranks: list[int]  # world ranks, in order; self.rank indexes this list
    rank: int
    process_group: object  # torch.distributed group (None: the world of a 1-rank job)
    device: torch.device
    mpi: object = None  # mpi4py communicator over the same ranks, when launched by MPI
    index: int | None = None  # sub-network index of a group; None for the world

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # --- reductions (metrics: once per epoch; flags: every few steps) ---
    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (one tiny allreduce)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(t.item())

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        if self.size > 1:
            if self.mpi is not None and tensor.device.type == "cpu":
                self.mpi.Bcast(tensor.numpy(), root=root)
            else:
                dist.broadcast(tensor, src=self.ranks[root], group=self.process_group)
        return tensor

    def broadcast_object(self, obj, root: int = 0):
        if self.size == 1:
            return obj
        if self.mpi is not None:
            return self.mpi.bcast(obj, root=root)
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[root], group=self.process_group,
                                   device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def allgather_object(self, obj) -> list:
        if self.size == 1:
            return [obj]
        if self.mpi is not None:
            return self.mpi.allgather(obj)
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out

    def gather_object(self, obj, root: int = 0) -> list | None:
        if self.size == 1:
            return [obj]
        if self.mpi is not None:
            return self.mpi.gather(obj, root=root)
        out = [None] * self.size if self.rank == root else None
        dist.gather_object(obj, out, dst=self.ranks[root], group=self.process_group)
        return out

    def gather_flat(self, flat: torch.Tensor, root: int = 0) -> torch.Tensor | None:
        """Equal-length flat vectors from every rank, stacked [size, n] on the root (zero-copy
        buffers under MPI); None elsewhere."""
        flat = flat.contiguous()
        if self.size == 1:
            return flat[None]
        if self.mpi is not None and flat.device.type == "cpu":
            out = torch.empty(self.size, flat.numel(), dtype=flat.dtype) if self.rank == root else None
            self.mpi.Gather(flat.numpy(), out.numpy() if out is not None else None, root=root)
            return out
        flat = flat.to(self.device)
        parts = [torch.empty_like(flat) for _ in range(self.size)] if self.rank == root else None
        dist.gather(flat, parts, dst=self.ranks[root], group=self.process_group)
        return torch.stack(parts).cpu() if parts is not None else None

    def barrier(self) -> None:
        if self.size > 1:
            self.any(False)  # an allreduce: obeys the collective timeout, unlike some barriers

    def verdict_of_root(self, check: Callable[[], str | None]) -> str | None:
        """Run ``check`` on the root only and give its verdict (None or a message) to all.

        For checks that read files (md5 sums, an output directory): one rank reads, every
        rank raises the same error, and no rank is left waiting in a collective.
        """
        verdict = None
        if self.rank == 0:
            try:
                verdict = check()
            except UsageError as error:
                verdict = str(error)
            except OSError as error:  # disk full, unreadable file: the others are waiting on us
                verdict = f"{getattr(error, 'filename', None) or 'a file'}: {error.strerror or error}"
        return self.broadcast_object(verdict)

    # --- data parallelism ---
    def data_parallel(self, model: nn.Module) -> nn.Module:
        """DDP over this comm's group. Buffers (BN statistics) are averaged once per epoch by
        ``average_buffers`` instead of broadcast on every forward.

        Under ``--deterministic`` the gradient buckets are laid out once, here: DDP otherwise
        reduces its first step in one bucket and re-builds the buckets after it, and on more
        than 2 ranks the ring allreduce's summation order follows the bucket layout, so a run
        resumed mid-phase (a new wrapper) would drift by rounding from an uninterrupted one.
        (These are the calls DDP's own ``Join`` uses to fix the buckets.)"""
        if self.size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        with warnings.catch_warnings():  # its replacement flag still syncs at init, which we want
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, process_group=self.process_group,
                broadcast_buffers=False, gradient_as_bucket_view=True)
        if torch.are_deterministic_algorithms_enabled():
            ddp.reducer._push_all_rebuilt_params()  # parameter order, the same in every wrapper
            ddp.reducer._rebuild_buckets()  # collective: every rank of the group builds one
        return ddp

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer  # DDP already averages gradients

    def broadcast_model_(self, model: nn.Module, root: int = 0) -> None:
        """Make every rank hold the root's parameters and buffers (one flat broadcast)."""
        if self.size == 1:
            return
        flat = flatten_state(model.state_dict()).to(self.device)
        self.broadcast_(flat, root)
        unflatten_into(model, flat)

    def average_buffers_(self, model: nn.Module) -> None:
        """Average BN running statistics over the ranks, so saved/evaluated nets agree."""
        if self.size == 1:
            return
        buffers = [b for name, b in model.named_buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        self.allreduce_sum_(flat).div_(self.size)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI: Abort; otherwise this process, and the
        launcher or the collective timeout ends the others)."""
        if self.mpi is not None:
            self.mpi.Abort(code)
        os._exit(code)


# --- flat buffers: one contiguous tensor per model, for broadcast, gather and checksums ---
def flatten_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """All entries (integer counters too, exact below 2^24) as one float32 CPU vector.

    Each entry is copied once, straight into its slice: ``reshape(-1)`` + ``cat`` would copy
    every channels-last weight twice and hold both copies at once (phase 2's peak memory)."""
    flat = torch.empty(sum(t.numel() for t in state.values()), dtype=torch.float32)
    offset = 0
    for t in state.values():
        flat[offset:offset + t.numel()].view(t.shape).copy_(t.detach())  # logical (NCHW) order
        offset += t.numel()
    return flat


def unflatten_state(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, t in like.items():
        out[key] = flat[offset:offset + t.numel()].view(t.shape).to(t.device, t.dtype)
        offset += t.numel()
    return out


def unflatten_into(model: nn.Module, flat: torch.Tensor) -> None:
    state = model.state_dict()  # once: building it per entry made this quadratic in the depth
    with torch.no_grad():
        for key, value in unflatten_state(flat, state).items():
            state[key].copy_(value)


def checksum(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit."""
    return checksum_state(model.state_dict())


def checksum_state(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, t in state.items():
        digest.update(key.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- world set-up ---
@dataclass
class World:
    launch: LaunchInfo
    comm: Comm  # all ranks
    mpi_world: object = None
    timeout: datetime.timedelta = datetime.timedelta(seconds=60)  # for new groups too
    backend_name: str = "torch"

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def split(self, layout: list[list[int]], index: int) -> Comm:
        """This rank's group comm. Every rank must call it (group creation is collective)."""
        groups = []
        for ranks in layout:  # new_group is collective over the world: same order everywhere
            groups.append(dist.new_group(ranks, timeout=self.timeout) if self.size > 1 and len(ranks) > 1 else None)
        mpi = self.mpi_world.Split(color=index, key=self.rank) if self.mpi_world is not None else None
        ranks = layout[index]
        return Comm(list(ranks), ranks.index(self.rank), groups[index], self.comm.device, mpi, index)

    def phase_sync(self, hours: float = 48.0) -> Comm:
        """The world again, over a group that waits long: phase 1's groups may finish far
        apart. A dead rank still ends the wait at once (its connections close, or the
        launcher stops the job); only a hung one is waited for."""
        group = dist.new_group(list(range(self.size)), timeout=datetime.timedelta(hours=hours)) \
            if self.size > 1 else None
        return Comm(self.comm.ranks, self.rank, group, self.comm.device, self.mpi_world)

    def subset(self, ranks: list[int]) -> Comm | None:
        """A comm over ``ranks`` (e.g. the group leaders); None on ranks outside it."""
        group = dist.new_group(ranks, timeout=self.timeout) if self.size > 1 else None
        mpi = None
        if self.mpi_world is not None:
            mpi = self.mpi_world.Split(color=0 if self.rank in ranks else 1, key=self.rank)
        if self.rank not in ranks:
            if mpi is not None:
                mpi.Free()
            return None
        return Comm(list(ranks), ranks.index(self.rank), group, self.comm.device, mpi)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def pick_device(requested: str, launch: LaunchInfo) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no GPU is visible: use --device cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        local = launch.local_rank % max(1, torch.cuda.device_count())  # one GPU per local rank
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_world(launch: LaunchInfo, device: torch.device, timeout_seconds: float) -> World:
    """Join the world: MPI first where the job was launched by MPI, then torch.distributed."""
    mpi_world = mpi_world_for(launch)
    addr, port = launch.master_addr, launch.master_port
    if mpi_world is not None and (addr is None or port is None):
        proposal = _rendezvous_address(mpi_world)  # collective: every rank calls it
        addr, port = mpi_world.bcast(proposal if launch.rank == 0 else None, root=0)
    if launch.world_size > 1:
        if addr is None or port is None:
            raise UsageError(f"{launch.launcher} started {launch.world_size} ranks but MASTER_ADDR/"
                             "MASTER_PORT are not set: export them (see launch/) or use mpiexec")
        backend = "nccl" if device.type == "cuda" else "gloo"
        # torchrun's agent hosts the store itself (any rendezvous backend): join it by env://
        init_method = "env://" if launch.launcher == "torchrun" else f"tcp://{addr}:{port}"
        dist.init_process_group(
            backend, init_method=init_method, rank=launch.rank,
            world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_seconds),
            device_id=device if device.type == "cuda" else None)
    comm = Comm(list(range(launch.world_size)), launch.rank,
                dist.group.WORLD if launch.world_size > 1 else None, device, mpi_world)
    return World(launch, comm, mpi_world, datetime.timedelta(seconds=timeout_seconds))


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


def _rendezvous_address(mpi_world) -> tuple[str, int]:
    """Rank 0's address and a free port; loopback when the whole job is on this host."""
    hosts = set(mpi_world.allgather(socket.gethostname()))
    return ("127.0.0.1" if len(hosts) == 1 else reachable_address()), free_port()


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


def exit_quietly_if_peer_lost(error: BaseException) -> bool:
    """True for the errors a rank sees when *another* rank died or hung (gloo/NCCL/MPI).
    Case-blind: gloo says "Timed out waiting 5000ms for recv", NCCL "timeout"."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "timed out",
                                   "timeout", "distbackenderror", "broken pipe", "econnreset",
                                   "horovodinternalerror"))


def log(message: str, *, rank: int = 0) -> None:
    """Progress goes to stdout from rank 0 only (the rank of the comm passed in)."""
    if rank == 0:
        print(message, flush=True, file=sys.stdout)
