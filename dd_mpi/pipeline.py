"""The method, top-down: phase 1 (groups train sub-nets), phase 2 (gather, compose,
broadcast), phase 3 (all ranks fine-tune), and the conventional baseline.

Every phase writes atomic checkpoints and resumes from them: a finished phase is loaded,
an unfinished one continues from its last epoch. Rank 0 owns the run's files; a group's
leader owns its sub-network's checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .comm import Comm, World, checksum, checksum_state, flatten_state, group_layout, group_of, log, unflatten_state
from .config import RunConfig
from .data import DataPlan, load_data, split_size, subset_for_group, train_steps
from .decompose import compose, composed_spec, subnet_spec
from .errors import UsageError
from .models import ModelSpec, build_model
from .report import build_report, write_metrics, write_report
from .train import NonFiniteLoss, Recipe, evaluate, make_optimizer, make_scheduler, train_epoch


class Preempted(Exception):
    """A stop signal arrived: the last epoch's checkpoint is on disk; exit for requeue."""


class PhaseFailed(Exception):
    """A phase cannot go on (e.g. NaN loss): the message says which phase and epoch."""


@dataclass
class PhaseResult:
    name: str
    state: dict  # final model state
    history: list[dict] = field(default_factory=list)  # one row per epoch
    test: dict = field(default_factory=dict)  # final evaluation
    seconds: float = 0.0  # training + evaluation time of this phase, over all its runs


@dataclass
class Context:
    """What every phase needs: the config, the world, the data, the output directory."""

    cfg: RunConfig
    world: World
    plan: DataPlan
    num_classes: int
    global_spec: ModelSpec
    out: Path
    should_stop: object  # () -> bool
    metrics: list[dict] = field(default_factory=list)  # rank 0's rows of metrics.jsonl

    @property
    def bf16(self) -> bool:
        return self.cfg.bf16(self.world.comm.device.type)

    def record(self, rows: list[dict]) -> None:
        if self.world.rank == 0 and not self.cfg.only_group_mode:
            self.metrics.extend(rows)
            write_metrics(self.out, self.metrics)


# ---------------------------------------------------------------------------------------
def run(cfg: RunConfig, world: World, should_stop) -> dict | None:
    """The whole job. Returns the report on rank 0 (None elsewhere or in --only-group mode)."""
    if cfg.out is None:  # one name for all ranks, chosen by rank 0
        cfg.out = world.comm.broadcast_object(time.strftime("runs/%Y%m%d-%H%M%S"))
    out = Path(cfg.out)
    data = load_data(cfg, world.comm)  # before anything is written: bad data leaves no run behind
    prepare_output(cfg, world.comm, out)
    spec = cfg.model_spec(data.num_classes)
    ctx = Context(cfg, world, DataPlan(data, cfg, world.comm.device), data.num_classes, spec, out, should_stop)
    results: dict = {"world_size": world.size}
    if "dd" in cfg.strategies:
        results.update(run_domain_decomposition(ctx))
        if cfg.only_group_mode:
            return None
    if "baseline" in cfg.strategies:
        results["random_T"] = run_baseline(ctx)
    if world.rank != 0:
        return None
    report = build_report(cfg, world, results)
    write_report(out, report)
    return report


def run_domain_decomposition(ctx: Context) -> dict:
    cfg, world = ctx.cfg, ctx.world
    sub_spec = subnet_spec(ctx.global_spec, cfg.subnets)
    if cfg.only_group_mode:  # one sub-network on all ranks of this job (job-array mode)
        layout, index = [list(range(world.size))], cfg.only_group
        group = world.comm
        group.index = index
    else:
        layout = group_layout(world.size, cfg.subnets)
        index = group_of(world.rank, layout)
        group = world.split(layout, index)
        leaders = world.subset([ranks[0] for ranks in layout])
        phase_sync = world.phase_sync()

    # Phase 1: each group trains its own sub-network, talking only inside the group.
    log(f"phase 1: {cfg.subnets} sub-networks of {sub_spec.arch} width {sub_spec.width:g} on "
        f"groups {layout}", rank=world.rank)
    status, sub = "ok", None
    try:
        sub = train_subnetwork(ctx, group, sub_spec, index)
    except Preempted:
        status = "preempted"
    except PhaseFailed as error:
        status = f"failed: {error}"
    except UsageError as error:  # e.g. this group's checkpoint is corrupt: stop all groups alike
        if not error.everywhere:  # one rank's own trouble (an unreadable image): it must say so
            raise
        status = f"usage: {error}"
    if cfg.only_group_mode:
        _raise_for(status)
        log(f"sub-network {index} finished: run `dd-train --resume --out {ctx.out}` with all ranks "
            "to compose and fine-tune", rank=world.rank)
        return {}
    # The groups finish at different times: agree on the outcome with a patient collective.
    _raise_for(next((s for s in phase_sync.allgather_object(status) if s != "ok"), "ok"))

    # Phase 2: leaders send sub-nets to rank 0, which composes and broadcasts the global net.
    start = time.perf_counter()
    composed, sub_reports, checksums = gather_and_compose(ctx, sub, sub_spec, leaders, layout)
    compose_seconds = time.perf_counter() - start
    start = time.perf_counter()
    transfer = evaluate(composed, ctx.plan.test(world.comm), world.comm, ctx.num_classes, ctx.bf16)
    transfer_eval_seconds = time.perf_counter() - start
    transfer["seconds"] = compose_seconds
    log(f"phase 2: composed {composed_spec(sub_spec, cfg.subnets).arch} width {cfg.width:g} in "
        f"{compose_seconds:.2f}s; transfer (before fine-tune) top-1 {transfer['top1']:.2f}%", rank=world.rank)

    # Phase 3: every rank fine-tunes the composed net with world-wide data parallelism.
    recipe = _recipe(cfg, "finetune", cfg.finetune_epochs, cfg.finetune_warmup_epochs)
    finetuned = train_phase(ctx, "finetune", composed, world.comm, recipe, stream=200,
                            pool=torch.arange(split_size(ctx.plan.data.train)), group=None,
                            initial_test=transfer, initial_seconds=transfer_eval_seconds)
    subnets_seconds = max(r["seconds"] for r in sub_reports)
    return {
        "sub_nets": sub_reports, "transfer": _public(transfer),
        "transfer_T": _public({**finetuned.test, "seconds": finetuned.seconds}),
        "groups": layout, "checksums": checksums,
        # the composed net's evaluation opens phase 3: inside "finetune", also given alone
        "timing": {"subnets": subnets_seconds, "compose": compose_seconds, "finetune": finetuned.seconds,
                   "transfer_eval": transfer_eval_seconds,
                   "dd_total": subnets_seconds + compose_seconds + finetuned.seconds},
    }


def _raise_for(status: str) -> None:
    if status == "preempted":
        raise Preempted()
    if status.startswith("failed: "):
        raise PhaseFailed(status[len("failed: "):])
    if status.startswith("usage: "):
        raise UsageError(status[len("usage: "):])


def _public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k in ("top1", "top5", "loss", "seconds")}


def _recipe(cfg: RunConfig, phase: str, epochs: int, warmup: float) -> Recipe:
    return Recipe(cfg.phase_lr(phase), epochs, warmup, cfg.schedule, cfg.momentum,
                  cfg.weight_decay, cfg.label_smoothing)


def _seeded_model(spec: ModelSpec, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(spec).to(device, memory_format=torch.channels_last)


def train_subnetwork(ctx: Context, group: Comm, sub_spec: ModelSpec, index: int) -> PhaseResult:
    cfg = ctx.cfg
    model = _seeded_model(sub_spec, cfg.seed * 1000 + index + 1, group.device)  # its own seed
    pool = subset_for_group(split_size(ctx.plan.data.train), subnet_data=cfg.subnet_data,
                            group=index, groups=cfg.subnets, seed=cfg.seed)
    recipe = _recipe(cfg, "subnet", cfg.subnet_epochs, cfg.warmup_epochs)
    return train_phase(ctx, f"subnet{index}", model, group, recipe, stream=100 + index, pool=pool,
                       group=index)


def run_baseline(ctx: Context) -> dict:
    """The paper's random_T: the global net from random init on all ranks."""
    cfg, world = ctx.cfg, ctx.world
    model = _seeded_model(ctx.global_spec, cfg.seed * 1000 + 999, world.comm.device)
    recipe = _recipe(cfg, "baseline", cfg.baseline_epochs, cfg.warmup_epochs)
    result = train_phase(ctx, "baseline", model, world.comm, recipe, stream=300,
                         pool=torch.arange(split_size(ctx.plan.data.train)), group=None)
    return _public({**result.test, "seconds": result.seconds})


# ---------------------------------------------------------------------------------------
def train_phase(ctx: Context, name: str, model: nn.Module, comm: Comm, recipe: Recipe, *,
                stream: int, pool: torch.Tensor, group: int | None,
                initial_test: dict | None = None, initial_seconds: float = 0.0) -> PhaseResult:
    """Train ``model`` on ``comm`` for ``recipe.epochs``, resuming from this phase's checkpoints.

    ``initial_test``/``initial_seconds``: an evaluation of the starting point already made
    (the composed net's), whose time counts as this phase's."""
    cfg = ctx.cfg
    final = ckpt.load(ckpt.checkpoint_path(ctx.out, name, "final")) if cfg.resume else None
    if final is not None:
        model.load_state_dict(final["model"])
        log(f"{name}: finished earlier, loaded {ckpt.checkpoint_path(ctx.out, name, 'final')}",
            rank=comm.rank)
        result = PhaseResult(name, final["model"], final["history"], final["test"], final["seconds"])
        if group is None:
            ctx.record(result.history)
        return result

    global_batch = cfg.batch_size * comm.size
    optimizer = make_optimizer(model, recipe, global_batch)
    steps = train_steps(len(pool), comm.size, cfg.batch_size)
    scheduler = make_scheduler(optimizer, recipe, steps)
    history, best, seconds, start_epoch = [], -1.0, initial_seconds, 0
    test = dict(initial_test or {})
    last = ckpt.load(ckpt.checkpoint_path(ctx.out, name, "last")) if cfg.resume else None
    if last is not None:
        if last.get("ranks", comm.size) != comm.size:  # LR scaling, steps and data split would change
            raise UsageError(f"--resume: {name} was trained on {last['ranks']} ranks and would resume on "
                             f"{comm.size}: relaunch with the same number of ranks, or delete "
                             f"{ckpt.checkpoint_path(ctx.out, name, 'last')} to retrain this phase")
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        history, best, seconds, start_epoch = last["history"], last["best"], last["seconds"], last["epoch"]
        test = last["test"]
        ckpt.set_rng_state(last["rng"])
        log(f"{name}: resuming after epoch {start_epoch}", rank=comm.rank)
        if group is None:
            ctx.record(history)
    trained = comm.data_parallel(model)
    if cfg.compile:
        trained = torch.compile(trained)
    optimizer = comm.wrap_optimizer(optimizer, model)

    for epoch in range(start_epoch, recipe.epochs):
        batches = ctx.plan.train(comm, pool, stream=stream, epoch=epoch)
        bar = _progress_bar(ctx.world.rank, f"{name} {epoch + 1}/{recipe.epochs}", len(batches))
        try:
            stats = train_epoch(trained, batches, optimizer, scheduler, comm,
                                label_smoothing=recipe.label_smoothing, should_stop=ctx.should_stop,
                                check_every=cfg.signal_check_steps, bf16=ctx.bf16, progress=bar)
        except NonFiniteLoss:
            kept = (f"the last good checkpoint, {ckpt.checkpoint_path(ctx.out, name, 'last')} (epoch "
                    f"{epoch}), is kept" if epoch else f"{name} has no checkpoint yet")
            flag = "--subnet-lr" if group is not None else f"--{name}-lr"
            raise PhaseFailed(f"{name} epoch {epoch + 1}: the loss or the weights became NaN/inf; "
                              f"{kept}; lower {flag}") from None
        finally:
            if bar is not None:
                bar.close()
        if stats.stopped:
            log(f"{name}: stop requested during epoch {epoch + 1}; resume from epoch {epoch}", rank=comm.rank)
            raise Preempted()
        comm.average_buffers_(model)
        eval_seconds, evaluated = 0.0, (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == recipe.epochs
        if evaluated:
            t0 = time.perf_counter()
            test = evaluate(model, ctx.plan.test(comm), comm, ctx.num_classes, ctx.bf16)
            eval_seconds = time.perf_counter() - t0
        seconds += stats.seconds + eval_seconds
        scored = test if evaluated else {}  # an epoch not evaluated has no test score of its own
        row = {"phase": "subnet" if group is not None else name, "group": group, "epoch": epoch + 1,
               "loss": stats.loss, "top1": stats.top1, "test_top1": scored.get("top1"),
               "test_top5": scored.get("top5"), "images_per_s": stats.images_per_s,
               "seconds": stats.seconds + eval_seconds, "elapsed": seconds,
               "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        if group is None:
            ctx.record([row])
        improved = scored.get("top1", -1.0) > best
        best = max(best, scored.get("top1", -1.0))
        if comm.is_leader:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                     "best": best, "seconds": seconds, "test": test, "rng": ckpt.rng_state(),
                     "ranks": comm.size, "config": cfg.to_dict(), "phase": name}
            ckpt.save(ckpt.checkpoint_path(ctx.out, name, "last"), state)
            if improved:
                ckpt.save(ckpt.checkpoint_path(ctx.out, name, "best"), state)
            _progress_line(name, recipe.epochs, row, scored)
        if stats.stop_requested:  # the epoch was complete: it is kept, then we stop
            log(f"{name}: stop requested; epoch {epoch + 1} is checkpointed", rank=comm.rank)
            raise Preempted()
    if not test:
        test = evaluate(model, ctx.plan.test(comm), comm, ctx.num_classes, ctx.bf16)
    if comm.is_leader:
        ckpt.save(ckpt.checkpoint_path(ctx.out, name, "final"),
                  {"model": model.state_dict(), "history": history, "test": test, "seconds": seconds,
                   "config": cfg.to_dict(), "phase": name})
    comm.barrier()  # the final checkpoint exists before anyone moves on
    return PhaseResult(name, model.state_dict(), history, test, seconds)


def _progress_bar(world_rank: int, label: str, steps: int):
    """A tqdm bar over the epoch's steps, on rank 0 and only on a terminal."""
    if world_rank != 0 or not sys.stdout.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=steps, desc=label, leave=False, dynamic_ncols=True)


def _progress_line(name: str, epochs: int, row: dict, test: dict) -> None:
    test_text = f" test {test['top1']:.2f}%" if "top1" in test else ""
    print(f"[{name}] epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} train {row['top1']:.2f}%"
          f"{test_text} {row['images_per_s']:.0f} img/s {row['seconds']:.1f}s", flush=True)


# ---------------------------------------------------------------------------------------
def gather_and_compose(ctx: Context, sub: PhaseResult, sub_spec: ModelSpec, leaders: Comm | None,
                       layout: list[list[int]]) -> tuple[nn.Module, list[dict], dict]:
    """Phase 2: group leaders -> rank 0 (flat buffers), compose, broadcast, verify checksums."""
    cfg, world = ctx.cfg, ctx.world
    device = world.comm.device
    global_spec = composed_spec(sub_spec, cfg.subnets)
    composed = build_model(global_spec).to(device, memory_format=torch.channels_last)
    sub_reports = None
    if leaders is not None:
        flat = flatten_state(sub.state)
        stacked = leaders.gather_flat(flat)  # [N, |S|] on the root
        infos = leaders.gather_object({"index": group_of(world.rank, layout), "history": sub.history,
                                       "test": sub.test, "seconds": sub.seconds})
        if world.rank == 0:
            states = [unflatten_state(stacked[k], sub.state) for k in range(cfg.subnets)]
            composed.load_state_dict(compose(states, sub_spec, offdiagonal_std=cfg.offdiag_std,
                                             generator=torch.Generator().manual_seed(cfg.seed)))
            ckpt.save(ckpt.checkpoint_path(ctx.out, "composed", ""),
                      {"model": composed.state_dict(), "spec": global_spec.__dict__, "config": cfg.to_dict()})
            infos = sorted(infos, key=lambda i: i["index"])
            sub_reports = [{"index": i["index"], "ranks": layout[i["index"]], **_public(i["test"]),
                            "seconds": i["seconds"]} for i in infos]
            ctx.record([row for i in infos for row in i["history"]])
    world.comm.broadcast_model_(composed)
    sub_reports = world.comm.broadcast_object(sub_reports)
    # Every rank's sub-net and global-net digests: replicas of a group must agree after
    # phase 1, and every rank must hold rank 0's global net before phase 3.
    digests = world.comm.allgather_object((checksum_state(sub.state), checksum(composed)))
    global_digests = [d[1] for d in digests]
    if len(set(global_digests)) != 1:
        bad = [r for r, d in enumerate(global_digests) if d != global_digests[0]]
        raise RuntimeError(f"ranks {bad} hold different global weights after the broadcast")
    checksums = {"subnets": [d[0] for d in digests], "global": global_digests[0]}
    return composed, sub_reports, checksums


# ---------------------------------------------------------------------------------------
def prepare_output(cfg: RunConfig, world: Comm, out: Path) -> None:
    """Check --out on rank 0 (one verdict for all ranks), then write config.json there."""

    def check() -> str | None:
        config_file = out / "config.json"
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            return f"--out {out} is not writable ({error.strerror}): choose a writable directory"
        joins = cfg.resume or cfg.only_group_mode
        if config_file.exists():
            if not joins:
                return (f"--out {out} holds another run's files (config.json): pass --resume to "
                        "continue it, or choose a new --out")
            try:
                saved = json.loads(config_file.read_text())
            except (OSError, ValueError):
                return f"--out {out}: config.json is unreadable: remove it or choose a new --out"
            differences = cfg.incompatible_with(saved)
            if differences:
                return (f"--resume: the run in {out} was made with other settings "
                        f"({'; '.join(differences)}): use the same flags or a new --out")
        elif (out / ckpt.CHECKPOINT_DIR).exists() and not joins:
            return (f"--out {out} holds another run's checkpoints: pass --resume or choose a new --out")
        ckpt.atomic_write_bytes(config_file, json.dumps(cfg.to_dict(), indent=2).encode())
        return None

    verdict = world.verdict_of_root(check)
    if verdict:
        raise UsageError(verdict)
    # Every rank reads checkpoints from --out: a node-local directory would leave ranks on
    # other nodes deciding differently (and waiting in different collectives).
    blind = [r for r, sees in enumerate(world.allgather_object(_sees(out / "config.json"))) if not sees]
    if blind:
        if world.rank == 0:
            (out / "config.json").unlink(missing_ok=True)  # no run was started here
        raise UsageError(f"--out {out} is not visible from ranks {blind} (a node-local directory?): "
                         "put --out on a file system that every rank shares")


def _sees(path: Path, patience: float = 5.0) -> bool:
    """True once ``path`` exists here; a shared file system may show a new file late."""
    deadline = time.monotonic() + patience
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
