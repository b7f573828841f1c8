"""dd-train: the entry point under every launcher.

    dd-train --nproc 4                                  # 4 local processes (gloo on CPU)
    torchrun --nproc-per-node 4 -m dd_mpi ...           # torchrun
    mpiexec -n 4 dd-train ...                           # MPI (mpi4py)
    srun --mpi=pmi2 dd-train ...                        # Slurm (see slurm/)
    horovodrun -np 4 -H localhost:4 --gloo dd-train --backend horovod ...

Exit codes: 0 done, 1 failure, 2 bad input (one line names the flag or file), 75 stopped by
SIGTERM/SIGUSR1 after checkpointing (requeue and run again with --resume).
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import sys
import traceback

# torch and what is built on it are imported by the ranks only (in main, below the --nproc
# branch): `dd-train --nproc K` itself checks the flags, starts K ranks and waits (catalog.py)
from .config import config_yaml, parse_config, ranks_disagree
from .errors import (EXIT_FAILURE, EXIT_PREEMPTED, EXIT_USAGE, PeerFailed, PhaseFailed, Preempted, UsageError,
                     peer_lost)
from .launch import (STOP_SIGNALS, check_local_ranks, cpu_mask, cpu_threads_per_rank, data_workers, detect_launch,
                     run_local, started_by_torchrun)
from .progress import say


# A launcher that restarts failed workers says so: the restarted run continues the same one.
# (torchrun's counter only where torchrun started this process: one left in a shell refused a fresh run)
RESTART_COUNTERS = {"SLURM_RESTART_COUNT": lambda launch: True,
                    "TORCHELASTIC_RESTART_COUNT": lambda launch: launch.launcher == "torchrun"}


class StopSignal:
    """SIGTERM/SIGUSR1/SIGINT (Ctrl-C), once ``arm``-ed, set a flag; training looks at it at
    safe points (between steps), checkpoints and exits 75.

    Until then (start-up: the rendezvous, loading the data) they end the rank at once, as they
    end any program: there is nothing to checkpoint yet, and a flag would not be looked at
    before training begins, so a rank waiting at a rendezvous for a rank that never comes held
    a stop for all of --io-timeout. Launchers count a rank ended so by the stop they forwarded
    as stopped (75; ``launch._wait_all``, slurm/common.sh)."""

    def __init__(self):
        self.requested = False
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)

    def arm(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _check_a_restart_finds_its_run(cfg, restarted: list[str]) -> None:
    """A restart, --resume and an array task continue (or join) the run in --out; without
    --out each attempt names a new one after its start time, and would silently train from
    scratch (or leave its sub-net where the final job never looks)."""
    if cfg.out is not None:
        return
    if restarted:
        raise UsageError(f"this job was restarted ({restarted[0]}) but has no --out to continue: give the "
                         "first attempt's --out with --resume, and --out DIR in the job script")
    if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") not in ("", "0") and "TORCHELASTIC_RUN_ID" in os.environ:
        raise UsageError(f"torchrun --max-restarts {os.environ['TORCHELASTIC_MAX_RESTARTS']} restarts a failed "
                         "job, which continues the run in --out: give --out DIR")
    if cfg.resume:
        raise UsageError("--resume continues the run in --out, and there is none: add --out DIR, the "
                         "directory of the run to continue")
    if cfg.only_group is not None:
        raise UsageError(f"--only-group {cfg.only_group} trains one group of the run in --out, where the "
                         "final job composes it: give every task the same --out DIR")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launch = detect_launch()
    try:
        with contextlib.redirect_stdout(io.StringIO()) if launch.rank != 0 else contextlib.nullcontext():
            cfg = parse_config(argv)  # (--help: printed by rank 0 alone, not once per rank)
        if cfg.print_config:
            if cfg.nproc and launch.launcher == "single":  # the job of --nproc K ranks: its layout checked
                from .plan import checked_layouts  # (launch/*.sh check so before torchrun or horovodrun starts)
                checked_layouts(cfg, cfg.nproc)
            if launch.rank == 0:
                print(config_yaml(cfg), end="", flush=True)
            return 0
        restarted = [f"{v}={os.environ[v]}" for v, counts in RESTART_COUNTERS.items()
                     if os.environ.get(v, "0") not in ("", "0") and counts(launch)]
        if restarted:
            cfg.resume = True  # a requeued or restarted job continues from its checkpoints
        _check_a_restart_finds_its_run(cfg, restarted)
        if cfg.only_group_mode:  # so does an array task: a failed one is resubmitted as it was, without
            cfg.resume = True  # --resume, and would retrain its sub-net from scratch over its checkpoints
        if cfg.nproc and cfg.nproc > 1 and launch.launcher == "torchrun" and not started_by_torchrun():
            stale = " ".join(f"{v}={os.environ[v]}" for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if v in os.environ)
            raise UsageError(f"--nproc {cfg.nproc} starts ranks of its own, but {stale} in the environment say "
                             "this process is one rank of a launcher's job (left in this shell?): `unset RANK "
                             "WORLD_SIZE LOCAL_RANK` to start the ranks here, or leave --nproc out under a launcher")
        if cfg.nproc and cfg.nproc > 1 and launch.launcher == "single":
            check_local_ranks(cfg.nproc)
            return run_local(cfg.nproc, _without_nproc(argv))
        if cfg.nproc and launch.launcher not in ("single", "local") and launch.rank == 0:
            say(f"dd-train: note: --nproc {cfg.nproc} ignored: {launch.launcher} started "
                f"{launch.world_size} ranks", sys.stderr)
        for note in cfg.unused_flags() if launch.rank == 0 else []:
            say(f"dd-train: note: {note}", sys.stderr)
        stop = StopSignal()  # a rank from here on
        import torch

        from .decompose import subnet_spec
        from .plan import checked_layouts
        from .rendezvous import check_the_net_fits, pick_device, pick_precision
        # Everything that needs no communication is checked first, identically on every rank
        # (its node's memory: on every rank of a node).
        layouts = checked_layouts(cfg, launch.world_size)
        spec, flag = cfg.model_spec(10), f"--width {cfg.width:g}"
        if cfg.only_group_mode:  # an array task trains one sub-net; the final job builds the whole net
            spec, flag = subnet_spec(spec, cfg.subnets), f"{flag} / --subnets {cfg.subnets}"
        check_the_net_fits(spec, flag, cfg.momentum, cfg.device, launch)
    except UsageError as error:
        # torchrun stops every rank as soon as one exits, and rank 0 may still be importing
        # torch then (no handler for its SIGTERM yet): there, every rank says the same line
        if launch.rank == 0 or launch.launcher == "torchrun" or not error.everywhere:
            say(f"dd-train: error: {error}", sys.stderr)
        return EXIT_USAGE

    torch.set_num_threads(cfg.threads or cpu_threads_per_rank(launch))  # until the ranks' masks are known
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    world = None
    try:
        device = pick_device(cfg.device, launch)
        precision = pick_precision(cfg.precision, device, cfg.device)
        world = _init_engine(cfg, launch, device, layouts)
        # which ranks share which CPUs is known only from all of them (how the launcher bound them)
        masks, settings = zip(*world.comm.slow.allgather_object((cpu_mask(), cfg.to_dict())))
        disagree = ranks_disagree([(host, theirs) for (host, _), theirs in zip(masks, settings)])
        if disagree:
            raise UsageError(disagree)
        cfg.resume = any(theirs["resume"] for theirs in settings)  # a restart of some nodes resumes all
        threads = cpu_threads_per_rank(launch, list(masks))
        torch.set_num_threads(cfg.threads or threads)
        from .pipeline import run  # after the world: imports nothing that talks
        run(cfg, world, stop, layouts, precision, cfg.workers if cfg.workers is not None else data_workers(threads))
        world.close()
        return 0
    except UsageError as error:
        if launch.rank == 0 or not error.everywhere:
            say(f"dd-train: error: {error}", sys.stderr)
        if not error.everywhere and world is not None:
            world.comm.abort(EXIT_USAGE)  # the other ranks may be waiting on this one
        _close(world)
        return EXIT_USAGE
    except Exception as error:
        if isinstance(error, Preempted):
            if launch.rank == 0:
                say(f"dd-train: stopped by signal after checkpointing; {_how_to_continue(cfg)}", sys.stderr)
            _close(world)
            return EXIT_PREEMPTED
        if isinstance(error, PhaseFailed):
            if launch.rank == 0:
                say(f"dd-train: error: {error}", sys.stderr)
            _close(world)
            return EXIT_FAILURE
        if isinstance(error, PeerFailed):
            if launch.rank == 0:
                say(f"dd-train: error: {error}", sys.stderr)
            world.comm.abort(EXIT_FAILURE)  # no orderly close: a peer is gone
        if stop.requested and world is not None and peer_lost(error):
            # the others were stopped too, and one ended before it could catch the signal (it
            # was still starting up) or while checkpointing: checkpoints are written whole
            say(f"dd-train: rank {launch.rank}: stopped by signal; another rank ended before it could "
                f"checkpoint; {_how_to_continue(cfg)}", sys.stderr)
            world.comm.abort(EXIT_PREEMPTED)  # no orderly close: a peer is gone
        if peer_lost(error):
            # one line, but with the message: the match is by substring, so a genuine local
            # timeout (a DataLoader's, say) must still say what it was
            detail = (str(error).strip().splitlines() or [""])[0][:200]
            say(f"dd-train: rank {launch.rank}: lost contact with another rank "
                f"({type(error).__name__}: {detail}); stopping", sys.stderr)
        else:
            # every line names its rank: ranks that fail together interleave their tracebacks
            trace = traceback.format_exc().rstrip().splitlines()
            say("\n".join([f"dd-train: rank {launch.rank} failed:", *(f"[rank {launch.rank}] {line}" for line in trace)]),
                sys.stderr)
        if world is not None:
            world.comm.abort(EXIT_FAILURE)  # MPI: the whole job; otherwise this process
        return EXIT_FAILURE


def _how_to_continue(cfg) -> str:
    """--out as the run resolved it (rank 0's time stamp when none was given). An array task
    is run again as it was: with --resume instead it became the whole job."""
    if cfg.only_group_mode:
        return f"run the task again (--only-group {cfg.only_group} --out {shlex.quote(str(cfg.out))}; no --resume)"
    return "run again with its flags and --resume" + (f" --out {shlex.quote(str(cfg.out))}" if cfg.out is not None else "")


def _close(world) -> None:
    """Shut the process groups down while Python still runs, on exits every rank agreed on:
    left to the interpreter's exit, gloo's threads may be torn down in the wrong order and
    abort the process ("terminate called without an active exception"), turning a clean
    exit 75 into a crash that the launcher reports instead."""
    if world is not None:
        world.close()


def _init_engine(cfg, launch, device, layouts):
    from .comm import init_world
    from .plan import comm_partitions
    backend = cfg.backend
    if backend == "auto":
        backend = "horovod" if launch.launcher == "horovod" else "torch"
    if backend == "horovod":
        from .engine_horovod import init_horovod_world
        return init_horovod_world(launch, device, timeout=cfg.timeout, io_timeout=cfg.io_timeout,
                                  partitions=comm_partitions(cfg, layouts))
    if launch.launcher == "horovod":
        raise UsageError("launched by horovodrun but --backend torch: use --backend horovod (or auto)")
    return init_world(launch, device, timeout=cfg.timeout, io_timeout=cfg.io_timeout, compile_bound=cfg.compile)


if __name__ == "__main__":
    sys.exit(main())
