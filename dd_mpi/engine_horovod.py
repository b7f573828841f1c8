"""The Horovod engine: the same ``World``/``Comm`` interface, over Horovod process sets.

    horovodrun --gloo -np 4 -H localhost:4 dd-train --backend horovod ...   # Gloo
    mpiexec -n 4 dd-train --backend horovod ...                            # MPI (mpi4py)

Horovod wants every process set up front: ``hvd.init(process_sets=...)`` registers one set
per sub-network group of ``group_layout(P, --subnets)`` and the set of group leaders, from
rank lists under Gloo and from ``mpi4py`` communicator splits where Horovod runs on MPI.
Sets of one rank need no traffic and are not registered; a set equal to the world is
``hvd.global_process_set`` (Horovod rejects a second copy of it, and of any set), so for
``--subnets 1`` (one group = the world) and ``--subnets P`` (leaders = the world) nothing
extra is registered at all.

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

from .comm import Comm, World, group_layout, log, mpi_world_for
from .errors import UsageError
from .launch import LaunchInfo

NOT_INSTALLED = "--backend horovod but Horovod is not installed: run launch/build_horovod.sh (see README)"


def _import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError:
        raise UsageError(NOT_INSTALLED) from None
    return hvd


# ---------------------------------------------------------------------------------------
def registered_sets(world_size: int, cfg) -> list[list[int]]:
    """The rank lists to register at ``hvd.init``: same list, same order, on every rank.

    One per sub-network group and one for the group leaders; without 1-rank sets (no
    traffic), without the world (that is ``hvd.global_process_set``) and without duplicates.
    """
    if "dd" not in cfg.strategies or cfg.only_group_mode or world_size == 1:
        return []
    layout = group_layout(world_size, cfg.subnets)
    unique: list[list[int]] = []
    for ranks in [*layout, [group[0] for group in layout]]:
        if 1 < len(ranks) < world_size and ranks not in unique:
            unique.append(list(ranks))
    return unique


def sets_from_mpi_splits(hvd, mpi_world, rank_lists: list[list[int]], subnets: int) -> list:
    """The same sets as ``rank_lists``, from communicator splits (where Horovod has MPI):
    every rank hands Horovod the communicator of its own part, in the same order on every
    rank. The leaders' split gives the other ranks a set of their own too (never used)."""
    rank = mpi_world.Get_rank()
    layout = group_layout(mpi_world.Get_size(), subnets)
    leaders = [group[0] for group in layout]
    sets = []
    if any(ranks in layout for ranks in rank_lists):  # all groups have one size: all or none
        mine = next(k for k, group in enumerate(layout) if rank in group)
        sets.append(hvd.ProcessSet(mpi_world.Split(color=mine, key=rank)))
    if leaders in rank_lists:
        sets.append(hvd.ProcessSet(mpi_world.Split(color=0 if rank in leaders else 1, key=rank)))
    return sets


def init_horovod_world(launch: LaunchInfo, device: torch.device, cfg) -> HorovodWorld:
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
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(max(1, int(round(cfg.timeout)))))
    rank_lists = registered_sets(launch.world_size, cfg)
    if mpi_world is not None and hvd.mpi_built():
        sets = sets_from_mpi_splits(hvd, mpi_world, rank_lists, cfg.subnets)
        hvd.init(comm=mpi_world, process_sets=sets)
        source = "MPI communicator splits"
    else:
        sets = [hvd.ProcessSet(ranks) for ranks in rank_lists]
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
    return HorovodWorld(launch, comm, mpi_world, datetime.timedelta(seconds=cfg.timeout),
                        "horovod", process_sets=by_ranks)


# ---------------------------------------------------------------------------------------
@dataclass
class HorovodComm(Comm):
    """A Comm whose ``process_group`` is a Horovod ``ProcessSet`` (None for one rank).

    Horovod ops take the *global* rank of the root; ``root`` arguments here are, as in
    ``Comm``, positions in ``ranks``. Every op is named ``dd.<tag>.<kind>.<n>``, ``n``
    counting this comm's ops, which all its ranks make in the same order.
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

    # --- reductions ---
    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self._wait(self.hvd.allreduce_async_(tensor, op=self.hvd.Sum, name=self._name("sum"),
                                                 process_set=self.process_group))
        return tensor

    def any(self, flag: bool) -> bool:
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._wait(self.hvd.allreduce_async_(t, op=self.hvd.Max, name=self._name("any"),
                                             process_set=self.process_group))
        return bool(t.item())

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        if self.size == 1:
            return tensor
        if self.mpi is not None and tensor.device.type == "cpu" and tensor.is_contiguous():
            self.mpi.Bcast(tensor.numpy(), root=root)
        else:
            self._wait(self.hvd.broadcast_async_(tensor, root_rank=self.ranks[root], name=self._name("bcast"),
                                                 process_set=self.process_group))
        return tensor

    # --- Python objects (pickled into byte tensors; mpi4py's own when MPI is there) ---
    def broadcast_object(self, obj, root: int = 0):
        if self.size == 1:
            return obj
        if self.mpi is not None:
            return self.mpi.bcast(obj, root=root)
        data = _to_bytes(obj) if self.rank == root else torch.empty(0, dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64)
        self.broadcast_(length, root)
        if self.rank != root:
            data = torch.empty(int(length.item()), dtype=torch.uint8)
        self.broadcast_(data, root)
        return obj if self.rank == root else _from_bytes(data)

    def allgather_object(self, obj) -> list:
        if self.size == 1:
            return [obj]
        if self.mpi is not None:
            return self.mpi.allgather(obj)
        data = _to_bytes(obj)
        lengths = self._wait(self.hvd.allgather_async(torch.tensor([data.numel()], dtype=torch.int64),
                                                      name=self._name("gather.len"), process_set=self.process_group))
        joined = self._wait(self.hvd.allgather_async(data, name=self._name("gather.data"),
                                                     process_set=self.process_group))
        return [_from_bytes(part) for part in torch.split(joined, lengths.tolist())]

    def gather_object(self, obj, root: int = 0) -> list | None:
        if self.size == 1:
            return [obj]
        if self.mpi is not None:
            return self.mpi.gather(obj, root=root)
        everything = self.allgather_object(obj)  # Horovod has no gather; the objects are small
        return everything if self.rank == root else None

    def gather_flat(self, flat: torch.Tensor, root: int = 0) -> torch.Tensor | None:
        flat = flat.contiguous()
        if self.size == 1:
            return flat[None]
        if self.mpi is not None and flat.device.type == "cpu":
            return super().gather_flat(flat, root)  # MPI Gather into one buffer on the root
        # Horovod has no gather: an allgather over the (few) group leaders.
        stacked = self._wait(self.hvd.allgather_async(flat[None], name=self._name("gather.flat"),
                                                      process_set=self.process_group))
        return stacked.cpu() if self.rank == root else None

    # --- data parallelism ---
    def data_parallel(self, model: nn.Module) -> nn.Module:
        """The model itself (gradients are averaged by ``wrap_optimizer``), after every rank
        of the set took the first rank's weights and buffers: ``hvd.broadcast_parameters``
        is world-only, so this is one flat broadcast inside the set.

        Horovod reduces contiguous tensors only, and a gradient takes its parameter's
        layout: a channels-last model is turned back to the default layout, in place (the
        optimizer keeps the same parameter objects)."""
        if any(not p.is_contiguous() for p in model.parameters()):
            model.to(memory_format=torch.contiguous_format)
        self.broadcast_model_(model)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """``hvd.DistributedOptimizer`` over this set: gradients averaged inside the set.

        The wrapper shares the optimizer's ``param_groups`` (so the LR scheduler built on the
        optimizer still drives it) and is given its ``state`` (so momentum restored on resume
        survives). Horovod 0.28's ``zero_grad()`` takes no ``set_to_none``; ours does.
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

    def abort(self, code: int = 1) -> None:
        """End every rank: MPI ``Abort`` under an MPI launcher; otherwise exit this process,
        and Horovod's lost connection and horovodrun end the others."""
        if self.mpi is not None:
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(code)
        os._exit(code)


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
class HorovodWorld(World):
    """``World`` over Horovod: groups are the process sets registered by ``init_horovod_world``."""

    process_sets: dict = field(default_factory=dict)  # tuple(ranks) -> hvd.ProcessSet

    def _comm(self, ranks: list[int], mpi, index: int | None, tag: str) -> HorovodComm:
        import horovod.torch as hvd
        ranks = list(ranks)
        if len(ranks) == 1:
            process_set = None
        elif ranks == list(range(self.size)):
            process_set = hvd.global_process_set
        elif tuple(ranks) in self.process_sets:
            process_set = self.process_sets[tuple(ranks)]
        else:
            raise RuntimeError(f"no Horovod process set for ranks {ranks}: Horovod needs every set at "
                               "hvd.init; add it to engine_horovod.registered_sets")
        return HorovodComm(ranks, ranks.index(self.rank), process_set, self.comm.device, mpi, index, tag=tag)

    def split(self, layout: list[list[int]], index: int) -> HorovodComm:
        """This rank's group comm (every rank calls it, as with the torch engine)."""
        mpi = self.mpi_world.Split(color=index, key=self.rank) if self.mpi_world is not None else None
        return self._comm(layout[index], mpi, index, tag=f"group{index}")

    def subset(self, ranks: list[int]) -> HorovodComm | None:
        """A comm over ``ranks`` (e.g. the group leaders); None on ranks outside it."""
        mpi = None
        if self.mpi_world is not None:
            mpi = self.mpi_world.Split(color=0 if self.rank in ranks else 1, key=self.rank)
        if self.rank not in ranks:
            if mpi is not None:
                mpi.Free()
            return None
        return self._comm(ranks, mpi, None, tag="subset" + "-".join(map(str, ranks)))

    def phase_sync(self, hours: float = 48.0) -> HorovodComm:
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
