"""The Horovod engine: the same ``World``/``Comm`` interface, over Horovod process sets.

    horovodrun --gloo -np 4 -H localhost:4 dd-train --backend horovod ...   # Gloo
    mpiexec -n 4 dd-train --backend horovod ...                            # MPI (mpi4py)

Horovod wants every process set up front: ``hvd.init(process_sets=...)`` registers every
group the run's plan will split the world into (each level's groups and, for each
composition, its group leaders: ``plan.comm_partitions``), from rank lists under Gloo and
from ``mpi4py`` communicator splits where Horovod runs on MPI.
Sets of one rank need no traffic and are not registered; a set equal to the world is
``hvd.global_process_set`` (Horovod rejects a second copy of it, and of any set), so for
``--subnets 1`` (one group = the world) and ``--subnets P`` (leaders = the world) nothing
extra is registered at all. The world's object traffic, broadcasts and gather are
``comm.BaseComm``'s (MPI where there is MPI); this engine implements only its collectives.

Gradients: ``hvd.DistributedOptimizer(process_set=...)``, so phase 1 averages inside a group
only. Everything else (metrics, flags, object and weight broadcasts, the phase-2 gather) is
a collective on the comm's process set under a name derived from the comm and a per-comm
counter: Horovod matches tensors across ranks *by name*, and its default names count every
op the process ever made, which differs between a group leader and the other ranks after
phase 2. Under an MPI launcher an ``mpi4py`` communicator split the same way carries the
object traffic and the phase-2 gather (as in the torch engine) and ``Abort`` ends the job.

What bounds a dead rank:
- it exits (crash, kill, or our ``abort``): the others' Horovod background threads lose
  their connection to it, Horovod shuts down, and every pending or later collective raises
  ``HorovodInternalError`` within milliseconds; ``horovodrun`` also kills the other workers
  as soon as one exits non-zero, and MPICH's ``mpiexec`` does the same (``Abort`` first).
- it freezes (SIGSTOP, swapped out): Horovod's background loop talks to every rank every
  cycle, so under Gloo the next exchange times out after ``HOROVOD_GLOO_TIMEOUT_SECONDS``,
  which we set from ``--timeout`` unless the user (or ``horovodrun --gloo-timeout-seconds``)
  did. Under MPI there is no such timeout.
- it is alive but its training loop is stuck: its background thread keeps answering, so the
  others wait (Horovod logs a stall warning every 60 s), as a late group is waited for at
  the end of phase 1. ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` would end it but would also
  end a long wait between groups that finish phase 1 far apart, so we leave it unset.

A slow rank must not look like a frozen one: the Gloo timeout bounds the background
threads' exchanges, which go on while the main threads wait, so it holds only if waiting
ranks leave the CPU to them. Horovod's own ``synchronize`` spins; every wait here (our
collectives and the optimizer's gradient step) polls with short sleeps instead
(``wait_quietly``).
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from .comm import BaseComm, BaseWorld
from .errors import UsageError
from .launch import LaunchInfo
from .progress import log
from .rendezvous import mpi_world_for

NOT_INSTALLED = "--backend horovod but Horovod is not installed: run launch/build_horovod.sh (see README)"


def _import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError:
        raise UsageError(NOT_INSTALLED) from None
    return hvd


# ---------------------------------------------------------------------------------------
def registered_sets(world_size: int, partitions: list[list[list[int]]]) -> list[list[int]]:
    """The rank lists to register at ``hvd.init`` under Gloo: same lists, same order, on
    every rank; without 1-rank sets (no traffic), without the world (that is
    ``hvd.global_process_set``) and without duplicates. A partition of one list is a subset
    (the group leaders): only that list is a set."""
    unique: list[list[int]] = []
    for partition in partitions:
        for ranks in partition:
            if 1 < len(ranks) < world_size and ranks not in unique:
                unique.append(list(ranks))
    return unique


def sets_from_mpi_splits(hvd, mpi_world, partitions: list[list[list[int]]]) -> list:
    """The same sets from communicator splits (where Horovod has MPI): for every partition
    that needs one, every rank hands Horovod the communicator of its own part, in the same
    order on every rank (a subset's split gives the other ranks a set of their own too,
    never used). A partition already split is skipped (two levels on the same groups, as
    ``--levels 4,2,1`` on 6 ranks): Horovod refuses a set registered twice."""
    rank, size = mpi_world.Get_rank(), mpi_world.Get_size()
    sets, seen = [], []
    for partition in partitions:
        if not any(1 < len(ranks) < size for ranks in partition):
            continue
        rest = sorted(set(range(size)).difference(*partition))
        parts = sorted([sorted(ranks) for ranks in partition] + ([rest] if rest else []))
        if parts in seen:  # the same on every rank: every rank skips it, as Split is collective
            continue
        seen.append(parts)
        mine = next((k for k, ranks in enumerate(partition) if rank in ranks), len(partition))
        sets.append(hvd.ProcessSet(mpi_world.Split(color=mine, key=rank)))
    return sets


def init_horovod_world(launch: LaunchInfo, device: torch.device, *, timeout: float, io_timeout: float,
                       partitions: list[list[list[int]]]) -> HorovodWorld:
    """Join the Horovod world (Gloo under horovodrun, MPI under mpiexec/srun)."""
    hvd = _import_horovod()
    if launch.launcher in ("local", "torchrun") and launch.world_size > 1:
        raise UsageError(f"--backend horovod needs horovodrun or an MPI launcher, but {launch.launcher} "
                         f"started this job: use `horovodrun --gloo -np {launch.world_size} -H "
                         f"localhost:{launch.world_size} dd-train ...`, mpiexec, or --backend torch")
    mpi_world = mpi_world_for(launch)  # COMM_WORLD under mpiexec / srun with PMI, else None
    if launch.launcher == "slurm" and mpi_world is None:
        raise UsageError("--backend horovod under srun needs MPI: launch with `srun --mpi=pmi2` "
                         "(pip's MPICH) or your site's PMI, or use --backend torch")
    # A frozen rank ends the Gloo exchanges after this long (see the module docstring).
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(max(1, int(round(timeout)))))
    if mpi_world is not None and hvd.mpi_built():
        sets = sets_from_mpi_splits(hvd, mpi_world, partitions)
        hvd.init(comm=mpi_world, process_sets=sets)
        source = "MPI communicator splits"
    else:
        sets = [hvd.ProcessSet(ranks) for ranks in registered_sets(launch.world_size, partitions)]
        hvd.init(process_sets=sets)
        source = "rank lists"
    if sets:
        log(f"horovod: {len(sets)} process sets from {source}", rank=launch.rank)
    if hvd.size() != launch.world_size or hvd.rank() != launch.rank:
        raise UsageError(f"Horovod sees rank {hvd.rank()} of {hvd.size()} but the launcher "
                         f"{launch.launcher} rank {launch.rank} of {launch.world_size}: start the job with "
                         "horovodrun or mpiexec (with the MPI that Horovod and mpi4py were built against)")
    by_ranks = {tuple(ps.ranks): ps for ps in sets}  # comm-built sets learn their ranks at init
    world_ranks = list(range(launch.world_size))
    comm = HorovodComm(world_ranks, launch.rank, hvd.global_process_set if launch.world_size > 1 else None,
                       device, mpi_world, tag="world")
    return HorovodWorld(launch, comm, mpi_world, datetime.timedelta(seconds=timeout),
                        datetime.timedelta(seconds=io_timeout), "horovod", process_sets=by_ranks)


# ---------------------------------------------------------------------------------------
@dataclass
class HorovodComm(BaseComm):
    """A comm whose ``process_group`` is a Horovod ``ProcessSet`` (None for one rank).

    Horovod ops take the *global* rank of the root; ``root`` arguments here are, as in
    ``BaseComm``, positions in ``ranks``. Every op is named ``dd.<tag>.<kind>.<n>``, ``n``
    counting this comm's ops, which all its ranks make in the same order. Horovod's Gloo
    waits do not depend on the main threads (its background threads keep talking), so a
    slow checkpoint write needs no patient twin: ``patient`` stays None.
    """

    tag: str = "world"
    ops: int = field(default=0, repr=False)

    @property
    def hvd(self):
        import horovod.torch as hvd
        return hvd

    def _name(self, kind: str) -> str:
        self.ops += 1
        return f"dd.{self.tag}.{kind}.{self.ops}"

    def _wait(self, handle):
        """The op's result, waited for without spinning (see ``wait_quietly``)."""
        return wait_quietly(self.hvd, handle)

    # --- the collectives ---
    def _allreduce_(self, tensor: torch.Tensor, op: str) -> None:
        hvd_op = self.hvd.Sum if op == "sum" else self.hvd.Max
        self._wait(self.hvd.allreduce_async_(tensor, op=hvd_op, name=self._name(op),
                                             process_set=self.process_group))

    def _broadcast_(self, tensor: torch.Tensor, root: int) -> None:
        self._wait(self.hvd.broadcast_async_(tensor, root_rank=self.ranks[root], name=self._name("bcast"),
                                             process_set=self.process_group))

    def _allgather(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        return self._wait(self.hvd.allgather_async(tensor, name=self._name(kind), process_set=self.process_group))

    def _broadcast_object(self, obj, root: int):
        data = _to_bytes(obj) if self.rank == root else torch.empty(0, dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64)
        self._broadcast_(length, root)
        if self.rank != root:
            data = torch.empty(int(length.item()), dtype=torch.uint8)
        self._broadcast_(data, root)
        return obj if self.rank == root else _from_bytes(data)

    def _allgather_object(self, obj) -> list:
        data = _to_bytes(obj)
        lengths = self._allgather(torch.tensor([data.numel()], dtype=torch.int64), "gather.len")
        joined = self._allgather(data, "gather.data")
        return [_from_bytes(part) for part in torch.split(joined, lengths.tolist())]

    def _gather_object(self, obj, root: int) -> list | None:
        everything = self._allgather_object(obj)  # Horovod has no gather; the objects are small
        return everything if self.rank == root else None

    def _gather_flat(self, flat: torch.Tensor, root: int) -> torch.Tensor | None:
        stacked = self._allgather(flat[None], "gather.flat")  # no gather: an allgather (few leaders)
        return stacked.cpu() if self.rank == root else None

    # --- data parallelism ---
    def data_parallel(self, model: nn.Module) -> nn.Module:
        """The model itself (gradients are averaged by ``wrap_optimizer``), after every rank
        of the set took the first rank's weights (not its buffers, as DDP: a rank resumed
        mid-epoch keeps its own BN statistics): ``hvd.broadcast_parameters`` is world-only,
        so this is one flat broadcast inside the set.

        Horovod reduces contiguous tensors only, and a gradient takes its parameter's
        layout: a channels-last model is turned back to the default layout, in place (the
        optimizer keeps the same parameter objects)."""
        if any(not p.is_contiguous() for p in model.parameters()):
            model.to(memory_format=torch.contiguous_format)
        self.broadcast_parameters_(model)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """``hvd.DistributedOptimizer`` over this set: gradients averaged inside the set.

        The wrapper shares the optimizer's ``param_groups`` (so the LR scheduler built on the
        optimizer still drives it) and is given its ``state`` (so momentum restored on resume
        survives). Horovod 0.28's ``zero_grad()`` takes no ``set_to_none``; ours does. Its
        ``synchronize()`` spins while it waits; ours first waits quietly.
        """
        if self.size == 1:
            return optimizer
        hvd = self.hvd
        wrapped = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                           process_set=self.process_group)
        wrapped.state = optimizer.state
        base = type(optimizer)

        def zero_grad(self, set_to_none: bool = True):
            if self._handles:
                raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                     "before optimizer.step(): Horovod is still reducing gradients")
            return base.zero_grad(self, set_to_none=set_to_none)

        def synchronize(self):
            for handle, _ in list(self._handles.values()):  # wait quietly, then collect
                if isinstance(handle, int):
                    wait_quietly(hvd, handle, collect=False)
            return type(self).synchronize(self)

        wrapped.zero_grad = types.MethodType(zero_grad, wrapped)
        wrapped.synchronize = types.MethodType(synchronize, wrapped)
        # The scheduler watches the optimizer it was built on for step() calls; mark it so
        # it does not warn that the LR was stepped before the (wrapped) optimizer.
        optimizer._opt_called = True
        return wrapped

    def scaled_step(self, optimizer, scaler) -> None:
        """fp16: the gradients must be averaged before the scaler unscales them (Horovod's
        AMP recipe), then the step must not synchronize again."""
        if hasattr(optimizer, "skip_synchronize"):
            optimizer.synchronize()
            scaler.unscale_(optimizer)
            with optimizer.skip_synchronize():
                scaler.step(optimizer)
        else:
            scaler.step(optimizer)


def wait_quietly(hvd, handle: int, *, collect: bool = True):
    """Wait for a Horovod op by polling with short sleeps, then collect its result.

    Horovod 0.28's ``synchronize`` busy-waits (``WaitAndClear`` yields in a loop at 100 % of a
    core). With more ranks than cores, ranks waiting for a late peer then starve the
    background threads, whose Gloo exchanges every cycle are bounded by
    ``HOROVOD_GLOO_TIMEOUT_SECONDS``: measured on 2 cores, 4 ranks, a rank 22 s late and
    ``--timeout 10`` killed 2 of 10 jobs; with this wait, 0 of 10 (and each job ran faster).
    The pause (at most 2 ms) is far below a training step."""
    pause = 1e-4
    while not hvd.poll(handle):
        time.sleep(pause)
        pause = min(2 * pause, 2e-3)
    return hvd.synchronize(handle) if collect else None


def _to_bytes(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor):
    return pickle.loads(data.numpy().tobytes())


# ---------------------------------------------------------------------------------------
@dataclass
class HorovodWorld(BaseWorld):
    """``BaseWorld`` over Horovod: groups are the process sets registered at init."""

    process_sets: dict = field(default_factory=dict)  # tuple(ranks) -> hvd.ProcessSet

    def _comm(self, rank_lists: list[list[int]], mine: int | None, mpi, tag: str) -> HorovodComm | None:
        if mine is None:
            return None
        import horovod.torch as hvd
        ranks = list(rank_lists[mine])
        if len(ranks) == 1:
            process_set = None
        elif ranks == list(range(self.size)):
            process_set = hvd.global_process_set
        elif tuple(ranks) in self.process_sets:
            process_set = self.process_sets[tuple(ranks)]
        else:
            raise RuntimeError(f"no Horovod process set for ranks {ranks}: Horovod needs every set at "
                               "hvd.init; add it to plan.comm_partitions")
        return HorovodComm(ranks, ranks.index(self.rank), process_set, self.comm.device, mpi, tag=tag)

    def _patient_world(self) -> HorovodComm:
        """The world again. Horovod collectives wait without a deadline for a live rank (its
        background thread keeps answering), so groups may finish phase 1 far apart; a dead
        or frozen rank still ends the wait (module docstring)."""
        return HorovodComm(self.comm.ranks, self.rank, self.comm.process_group, self.comm.device,
                           self.mpi_world, tag="sync")

    def close(self) -> None:
        """Barrier first: one rank's shutdown (or exit) shuts Horovod down for all."""
        import horovod.torch as hvd
        if hvd.is_initialized():
            self.comm.barrier()  # an allreduce, waited for quietly (hvd.barrier spins)
            hvd.shutdown()
