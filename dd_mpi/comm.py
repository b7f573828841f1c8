"""The world of P ranks, its groups, and the few collectives training needs.

A ``Comm`` is a set of ranks (the world, or one group) and is always passed explicitly.
``BaseComm`` holds what every engine shares: the one-rank shortcuts, and where the job was
started by an MPI launcher, the MPI communicator split the same way, which carries object
traffic, the phase-2 gather and weight broadcasts and can abort the whole job. An engine
implements only its own collectives (``_allreduce_`` ... ``_gather_flat``) and its data
parallelism: ``Comm`` here with ``torch.distributed`` (DDP over NCCL on GPU, gloo on CPU),
``engine_horovod.HorovodComm`` with Horovod process sets.

Two time bounds (README, "Checkpoints, resume and failures"): training collectives wait at
most ``--timeout`` for a stuck rank; start-up and I/O waits (rank 0's data check, a leader's
checkpoint write, the first compiled step) wait up to ``--io-timeout`` on a patient twin of
the same ranks. A dead rank ends the job at once either way (its connections close, and the
launchers stop the others).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .errors import UsageError
from .launch import LaunchInfo
from .rendezvous import agreed_address, mpi_world_for

MPI_ABORT_GRACE_SECONDS = 1.0  # for mpiexec to forward a dying rank's last lines before it kills the job


def verdict_of(check: Callable[[], str | None]) -> str | None:
    """``check``'s verdict (None or a message), with what it raised of bad input said as one:
    a UsageError's message, or the file an OSError names (disk full, an unreadable file)."""
    try:
        return check()
    except UsageError as error:
        return str(error)
    except OSError as error:  # the other ranks are waiting on this one's verdict
        return f"{getattr(error, 'filename', None) or 'a file'}: {error.strerror or error}"


@dataclass
class BaseComm:
    """A set of ranks that train one model together (the world, or one group)."""

    ranks: list[int]  # world ranks, in order; self.rank indexes this list
    rank: int
    process_group: object  # the engine's group (None: a group of one rank)
    device: torch.device
    mpi: object = None  # mpi4py communicator over the same ranks, when launched by MPI
    patient: BaseComm | None = field(default=None, repr=False)  # same ranks, --io-timeout

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def slow(self) -> BaseComm:
        """The comm to use around start-up and I/O waits (itself if it has no twin)."""
        return self.patient or self

    # --- what an engine implements (called only with size > 1, and without MPI where noted) ---
    def _allreduce_(self, tensor: torch.Tensor, op: str) -> None:  # op: "sum" | "max"
        raise NotImplementedError

    def _broadcast_(self, tensor: torch.Tensor, root: int) -> None:
        raise NotImplementedError

    def _broadcast_object(self, obj, root: int):  # no MPI
        raise NotImplementedError

    def _allgather_object(self, obj) -> list:  # no MPI
        raise NotImplementedError

    def _gather_object(self, obj, root: int) -> list | None:  # no MPI
        raise NotImplementedError

    def _gather_flat(self, flat: torch.Tensor, root: int) -> torch.Tensor | None:  # no MPI or on GPU
        raise NotImplementedError

    # --- reductions (metrics: once per epoch; flags: every few steps) ---
    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self._allreduce_(tensor, "sum")
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (one tiny allreduce)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._allreduce_(t, "max")
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            self.any(False)  # an allreduce: obeys the comm's timeout, unlike some barriers

    # --- broadcasts and gathers: MPI's where the job has it ---
    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        if self.size == 1:
            return tensor
        if self.mpi is not None and tensor.device.type == "cpu" and tensor.is_contiguous():
            self.mpi.Bcast(tensor.numpy(), root=root)
        else:
            self._broadcast_(tensor, root)
        return tensor

    def broadcast_object(self, obj, root: int = 0):
        if self.size == 1:
            return obj
        return self.mpi.bcast(obj, root=root) if self.mpi is not None else self._broadcast_object(obj, root)

    def allgather_object(self, obj) -> list:
        if self.size == 1:
            return [obj]
        return self.mpi.allgather(obj) if self.mpi is not None else self._allgather_object(obj)

    def gather_object(self, obj, root: int = 0) -> list | None:
        if self.size == 1:
            return [obj]
        return self.mpi.gather(obj, root=root) if self.mpi is not None else self._gather_object(obj, root)

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
        return self._gather_flat(flat, root)

    def verdict_of_root(self, check: Callable[[], str | None]) -> str | None:
        """Run ``check`` on the root only and give its verdict (None or a message) to all.

        For checks that read files (md5 sums, an output directory): one rank reads, every
        rank raises the same error, and no rank is left waiting in a collective.
        """
        return self.slow.broadcast_object(verdict_of(check) if self.rank == 0 else None)

    # --- models ---
    def broadcast_parameters_(self, model: nn.Module, root: int = 0) -> None:
        """Make every rank hold the root's parameters (one flat broadcast), as DDP does when it
        wraps a model: not the buffers, so a rank resumed mid-epoch keeps its own BatchNorm
        statistics (they are averaged at the epoch's end)."""
        if self.size == 1:
            return
        params = list(model.parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params]).to(self.device)
        self.broadcast_(flat, root)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

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

    def data_parallel(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def scaled_step(self, optimizer: torch.optim.Optimizer, scaler) -> None:
        """``scaler.step`` once the gradients are final (fp16 loss scaling)."""
        scaler.step(optimizer)

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI: Abort; otherwise this process, and the
        launcher or the collective timeout ends the others).

        MPI_Abort has mpiexec kill every rank at once, and what this rank had just said (its
        traceback, written and flushed) was sometimes lost on the way through the launcher's
        proxy: a CI run ended exit 1 with nothing on stderr. The launcher gets a moment to
        forward it first."""
        if self.mpi is not None:
            from mpi4py import MPI
            sys.stdout.flush()
            sys.stderr.flush()
            time.sleep(MPI_ABORT_GRACE_SECONDS)
            MPI.COMM_WORLD.Abort(code)
        os._exit(code)


@dataclass
class Comm(BaseComm):
    """The torch.distributed engine: gradients by DDP over this comm's group."""

    def _allreduce_(self, tensor: torch.Tensor, op: str) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=self.process_group)

    def _broadcast_(self, tensor: torch.Tensor, root: int) -> None:
        dist.broadcast(tensor, src=self.ranks[root], group=self.process_group)

    def _broadcast_object(self, obj, root: int):
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[root], group=self.process_group,
                                   device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def _allgather_object(self, obj) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out

    def _gather_object(self, obj, root: int) -> list | None:
        out = [None] * self.size if self.rank == root else None
        dist.gather_object(obj, out, dst=self.ranks[root], group=self.process_group)
        return out

    def _gather_flat(self, flat: torch.Tensor, root: int) -> torch.Tensor | None:
        flat = flat.to(self.device)
        parts = [torch.empty_like(flat) for _ in range(self.size)] if self.rank == root else None
        dist.gather(flat, parts, dst=self.ranks[root], group=self.process_group)
        return torch.stack(parts).cpu() if parts is not None else None

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """DDP over this comm's group. Buffers (BN statistics) are averaged once per epoch by
        ``average_buffers_`` instead of broadcast on every forward.

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


# ---------------------------------------------------------------------------------------
@dataclass
class BaseWorld:
    """All ranks, and the groups they split into. Group creation is collective: every rank
    calls ``split``/``subset`` with the same rank lists in the same order."""

    launch: LaunchInfo
    comm: BaseComm  # all ranks (with its patient twin)
    mpi_world: object = None
    timeout: datetime.timedelta = datetime.timedelta(seconds=300)  # training collectives
    io_timeout: datetime.timedelta = datetime.timedelta(seconds=1800)  # start-up and I/O waits
    backend_name: str = "torch"

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def split(self, rank_lists: list[list[int]], tag: str = "group") -> BaseComm:
        """This rank's comm, one of disjoint ``rank_lists`` covering the world."""
        mine = next(k for k, ranks in enumerate(rank_lists) if self.rank in ranks)
        mpi = self.mpi_world.Split(color=mine, key=self.rank) if self.mpi_world is not None else None
        return self._comm(rank_lists, mine, mpi, f"{tag}{mine}")

    def subset(self, ranks: list[int], tag: str = "subset") -> BaseComm | None:
        """A comm over ``ranks`` (e.g. the group leaders); None on the other ranks."""
        member = self.rank in ranks
        mpi = None
        if self.mpi_world is not None:
            mpi = self.mpi_world.Split(color=0 if member else 1, key=self.rank)
            if not member:
                mpi.Free()
                mpi = None
        return self._comm([list(ranks)], 0 if member else None, mpi, tag)

    def layout_comm(self, layout, tag: str = "group") -> BaseComm:
        """This rank's group of a level's layout (``layout.Layout``); the world's own comm
        when the level has one group."""
        if layout.groups == 1:
            return self.comm
        return self.split(layout.rank_lists, tag=tag)

    def phase_sync(self) -> BaseComm:
        """The world, waiting as long as it takes (``--io-timeout`` at least, and days for
        torch): phase 1's groups may finish far apart. A dead rank still ends the wait at
        once; only a hung one is waited for."""
        return self._patient_world()

    def _comm(self, rank_lists: list[list[int]], mine: int | None, mpi, tag: str) -> BaseComm | None:
        """The engine's comm for ``rank_lists[mine]`` (None if ``mine`` is None), after creating
        whatever every rank must create for all of ``rank_lists``."""
        raise NotImplementedError

    def _patient_world(self) -> BaseComm:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@dataclass
class World(BaseWorld):
    """The torch.distributed world."""

    compile_bound: bool = False  # --compile: a first step may compile for minutes

    def _comm(self, rank_lists: list[list[int]], mine: int | None, mpi, tag: str) -> Comm | None:
        fast, slow = [], []
        training = self.io_timeout if self.compile_bound else self.timeout
        for ranks in rank_lists:  # new_group is collective over the world: same order everywhere
            multi = self.size > 1 and len(ranks) > 1
            fast.append(dist.new_group(ranks, timeout=training) if multi else None)
            slow.append(dist.new_group(ranks, timeout=self.io_timeout) if multi else None)
        if mine is None:
            return None
        ranks = rank_lists[mine]
        patient = Comm(list(ranks), ranks.index(self.rank), slow[mine], self.comm.device, mpi)
        return Comm(list(ranks), ranks.index(self.rank), fast[mine], self.comm.device, mpi, patient)

    def _patient_world(self) -> Comm:
        group = dist.new_group(list(range(self.size)), timeout=datetime.timedelta(days=2)) \
            if self.size > 1 else None
        return Comm(self.comm.ranks, self.rank, group, self.comm.device, self.mpi_world)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _unresolved(addr: str, port: int, rank: int) -> str | None:
    """Why this rank cannot reach MASTER_ADDR, or None: a name that does not resolve. The
    store's client retried it for --io-timeout (30 min), saying only c10d's warnings."""
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        return (f"MASTER_ADDR {addr} does not resolve on rank {rank} ({socket.gethostname()}: "
                f"{getattr(error, 'strerror', None) or error}): export a name or address of rank 0's node that "
                "every node resolves, or under mpiexec and srun unset MASTER_ADDR and MASTER_PORT (the ranks "
                "then agree on rank 0's)")
    return None


def _store(launch: LaunchInfo, addr: str, port: int, timeout: datetime.timedelta, mpi_world=None) -> dist.Store:
    """The rendezvous store. torchrun's agent hosts it (any rendezvous backend) and keeps it
    across ``--max-restarts``: a restarted worker group then reads the previous attempt's
    gloo addresses for the same group names and connects to dead ports, so every attempt
    gets keys of its own (TORCHELASTIC_RESTART_COUNT).

    Under MPI rank 0 opens the store first and tells the others over MPI whether it could: a
    MASTER_PORT in use (exported for one job, two jobs on a node) was a traceback on rank 0,
    and its other ranks joined the other job's store and hung there past every timeout."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and launch.launcher == "torchrun"
    master = launch.rank == 0 and not agent_hosts
    unresolved = _unresolved(addr, port, launch.rank)
    if mpi_world is not None:  # (each rank resolves it for itself; a node's DNS may differ)
        unresolved = next((word for word in mpi_world.allgather(unresolved) if word), None)
    if unresolved:
        raise UsageError(unresolved, everywhere=mpi_world is not None)
    store = failure = None
    if master or mpi_world is None:
        try:
            store = dist.TCPStore(addr, port, launch.world_size, is_master=master, timeout=timeout,
                                  multi_tenant=not agent_hosts, wait_for_workers=mpi_world is None)
        except Exception as error:  # (any: the other ranks wait in the bcast below for rank 0's word)
            if mpi_world is None:
                raise
            failure = (f"rank 0 cannot open the rendezvous at {addr}:{port} ({str(error).splitlines()[0][:160]}): "
                       "another job on this node may hold MASTER_PORT; unset MASTER_ADDR and MASTER_PORT "
                       "(under mpiexec dd_mpi picks a free port) or export another (slurm/common.sh derives "
                       "it from the job id)")
    if mpi_world is not None:
        failure = mpi_world.bcast(failure, root=0)
        if failure:
            raise UsageError(failure)
        if not master:
            store = dist.TCPStore(addr, port, launch.world_size, is_master=False, timeout=timeout,
                                  multi_tenant=not agent_hosts)
    return dist.PrefixStore(f"dd_mpi/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_world(launch: LaunchInfo, device: torch.device, *, timeout: float, io_timeout: float,
               compile_bound: bool = False) -> World:
    """Join the world: MPI first where the job was launched by MPI, then torch.distributed.
    The world's own group waits ``io_timeout`` (start-up checks run on it); its training twin
    is a group of all ranks with ``timeout``."""
    mpi_world = mpi_world_for(launch)
    addr, port = agreed_address(launch, mpi_world)
    slow = datetime.timedelta(seconds=io_timeout)
    fast = datetime.timedelta(seconds=timeout)
    if launch.world_size > 1:
        if addr is None or port is None:
            raise UsageError(f"{launch.launcher} started {launch.world_size} ranks but MASTER_ADDR/"
                             "MASTER_PORT are not set: export them (see launch/) or use mpiexec")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=_store(launch, addr, port, slow, mpi_world), rank=launch.rank,
                                world_size=launch.world_size, timeout=slow,
                                device_id=device if device.type == "cuda" else None)
    everyone = list(range(launch.world_size))
    multi = launch.world_size > 1
    patient = Comm(everyone, launch.rank, dist.group.WORLD if multi else None, device, mpi_world)
    training = dist.new_group(everyone, timeout=slow if compile_bound else fast) if multi else None
    comm = Comm(everyone, launch.rank, training, device, mpi_world, patient)
    return World(launch, comm, mpi_world, fast, slow, "torch", compile_bound)
