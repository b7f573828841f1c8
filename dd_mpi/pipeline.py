"""The method, top-down: the levels of the plan (level 0: groups train the sub-nets; every
later level: gather, compose, broadcast, fine-tune), then the conventional baseline.

Every level writes atomic checkpoints and resumes from them: a finished net is loaded, an
unfinished group continues from its last step. Rank 0 owns the run's files; a group's
leader owns its nets' checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import socket
import time
import uuid
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import runlock
from .comm import BaseComm, BaseWorld
from .config import RunConfig, read_saved_config
from .data import DataPlan, Stream
from .datasets import data_difference, data_view, load_for_run, split_size
from .decompose import compose
from .errors import (Outcome, PeerFailed, Preempted, UsageError, deciding, is_outcome, outcome_of, peer_lost,
                     raise_outcome)
from .flat import checksum, checksum_state, flatten_state, unflatten_state
from .layout import Layout
from .phase import NetResult, Run, model_of, train_group
from .plan import Level, build_plan, default_groups, pools, refuse_empty_epochs
from .progress import Reporter, log
from .rendezvous import processor_name
from .report import build_report, public, write_report
from .train import evaluate


def run(cfg: RunConfig, world: BaseWorld, should_stop, layouts: list[Layout], precision: str,
        workers: int) -> dict | None:
    """The whole job on the levels' ``layouts``, in ``precision`` (fp32 | bf16 | fp16), with
    ``workers`` DataLoader workers per rank. ``should_stop`` (cli.StopSignal) is armed once
    the data is loaded: from then on a stop signal checkpoints. Returns the report on rank 0
    (None elsewhere or in --only-group mode)."""
    try:
        return _run(cfg, world, should_stop, layouts, precision, workers)
    finally:  # the claim on --out is the job's (the process's end drops it too): a later run in
        runlock.release()  # this process (tests, a notebook) must not keep another job waiting


def _run(cfg: RunConfig, world: BaseWorld, should_stop, layouts: list[Layout], precision: str,
         workers: int) -> dict | None:
    if cfg.out is None:  # one name for all ranks, chosen by rank 0
        cfg.out = world.comm.broadcast_object(time.strftime("runs/%Y%m%d-%H%M%S"))
    out = Path(cfg.out).expanduser()  # (as --data-dir: a config file's ~ is no shell's)
    # data and plan before anything is written: bad data or a batch the layout cannot split
    # leaves no run behind (a config.json would make the corrected run ask for --resume)
    data = load_for_run(cfg, world.comm, workers)
    plan = build_plan(cfg, layouts, world.size, data.num_classes)
    refuse_empty_epochs(plan, split_size(data.train), cfg, data.image_size)
    should_stop.arm()
    prepare_output(cfg, world.comm, out, default_groups(cfg, world.size), should_stop, data_view(data))
    reporter = Reporter(out, world_rank=world.rank, log_every=cfg.log_every, tensorboard=cfg.tensorboard)
    plan_data = DataPlan(data, world.comm.device, seed=cfg.seed, batch_size=cfg.batch_size, workers=workers)
    token = world.comm.broadcast_object(uuid.uuid4().hex[:12])  # rank 0's
    job = Run(cfg, plan, plan_data, data.num_classes, out, should_stop, reporter, precision, world.rank, token)
    results: dict = {"world_size": world.size, "precision": precision, "test_samples": split_size(data.test),
                     "threads": torch.get_num_threads(), "workers": workers,  # per rank, as resolved (the config
                     # keeps the flags, None where left to the machine)
                     "ranks": world.comm.allgather_object(place_of(world))}
    try:
        if plan.levels:
            results.update(run_levels(job, world))
            if cfg.only_group_mode:
                return None
        if plan.baseline is not None:
            results["random_T"] = run_baseline(job, world)
            results["baseline_batch_size"] = plan.baseline.batch_size
    finally:
        reporter.close()
    if world.rank != 0:
        return None
    report = build_report(cfg, world, results)
    write_report(out, report)
    return report


def place_of(world: BaseWorld) -> dict:
    """Where this rank runs, as the launcher says (checked by the multi-node rehearsal)."""
    launch = world.launch
    node = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID")  # torchrun's, Slurm's node rank
    return {"rank": launch.rank, "local_rank": launch.local_rank, "local_world_size": launch.local_world_size,
            "host": socket.gethostname(), "node": node if node is not None else launch.rank - launch.local_rank,
            "processor": processor_name(world.comm.device)}


# ---------------------------------------------------------------------------------------
def streams_of(job: Run, level: Level, nets: list[int]) -> list[Stream]:
    """``nets``' data; each takes the level's smallest pool per epoch, whoever it trains with."""
    every = pools(level, job.plan, split_size(job.data.data.train), job.cfg)
    take = min(len(pool) for pool in every)
    return [Stream(every[j], level.stream(j), take) for j in nets]


def run_levels(job: Run, world: BaseWorld) -> dict:
    cfg, levels = job.cfg, job.plan.levels
    first = levels[0]
    if cfg.only_group_mode:  # one sub-network on all ranks of this job (job-array mode)
        nets = [cfg.only_group]
        log(f"phase 1: sub-network {nets[0]} of {first.nets} ({first.spec.arch} width {first.spec.width:g}) "
            f"on {'all ' if world.size > 1 else ''}{world.size} rank{'s' if world.size > 1 else ''}", rank=world.rank)
        train_group(job, first, world.comm, nets, streams_of(job, first, nets))
        # (the run's flags: `--resume --out` alone was refused as a run of other settings)
        final = shlex.join(["dd-train", "--resume", "--out", str(job.out), "--config", str(job.out / "config.json")])
        log(f"sub-network {nets[0]} finished: once every task has, run `{final}` (the run's flags; flags given "
            "after it win, e.g. another --device) with all ranks to compose and fine-tune", rank=world.rank)
        return {}
    phase_sync = world.phase_sync()
    log(f"phase 1: {first.nets} sub-networks of {first.spec.arch} width {first.spec.width:g} on "
        f"{first.layout.describe()}: groups {first.layout.rank_lists}", rank=world.rank)
    if cfg.resume and world.rank == 0:  # (an array's final job, some of whose tasks did not finish)
        missing = [first.net_name(j) for j in range(first.nets)
                   if not ckpt.checkpoint_path(job.out, first.net_name(j), "final").exists()]
        if 0 < len(missing) < first.nets:
            log(f"phase 1: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no final checkpoint in "
                f"{job.out}: this job trains (or continues) {'it' if len(missing) == 1 else 'them'}")
    trained, seconds = train_level(job, world, first, phase_sync)
    digests = world.comm.allgather_object(checksum_state(fused_view(trained)))
    record = {"groups": first.layout.rank_lists, "layout": [layout_entry(first)],
              "timing": {"subnets": seconds, "compose": 0.0, "intermediate": 0.0}}
    intermediate = []
    for before, level in zip(levels, levels[1:]):
        start = time.perf_counter()
        composed, infos = gather_and_compose(job, world, before, level, trained)
        compose_seconds = time.perf_counter() - start
        record["timing"]["compose"] += compose_seconds
        if before.is_first:
            record["sub_nets"] = [net_report(i, before) for i in infos]
        else:
            intermediate.append({"level": before.index, "nets": [
                {"index": i["net"], "ranks": before.layout.ranks(before.layout.group_of_net(i["net"])),
                 "composed": public(i["initial"]), "finetuned": public({**i["test"], "seconds": i["seconds"]})}
                for i in infos]})
        record["layout"].append(layout_entry(level))
        if level.world_wide:
            record.update(finish(job, world, level, composed, compose_seconds, record["timing"]))
            checksums = world.comm.allgather_object(checksum(model_of(level, composed[0], torch.device("cpu"))))
            if len(set(checksums)) != 1:
                bad = [r for r, d in enumerate(checksums) if d != checksums[0]]
                raise RuntimeError(f"ranks {bad} hold different global weights after the broadcast")
            record["checksums"] = {"subnets": digests, "global": checksums[0]}
        else:
            log(f"level {level.index}: {level.nets} composed nets on {level.layout.describe()}", rank=world.rank)
            trained, seconds = train_level(job, world, level, phase_sync, start=composed)
            record["timing"]["intermediate"] += seconds
    record["intermediate"] = intermediate
    t = record["timing"]
    t["dd_total"] = t["subnets"] + t["compose"] + t["intermediate"] + t["finetune"]
    return record


def layout_entry(level: Level) -> dict:
    return {"level": level.index, "nets": level.nets, "groups": level.layout.groups,
            "ranks_per_group": level.layout.ranks_per_group, "nets_per_group": level.layout.nets_per_group,
            "batch_size": level.batch_size,  # per rank and net, as trained (dd-scaling's model reads it)
            "eval_every": level.eval_every}  # epochs between test scores (and after the last)


def fused_view(results: list[NetResult]) -> dict:
    """This rank's nets as one state (for its digest): replicas in a group must agree."""
    return {f"{r.net}.{k}": v for r in results for k, v in r.state.items()}


def net_report(info: dict, level: Level) -> dict:
    ranks = level.layout.ranks(level.layout.group_of_net(info["net"]))
    elsewhere = {"trained_on": info["trained_on"]} if info.get("trained_on") else {}  # by an array task
    return {"index": info["net"], "ranks": ranks, **elsewhere, **public(info["test"]), "seconds": info["seconds"]}


def train_level(job: Run, world: BaseWorld, level: Level, phase_sync: BaseComm,
                start: list[dict] | None = None) -> tuple[list[NetResult], float]:
    """This rank's group trains its nets of ``level``; the groups then agree on the outcome
    with a patient collective (they finish at different times). A group that fails raises
    the alarm at once, and the others stop at their next signal check, checkpointed, instead
    of training to the end of the level before they learn it. Returns this group's nets and
    the level's seconds (its slowest group's)."""
    group = world.layout_comm(level.layout, tag=level.phase)
    nets = level.layout.nets_of(level.layout.group_of_rank(world.rank))
    alarm = GroupAlarm(job.out / f"{GroupAlarm.PREFIX}{job.token}" if level.layout.groups > 1 else None)
    watched = dataclasses.replace(job, should_stop=lambda: job.should_stop() or alarm.raised())
    results, initial, initial_seconds = [], None, 0.0
    outcome, message = Outcome.OK, ""
    try:
        if start is not None:  # composed nets: score them as they start (the "transfer" rows)
            t0 = time.perf_counter()
            initial = evaluate_states(job, level, group, start)
            initial_seconds = time.perf_counter() - t0
        results = train_group(watched, level, group, nets, streams_of(job, level, nets), start=start,
                              initial=initial, initial_seconds=initial_seconds)
    except Exception as raised:  # noqa: BLE001 -- outcome_of re-raises what is not an outcome
        if not is_outcome(raised):
            # one rank's own trouble (an unreadable image, out of memory): it says so and ends
            # the job; the other groups stop at their next check, checkpointed, instead of at
            # the launcher's kill. Its group-mates then lose it: theirs is no news.
            if not peer_lost(raised) and not alarm.raised():
                alarm.raise_(str(raised) if isinstance(raised, UsageError) else
                             f"rank {world.rank}: {type(raised).__name__}: {raised}".splitlines()[0])
            raise
        # read here, not kept: a kept exception would hold this frame (and its process groups)
        # in a cycle past the groups' teardown, and gloo's threads abort the exit
        outcome, message = outcome_of(raised)
    if outcome in (Outcome.FAILED, Outcome.USAGE):
        alarm.raise_(message)
    elif outcome is Outcome.PREEMPTED and alarm.raised() and not job.should_stop():
        log(f"{level.group_name(nets)}: stopped, checkpointed: another group failed (its error ends the job)",
            rank=group.rank)
    try:
        verdicts = phase_sync.allgather_object((outcome, message, max((r.seconds for r in results), default=0.0)))
    except Exception as lost:  # noqa: BLE001 -- re-raised unless the alarm explains it
        if alarm.raised() and peer_lost(lost):  # the failed rank ended with its own line: say that, not gloo's
            raise PeerFailed(alarm.message()) from None
        raise
    raise_outcome(*deciding([(theirs, text) for theirs, text, _ in verdicts]))
    return results, max(s for _, _, s in verdicts)


@dataclasses.dataclass(frozen=True)
class GroupAlarm:
    """A file in --out (which every rank sees) that a failing group creates and the other
    groups look for at their signal checks: a stat every few steps, no collective, so the
    groups stay independent. Its name holds the run's token: a failed run's file, which a
    network file system may show for a while after it is removed, never stops another run.
    ``path`` None: a level of one group, nobody to tell."""

    path: Path | None
    PREFIX = ".a-group-failed-"  # + the run's token; earlier runs' are removed at the start

    def raise_(self, message: str) -> None:
        """Best effort: a rank that cannot write it costs only the early stop, never the
        verdict that every rank still waits for."""
        if self.path is not None:
            try:
                ckpt.atomic_write_bytes(self.path, message.encode())
            except OSError:
                pass

    def message(self) -> str:
        """What the failing group wrote ("" if it cannot be read)."""
        try:
            return self.path.read_text() if self.path is not None else ""
        except OSError:
            return ""

    def raised(self) -> bool:
        """A stat that fails (ESTALE, EIO on a sick network file system) is "not raised": the
        check is an early stop, not worth a rank that leaves its group mid-phase."""
        if self.path is None:
            return False
        try:
            self.path.stat()
        except OSError:  # FileNotFoundError included
            return False
        return True


def evaluate_states(job: Run, level: Level, comm: BaseComm, states: list[dict]) -> list[dict]:
    return [evaluate(model_of(level, state, comm.device), job.data.test(comm), comm, job.num_classes,
                     precision=job.precision)[0] for state in states]


def gather_and_compose(job: Run, world: BaseWorld, before: Level, level: Level,
                       trained: list[NetResult]) -> tuple[list[dict], list[dict]]:
    """Leaders of ``before``'s groups -> rank 0 (one flat buffer each), which composes
    ``level``'s nets and broadcasts them; every rank keeps its own group's. Returns those
    states and, on every rank, what each net of ``before`` reported (sorted by net)."""
    cfg = job.cfg
    layout = before.layout
    leaders = world.subset(layout.leaders, tag=f"{before.phase}-leaders")
    like = trained[0].state
    composed_all, infos = None, None
    if leaders is not None:
        flat = torch.cat([flatten_state(r.state) for r in trained])
        stacked = leaders.gather_flat(flat)  # [groups, k*|net|] on rank 0
        gathered = leaders.gather_object([{"net": r.net, "history": r.history, "test": r.test,
                                           "seconds": r.seconds, "initial": r.initial, "trained_on": r.trained_on}
                                          for r in trained])
        if world.rank == 0:
            size = flat.numel() // len(trained)
            states = [unflatten_state(row[m * size:(m + 1) * size], like)
                      for row in stacked for m in range(len(trained))]
            per = before.nets // level.nets
            composed_all = [compose(states[j * per:(j + 1) * per], before.spec, offdiagonal_std=cfg.offdiag_std,
                                    generator=torch.Generator().manual_seed(cfg.seed + j))
                            for j in range(level.nets)]
            name = "composed" if level.world_wide else f"{level.phase}-composed"
            ckpt.save(ckpt.checkpoint_path(job.out, name, ""),
                      {"model": composed_all[0] if level.world_wide else composed_all,
                       "spec": level.spec.__dict__, "config": cfg.to_dict()})
            infos = sorted((i for part in gathered for i in part), key=lambda i: i["net"])
            job.record([row for i in infos for row in i["history"]])
    infos = world.comm.slow.broadcast_object(infos)  # rank 0 wrote composed.pt meanwhile: --io-timeout
    # every rank receives all of ``level``'s nets from rank 0 in one message, keeps its group's
    shapes = net_shapes(level)
    size = sum(math.prod(shape) for shape, _ in shapes.values())
    if composed_all is not None:
        flat = torch.cat([flatten_state(state) for state in composed_all])
    else:
        flat = torch.empty(level.nets * size)
    flat = world.comm.broadcast_(flat.to(world.comm.device)).cpu()
    mine = level.layout.nets_of(level.layout.group_of_rank(world.rank))
    return [state_from(flat[j * size:(j + 1) * size], shapes) for j in mine], infos


def net_shapes(level: Level) -> dict[str, tuple[torch.Size, torch.dtype]]:
    from .models import build_model
    with torch.device("meta"):
        return {k: (v.shape, v.dtype) for k, v in build_model(level.spec).state_dict().items()}


def state_from(flat: torch.Tensor, shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> dict:
    """A state dict from its flat vector (``flat.flatten_state``'s order and conversions)."""
    state, offset = {}, 0
    for key, (shape, dtype) in shapes.items():
        n = math.prod(shape)
        state[key] = flat[offset:offset + n].view(shape).to(dtype).clone()
        offset += n
    return state


def finish(job: Run, world: BaseWorld, level: Level, composed: list[dict], compose_seconds: float,
           timing: dict) -> dict:
    """The last level: score the composed global net (``transfer``), fine-tune it on all ranks."""
    t0 = time.perf_counter()
    transfer = evaluate_states(job, level, world.comm, composed)[0]
    transfer_eval = time.perf_counter() - t0
    log(f"phase 2: composed {level.spec.arch} width {level.spec.width:g} in {compose_seconds:.2f}s; "
        f"transfer (before fine-tune) top-1 {transfer['top1']:.2f}%", rank=world.rank)
    tuned = train_group(job, level, world.comm, [0], streams_of(job, level, [0]), start=composed,
                        initial=[transfer], initial_seconds=transfer_eval)[0]
    timing.update(finetune=tuned.seconds, transfer_eval=transfer_eval)
    return {"transfer": public({**transfer, "seconds": timing["compose"]}),
            "transfer_T": public({**tuned.test, "seconds": tuned.seconds})}


def run_baseline(job: Run, world: BaseWorld) -> dict:
    """The paper's random_T: the global net from random init on all ranks."""
    level = job.plan.baseline
    result = train_group(job, level, world.comm, [0], streams_of(job, level, [0]))[0]
    return public({**result.test, "seconds": result.seconds})


# ---------------------------------------------------------------------------------------
DATA_FILE = "data.json"  # the classes and split sizes the run started with (datasets.data_view)


def prepare_output(cfg: RunConfig, world: BaseComm, out: Path, default_groups: int | None,
                   should_stop=lambda: False, data: tuple | None = None) -> None:
    """Check --out on rank 0 (one verdict for all ranks), then write config.json there.
    ``default_groups``: the G phase 1 takes without --groups on these ranks (None: no phase
    1), so that a resume may give or leave out --groups at that value. ``data``: the data this
    job loaded (``data_view``), which a job that continues the run must share with it: the
    flags cannot tell that a --data-dir's folders were renamed, added or filled since."""
    config_file, data_file = out / "config.json", out / DATA_FILE
    started_here = False  # (rank 0's) config.json is this run's own: removed if it cannot go on
    recorded_here = False  # (rank 0's) data.json is this job's record (a run of an older dd_mpi has none)
    recovered_from = None  # (rank 0's) the checkpoint whose settings stood for a missing config.json

    def check() -> str | None:
        nonlocal started_here, recovered_from, recorded_here
        if out.exists() and not out.is_dir():
            return f"--out {out} is a file, not a folder: choose a folder (a new one, or a run's)"
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            return f"--out {out} is not writable ({error.strerror}): choose a writable directory"
        if cfg.tensorboard:  # found after the first epoch otherwise, by every writer
            try:
                (out / "tensorboard").mkdir(exist_ok=True)
            except OSError as error:
                return (f"--tensorboard: {out / 'tensorboard'} cannot be a folder ({error.strerror}): move "
                        "what is there, or choose another --out")
        joins = cfg.resume or cfg.only_group_mode
        # a job that continues the run may follow one whose lock outlives it a while (a lost
        # node's, on NFS); the other ranks wait for this verdict up to --io-timeout
        busy = runlock.claim(out, cfg.only_group, wait_seconds=cfg.io_timeout / 2 if joins else 0,
                             should_stop=should_stop)
        if busy:
            return busy
        written, saved, source = cfg.to_dict(), None, "config.json"
        if config_file.exists():
            if not joins:
                return (f"--out {out} holds a run already (config.json): pass --resume to continue it, or "
                        "choose a new --out")
            saved = read_saved_config(config_file)
            if saved is None:
                return f"--out {out}: config.json is unreadable: remove it or choose a new --out"
        elif (out / ckpt.CHECKPOINT_DIR).exists():
            if not joins:
                return f"--out {out} holds a run's checkpoints already: pass --resume or choose a new --out"
            saved, source = ckpt.settings_in_checkpoints(out) or (None, None)
            recovered_from = source
        if saved is not None:
            # a checkpoint holds the --groups of the job that wrote it (a resume may have spelled
            # out the default G): the layout is checked at each group's -last checkpoint
            recovered = source != "config.json"
            differences = cfg.incompatible_with(saved, default_groups, layout_free=recovered)
            if differences:
                said = f", as {source} holds them (config.json is gone)" if recovered else ""
                return (f"{cfg.continuing_flag}: the run in {out} was made with other settings "
                        f"({'; '.join(differences)}){said}: use the same flags or a new --out")
            if not recovered:
                written = {**written, "groups": saved.get("groups")}  # (equal in effect: the next resume too)
        if data is not None and joins and data_file.exists():  # (a run of an older dd_mpi has none)
            try:
                started = json.loads(data_file.read_text())
                change = data_difference(data, (started["classes"], started["train"], started["test"]),
                                         "the run's")
            except (OSError, ValueError, KeyError, TypeError):
                return (f"--out {out}: {DATA_FILE} is unreadable: remove it (nothing then checks the data) or "
                        "choose a new --out")
            if change:
                return (f"{cfg.continuing_flag}: --data-dir {cfg.data_dir} does not hold the data the run in {out} "
                        f"started with ({change}): continue it with that data, or start a new run (a new --out)")
        for stale in out.glob(f"{GroupAlarm.PREFIX}*"):  # failed runs' (this one's has no token yet)
            stale.unlink(missing_ok=True)
        started_here, recorded_here = not config_file.exists(), not data_file.exists()
        ckpt.atomic_write_bytes(config_file, json.dumps(written, indent=2).encode())
        if data is not None:
            ckpt.atomic_write_bytes(data_file, json.dumps(dict(zip(("classes", "train", "test"), data))).encode())
        return None

    verdict = world.verdict_of_root(check)
    if verdict == runlock.STOPPED:  # every rank, alike: exit 75, and the job is requeued
        raise Preempted(verdict)
    if verdict:
        raise UsageError(verdict)
    # Every rank reads checkpoints from --out: a node-local directory would leave ranks on
    # other nodes deciding differently (and waiting in different collectives).
    blind = [r for r, sees in enumerate(world.slow.allgather_object(_sees(config_file))) if not sees]
    if blind:
        if started_here:  # no run was started here; a resumed run's config.json stays: it is
            config_file.unlink(missing_ok=True)  # what the next --resume is checked against
        if recorded_here:  # (nor was any data trained on here)
            data_file.unlink(missing_ok=True)
        raise UsageError(f"--out {out} is not visible from ranks {blind} (a node-local directory?): "
                         "put --out on a file system that every rank shares")
    if recovered_from is not None:
        log(f"--resume: {out} had no config.json: the run's settings, read from {recovered_from}, are this "
            "job's; config.json is written again")
    elif cfg.resume and started_here and not cfg.only_group_mode:  # a requeue before the first write, or a typo
        log(f"--resume: {out} held no run (no config.json): a new one starts there")


def _sees(path: Path, patience: float = 5.0) -> bool:
    """True once ``path`` exists here; a shared file system may show a new file late."""
    deadline = time.monotonic() + patience
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
