"""Phase-1 speed: seconds per epoch of phase 1 (all N groups in parallel) vs one epoch of the
global net on the same ranks, next to the FLOP-count ideal.

    python benchmarks/phase_speed.py --quick            # ~3 minutes on 2 cores
    python benchmarks/phase_speed.py --quick --arch resnet32 --width 1 --subnets 4 --shortcut B  # the paper's split
    python benchmarks/phase_speed.py --quick --digits --arch resnet32 --width 1 --subnets 4 --shortcut B
    python benchmarks/phase_speed.py --nproc 8 --arch resnet32 --width 4 --subnets 4

One dd-train job trains the sub-nets (``--subnet-data full``) and the baseline for the same
number of epochs, a second one the sub-nets on shards. Evaluation runs only after the last
epoch, which is left out, so every epoch timed is pure training; so is the first (warm-up:
cuDNN's autotuning, the allocator, oneDNN's primitives; on a GPU it took 1.8× a later epoch)
whenever another epoch is left to time. The ideal ratio is the
global net's multiply-accumulates over the work of one phase-1 rank: N (full: each group of
P/N ranks sees all data with a net of ~1/N² the FLOPs) or N² (shard: 1/N of the data).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from harness import AFTER_THE_LAST_EPOCH, check_dd_train, digits_args, out_dir, print_header, run_dd_train

from dd_mpi.argtypes import OneLineParser, positive
from dd_mpi.decompose import subnet_spec
from dd_mpi.inspection import model_sizes

QUICK = ["--arch", "resnet20", "--width", "2", "--subnets", "2", "--train-samples", "2048",
         "--test-samples", "256", "--batch-size", "32"]


def timed_epochs(epochs: int) -> range:
    """The epochs whose seconds count: not the last (it also evaluates), and not the first
    (warm-up) unless it is the only other one."""
    return range(2 if epochs >= 3 else 1, epochs)


def seconds_per_epoch(metrics: list[dict], phase: str) -> float:
    """Median training seconds of the timed epochs, the slowest group's (groups run side by
    side)."""
    rows = [r for r in metrics if r["phase"] == phase]
    timed = timed_epochs(max(r["epoch"] for r in rows))
    by_group: dict = {}
    for r in rows:
        if r["epoch"] in timed:
            by_group.setdefault(r["group"], []).append(r["seconds"])
    return max(statistics.median(v) for v in by_group.values())


def describe(epochs: range) -> str:
    return f"epoch {epochs.start}" if len(epochs) == 1 else f"epochs {epochs.start}-{epochs.stop - 1}"


def main() -> None:
    parser = OneLineParser(description=__doc__, allow_abbrev=False,  # dd-train's flags pass through whole
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=positive(int), default=4, help="local ranks (P)")
    parser.add_argument("--quick", action="store_true", help="small synthetic run")
    parser.add_argument("--digits", action="store_true", help="scikit-learn's digits as an ImageFolder "
                        "(real images through the image-file path)")
    parser.add_argument("--epochs", type=positive(int), help="epochs per phase (default 4 with --quick, else 5)")
    parser.add_argument("--out", type=Path, help="directory for the runs (default runs/bench-speed-TIME)")
    args, dd_args = parser.parse_known_args()
    if args.epochs is not None and args.epochs < 2:
        parser.error("--epochs: 2 or more (the last epoch, which evaluates, is not timed)")
    epochs = str(args.epochs if args.epochs is not None else 4 if args.quick else 5)
    dd_args = [*(QUICK if args.quick else []), *(digits_args(write=False) if args.digits else []), *dd_args,
               "--subnet-epochs", epochs, "--baseline-epochs",
               epochs, "--finetune-epochs", "0", "--eval-every", AFTER_THE_LAST_EPOCH]
    full_args = [*dd_args, "--strategy", "both", "--subnet-data", "full"]
    shard_args = [*dd_args, "--strategy", "dd", "--subnet-data", "shard"]
    cfg = check_dd_train(parser, full_args, args.nproc)  # all bad input refused before the first run
    check_dd_train(parser, shard_args, args.nproc)
    out = out_dir(parser, args.out, "speed")
    if args.digits:
        digits_args()  # written now
    print_header("phase-1 epoch vs global epoch")

    n, spec = cfg.subnets, cfg.model_spec(10)
    size = cfg.image_size or spec.default_image_size
    global_flops, sub_flops = model_sizes(spec, size)[1], model_sizes(subnet_spec(spec, n), size)[1]
    ideal = {"full": global_flops / sub_flops / n, "shard": global_flops / sub_flops}  # ~N, ~N²

    full_report, full_metrics = run_dd_train(full_args, args.nproc, out / "full")
    _, shard_metrics = run_dd_train(shard_args, args.nproc, out / "shard")
    global_epoch = seconds_per_epoch(full_metrics, "baseline")
    batch = (f"every net's batch {cfg.global_batch_size} over its ranks" if cfg.global_batch_size
             else f"batch {cfg.batch_size}/rank")
    level0 = full_report["layout"][0]  # as dd-train laid phase 1 out (--groups, --subnet-batch-size)
    phase1 = (f"phase 1 in {level0['groups']} group(s) of {level0['ranks_per_group']} rank(s) x "
              f"{level0['nets_per_group']} net(s), {level0['batch_size']}/rank per net")
    print(f"setup: {cfg.arch} width {cfg.width:g}, {n} sub-nets, {args.nproc} ranks, {batch}, {phase1}, "
          f"{full_report['config']['dataset']}, {epochs} epochs per phase, "
          f"timed: {describe(timed_epochs(int(epochs)))} (the last evaluates, the first warms up)")
    print(f"global net: {global_epoch:.2f} s/epoch on {args.nproc} ranks")
    ratios = {}
    for mode, metrics in (("full", full_metrics), ("shard", shard_metrics)):
        phase1 = seconds_per_epoch(metrics, "subnet")
        ratios[mode] = global_epoch / phase1
        print(f"phase 1 ({mode}): {phase1:.2f} s/epoch; global / phase 1 = {ratios[mode]:.2f} "
              f"(FLOP ideal {ideal[mode]:.2f}, {100 * ratios[mode] / ideal[mode]:.0f} % of it)")
    print(f"speed ratio: {ratios['full']:.2f} (full; shard {ratios['shard']:.2f})")


if __name__ == "__main__":
    main()
