"""Overhead of dd_mpi's training loop: its global-phase epoch (the real ``train_epoch``,
``DataPlan`` batches with augmentation, ``Comm.data_parallel``'s DDP, the per-epoch BN
average) vs a minimal plain torch.distributed DDP loop, same model, batch, in-memory data,
process count and backend, epochs alternating.

    python benchmarks/overhead.py --quick                # ~1 minute on 2 cores
    python benchmarks/overhead.py --nproc 4 --arch resnet32 --width 4 --batch-size 128

dd-train flags (model, batch, data, --device) pass through. The plain loop is what one writes
from the DDP tutorial: pre-normalised float images, a per-epoch shuffle, DDP with its
defaults, SGD, no metrics. Throughput = images trained over all ranks per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from harness import check_dd_train, print_header

from dd_mpi.argtypes import OneLineParser, positive
from dd_mpi.comm import init_world
from dd_mpi.config import parse_config
from dd_mpi.data import DataPlan
from dd_mpi.datasets import load_for_run, split_size
from dd_mpi.launch import LaunchInfo, free_port
from dd_mpi.models import build_model
from dd_mpi.rendezvous import pick_device, pick_precision
from dd_mpi.train import PRECISIONS, Recipe, make_optimizer, make_scheduler, train_epoch

QUICK = ["--arch", "resnet20", "--width", "2", "--train-samples", "512", "--batch-size", "64"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():  # a 1-rank world has no process group
        dist.barrier()


def dd_mpi_epoch(state: dict, epoch: int) -> int:
    """What phase.train_group does per epoch, minus checkpoints and evaluation."""
    comm, plan, pool = state["comm"], state["plan"], state["pool"]
    batches = plan.train(comm, pool, stream=300, epoch=epoch)
    stats = train_epoch(state["ddp"], batches, state["optimizer"], state["scheduler"], comm,
                        label_smoothing=0.0, should_stop=lambda: False,
                        check_every=state["cfg"].signal_check_steps, precision=state["precision"])
    comm.average_buffers_(state["model"])
    return stats.samples


def plain_epoch(state: dict, epoch: int) -> int:
    """The tutorial loop: shuffle, slice this rank's part, forward, backward, step."""
    images, labels, model, optimizer = state["images"], state["labels"], state["ddp"], state["optimizer"]
    rank, size, batch = state["rank"], state["size"], state["batch"]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
    per_rank = len(order) // size
    mine = order[rank * per_rank:(rank + 1) * per_rank].to(images.device)
    for start in range(0, per_rank, batch):
        idx = mine[start:start + batch]
        dtype = PRECISIONS[state["precision"]]
        with torch.autocast(images.device.type, dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return per_rank * size


def worker(rank: int, nproc: int, port: int, dd_args: list[str], reps: int, tuned: bool,
           result_file: str) -> None:
    cfg = parse_config(dd_args)
    launch = LaunchInfo("local", rank, nproc, rank, nproc, "127.0.0.1", port)
    torch.set_num_threads(cfg.threads or max(1, len(os.sched_getaffinity(0)) // nproc))  # as dd-train
    device = pick_device(cfg.device, launch)
    world = init_world(launch, device, timeout=cfg.timeout, io_timeout=cfg.io_timeout)
    comm = world.comm
    data = load_for_run(cfg, comm, workers=0)  # both loops read in the main process (DataPlan below)
    spec = cfg.model_spec(data.num_classes)
    precision = pick_precision(cfg.precision, device, cfg.device)  # both loops alike (--precision; bf16 on GPU)
    recipe = Recipe(cfg.lr, 1000, 0.0, cfg.schedule, cfg.momentum, cfg.weight_decay, 0.0)

    # dd_mpi: the model and optimiser exactly as phase.train_group builds them
    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe, cfg.batch_size * nproc)
    plan = DataPlan(data, device, seed=cfg.seed, batch_size=cfg.batch_size, workers=0)
    pool = torch.arange(split_size(data.train))
    steps = (len(pool) // nproc + cfg.batch_size - 1) // cfg.batch_size
    ours = {"cfg": cfg, "comm": comm, "plan": plan, "pool": pool, "model": model,
            "ddp": comm.data_parallel(model), "optimizer": optimizer, "precision": precision,
            "scheduler": make_scheduler(optimizer, recipe, steps)}

    # plain: same initial weights, data normalised once; DDP defaults unless --plain-tuned
    # (channels-last and no per-forward buffer broadcast, as dd_mpi does: the ratio is then
    # the loop's own overhead: index plans, augmentation, metrics, stop checks, BN averaging)
    torch.manual_seed(cfg.seed)
    plain_model = build_model(spec).to(device)
    source = data.train.images  # DataPlan has put it on the GPU, if there is one
    mean, std = (torch.tensor(v, device=source.device).view(1, -1, 1, 1) for v in (data.mean, data.std))
    images = ((source.float() / 255 - mean) / std).to(device)
    if tuned:
        plain_model = plain_model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    plain_ddp = plain_model  # one rank: no DDP, as in dd_mpi
    if nproc > 1:
        with warnings.catch_warnings():  # torch 2.14 renames broadcast_buffers; the old flag is what we mean
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            plain_ddp = torch.nn.parallel.DistributedDataParallel(
                plain_model, device_ids=[device.index] if device.type == "cuda" else None,
                **({"broadcast_buffers": False} if tuned else {}))
    plain = {"images": images, "labels": data.train.labels.to(device), "batch": cfg.batch_size,
             "precision": precision, "ddp": plain_ddp, "rank": rank, "size": nproc,
             "optimizer": torch.optim.SGD(plain_model.parameters(), lr=cfg.lr * cfg.batch_size * nproc / 128,
                                          momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)}

    rows = []
    for rep in range(reps + 1):  # rep 0 warms both up (allocator, DDP buckets) and is not counted
        order = [("dd_mpi", dd_mpi_epoch, ours), ("plain", plain_epoch, plain)]
        for name, epoch_fn, state in order if rep % 2 else order[::-1]:  # alternate who goes first
            sync(device)
            start = time.perf_counter()
            samples = epoch_fn(state, rep)
            sync(device)
            rows.append({"rep": rep, "loop": name, "images_per_s": samples / (time.perf_counter() - start)})
    if rank == 0:
        with open(result_file, "w") as handle:
            json.dump({"device": str(device), "precision": precision, "rows": rows}, handle)
    world.close()


def main() -> None:
    parser = OneLineParser(description=__doc__, allow_abbrev=False,  # dd-train's flags pass through whole
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=positive(int), default=4, help="processes (ranks)")
    parser.add_argument("--quick", action="store_true", help="small model and data")
    parser.add_argument("--reps", type=positive(int), default=10, help="timed epochs per loop (default 10)")
    parser.add_argument("--plain-tuned", action="store_true",
                        help="plain loop with dd_mpi's channels-last and broadcast_buffers=False")
    args, dd_args = parser.parse_known_args()
    dd_args = [*(QUICK if args.quick else []), *dd_args]
    reps = args.reps
    cfg = check_dd_train(parser, dd_args)  # all bad input refused before any work
    print_header("overhead: dd_mpi's global training loop vs a plain DDP loop")
    print(f"setup: {cfg.arch} width {cfg.width:g}, batch {cfg.batch_size}/rank, {args.nproc} ranks, "
          f"{cfg.dataset} (in memory), {reps} timed epochs each + 1 warm-up, alternating", flush=True)
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        mp.spawn(worker, args=(args.nproc, free_port(), dd_args, reps, args.plain_tuned, tmp.name), nprocs=args.nproc)
        result = json.loads(Path(tmp.name).read_text())
    rows = result["rows"]
    print(f"device {result['device']}, {result['precision']} in both loops; plain loop: "
          + ("channels-last, broadcast_buffers=False" if args.plain_tuned else "DDP defaults, NCHW"))
    timed = [r for r in rows if r["rep"] > 0]
    ratios = []  # per epoch pair: the two ran seconds apart, so they share the machine's mood
    for rep in sorted({r["rep"] for r in timed}):
        pair = {r["loop"]: r["images_per_s"] for r in timed if r["rep"] == rep}
        ratios.append(pair["dd_mpi"] / pair["plain"])
        print(f"epoch {rep}: dd_mpi {pair['dd_mpi']:.1f} img/s, plain {pair['plain']:.1f} img/s, "
              f"ratio {ratios[-1]:.3f}")
    median = {loop: statistics.median(r["images_per_s"] for r in timed if r["loop"] == loop)
              for loop in ("dd_mpi", "plain")}
    print(f"median: dd_mpi {median['dd_mpi']:.1f} img/s, plain {median['plain']:.1f} img/s; "
          f"per-pair ratios min {min(ratios):.3f} max {max(ratios):.3f}")
    print(f"throughput ratio: {statistics.median(ratios):.3f}")

if __name__ == "__main__":
    main()
