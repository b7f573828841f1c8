"""Phase 2's cost: seconds of gather + compose + broadcast (``timing.compose``) vs the run's
total, and rank 0's peak memory while composing vs the global model's size.

    python benchmarks/comm.py --quick     # 512 images, 1 + 1 epochs: ~1.5 minutes on 2 cores
    python benchmarks/comm.py             # 2048 images, 2 + 1 epochs: ~4 minutes

Both at the paper's size: a 4x-wide ResNet32 composed from 4 ResNet32s. Time: one dd-train
job (DD only, 4 ranks) with few training samples, so the share is an upper bound: phase 2
does not grow with the data, the rest does.
Memory: a fresh process does what phase 2 does on rank 0 with the torch engine (build the
global model, gather the flat [N, |S|] buffer, ``unflatten_state``, ``compose``, load into the
global model; then the composed checkpoint, the broadcast's flat copy and the checksums)
and reads the peak resident set (Linux VmHWM, reset first; tracemalloc cannot see torch
tensors). The MPI path gathers straight into [N, |S|] and needs a little less.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import check_dd_train, out_dir, print_header, run_dd_train

from dd_mpi import checkpoint as ckpt
from dd_mpi.argtypes import OneLineParser, positive
from dd_mpi.flat import checksum, checksum_state, flatten_state, unflatten_into, unflatten_state
from dd_mpi.config import RunConfig
from dd_mpi.decompose import compose, composed_spec, subnet_spec
from dd_mpi.errors import EXIT_USAGE
from dd_mpi.models import build_model

PAPER = ["--arch", "resnet32", "--width", "4", "--subnets", "4", "--batch-size", "32"]  # the wide preset's net
QUICK = ["--train-samples", "512", "--test-samples", "256", "--subnet-epochs", "1", "--finetune-epochs", "1"]
FULL = ["--train-samples", "2048", "--test-samples", "512", "--subnet-epochs", "2", "--finetune-epochs", "1"]


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def probe_memory(cfg: RunConfig) -> dict:
    """Rank 0's phase 2, step by step as pipeline.gather_and_compose does it, in this process."""
    sub_spec = subnet_spec(cfg.model_spec(10), cfg.subnets)
    own = build_model(sub_spec).to(memory_format=torch.channels_last).state_dict()  # rank 0's sub-net
    flat = flatten_state(own)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    base, steps, t = rss_kib("VmRSS"), {}, time.perf_counter()

    def step(name: str) -> None:  # seconds of the step, and the peak so far (MiB above the start)
        nonlocal t
        steps[name] = (time.perf_counter() - t, (rss_kib("VmHWM") - base) / 1024)
        t = time.perf_counter()

    composed = build_model(composed_spec(sub_spec, cfg.subnets)).to(memory_format=torch.channels_last)
    parts = [flat.clone() for _ in range(cfg.subnets)]  # what dist.gather fills on the root
    stacked = torch.stack(parts)  # Comm.gather_flat's [N, |S|]
    del parts
    step("build + gather")
    states = [unflatten_state(stacked[k], own) for k in range(cfg.subnets)]
    composed.load_state_dict(compose(states, sub_spec, offdiagonal_std=cfg.offdiag_std,
                                     generator=torch.Generator().manual_seed(0)))
    step("compose + load")
    with tempfile.TemporaryDirectory() as tmp:  # the composed checkpoint rank 0 writes
        ckpt.save(Path(tmp) / "composed.pt", {"model": composed.state_dict(), "config": cfg.to_dict()})
    step("checkpoint")
    unflatten_into(composed, flatten_state(composed.state_dict()))  # broadcast_model_ on the root
    step("broadcast copies")
    checksum_state(own), checksum(composed)
    step("checksums")
    model_mib = sum(v.numel() * v.element_size() for v in composed.state_dict().values()) / 2 ** 20
    return {"model_mib": model_mib, "steps": steps, "params": sum(p.numel() for p in composed.parameters())}


def main() -> None:
    parser = OneLineParser(description=__doc__, allow_abbrev=False,  # dd-train's flags pass through whole
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=positive(int), default=4, help="local ranks (P)")
    parser.add_argument("--quick", action="store_true", help="fewer samples and epochs")
    parser.add_argument("--out", type=Path, help="directory for the run (default runs/bench-comm-<time>)")
    parser.add_argument("--probe-memory", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    args, dd_args = parser.parse_known_args()
    dd_args = [*PAPER, *(QUICK if args.quick else FULL), *dd_args]
    if args.probe_memory:
        print(json.dumps(probe_memory(check_dd_train(parser, dd_args))))
        return
    check_dd_train(parser, [*dd_args, "--strategy", "dd"], args.nproc)  # all bad input refused here
    out = out_dir(parser, args.out, "comm")
    print_header("phase 2: compose time share and rank 0's peak memory")

    probe = subprocess.run([sys.executable, __file__, "--probe-memory", *dd_args], capture_output=True, text=True)
    if probe.returncode == EXIT_USAGE:  # its one line
        sys.stderr.write(probe.stderr)
        sys.exit(EXIT_USAGE)
    if probe.returncode != 0:
        sys.exit(f"the memory probe failed (exit {probe.returncode}):\n{probe.stderr[-3000:]}")
    mem = json.loads(probe.stdout.splitlines()[-1])
    report, _ = run_dd_train([*dd_args, "--strategy", "dd"], args.nproc, out)
    t, cfg = report["timing"], report["config"]
    share = t["compose"] / t["dd_total"]
    print(f"setup: {cfg['arch']} width {cfg['width']:g} ({mem['params']:,} parameters, "
          f"{mem['model_mib']:.1f} MiB), {cfg['subnets']} sub-nets, {args.nproc} ranks, {cfg['train_samples']} training samples, epochs "
          f"{cfg['subnet_epochs']} + {cfg['finetune_epochs']}")
    print(f"time: phase 2 (gather + compose + checkpoint + broadcast) {t['compose']:.2f} s of "
          f"{t['dd_total']:.1f} s DD total = {100 * share:.2f} % (phase 1 {t['subnets']:.1f} s, fine-tune "
          f"{t['finetune']:.1f} s)")
    print("rank 0's phase 2 alone (fresh process): step seconds / peak so far as a multiple of the model:")
    for name, (seconds, peak) in mem["steps"].items():
        print(f"  {name:<17} {seconds:6.2f} s  {peak / mem['model_mib']:5.2f}x")
    compose_peak = mem["steps"]["compose + load"][1] / mem["model_mib"]
    phase2_peak = mem["steps"]["checksums"][1] / mem["model_mib"]
    print(f"memory: peak while composing {compose_peak:.2f}x the global model, "
          f"whole phase 2 {phase2_peak:.2f}x")
    print(f"compose share: {100 * share:.2f} %, peak memory: {compose_peak:.2f}x model")


if __name__ == "__main__":
    main()
