"""dd-scaling: scaling studies of dd-train over world sizes P and sub-network counts N.

    # 1. run a sweep: every (P, N) with P % N == 0, DD and the baseline (--strategy both)
    dd-scaling --local --nprocs 1,2,4 --subnets 1,2 --out runs/scaling -- --dataset synthetic ...
    dd-scaling --slurm --nodes 1,2,4 --tasks-per-node 4 --subnets 2,4 --out runs/scaling \\
               -- --preset cifar10-resnet32            # bash slurm/scaling_study.sh, see below
    # 2. collect every run under the directories into one CSV and a plot
    dd-scaling --collect runs/scaling [--target 90]
    # 3. the performance model: calibrate on the runs, validate on them, project to 8..4096 GPUs
    dd-scaling --model runs/scaling --measure-comm
    dd-scaling --model runs/scaling --alpha 1e-5 --beta 12.5e9 --samples 50000 --global-ips 2500

--local runs `python -m dd_mpi --nproc P --subnets N --strategy both ARGS --out OUT/P{P}-N{N}`
one after another (a finished run is skipped, an interrupted one resumed), then --collect and
dd-report on OUT. --slurm runs `bash slurm/scaling_study.sh [SBATCH_OPTS] -- --strategy both
ARGS` with NODES, SUBNETS, TASKS_PER_NODE, STUDY (= --out) and SCRIPT in its environment: that
script submits one job per (nodes, N) and a report job that runs dd-report and
`dd-scaling --collect STUDY`.

--collect writes OUT/scaling.csv (one row per run, strategy and phase) and OUT/scaling.png:
  images_per_s            images/s of the phase, all its ranks together (phase 1: all groups)
  seconds_per_epoch       dd-train's seconds per epoch (training + evaluation; phase 1: the
                          slowest group's)
  strong_efficiency       t_ref * P_ref / (P * t_P): the same global problem (the same data
                          per epoch) on more ranks; t = seconds per epoch (seconds for totals)
  weak_efficiency         (images/s at P / P) / (images/s at P_ref / P_ref): per-rank
                          throughput kept as ranks (and the global batch) grow
  time_to_target          wall-clock seconds until the global net's test top-1 first reaches
                          the target (DD: the composed net, then the fine-tune; default
                          target: the lower of transfer_T and random_T of that run)
  tta_speedup             baseline's time_to_target / DD's; speedup = baseline / DD total time
P_ref is the smallest P measured for the same strategy and phase (and the same N for the
phases whose work depends on N: sub-nets, compose, DD total); normally P_ref = 1.

The model (Hockney α-β; ring allreduce as in Thakur, Rabenseifner, Gropp 2005):
  ring allreduce of n bytes over p ranks   2(p-1)·α + 2·(p-1)/p · n/β  (per DDP bucket: α term)
  broadcast of n bytes to p ranks          (⌈log2 p⌉ + p - 1)·α + 2·(p-1)/p · n/β  (scatter +
                                           allgather, van de Geijn)
  gather of N pieces of m bytes            ⌈log2 N⌉·α + (N-1)·m/β
  one epoch on p ranks                     (D/p)·c + ⌈(D/p)/b⌉ · allreduce(4·params, p)
DD phase 1: p = P/N ranks per group, the sub-net's c_S and |S| ≈ |G|/N² parameters, groups in
parallel with no traffic between them; phase 2: gather of N sub-nets + broadcast of |G|;
phase 3 and the baseline: p = P, c_G and |G|. c (seconds per sample on one rank) comes from
the runs' images/s per rank, minus the modelled allreduce of the run it came from (the run with
the fewest ranks per communicator, ideally 1), or from --global-ips / --subnet-ips. No overlap
of communication with the backward pass is assumed (an upper bound), and evaluation is not
modelled. Time to accuracy = the recipe's epochs per phase times seconds per epoch.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import UsageError
from .reporting import RunFiles, baseline_curve, dd_timeline, pyplot, subnet_rows_by_epoch

REPO = Path(__file__).resolve().parent.parent
STUDY_SCRIPT = REPO / "slurm" / "scaling_study.sh"
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel's default bucket_cap_mb=25
BYTES_PER_PARAM = 4  # fp32 gradients (bf16 autocast keeps fp32 parameters and gradients)
DEFAULT_ALPHA = 10e-6  # s per message: an InfiniBand/NCCL-class latency
DEFAULT_BETA = 12.5e9  # bytes/s: 100 Gb/s per rank
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "food101": 75_750}  # full training sets
NUM_CLASSES = {"synthetic": 10, "cifar10": 10, "cifar100": 100, "food101": 101}
SCALING_FIELDS = ("run", "P", "N", "strategy", "phase", "epochs", "images_per_s", "images_per_s_per_rank",
                  "seconds_per_epoch", "seconds", "final_top1", "final_top5", "target_top1",
                  "time_to_target", "tta_speedup", "speedup", "P_ref", "strong_efficiency",
                  "weak_efficiency")


class ScalingError(Exception):
    """Bad input: one line, exit code 2."""


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def gpu_list(text: str) -> list[int]:
    """'8-4096' = the powers of two from 8 to 4096; '8,64,512' = exactly those."""
    if "-" in text:
        low, high = (int(v) for v in text.split("-", 1))
        values, p = [], 1
        while p <= high:
            if p >= low:
                values.append(p)
            p *= 2
        return values
    return int_list(text)


def valid_pairs(nprocs: list[int], subnets: list[int]) -> list[tuple[int, int]]:
    """The (P, N) pairs a sweep runs: every sub-network needs the same number of ranks."""
    return [(p, n) for p in nprocs for n in subnets if p % n == 0]


# =======================================================================================
# Sweeps
FORBIDDEN_PASSTHROUGH = ("--nproc", "--subnets", "--out", "--resume")


def check_passthrough(dd_args: list[str]) -> None:
    for arg in dd_args:
        if arg.split("=", 1)[0] in FORBIDDEN_PASSTHROUGH:
            raise ScalingError(f"{arg.split('=', 1)[0]} is set by dd-scaling per run: use --nprocs/--nodes, "
                               "--subnets and --out of dd-scaling instead")


def local_sweep(nprocs: list[int], subnets: list[int], out: Path, dd_args: list[str], *,
                timeout: float) -> list[Path]:
    """Run dd-train for every valid (P, N) on this machine, one run at a time."""
    check_passthrough(dd_args)
    pairs = valid_pairs(nprocs, subnets)
    if not pairs:
        raise ScalingError(f"no (P, N) pair with P % N == 0 in --nprocs {nprocs} --subnets {subnets}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONUNBUFFERED"] = "1"
    done, failed = [], []
    for p, n in pairs:
        run_dir = out / f"P{p}-N{n}"
        if (run_dir / "report.json").is_file():
            print(f"[P={p} N={n}] {run_dir}: finished earlier, kept", flush=True)
            done.append(run_dir)
            continue
        resume = ["--resume"] if (run_dir / "config.json").is_file() else []
        cmd = [sys.executable, "-m", "dd_mpi", "--nproc", str(p), "--subnets", str(n), "--strategy", "both",
               *dd_args, *resume, "--out", str(run_dir)]
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[P={p} N={n}] $ {shlex.join(['dd-train', *cmd[3:]])}", flush=True)
        start = time.monotonic()
        with open(run_dir / "dd-train.log", "a") as log:
            rc = run_with_timeout(cmd, log, env, timeout)
        if rc == 0 and (run_dir / "report.json").is_file():
            print(f"[P={p} N={n}] done in {time.monotonic() - start:.0f} s", flush=True)
            done.append(run_dir)
        else:
            tail = (run_dir / "dd-train.log").read_text()[-1500:]
            print(f"[P={p} N={n}] FAILED (exit {rc}); {run_dir / 'dd-train.log'} ends:\n{tail}", flush=True)
            failed.append(run_dir)
    if failed:
        print(f"{len(failed)} of {len(pairs)} runs failed: {', '.join(map(str, failed))}", flush=True)
    return done  # the caller compares with the number of pairs


def run_with_timeout(cmd: list[str], log, env: dict, timeout: float) -> int | str:
    """Run one dd-train job in its own process group; past the timeout, stop the whole group
    (the launcher and its ranks): SIGTERM first (ranks checkpoint), SIGKILL 30 s later."""
    import signal
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return f"timeout after {timeout:g} s"
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise


def slurm_command(nodes: list[int], subnets: list[int], tasks_per_node: int, out: Path, dd_args: list[str],
                  *, sbatch_opts: list[str], script: Path | None = None,
                  study_script: Path = STUDY_SCRIPT) -> tuple[dict[str, str], list[str]]:
    """The environment and argv of slurm/scaling_study.sh for this sweep."""
    check_passthrough(dd_args)
    env = {"NODES": " ".join(map(str, nodes)), "SUBNETS": " ".join(map(str, subnets)),
           "TASKS_PER_NODE": str(tasks_per_node), "STUDY": str(out)}
    if script is not None:
        env["SCRIPT"] = str(script)
    return env, ["bash", str(study_script), *sbatch_opts, "--", "--strategy", "both", *dd_args]


# =======================================================================================
# Collecting runs
def find_runs(dirs: list[Path]) -> list[RunFiles]:
    """Every finished run (a report.json) at or under each directory, by (P, N, path)."""
    paths: list[Path] = []
    for d in dirs:
        if (d / "report.json").is_file():
            paths.append(d)
        elif d.is_dir():
            paths += sorted(f.parent for f in d.rglob("report.json"))
        else:
            raise ScalingError(f"{d}: no such directory")
    if not paths:
        raise ScalingError(f"no report.json under {', '.join(map(str, dirs))}: no finished runs")
    runs = [RunFiles(p) for p in dict.fromkeys(paths)]
    return sorted(runs, key=lambda r: (r.world_size, r.subnets, str(r.path)))


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def phase1_epochs(metrics: list[dict]) -> list[dict]:
    """Phase 1 per epoch over all groups: images/s summed (all ranks), seconds of the slowest."""
    return [{"epoch": e, "images_per_s": sum(r["images_per_s"] for r in rows),
             "seconds": max(r["seconds"] for r in rows)} for e, rows in sorted(subnet_rows_by_epoch(metrics).items())]


def time_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first wall-clock time at which test top-1 >= target (None: never)."""
    for x, y in curve:
        if y is not None and y >= target - 1e-9:
            return x
    return None


def default_target(report: dict) -> float | None:
    finals = [report[k]["top1"] for k in ("transfer_T", "random_T") if report.get(k)]
    return min(finals) if finals else None


def speedup(t_baseline: float | None, t_dd: float | None) -> float | None:
    return t_baseline / t_dd if t_baseline and t_dd else None


def run_rows(run: RunFiles, target: float | None = None) -> list[dict]:
    """The rows of scaling.csv for one run (efficiencies are filled in over all runs)."""
    report, metrics = run.report, run.metrics
    timing = report.get("timing") or {}
    P = run.world_size
    base = {"run": str(run.path), "P": P, "N": run.subnets}
    target = target if target is not None else default_target(report)
    rows = []

    def add(strategy: str, phase: str, seconds, result: dict | None, epochs: list[dict] | None = None, **extra):
        ips = _mean([e["images_per_s"] for e in epochs]) if epochs else None
        rows.append({**base, "strategy": strategy, "phase": phase, "epochs": len(epochs) if epochs else None,
                     "images_per_s": ips, "images_per_s_per_rank": ips / P if ips else None,
                     "seconds_per_epoch": _mean([e["seconds"] for e in epochs]) if epochs else None,
                     "seconds": seconds, "final_top1": (result or {}).get("top1"),
                     "final_top5": (result or {}).get("top5"), **extra})

    tta = {}
    if report.get("transfer") is not None:
        timeline = dd_timeline(report, metrics)
        dd_curve = [timeline["transfer"], *timeline["finetune"]]
        tta["dd"] = time_to_target(dd_curve, target) if target is not None else None
        subs = report.get("sub_nets") or []
        sub_mean = {"top1": _mean([s.get("top1") for s in subs]), "top5": _mean([s.get("top5") for s in subs])}
        add("dd", "subnet", timing.get("subnets"), sub_mean, phase1_epochs(metrics))
        add("dd", "compose", timing.get("compose"), report["transfer"])
        add("dd", "finetune", timing.get("finetune"), report.get("transfer_T"),
            [r for r in metrics if r.get("phase") == "finetune"])
    if report.get("random_T") is not None:
        tta["baseline"] = time_to_target(baseline_curve(metrics), target) if target is not None else None
        add("baseline", "baseline", timing.get("baseline_total"), report["random_T"],
            [r for r in metrics if r.get("phase") == "baseline"])
    if "dd" in tta:
        add("dd", "total", timing.get("dd_total"), report.get("transfer_T"), target_top1=target,
            time_to_target=tta["dd"], tta_speedup=speedup(tta.get("baseline"), tta["dd"]),
            speedup=report.get("speedup"))
    if "baseline" in tta:
        add("baseline", "total", timing.get("baseline_total"), report["random_T"], target_top1=target,
            time_to_target=tta["baseline"])
    return rows


def strong_efficiency(t_ref: float, p_ref: int, t: float, p: int) -> float:
    """Fixed global problem: t_ref·P_ref / (P·t_P); 1 = perfect, t1/(P·tP) when P_ref = 1."""
    return t_ref * p_ref / (p * t)


def weak_efficiency(ips_ref: float, p_ref: int, ips: float, p: int) -> float:
    """Per-rank throughput kept: (ips_P / P) / (ips_ref / P_ref); ips_P / (P·ips_1) when P_ref = 1."""
    return (ips / p) / (ips_ref / p_ref)


def _reference_key(row: dict) -> tuple:
    depends_on_n = row["strategy"] == "dd" and row["phase"] in ("subnet", "compose", "total")
    return (row["strategy"], row["phase"], row["N"] if depends_on_n else None)


def _epoch_or_total(row: dict) -> float | None:
    return row["seconds_per_epoch"] if row["seconds_per_epoch"] is not None else row["seconds"]


def add_efficiencies(rows: list[dict]) -> list[dict]:
    """Fill P_ref, strong_efficiency and weak_efficiency of every row against its reference:
    the rows of the smallest P of the same key (their mean when several runs share it)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_reference_key(row), []).append(row)
    for members in groups.values():
        p_ref = min(r["P"] for r in members)
        refs = [r for r in members if r["P"] == p_ref]
        t_ref = _mean([_epoch_or_total(r) for r in refs])
        ips_ref = _mean([r["images_per_s"] for r in refs])
        for r in members:
            r["P_ref"] = p_ref
            if r["phase"] == "compose":  # a fixed cost, not a parallel workload: no efficiency
                r["strong_efficiency"] = r["weak_efficiency"] = None
                continue
            t = _epoch_or_total(r)
            r["strong_efficiency"] = strong_efficiency(t_ref, p_ref, t, r["P"]) if t and t_ref else None
            r["weak_efficiency"] = (weak_efficiency(ips_ref, p_ref, r["images_per_s"], r["P"])
                                    if r["images_per_s"] and ips_ref else None)
    return rows


def collect(runs: list[RunFiles], target: float | None = None) -> list[dict]:
    rows = [row for run in runs for row in run_rows(run, target)]
    return add_efficiencies(rows)


def rows_csv(rows: list[dict], fields=SCALING_FIELDS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buffer.getvalue()


def _cell(value, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)


def collect_table(rows: list[dict]) -> str:
    lines = [f"{'P':>5} {'N':>3} {'strategy':<9} {'phase':<9} {'img/s':>9} {'s/epoch':>8} {'seconds':>8} "
             f"{'top-1':>6} {'t->target':>9} {'strong':>6} {'weak':>6} {'speedup':>7} {'tta-spd':>7}"]
    for r in rows:
        lines.append(f"{r['P']:>5} {r['N']:>3} {r['strategy']:<9} {r['phase']:<9} "
                     f"{_cell(r['images_per_s'], '9.1f')} "
                     f"{_cell(r['seconds_per_epoch'], '8.2f')} {_cell(r['seconds'], '8.2f')} "
                     f"{_cell(r['final_top1'], '6.2f')} {_cell(r.get('time_to_target'), '9.2f')} "
                     f"{_cell(r['strong_efficiency'], '6.2f')} {_cell(r['weak_efficiency'], '6.2f')} "
                     f"{_cell(r.get('speedup'), '7.2f')} {_cell(r.get('tta_speedup'), '7.2f')}")
    return "\n".join(lines)


def _by_p(rows: list[dict], value: str) -> tuple[list[int], list[float]]:
    """Mean of a column per P (runs of the same P and another N, e.g. the baseline)."""
    per_p: dict[int, list[float]] = {}
    for r in rows:
        if r.get(value) is not None:
            per_p.setdefault(r["P"], []).append(r[value])
    ps = sorted(per_p)
    return ps, [sum(per_p[p]) / len(per_p[p]) for p in ps]


def plot_scaling(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    ns = sorted({r["N"] for r in rows})

    def select(strategy, phase, n=None):
        return [r for r in rows if r["strategy"] == strategy and r["phase"] == phase and (n is None or r["N"] == n)]

    ax = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(ns):
        total = select("dd", "total", n)
        for column, style, text in (("speedup", "o-", "total time"), ("tta_speedup", "s--", "time to target")):
            ps, ys = _by_p(total, column)
            if ps:
                ax.plot(ps, ys, style, color=colors[i % len(colors)], label=f"N={n}: {text}")
    ax.axhline(1.0, color="0.5", linewidth=0.8)
    ax.set_title("DD speedup over the baseline")
    ax.set_ylabel("baseline / DD")
    for ax, column, title in ((axes[1], "strong_efficiency", "strong scaling: t_ref·P_ref / (P·t_P)"),
                              (axes[2], "weak_efficiency", "weak scaling: per-rank images/s vs P_ref")):
        curves = [(f"DD phase 1, N={n}", select("dd", "subnet", n)) for n in ns]
        curves += [("DD fine-tune", select("dd", "finetune")), ("baseline", select("baseline", "baseline"))]
        if column == "strong_efficiency":
            curves += [(f"DD total, N={n}", select("dd", "total", n)) for n in ns]
        for label, subset in curves:
            ps, ys = _by_p(subset, column)
            if ps:
                ax.plot(ps, ys, "o-" if "total" not in label else "x:", label=label)
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("efficiency")
    for ax in axes:
        ps = sorted({r["P"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ps, [str(p) for p in ps])
        ax.set_xlabel("ranks P")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


# =======================================================================================
# The performance model
@dataclass(frozen=True)
class Network:
    alpha: float  # seconds per message (latency)
    beta: float  # bytes per second (bandwidth)
    bucket_bytes: int = DDP_BUCKET_BYTES  # DDP reduces gradients in buckets: one α term each


def ring_allreduce_seconds(n_bytes: float, p: int, net: Network) -> float:
    """Ring allreduce of n bytes over p ranks: 2(p-1)α + 2((p-1)/p)·n/β."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * net.alpha + 2 * (p - 1) / p * n_bytes / net.beta


def gradient_allreduce_seconds(n_bytes: float, p: int, net: Network) -> float:
    """One training step's gradient allreduce, as DDP does it: one ring per bucket."""
    if p <= 1:
        return 0.0
    buckets = max(1, math.ceil(n_bytes / net.bucket_bytes))
    return buckets * 2 * (p - 1) * net.alpha + 2 * (p - 1) / p * n_bytes / net.beta


def broadcast_seconds(n_bytes: float, p: int, net: Network) -> float:
    """Broadcast of n bytes to p ranks, scatter + ring allgather: (⌈log2 p⌉+p-1)α + 2((p-1)/p)n/β."""
    if p <= 1:
        return 0.0
    return (math.ceil(math.log2(p)) + p - 1) * net.alpha + 2 * (p - 1) / p * n_bytes / net.beta


def gather_seconds(piece_bytes: float, n: int, net: Network) -> float:
    """N pieces of m bytes to the root (binomial tree): ⌈log2 N⌉α + (N-1)m/β."""
    if n <= 1:
        return 0.0
    return math.ceil(math.log2(n)) * net.alpha + (n - 1) * piece_bytes / net.beta


def epoch_seconds(samples: int, ranks: int, batch: int, per_sample_s: float, grad_bytes: float,
                  net: Network) -> float:
    """One epoch of data-parallel training: ⌈D/p⌉·c (the busiest rank) + steps·allreduce, with
    dd_mpi.data's step count (batches of ⌊D/p⌋; a rank's extra sample rides in its last batch)."""
    steps = math.ceil((samples // ranks) / batch)
    return math.ceil(samples / ranks) * per_sample_s + steps * gradient_allreduce_seconds(grad_bytes, ranks, net)


@dataclass(frozen=True)
class Workload:
    """What one projection needs: the data, the nets, the recipe and the machine."""

    samples: int  # training samples per epoch (D)
    batch: int  # per rank
    global_params: int  # |G|
    subnet_params: int  # |S| ≈ |G| / N²
    subnets: int  # N
    global_sample_s: float  # c_G: seconds per sample per rank, global net
    subnet_sample_s: float  # c_S: seconds per sample per rank, sub-net
    subnet_epochs: int
    finetune_epochs: int
    baseline_epochs: int
    subnet_data: str = "full"  # full: every group sees D samples; shard: D/N
    compose_s: float = 0.0  # rank 0's compose compute (measured), seconds
    bytes_per_param: int = BYTES_PER_PARAM


def _phase1_samples(w: Workload) -> int:
    return w.samples if w.subnet_data == "full" or w.subnets == 1 else w.samples // w.subnets


def subnet_epoch_seconds(w: Workload, P: int, net: Network) -> float:
    """Phase 1, one epoch: the N groups in parallel, each on P/N ranks, no traffic between them."""
    return epoch_seconds(_phase1_samples(w), P // w.subnets, w.batch, w.subnet_sample_s,
                         w.subnet_params * w.bytes_per_param, net)


def global_epoch_seconds(w: Workload, P: int, net: Network) -> float:
    """Phase 3 or the baseline, one epoch: the global net on all P ranks."""
    return epoch_seconds(w.samples, P, w.batch, w.global_sample_s, w.global_params * w.bytes_per_param, net)


def compose_seconds(w: Workload, P: int, net: Network) -> float:
    """Phase 2: the N leaders send |S| to rank 0, which composes |G| and broadcasts it."""
    state = 4  # fp32 weights
    return (gather_seconds(w.subnet_params * state, w.subnets, net) + w.compose_s
            + broadcast_seconds(w.global_params * state, P, net))


def projectable(w: Workload, P: int) -> bool:
    """P splits into N equal groups and every rank gets at least one sample per epoch."""
    return P % w.subnets == 0 and _phase1_samples(w) // (P // w.subnets) >= 1 and w.samples // P >= 1


def project(w: Workload, P: int, net: Network) -> dict:
    """Seconds per epoch of each phase and time to accuracy of DD and of the baseline at P ranks."""
    t_sub, t_glob = subnet_epoch_seconds(w, P, net), global_epoch_seconds(w, P, net)
    t_comp = compose_seconds(w, P, net)
    dd = w.subnet_epochs * t_sub + t_comp + w.finetune_epochs * t_glob
    baseline = w.baseline_epochs * t_glob
    comm_sub = subnet_epoch_seconds(replace(w, subnet_sample_s=0.0), P, net)  # the allreduce part
    comm_glob = global_epoch_seconds(replace(w, global_sample_s=0.0), P, net)
    return {"P": P, "N": w.subnets, "subnet_epoch_s": t_sub, "compose_s": t_comp, "global_epoch_s": t_glob,
            "comm_share_subnet": comm_sub / t_sub if t_sub else 0.0,
            "comm_share_global": comm_glob / t_glob if t_glob else 0.0,
            "dd_seconds": dd, "baseline_seconds": baseline, "speedup": baseline / dd if dd else None}


# ---- calibration from runs -------------------------------------------------------------
def train_size(config: dict) -> int | None:
    """Training samples per epoch of a run (its --train-samples cap, or the dataset's size)."""
    if config.get("train_samples"):
        return int(config["train_samples"])
    if config.get("dataset") == "synthetic":
        from .synthetic import DEFAULT_TRAIN_SAMPLES
        return DEFAULT_TRAIN_SAMPLES
    return TRAIN_SIZES.get(config.get("dataset"))


def model_params(config: dict, subnets: int, num_classes: int | None = None) -> tuple[int, int, int, int]:
    """(|G|, |S|, MACs of G, MACs of S) per image, from the run's config (meta tensors: no memory)."""
    from .decompose import subnet_spec
    from .inspect import model_sizes
    from .models import ModelSpec
    classes = num_classes or NUM_CLASSES.get(config.get("dataset"))
    if classes is None:
        raise ScalingError(f"--dataset {config.get('dataset')}: pass --classes for the model's parameter count")
    spec = ModelSpec(config["arch"], config["width"], classes, config.get("shortcut", "A"))
    image = config.get("image_size") or spec.default_image_size
    g_params, g_flops = model_sizes(spec, image)
    s_params, s_flops = model_sizes(subnet_spec(spec, subnets), image)
    return g_params, s_params, g_flops, s_flops


@dataclass
class Measurement:
    """Measured training seconds per epoch of one phase of one run, and what it implies for c."""

    run: RunFiles
    phase: str  # subnet | finetune | baseline
    net: str  # 'global' or 'subnet N'
    ranks: int  # ranks in the communicator (P/N in phase 1, P otherwise)
    samples_per_rank: int
    batch: int
    grad_bytes: float
    train_epoch_s: float  # measured: samples / images_per_s (the slowest group in phase 1)


def measurements(run: RunFiles, num_classes: int | None = None) -> list[Measurement]:
    cfg = run.report.get("config") or {}
    D = train_size(cfg)
    if D is None:
        return []
    P, N = run.world_size, run.subnets
    g_params, s_params, _, _ = model_params(cfg, N, num_classes)
    out = []
    sub_rows = [r for r in run.metrics if r.get("phase") == "subnet"]
    if sub_rows and P % N == 0:
        ranks = P // N
        pool = D if cfg.get("subnet_data", "full") == "full" or N == 1 else D // N
        per_rank = pool // ranks
        by_epoch: dict[int, float] = {}
        for r in sub_rows:  # the slowest group per epoch, as the phase waits for it
            by_epoch[r["epoch"]] = max(by_epoch.get(r["epoch"], 0.0), per_rank * ranks / r["images_per_s"])
        out.append(Measurement(run, "subnet", "global" if N == 1 else f"subnet {N}", ranks, per_rank,
                               cfg["batch_size"], s_params * BYTES_PER_PARAM, _mean(list(by_epoch.values()))))
    for phase in ("finetune", "baseline"):
        rows = [r for r in run.metrics if r.get("phase") == phase and r.get("images_per_s")]
        if rows:
            per_rank = D // P
            out.append(Measurement(run, phase, "global", P, per_rank, cfg["batch_size"],
                                   g_params * BYTES_PER_PARAM,
                                   _mean([per_rank * P / r["images_per_s"] for r in rows])))
    return out


def per_sample_seconds(m: Measurement, net: Network) -> float:
    """c from one measurement: its epoch minus the modelled allreduces, per sample per rank."""
    steps = math.ceil(m.samples_per_rank / m.batch)
    compute = m.train_epoch_s - steps * gradient_allreduce_seconds(m.grad_bytes, m.ranks, net)
    return max(compute, 0.05 * m.train_epoch_s) / m.samples_per_rank


def calibrate(ms: list[Measurement], net: Network) -> dict[str, tuple[float, list[Measurement]]]:
    """Per net: c from the measurements with the fewest ranks per communicator (their mean)."""
    by_net: dict[str, list[Measurement]] = {}
    for m in ms:
        by_net.setdefault(m.net, []).append(m)
    result = {}
    for name, group in by_net.items():
        fewest = min(m.ranks for m in group)
        sources = [m for m in group if m.ranks == fewest]
        result[name] = (statistics.mean(per_sample_seconds(m, net) for m in sources), sources)
    return result


def predict(m: Measurement, c: float, net: Network) -> float:
    return epoch_seconds(m.samples_per_rank * m.ranks, m.ranks, m.batch, c, m.grad_bytes, net)


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


# ---- measuring α and β: a tiny gloo allreduce benchmark ----------------------------------
def _allreduce_worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, queue) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    timings = {}
    for n_bytes in sizes:
        tensor = torch.ones(max(1, n_bytes // 4), dtype=torch.float32)
        for _ in range(3):  # warm-up: connections, buffers
            dist.all_reduce(tensor)
        dist.barrier()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            dist.all_reduce(tensor)
            samples.append(time.perf_counter() - start)
        timings[n_bytes] = statistics.median(samples)
    if rank == 0:
        queue.put(timings)
    dist.barrier()
    dist.destroy_process_group()


def fit_alpha_beta(timings: dict[int, float], p: int) -> Network:
    """Least squares t = a + b·n, then α = a / (2(p-1)) and β = 2((p-1)/p) / b."""
    xs, ys = list(timings), [timings[n] for n in timings]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    if a <= 0:  # noise: take the smallest message's time as all latency
        a = min(ys)
    b = max(b, 1e-15)
    return Network(alpha=a / (2 * (p - 1)), beta=2 * (p - 1) / p / b)


def measure_network(p: int = 2, repeats: int = 20) -> tuple[Network, dict[int, float]]:
    import torch.multiprocessing as mp

    from .launch import free_port
    port = free_port()
    sizes = [4, 1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_allreduce_worker, args=(p, port, sizes, repeats, queue), nprocs=p, join=True,
                       start_method="spawn")
    timings = queue.get()
    return fit_alpha_beta(timings, p), timings


# ---- the --model command ----------------------------------------------------------------
def _ips_overrides(text: str | None) -> dict[int | None, float]:
    """'2500' (any N) or '2=9000,4=20000' (per N) -> {N or None: images/s per rank}."""
    if not text:
        return {}
    result = {}
    for item in text.split(","):
        key, _, value = item.rpartition("=")
        result[int(key) if key else None] = float(value)
    return result


def build_workloads(runs: list[RunFiles], calibration: dict, args) -> list[tuple[Workload, str]]:
    """One workload per N to project, with a note on where each per-sample time came from."""
    cfg = runs[0].report.get("config") or {}
    D = args.samples or train_size(cfg)
    if D is None:
        raise ScalingError("the runs' dataset size is unknown: pass --samples")
    epochs = args.epochs or [cfg.get(k, 1) for k in ("subnet_epochs", "finetune_epochs", "baseline_epochs")]
    subnet_ns = args.model_subnets or sorted({r.subnets for r in runs if r.subnets > 1}) or [4]
    global_override = _ips_overrides(args.global_ips).get(None)
    subnet_override = _ips_overrides(args.subnet_ips)
    if global_override:
        c_g, g_note = 1.0 / global_override, f"--global-ips {global_override:g}"
    elif "global" in calibration:
        c_g, sources = calibration["global"]
        g_note = f"measured: {sources[0].run.path.name} {sources[0].phase} on {sources[0].ranks} rank(s)"
    else:
        raise ScalingError("no global-net measurement in the runs (finetune or baseline): pass --global-ips")
    composes = [r.report["timing"]["compose"] for r in runs if (r.report.get("timing") or {}).get("compose")]
    compose_s = min(composes) if composes else 0.0
    out = []
    for n in subnet_ns:
        g_params, s_params, g_flops, s_flops = model_params(cfg, n, args.classes)
        if n in subnet_override or None in subnet_override:
            ips = subnet_override.get(n, subnet_override.get(None))
            c_s, s_note = 1.0 / ips, f"--subnet-ips {ips:g}"
        elif n == 1:
            c_s, s_note = c_g, "N=1: the global net"
        elif f"subnet {n}" in calibration and not global_override:
            c_s, sources = calibration[f"subnet {n}"]
            s_note = f"measured: {sources[0].run.path.name} phase 1 on {sources[0].ranks} rank(s) per group"
        else:
            c_s, s_note = c_g * s_flops / g_flops, "scaled from the global net by MACs (not measured)"
        w = Workload(samples=D, batch=args.per_rank_batch or cfg.get("batch_size", 64), global_params=g_params,
                     subnet_params=s_params, subnets=n, global_sample_s=c_g, subnet_sample_s=c_s,
                     subnet_epochs=epochs[0], finetune_epochs=epochs[1], baseline_epochs=epochs[2],
                     subnet_data=cfg.get("subnet_data", "full"), compose_s=compose_s)
        out.append((w, f"N={n}: |G|={g_params:,} |S|={s_params:,} (|G|/N²={g_params / n ** 2:,.0f}); "
                       f"c_G={c_g * 1e3:.3f} ms/sample ({g_note}); c_S={c_s * 1e3:.3f} ms/sample ({s_note})"))
    return out


def validation_rows(runs: list[RunFiles], net: Network, classes: int | None) -> list[dict]:
    ms = [m for run in runs for m in measurements(run, classes)]
    calibration = calibrate(ms, net)
    rows = []
    for m in ms:
        c, sources = calibration[m.net]
        predicted = predict(m, c, net)
        rows.append({"run": str(m.run.path), "P": m.run.world_size, "N": m.run.subnets, "phase": m.phase,
                     "ranks": m.ranks, "measured_s": m.train_epoch_s, "predicted_s": predicted,
                     "relative_error": relative_error(predicted, m.train_epoch_s),
                     "calibration": m in sources})
    return rows


def plot_model(projections: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    for n in sorted({r["N"] for r in projections}):
        rows = [r for r in projections if r["N"] == n]
        ps = [r["P"] for r in rows]
        axes[0].plot(ps, [r["subnet_epoch_s"] for r in rows], "o-", label=f"DD phase 1 epoch, N={n}")
        axes[1].plot(ps, [r["speedup"] for r in rows], "o-", label=f"N={n}")
    rows = [r for r in projections if r["N"] == projections[0]["N"]]
    axes[0].plot([r["P"] for r in rows], [r["global_epoch_s"] for r in rows], "s--", color="k",
                 label="global net epoch (fine-tune, baseline)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds per epoch (model)")
    axes[0].set_title("projected seconds per epoch")
    axes[1].axhline(1.0, color="0.5", linewidth=0.8)
    axes[1].set_ylabel("baseline / DD time to accuracy")
    axes[1].set_title("projected DD speedup (time to accuracy)")
    ps = sorted({r["P"] for r in projections})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ps, [str(p) for p in ps], fontsize=7)
        ax.set_xlabel("GPUs (ranks) P")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def run_model(args, dirs: list[Path]) -> int:
    runs = find_runs(dirs)
    if args.measure_comm:
        net, timings = measure_network(args.measure_comm)
        print(f"gloo allreduce on {args.measure_comm} local ranks: " +
              ", ".join(f"{n} B {t * 1e6:.0f} us" for n, t in timings.items()))
        source = f"measured here (gloo, {args.measure_comm} local ranks)"
    else:
        net, source = Network(args.alpha, args.beta), "--alpha/--beta"
    print(f"network: alpha {net.alpha * 1e6:.2f} us, beta {net.beta / 1e9:.3f} GB/s ({source}); "
          f"DDP buckets of {net.bucket_bytes >> 20} MiB; fp32 gradients")

    checks = validation_rows(runs, net, args.classes)
    print("\nvalidation on the runs: training seconds per epoch, predicted vs measured")
    print(f"{'run':<28} {'P':>4} {'N':>3} {'phase':<9} {'ranks':>5} {'measured':>9} {'predicted':>9} {'error':>7}")
    for r in checks:
        note = "  (calibration run)" if r["calibration"] else ""
        print(f"{Path(r['run']).name:<28} {r['P']:>4} {r['N']:>3} {r['phase']:<9} {r['ranks']:>5} "
              f"{r['measured_s']:>9.3f} {r['predicted_s']:>9.3f} {r['relative_error']:>+7.1%}{note}")
    others = [abs(r["relative_error"]) for r in checks if not r["calibration"]]
    if others:
        print(f"mean |relative error| outside the calibration runs: {statistics.mean(others):.1%} "
              f"(max {max(others):.1%})")

    calibration = calibrate([m for run in runs for m in measurements(run, args.classes)], net)
    workloads = build_workloads(runs, calibration, args)
    projections = []
    print(f"\nprojection ({workloads[0][0].samples} samples/epoch, batch {workloads[0][0].batch} per rank, "
          f"epochs sub-net/fine-tune/baseline {workloads[0][0].subnet_epochs}/{workloads[0][0].finetune_epochs}/"
          f"{workloads[0][0].baseline_epochs}):")
    for w, note in workloads:
        print("  " + note)
    print(f"{'P':>5} {'N':>3} {'sub s/ep':>9} {'glob s/ep':>9} {'compose':>8} {'comm% sub':>9} "
          f"{'comm% glob':>10} {'DD s':>9} {'base s':>9} {'speedup':>7}")
    skipped = set()
    for w, _ in workloads:
        for P in args.gpus:
            if not projectable(w, P):
                skipped.add(P)
                continue
            r = project(w, P, net)
            projections.append(r)
            print(f"{P:>5} {w.subnets:>3} {r['subnet_epoch_s']:>9.4f} {r['global_epoch_s']:>9.4f} "
                  f"{r['compose_s']:>8.4f} {r['comm_share_subnet']:>9.1%} {r['comm_share_global']:>10.1%} "
                  f"{r['dd_seconds']:>9.2f} {r['baseline_seconds']:>9.2f} {r['speedup']:>7.2f}")
    if skipped:
        print(f"skipped P = {sorted(skipped)}: not a multiple of N, or fewer samples than ranks "
              "(pass --samples with the real training set's size)")
    out = args.out or dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    fields = list(projections[0]) if projections else ["P"]
    (out / "model_projection.csv").write_text(rows_csv(projections, fields))
    (out / "model_validation.csv").write_text(rows_csv(checks, list(checks[0]) if checks else ["run"]))
    if projections:
        plot_model(projections, out / "model.png")
    print(f"\nwrote {out / 'model_projection.csv'}, {out / 'model_validation.csv'}, {out / 'model.png'}")
    return 0


# =======================================================================================
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """dd-scaling's own flags, and the dd-train flags (after `--`, or any it does not know)."""
    if "--" in argv:
        cut = argv.index("--")
        own, passthrough = argv[:cut], argv[cut + 1:]
    else:
        own, passthrough = argv, []
    parser = argparse.ArgumentParser(prog="dd-scaling", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="run the sweep here, one dd-train after another")
    mode.add_argument("--slurm", action="store_true", help="submit the sweep: bash slurm/scaling_study.sh")
    mode.add_argument("--collect", nargs="+", type=Path, metavar="DIR", help="runs at or under DIRs -> CSV, plot")
    mode.add_argument("--model", nargs="+", type=Path, metavar="DIR", help="performance model on the runs")
    parser.add_argument("--out", type=Path, help="sweep: study directory (default runs/scaling-DATE); "
                                                 "collect/model: where to write (default: the first DIR)")
    sweep = parser.add_argument_group("sweeps")
    sweep.add_argument("--nprocs", type=int_list, default=[1, 2, 4], help="--local: world sizes P (1,2,4)")
    sweep.add_argument("--subnets", type=int_list, default=None, help="values of N (local 1,2; slurm 2,4,8)")
    sweep.add_argument("--run-timeout", type=float, default=3600, help="--local: seconds per run (3600)")
    sweep.add_argument("--nodes", type=int_list, default=[1, 2, 4], help="--slurm: node counts (1,2,4)")
    sweep.add_argument("--tasks-per-node", type=int, default=4, help="--slurm: ranks (GPUs) per node (4)")
    sweep.add_argument("--script", type=Path, help="--slurm: job script of one run (default slurm/resnet32.sh)")
    sweep.add_argument("--sbatch", default="", help="--slurm: sbatch options for every job, e.g. '-p gpu -A proj'")
    sweep.add_argument("--dry-run", action="store_true", help="--slurm: print the command, submit nothing")
    coll = parser.add_argument_group("collect")
    coll.add_argument("--target", type=float, help="target test top-1 (%%) for time to accuracy "
                                                   "(default per run: min(transfer_T, random_T))")
    model = parser.add_argument_group("model")
    model.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"latency, s ({DEFAULT_ALPHA:g})")
    model.add_argument("--beta", type=float, default=DEFAULT_BETA, help=f"bandwidth, bytes/s ({DEFAULT_BETA:g})")
    model.add_argument("--measure-comm", type=int, nargs="?", const=2, default=0, metavar="P",
                       help="measure alpha and beta with a gloo allreduce on P local ranks (2)")
    model.add_argument("--gpus", type=gpu_list, default=gpu_list("8-4096"), help="P to project (8-4096)")
    model.add_argument("--model-subnets", type=int_list, help="N to project (default: the runs' N > 1, or 4)")
    model.add_argument("--samples", type=int, help="training samples per epoch (default: the runs')")
    model.add_argument("--per-rank-batch", type=int, help="batch per rank (default: the runs')")
    model.add_argument("--epochs", type=int_list, help="epochs SUBNET,FINETUNE,BASELINE (default: the runs')")
    model.add_argument("--global-ips", help="images/s per rank of the global net (e.g. from a GPU benchmark)")
    model.add_argument("--subnet-ips", help="images/s per rank of a sub-net: X, or N=X,N=Y")
    model.add_argument("--classes", type=int, help="classes, for --dataset imagefolder runs")
    args, unknown = parser.parse_known_args(own)
    if unknown and not (args.local or args.slurm):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.epochs is not None and len(args.epochs) != 3:
        parser.error("--epochs: give SUBNET,FINETUNE,BASELINE")
    if args.measure_comm == 1:
        parser.error("--measure-comm 1: an allreduce needs 2 or more ranks")
    for flag in ("global_ips", "subnet_ips"):
        try:
            _ips_overrides(getattr(args, flag))
        except ValueError:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: give images/s per rank, "
                         "X or N=X,N=Y")
    return args, unknown + passthrough


def main(argv: list[str] | None = None) -> int:
    args, dd_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.local:
            out = args.out or Path(time.strftime("runs/scaling-%Y%m%d-%H%M%S"))
            subnets = args.subnets or [1, 2]
            done = local_sweep(args.nprocs, subnets, out, dd_args, timeout=args.run_timeout)
            expected = len(valid_pairs(args.nprocs, subnets))
            if done:
                from .reporting import load_runs, write_all
                write_all(load_runs(done), out)
                print(f"wrote {out}/dd_report.md and plots")
                run_collect(args, [out])
            return 0 if len(done) == expected else 1
        if args.slurm:
            out = args.out or Path(time.strftime("runs/scaling-%Y%m%d-%H%M%S"))
            env, cmd = slurm_command(args.nodes, args.subnets or [2, 4, 8], args.tasks_per_node, out, dd_args,
                                     sbatch_opts=shlex.split(args.sbatch), script=args.script)
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd), flush=True)
            if args.dry_run:
                return 0
            return subprocess.run(cmd, env={**os.environ, **env}).returncode
        if args.collect:
            return run_collect(args, args.collect)
        return run_model(args, args.model)
    except (ScalingError, UsageError) as error:
        print(f"dd-scaling: {error}", file=sys.stderr)
        return 2


def run_collect(args, dirs: list[Path]) -> int:
    rows = collect(find_runs(dirs), args.target)
    out = args.out or dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.csv").write_text(rows_csv(rows))
    plot_scaling(rows, out / "scaling.png")
    print(collect_table(rows))
    print(f"wrote {out / 'scaling.csv'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
