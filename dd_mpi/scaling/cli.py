"""dd-scaling: scaling studies of dd-train over world sizes P and sub-network counts N.

    # 1. run a sweep: every (P, N) (any N on any P), DD and the baseline (--strategy both)
    dd-scaling --local --nprocs 1,2,4 --subnets 1,2 --out runs/scaling -- --dataset synthetic ...
    dd-scaling --slurm --nodes 1,2,4 --tasks-per-node 4 --subnets 2,4 --out runs/scaling \\
               -- --preset cifar10-resnet32            # bash slurm/scaling_study.sh, see below
    # 2. collect every run under the directories into one CSV and a plot
    dd-scaling --collect runs/scaling [--target 90]
    # 3. the performance model: calibrate on the runs, validate on them, project to 8..4096 GPUs
    dd-scaling --model runs/scaling --measure-comm
    dd-scaling --model runs/scaling --alpha 1e-5 --beta 12.5e9 --samples 50000 --global-ips 2500

--local runs `python -m dd_mpi --nproc P --subnets N --strategy both ARGS --out OUT/P{P}-N{N}`
one after another (a finished run is skipped, an interrupted one resumed; a finished run made
with other settings is refused before anything runs), then --collect and
dd-report on OUT. --slurm runs `bash STUDY_SCRIPT [SBATCH_OPTS] -- --strategy both ARGS` with
NODES, SUBNETS, TASKS_PER_NODE, STUDY (= --out) and SCRIPT in its environment: that script
submits one job per (nodes, N) and a report job that runs dd-report and `dd-scaling --collect
STUDY`. STUDY_SCRIPT is --study-script, default slurm/scaling_study.sh under the working
directory, else in $DD_MPI_SLURM_DIR (the package does not know where the repository is).

--collect writes OUT/scaling.csv (one row per run, strategy and phase) and OUT/scaling.png:
  images_per_s            images/s of the phase, all its ranks together (phase 1: all groups):
                          its images over its training time
  seconds_per_epoch       dd-train's seconds per epoch (training + evaluation; phase 1: the
                          slowest group's)
                          (both over the epochs after the first where there are more: the
                          first carries the process's warm-up; the model calibrates on them too)
  strong_efficiency       t_ref * P_ref / (P * t_P): the same global problem (the same data
                          per epoch) on more ranks; t = seconds per epoch (seconds for totals)
  weak_efficiency         (images/s at P / P) / (images/s at P_ref / P_ref): per-rank
                          throughput kept as ranks (and the global batch) grow
  time_to_target          wall-clock seconds until the global net's test top-1 first reaches
                          the target (DD: the composed net, then the fine-tune; default
                          target: the lower of transfer_T and random_T of that run)
  tta_speedup             baseline's time_to_target / DD's; speedup = baseline / DD total time
P_ref is the smallest P measured for the same strategy and phase (and the same N for the
phases whose work depends on N: sub-nets, intermediate levels, compose, DD total); normally
P_ref = 1. A run with --levels has an "intermediate" row: the levels between, their total. The runs
collected together may differ only in P, N and the seed (collect.WORKLOAD).

The performance model's formulas: dd_mpi/scaling/perfmodel.py.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..argtypes import OneLineParser, add_version, int_list, positive
from ..errors import EXIT_PREEMPTED, UsageError
from ..reporting import NO_MATPLOTLIB, plots_available
from .collect import collect, collect_table, find_runs, rows_csv
from .errors import ScalingError
from .netbench import measure_network
from .perfmodel import (DEFAULT_ALPHA, DEFAULT_BETA, Network, build_workloads, calibrate, ips_overrides,
                        measurements, project, projectable, validation_rows)
from .plots import plot_model, plot_scaling
from .sweep import SweepStopped, find_study_script, local_sweep, slurm_command, valid_pairs


def gpu_list(text: str) -> list[int]:
    """'8-4096' = the powers of two from 8 to 4096; '8,64,512' = exactly those."""
    if "-" in text:
        low, high = (int(v) for v in text.split("-", 1))
        values, p = [], 1
        while p <= high:
            if p >= low:
                values.append(p)
            p *= 2
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: no power of two from {low} to {high}")
        return values
    return int_list(text)


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

    checks = validation_rows(runs, net, args.classes, args.samples)
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

    calibration = calibrate([m for run in runs for m in measurements(run, args.classes, args.samples)], net)
    workloads = build_workloads(runs, calibration, args, net)
    projections = []
    print(f"\nprojection ({workloads[0][0].samples} samples/epoch, batch {workloads[0][0].batch} per rank, "
          f"epochs sub-net/fine-tune/baseline {workloads[0][0].subnet_epochs}/{workloads[0][0].finetune_epochs}/"
          f"{workloads[0][0].baseline_epochs}):")
    for w, note in workloads:
        print("  " + note)
    if any((run.report.get("config") or {}).get("groups") for run in runs):
        print("  note: the runs set --groups; the projection lays phase 1 out as dd-train does without it "
              "(G = gcd(N, P) groups)")
    if any(run.report.get("intermediate") for run in runs):
        print("  note: the runs compose in stages (--levels); the projection has no term for the levels between "
              "(phase 1, one composition and the fine-tune), so it leaves their time out of DD's")
    global_batch = (runs[0].report.get("config") or {}).get("global_batch_size")
    if global_batch and not args.per_rank_batch:
        print(f"  note: the runs set --global-batch-size {global_batch} (a batch per rank that shrinks as P "
              f"grows); the projection holds {workloads[0][0].batch} per rank at every P: --per-rank-batch sets it")
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
        print(f"skipped P = {sorted(skipped)}: fewer samples than ranks (pass --samples with the real training "
              "set's size)")
    out = args.out or dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    fields = list(projections[0]) if projections else ["P"]
    (out / "model_projection.csv").write_text(rows_csv(projections, fields))
    (out / "model_validation.csv").write_text(rows_csv(checks, list(checks[0]) if checks else ["run"]))
    written = [out / "model_projection.csv", out / "model_validation.csv"]
    if projections and plot_or_say_why(plot_model, projections, out / "model.png"):
        written.append(out / "model.png")
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0


MODES = ("local", "slurm", "collect", "model")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """dd-scaling's own flags, and the dd-train flags (after `--`, or any it does not know)."""
    if "--" in argv:
        cut = argv.index("--")
        own, passthrough = argv[:cut], argv[cut + 1:]
    else:
        own, passthrough = argv, []
    parser = OneLineParser(prog="dd-scaling", description=__doc__, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(parser)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="run the sweep here, one dd-train after another")
    mode.add_argument("--slurm", action="store_true", help="submit the sweep: bash slurm/scaling_study.sh "
                      "(--study-script)")
    mode.add_argument("--collect", nargs="+", type=Path, metavar="DIR", help="runs at or under DIRs -> CSV, plot")
    mode.add_argument("--model", nargs="+", type=Path, metavar="DIR", help="performance model on the runs")
    parser.add_argument("--out", type=Path, help="sweep: study directory (default runs/scaling-DATE); "
                                                 "collect/model: where to write (default: the first DIR)")
    readers: dict[str, tuple[str, ...]] = {}  # a flag -> the modes that read it (unlisted: all of them)

    def add(group, read_by: tuple[str, ...], *names: str, **options) -> None:
        group.add_argument(*names, **options)
        readers.update(dict.fromkeys(names, read_by))

    sweep = parser.add_argument_group("sweeps")
    add(sweep, ("local",), "--nprocs", type=int_list, default=[1, 2, 4], help="--local: world sizes P (1,2,4)")
    add(sweep, ("local", "slurm"), "--subnets", type=int_list, default=None,
        help="values of N (local 1,2; slurm 2,4,8)")
    add(sweep, ("local",), "--run-timeout", type=positive(float), default=3600,
        help="--local: seconds per run (3600)")
    add(sweep, ("slurm",), "--nodes", type=int_list, default=[1, 2, 4], help="--slurm: node counts (1,2,4)")
    add(sweep, ("slurm",), "--tasks-per-node", type=positive(int), default=4,
        help="--slurm: ranks (GPUs) per node (4)")
    add(sweep, ("slurm",), "--script", type=Path, help="--slurm: job script of one run (default slurm/resnet32.sh)")
    add(sweep, ("slurm",), "--study-script", type=Path,
        help="--slurm: slurm/scaling_study.sh (default: under the working directory, else in $DD_MPI_SLURM_DIR)")
    add(sweep, ("slurm",), "--sbatch", default="",
        help="--slurm: sbatch options for every job, e.g. '-p gpu -A proj'")
    add(sweep, ("slurm",), "--dry-run", action="store_true", help="--slurm: print the command, submit nothing")
    coll = parser.add_argument_group("collect")
    add(coll, ("local", "collect"), "--target", type=positive(float),  # (a --local sweep collects its runs)
        help="target test top-1 (%%) for time to accuracy (default per run: min(transfer_T, random_T))")
    model = parser.add_argument_group("model")
    for flag, options in {
            "--alpha": dict(type=positive(float, or_zero=True), default=DEFAULT_ALPHA,
                            help=f"latency, s ({DEFAULT_ALPHA:g})"),
            "--beta": dict(type=positive(float), default=DEFAULT_BETA, help=f"bandwidth, bytes/s ({DEFAULT_BETA:g})"),
            "--measure-comm": dict(type=int, nargs="?", const=2, default=0, metavar="P",
                                   help="measure alpha and beta with a gloo allreduce on P local ranks (2)"),
            "--gpus": dict(type=gpu_list, default=gpu_list("8-4096"), help="P to project (8-4096)"),
            "--model-subnets": dict(type=int_list, help="N to project (default: the runs' N > 1, or 4)"),
            "--samples": dict(type=positive(int), help="training samples per epoch (default: the runs'; "
                                                       "--dataset imagefolder runs need it)"),
            "--per-rank-batch": dict(type=positive(int), help="batch per rank (default: the runs')"),
            "--epochs": dict(type=int_list, help="epochs SUBNET,FINETUNE,BASELINE (default: the runs')"),
            "--global-ips": dict(help="images/s per rank of the global net (e.g. from a GPU benchmark)"),
            "--subnet-ips": dict(help="images/s per rank of a sub-net: X, or N=X,N=Y"),
            "--classes": dict(type=positive(int), help="classes, for --dataset imagefolder runs")}.items():
        add(model, ("model",), flag, **options)
    args, unknown = parser.parse_known_args(own)
    if unknown and not (args.local or args.slurm):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    mode = next(name for name in MODES if getattr(args, name))
    if passthrough and mode not in ("local", "slurm"):
        parser.error(f"the dd-train flags after -- are for --local and --slurm sweeps, not --{mode}: leave them out")
    for token in own:  # a flag another mode reads was silently ignored (--slurm --nprocs 8 ran on --nodes)
        flag = token.split("=", 1)[0]
        if mode not in readers.get(flag, MODES):
            parser.error(f"{flag} is read by {' and '.join('--' + r for r in readers[flag])} only, "
                         f"not --{mode}: leave it out")
    if args.epochs is not None and len(args.epochs) != 3:
        parser.error("--epochs: give SUBNET,FINETUNE,BASELINE")
    if args.measure_comm and args.measure_comm < 2:  # (0: not measured)
        parser.error(f"--measure-comm {args.measure_comm}: an allreduce needs 2 or more ranks")
    for flag in ("global_ips", "subnet_ips"):
        try:
            rates = ips_overrides(getattr(args, flag))
        except ValueError:
            rates = {0: math.nan}
        if not all(rate > 0 and math.isfinite(rate) for rate in rates.values()) or (
                flag == "global_ips" and set(rates) - {None}):
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: give images/s per rank above 0, "
                         + ("X (the global net has no N)" if flag == "global_ips" else "X or N=X,N=Y"))
    try:
        args.sbatch_opts = shlex.split(args.sbatch)
    except ValueError as error:
        parser.error(f"--sbatch {args.sbatch!r}: {error} (quote it as a shell would)")
    return args, unknown + passthrough


def main(argv: list[str] | None = None) -> int:
    args, dd_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.local:
            out = args.out or Path(time.strftime("runs/scaling-%Y%m%d-%H%M%S"))
            subnets = args.subnets or [1, 2]
            done = local_sweep(args.nprocs, subnets, out, dd_args, timeout=args.run_timeout)
            expected = len(valid_pairs(args.nprocs, subnets))
            if done:  # the report covers the study: this sweep's runs and those kept from earlier ones
                from ..reporting import write_all
                written = write_all(find_runs([out]), out)
                print(f"wrote {', '.join(str(path) for path in written.values())}")
                run_collect(args, [out])
            return 0 if len(done) == expected else 1
        if args.slurm:
            if not args.dry_run and shutil.which("sbatch") is None:
                raise ScalingError("--slurm submits with sbatch, which is not on PATH: run it on a Slurm login "
                                   "node (or add --dry-run to see the command)")
            out = args.out or Path(time.strftime("runs/scaling-%Y%m%d-%H%M%S"))
            env, cmd = slurm_command(args.nodes, args.subnets or [2, 4, 8], args.tasks_per_node, out, dd_args,
                                     sbatch_opts=args.sbatch_opts, script=args.script,
                                     study_script=find_study_script(args.study_script))
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd), flush=True)
            if args.dry_run:
                return 0
            return subprocess.run(cmd, env={**os.environ, **env}).returncode
        if args.collect:
            return run_collect(args, args.collect)
        return run_model(args, args.model)
    except (SweepStopped, KeyboardInterrupt) as stop:
        print(f"dd-scaling: stopped by {str(stop) or 'SIGINT'}; the run in progress (if any) checkpointed: run the same command "
              "again to go on", file=sys.stderr)
        return EXIT_PREEMPTED
    except (ScalingError, UsageError) as error:
        print(f"dd-scaling: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # writing the study's files, or reading a run's
        where = error.filename or args.out or "a file"
        print(f"dd-scaling: error: {where}: {error.strerror or error}: check --out (a directory you can write) "
              "and the run directories", file=sys.stderr)
        return 2


def run_collect(args, dirs: list[Path]) -> int:
    rows = collect(find_runs(dirs), args.target)
    out = args.out or dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.csv").write_text(rows_csv(rows))
    plotted = plot_or_say_why(plot_scaling, rows, out / "scaling.png")
    print(collect_table(rows))
    print(f"wrote {out / 'scaling.csv'}" + (f" and {out / 'scaling.png'}" if plotted else ""))
    return 0


def plot_or_say_why(plot, rows: list[dict], path: Path) -> bool:
    """Draw one plot if matplotlib (an optional extra) is there; else say so and go on: the
    tables are the study's results, and a report job must not fail over a picture."""
    if not plots_available():
        print(f"dd-scaling: {path.name} skipped: {NO_MATPLOTLIB}", file=sys.stderr)
        return False
    plot(rows, path)
    return True
