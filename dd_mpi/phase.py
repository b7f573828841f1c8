"""One group trains its nets of one level: the epoch loop, with its checkpoints and resume.

A group's nets (one, or k fused into one grouped-convolution model) train on the group's
comm for the level's epochs. Every epoch ends with one evaluation (when due), one metrics
row per net and, on the group's leader, an atomic ``last`` checkpoint (``best`` when the
mean test top-1 improved); a stop signal checkpoints at the step it reached. When all epochs
are done each net gets its ``final`` checkpoint, whose presence marks it finished: a resumed
run loads it instead of training again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .checkpoint import PhaseState
from .config import RunConfig
from .data import DataPlan, Stream, epoch_samples, train_steps
from .decompose import fuse_states, unfuse_state
from .errors import PhaseFailed, Preempted, UsageError
from .models import build_model
from .plan import Level, Plan
from .progress import Reporter, log, say
from .report import metrics_row, write_metrics
from .train import EpochProgress, NonFiniteLoss, evaluate, make_optimizer, make_scheduler, train_epoch


@dataclass
class Run:
    """What every level needs: the config, the plan, the data, the outputs, the signal flag."""

    cfg: RunConfig
    plan: Plan
    data: DataPlan
    num_classes: int
    out: Path
    should_stop: object  # () -> bool
    reporter: Reporter
    precision: str  # fp32 | bf16 | fp16 (rendezvous.pick_precision)
    world_rank: int
    token: str  # this run's own id, the same on every rank: names files that must not outlive it
    metrics: list[dict] = field(default_factory=list)  # rank 0's rows of metrics.jsonl

    def record(self, rows: list[dict]) -> None:
        if self.world_rank == 0 and not self.cfg.only_group_mode:
            self.metrics.extend(rows)
            write_metrics(self.out, self.metrics)


@dataclass
class NetResult:
    """One net's training at one level, as its group ends it."""

    net: int
    state: dict  # final weights
    history: list[dict]  # one metrics row per epoch
    test: dict  # final evaluation
    seconds: float  # training and evaluation, over all its runs
    initial: dict = field(default_factory=dict)  # the evaluation it started from (a composed net)
    trained_on: dict = field(default_factory=dict)  # {"ranks", "step_batch"} of a final loaded from a group
    # of another size (an array task's): the report's layout is this job's


GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def compile_mode(requested: str, ranks: int, device_type: str = "cuda") -> tuple[str, str | None]:
    """torch.compile's mode for a phase whose group has ``ranks`` ranks on ``device_type``, and
    why it is not the one requested (None: it is). CUDA graphs take a narrow net's kernel
    launches away (~3x per step on an H200, BENCHMARKS.md section 6), but with gradient hooks
    firing between captured graphs (DDP, Horovod) torch's CUDA graphs are not reliable
    (pytorch/pytorch#140395, #128218): a group of several ranks keeps the rest of the mode
    without graphs, and so does the CPU, which has none to capture."""
    if requested not in GRAPH_MODES or (ranks == 1 and device_type == "cuda"):
        return requested, None
    why = (f"trained on {ranks} ranks" if device_type == "cuda" else "on the CPU, which has no CUDA graphs")
    rest = "max-autotune-no-cudagraphs" if requested == "max-autotune" else "default"
    return rest, (f"{why}, so compiled in mode {rest} (--compile-mode {requested} captures CUDA graphs only on "
                  "a GPU, where a group is one rank)")


def other_layouts_progress(level: Level, out: Path, nets: list[int], own: Path) -> list[Path]:
    """``-last`` checkpoints of this level whose group shares nets with ``nets`` but is
    another set: progress that a changed layout (ranks, --groups) leaves behind."""
    found = []
    for path in sorted(own.parent.glob("*-last.pt")):
        theirs = level.nets_named(path.name[:-len("-last.pt")])
        if path != own and theirs and set(theirs) & set(nets):
            found.append(path)
    return found


def finished_together(level: Level, nets: list[int], unfinished: list[int], own: Path) -> list[int] | None:
    """The set of ``nets`` whose fused ``-last`` checkpoint (beside ``own``) is at the level's
    last epoch and holds more than the ``unfinished`` ones: that set finished, and a kill
    between its nets' final checkpoints left only some of them. Resumed from it, the set
    writes them all again, the same (not the rest retrained alone). It is the group, or what
    remained of it when its other nets had finished elsewhere (--only-group tasks)."""
    for path in sorted(own.parent.glob("*-last.pt")):
        theirs = level.nets_named(path.name[:-len("-last.pt")])
        if theirs and set(unfinished) < set(theirs) <= set(nets):
            saved = ckpt.load(path)
            if isinstance(saved, dict) and saved.get("epoch") == level.recipe.epochs:
                return list(theirs)
    return None


def seeded_states(level: Level, nets: list[int], seed: int) -> list[dict]:
    """Fresh nets, each from its own seed: sub-net j from seed*1000+j+1, the baseline's
    global net from seed*1000+999 (the same in every layout)."""
    states = []
    for j in nets:
        torch.manual_seed(seed * 1000 + (999 if level.phase == "baseline" else j + 1))
        states.append(build_model(level.spec).state_dict())
    return states


def train_group(run: Run, level: Level, comm, nets: list[int], streams: list[Stream], *,
                start: list[dict] | None = None, initial: list[dict] | None = None,
                initial_seconds: float = 0.0) -> list[NetResult]:
    """Train ``nets`` of ``level`` on ``comm`` (fused when several), resuming from their
    checkpoints. ``start``: the nets' weights (composed nets), else seeded fresh ones;
    ``initial``: their evaluation already made, whose ``initial_seconds`` count as theirs."""
    cfg, out = run.cfg, run.out
    finished = {}
    if cfg.resume:
        with torch.device("meta"):
            shapes = build_model(level.spec).state_dict()
        for j in nets:
            path = ckpt.checkpoint_path(out, level.net_name(j), "final")
            finished[j] = ckpt.fitting(ckpt.load(path), path, ckpt.FINAL_KEYS, shapes, cfg.checkpoint_differences)
    done = [j for j in nets if finished.get(j) is not None]
    if done and len(done) < len(nets):
        together = finished_together(level, nets, [j for j in nets if j not in done],
                                     ckpt.checkpoint_path(out, level.group_name(nets), "last"))
        if together:  # stopped between their final checkpoints: its -last holds them all
            done = [j for j in nets if j not in together]
    elsewhere = {}
    for j in done:
        trained_on = finished[j].get("ranks", comm.size)  # (an older dd_mpi's final has none)
        if trained_on != comm.size:
            elsewhere[j] = {"ranks": trained_on, "step_batch": finished[j].get("step_batch")}
        other = (f" (trained on {trained_on} rank{'s' if trained_on > 1 else ''} at a batch of "
                 f"{finished[j].get('step_batch')} a step: its group here has {comm.size})") \
            if j in elsewhere else ""
        log(f"{level.net_name(j)}: finished earlier, loaded {ckpt.checkpoint_path(out, level.net_name(j), 'final')}"
            f"{other}", rank=comm.rank)
    todo = [j for j in nets if j not in done]
    results = {j: NetResult(j, finished[j]["model"], finished[j]["history"], finished[j]["test"],
                            finished[j]["seconds"], (initial or [{}] * len(nets))[nets.index(j)],
                            elsewhere.get(j, {})) for j in done}
    if level.world_wide and done:
        run.record(results[nets[0]].history)
    if done and comm.is_leader:  # their curves, had this run no --tensorboard when they trained
        _curves(run, level, level.group_name(nets), [row for j in done for row in results[j].history],
                rewrite=True, last=True)
    if todo:
        chosen = [nets.index(j) for j in todo]
        states = [start[i] for i in chosen] if start is not None else seeded_states(level, todo, cfg.seed)
        firsts = [initial[i] for i in chosen] if initial is not None else None
        for result in _train(run, level, comm, todo, [streams[i] for i in chosen], states, firsts, initial_seconds):
            results[result.net] = result
    return [results[j] for j in nets]


def _curves(run: Run, level: Level, name: str, rows: list[dict], *, names: list[str] = (),
            rewrite: bool = False, last: bool = False) -> None:
    """The TensorBoard points of ``rows`` (metrics rows of one or more nets), each net on its
    own curves (``names``: these nets' too, drawn empty when no row is theirs);
    ``rewrite``, ``last``: as ``Reporter.curves``."""
    nets: dict[str, list] = {net: [] for net in names}
    for row in rows:
        net = level.net_name(row["group"]) if row["group"] is not None else name
        nets.setdefault(net, []).append((row["epoch"], {  # (an older dd_mpi's rows may lack some)
            "train/loss": row.get("loss"), "train/top1": row.get("top1"), "test/top1": row.get("test_top1"),
            "test/top5": row.get("test_top5"), "lr": row.get("lr"), "images_per_s": row.get("images_per_s")}))
    for net, points in nets.items():
        run.reporter.curves(level.phase, net, points, rewrite=rewrite, last=last)


def _train(run: Run, level: Level, comm, nets: list[int], streams: list[Stream], states: list[dict],
           initial: list[dict] | None, initial_seconds: float) -> list[NetResult]:
    cfg, k, recipe = run.cfg, len(nets), level.recipe
    name = level.group_name(nets)
    model = build_model(level.spec.fused(k)).to(comm.device, memory_format=torch.channels_last)
    model.load_state_dict(fuse_states(states) if k > 1 else states[0])
    samples = epoch_samples(streams)
    per_rank = samples // comm.size
    steps = train_steps(samples, comm.size, level.batch_size)
    # a batch larger than a rank's share of the data takes that share: the LR follows the batch
    # each step really takes (scaled for the nominal one, a tiny set's single step diverged)
    taken = max(1, min(level.batch_size, per_rank))
    if taken < level.batch_size and comm.is_leader:
        log(f"{name}: a batch of {level.batch_size} per rank is more than the {per_rank} training samples a rank "
            f"has an epoch: each step takes {taken}, and the LR is scaled for that")
    optimizer = make_optimizer(model, recipe, taken * comm.size)
    scheduler = make_scheduler(optimizer, recipe, steps)
    scaler = torch.amp.GradScaler("cuda") if run.precision == "fp16" else None
    state = PhaseState(model={}, optimizer={}, scheduler={}, scaler=None, epoch=0, progress=None, history=[],
                       best=-1.0, seconds=initial_seconds, tests=list(initial) if initial else [{}] * k,
                       rng={}, ranks=comm.size, config=cfg.to_dict(), phase=name, nets=nets,
                       precision=run.precision)
    last_path = ckpt.checkpoint_path(run.out, name, "last")
    saved = ckpt.load(last_path) if cfg.resume else None
    if cfg.resume and saved is None and comm.is_leader:
        for other in other_layouts_progress(level, run.out, nets, last_path):
            log(f"{name}: starts afresh: {other} holds progress of some of its nets trained as another set, "
                "which it cannot continue: made in another layout (other ranks or --groups: relaunch with "
                "that one to use it), or with nets that have finished since (--only-group tasks)",
                rank=comm.rank)
    if saved is not None:
        held = saved.get("nets") if isinstance(saved, dict) else None
        if held is not None and list(held) != list(nets):  # named by an older dd_mpi
            raise UsageError(f"{cfg.continuing_flag}: {last_path} holds nets {list(held)}, not {nets}: delete it "
                             "to retrain them")
        ckpt.fitting(saved, last_path, ckpt.LAST_KEYS, model.state_dict(), cfg.checkpoint_differences)
        state = PhaseState.from_dict(saved)
        if state.ranks != comm.size:  # LR scaling, steps and data split would change
            others = " and the other groups' -last checkpoints beside it" if level.layout.groups > 1 else ""
            raise UsageError(f"{cfg.continuing_flag}: {name} was trained on {state.ranks} rank"
                             f"{'s' if state.ranks > 1 else ''} and would resume on {comm.size}: relaunch with the "
                             f"same number of ranks, or delete {last_path}{others} to retrain this phase")
        model.load_state_dict(state.model)
        if state.progress and state.rank_buffers:  # this rank's own BN statistics, mid-epoch
            model.load_state_dict(state.rank_buffers[comm.rank], strict=False)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        ckpt.set_rng_state(state.rng)
        within = f", at step {state.progress['step']} of epoch {state.epoch + 1}" if state.progress else ""
        log(f"{name}: resuming after epoch {state.epoch}{within}", rank=comm.rank)
        if state.precision not in (None, run.precision):  # --precision auto picks per GPU model
            log(f"{name}: note: it trained in {state.precision} so far and goes on in {run.precision}; give "
                f"--precision {state.precision} to keep it", rank=comm.rank)
        state.precision = run.precision
        if level.world_wide:
            run.record(state.history)
    if comm.is_leader:  # the curves so far: from the checkpoint, else none (an earlier start's are hidden)
        _curves(run, level, name, state.history, rewrite=True,
                names=[name] if level.world_wide else [level.net_name(j) for j in nets])
    trained = comm.data_parallel(model)
    if cfg.compile:
        mode, why = compile_mode(cfg.compile_mode, comm.size, comm.device.type)
        if why:
            log(f"{name}: {why}", rank=comm.rank)
        # CUDA graphs want static shapes: a graph per batch size (an epoch's last batch may differ)
        trained = torch.compile(trained, mode=mode, dynamic=False if mode in GRAPH_MODES else None)
    optimizer = comm.wrap_optimizer(optimizer, model)

    def save(kinds: tuple[str, ...]) -> None:
        # mid-epoch, the ranks' BN statistics still differ (they are averaged at the epoch's end)
        state.rank_buffers = comm.slow.gather_object(
            {k: b for k, b in model.named_buffers() if b.is_floating_point()}) if state.progress else None
        if comm.is_leader:
            state.model, state.optimizer, state.scheduler = model.state_dict(), optimizer.state_dict(), scheduler.state_dict()
            state.scaler, state.rng = (scaler.state_dict() if scaler is not None else None), ckpt.rng_state()
            for kind in kinds:
                ckpt.save(ckpt.checkpoint_path(run.out, name, kind), state.to_dict())
        comm.slow.barrier()  # the others wait for the write patiently (--io-timeout)

    for epoch in range(state.epoch, recipe.epochs):
        resume = EpochProgress(**state.progress) if state.progress else None
        batches = run.data.train_fused(comm, streams, epoch=epoch, batch_size=level.batch_size,
                                       start_step=resume.step if resume else 0)
        progress = run.reporter.epoch(name, leader=comm.is_leader, world_phase=level.world_wide, epoch=epoch + 1,
                                      epochs=recipe.epochs, steps=steps, start_step=resume.step if resume else 0,
                                      images_per_step=level.batch_size * k * comm.size)
        try:
            stats = train_epoch(trained, batches, optimizer, scheduler, comm, members=k,
                                label_smoothing=recipe.label_smoothing, should_stop=run.should_stop,
                                check_every=cfg.signal_check_steps, progress=progress, precision=run.precision,
                                scaler=scaler, resume=resume)
        except NonFiniteLoss:
            kept = (f"the last good checkpoint, {last_path} (epoch {state.epoch}), is kept" if state.epoch
                    else f"{name} has no checkpoint yet")
            raise PhaseFailed(f"{name} epoch {epoch + 1}: the loss or the weights became NaN/inf; "
                              f"{kept}; lower {level.lr_flag} and start a new run (a new --out: --resume "
                              "refuses changed settings)") from None
        finally:
            if progress is not None:
                progress.close()
        if stats.stopped is not None:
            state.progress = vars(stats.stopped)
            save(("last",))
            log(f"{name}: stop requested during epoch {epoch + 1}: checkpointed at step {stats.stopped.step}",
                rank=comm.rank)
            raise Preempted()
        comm.average_buffers_(model)
        evaluated = (epoch + 1) % level.eval_every == 0 or epoch + 1 == recipe.epochs
        eval_seconds = 0.0
        if evaluated:
            t0 = time.perf_counter()
            state.tests = evaluate(model, run.data.test(comm, k), comm, run.num_classes, members=k,
                                   precision=run.precision)
            eval_seconds = time.perf_counter() - t0
        state.seconds += stats.seconds + eval_seconds
        rows = [metrics_row(level.phase, None if level.world_wide else j, epoch + 1, stats, m,
                            state.tests[m] if evaluated else {}, eval_seconds, state.seconds,
                            optimizer.param_groups[0]["lr"] if stats.lr is None else stats.lr)
                for m, j in enumerate(nets)]
        state.history.extend(rows)
        state.epoch, state.progress = epoch + 1, None
        if level.world_wide:
            run.record(rows)
        mean = sum(t["top1"] for t in state.tests) / k if evaluated else -1.0
        improved = mean > state.best
        state.best = max(state.best, mean)
        save(("last", "best") if improved else ("last",))
        if comm.is_leader:
            for row in rows:
                print_epoch(level.net_name(row["group"]) if row["group"] is not None else name, recipe.epochs, row)
            _curves(run, level, name, rows)
        if stats.stop_requested:  # the epoch was complete: it is kept, then we stop
            log(f"{name}: stop requested; epoch {epoch + 1} is checkpointed", rank=comm.rank)
            raise Preempted()
    if not state.tests[0]:
        state.tests = evaluate(model, run.data.test(comm, k), comm, run.num_classes, members=k,
                               precision=run.precision)
    finals = unfuse_state(model.state_dict(), k) if k > 1 else [model.state_dict()]
    results = [NetResult(j, finals[m], [r for r in state.history if r["group"] in (j, None)], state.tests[m],
                         state.seconds, initial[m] if initial else {})
               for m, j in enumerate(nets)]
    if comm.is_leader:
        for result in results:
            ckpt.save(ckpt.checkpoint_path(run.out, level.net_name(result.net), "final"),
                      ckpt.final_state(model=result.state, history=result.history, test=result.test,
                                       seconds=result.seconds, config=cfg.to_dict(), phase=level.net_name(result.net),
                                       ranks=comm.size, step_batch=taken * comm.size))
    comm.slow.barrier()  # the final checkpoints exist before anyone moves on
    return results


def print_epoch(name: str, epochs: int, row: dict) -> None:
    test = f" test {row['test_top1']:.2f}%" if row.get("test_top1") is not None else ""
    say(f"[{name}] epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} train {row['top1']:.2f}%"
        f"{test} {row['images_per_s']:.0f} img/s {row['seconds']:.1f}s")


def model_of(level: Level, state: dict, device: torch.device) -> nn.Module:
    model = build_model(level.spec).to(device, memory_format=torch.channels_last)
    model.load_state_dict(state)
    return model
