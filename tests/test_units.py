"""Pure pieces the reliability contract rests on, one process, no communication: rank
discovery, data plans, config validation, checkpoint files, failure classification.

    .venv/bin/python -m pytest -q tests/test_units.py
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dd_mpi import checkpoint as ckpt, runlock
from dd_mpi.cli import _how_to_continue, _without_nproc, main
from dd_mpi.comm import Comm
from dd_mpi.errors import Outcome, deciding, peer_lost as exit_quietly_if_peer_lost
from dd_mpi.flat import flatten_state, unflatten_into
from dd_mpi.layout import Layout
from dd_mpi.config import PRESETS, RunConfig, build_parser, parse_config
from dd_mpi.data import (DataPlan, Stream, batch_slices, eval_indices, random_crop_flip, subset_for_group,
                         train_indices, train_steps)
from dd_mpi.bundle import InMemorySplit
from dd_mpi.decompose import composed_spec, subnet_spec
from dd_mpi.models import ModelSpec, build_model, count_parameters
from dd_mpi.phase import compile_mode
from dd_mpi.plan import build_plan, level_layouts, refuse_empty_epochs
from dd_mpi.pipeline import GroupAlarm
from dd_mpi.errors import UsageError
from dd_mpi.launch import _wait_all, cpu_threads_per_rank, data_workers, detect_launch, free_port, share_of_node
from dd_mpi.synthetic import make_synthetic

from helpers import TINY, launcher_free_env


# --- rank discovery: every launcher, and the traps of nested launchers --------------------
TORCHRUN = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, expected", [
    pytest.param({}, ("single", 0, 1, 0, 1), id="no-launcher"),
    pytest.param(TORCHRUN, ("torchrun", 2, 4, 2, 4), id="torchrun"),
    pytest.param({**TORCHRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, ("torchrun", 2, 4, 2, 4),
                 id="torchrun-inside-slurm"),
    pytest.param({**TORCHRUN, "DD_MPI_LAUNCHER": "local"}, ("local", 2, 4, 2, 4), id="dd-train-nproc"),
    pytest.param({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, ("mpi", 3, 4, 1, 2), id="openmpi"),
    pytest.param({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4"},
                 ("mpi", 3, 4, 3, 4), id="mpich-hydra"),
    pytest.param({"PMI_RANK": "0", "PMI_SIZE": "1"}, ("single", 0, 1, 0, 1), id="pmi-singleton"),
    pytest.param({"PMIX_RANK": "1", "PMIX_SIZE": "4", "PMIX_LOCAL_RANK": "1", "PMIX_LOCAL_SIZE": "4"},
                 ("mpi", 1, 4, 1, 4), id="pmix"),
    pytest.param({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
                  "SLURM_STEP_ID": "0", "MASTER_ADDR": "node1"}, ("slurm", 5, 8, 1, 4), id="srun"),
    # the batch script of `sbatch -n 4` (no step): dd-train there is alone, it once waited for 3 ranks
    pytest.param({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "4",
                  "SLURM_JOB_ID": "77"}, ("single", 0, 1, 0, 1), id="sbatch-script"),
    pytest.param({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "PMI_RANK": "3", "PMI_SIZE": "4",
                  "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4"}, ("mpi", 3, 4, 3, 4), id="mpirun-inside-slurm"),
    pytest.param({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"},
                 ("mpi", 2, 4, 0, 1), id="openmpi-inside-slurm"),
    pytest.param({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "4"},
                 ("horovod", 1, 4, 1, 4), id="horovodrun"),
    pytest.param({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1",
                  "OMPI_COMM_WORLD_SIZE": "4"}, ("horovod", 1, 4, 0, 1), id="horovodrun-over-mpirun"),
    # RANK/WORLD_SIZE left in the shell: every rank took rank 0 (or 2) and waited for the others
    pytest.param({**TORCHRUN, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}, ("mpi", 3, 4, 0, 1),
                 id="stale-rank-under-mpirun"),
    pytest.param({**TORCHRUN, "HOROVOD_RANK": "1", "HOROVOD_SIZE": "4"}, ("horovod", 1, 4, 0, 1),
                 id="stale-rank-under-horovodrun"),
    pytest.param({**TORCHRUN, "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}, ("slurm", 5, 8, 0, 1),
                 id="stale-rank-under-srun"),
    pytest.param({**TORCHRUN, "TORCHELASTIC_RUN_ID": "none", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                  "SLURM_STEP_ID": "0", "PMI_RANK": "1", "PMI_SIZE": "2"}, ("torchrun", 2, 4, 2, 4),
                 id="torchrun-in-an-srun-step"),
])
def test_detect_launch(env, expected):
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == expected


def test_detect_launch_rendezvous_address():
    assert (detect_launch(TORCHRUN).master_addr, detect_launch(TORCHRUN).master_port) == ("10.0.0.1", 29500)
    slurm = detect_launch({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "123",
                           "SLURM_STEP_ID": "0", "MASTER_ADDR": "node7"})
    assert (slurm.master_addr, slurm.master_port) == ("node7", 15123)  # a port every task derives alike, below
    # the ephemeral range (32768+), where an outgoing connection may hold it
    ports = {detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "MASTER_ADDR": "n",
                            "SLURM_JOB_ID": str(job)}).master_port for job in range(0, 60000, 7)}
    assert min(ports) >= 1024 and max(ports) < 32768


def test_threads_per_rank_do_not_oversubscribe():
    # torchrun's 4 ranks share its Slurm task's CPUs; a rank that srun or MPI started is a task
    assert cpu_threads_per_rank(detect_launch(TORCHRUN), None, {"SLURM_CPUS_PER_TASK": "32"}) == 8
    assert data_workers(cpu_threads_per_rank(detect_launch(TORCHRUN), None, {"SLURM_CPUS_PER_TASK": "32"})) == 7
    assert cpu_threads_per_rank(detect_launch(TORCHRUN), None, {"SLURM_CPUS_PER_TASK": "6"}) == 1
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
            "SLURM_STEP_ID": "0"}
    assert cpu_threads_per_rank(detect_launch(srun), None, {"SLURM_CPUS_PER_TASK": "6"}) == 6
    hydra = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4"}
    assert cpu_threads_per_rank(detect_launch(hydra), None, {"SLURM_CPUS_PER_TASK": "6"}) == 6
    assert cpu_threads_per_rank(detect_launch(TORCHRUN), None, {}) == max(1, len(os.sched_getaffinity(0)) // 4)


def test_threads_per_rank_follow_how_the_launcher_bound_the_ranks():
    """Every rank's (node, affinity mask): a rank's share counts each of its CPUs 1/k, k the
    node's ranks that may run there. The masks alone once got divided by the node's rank
    count again: a rank bound to its own 16 cores took 4 threads, one bound to a socket
    shared by 4 of 8 ranks took 4 instead of 8."""
    socket0, socket1 = list(range(32)), list(range(32, 64))
    per_core = [("n1", list(range(16 * r, 16 * r + 16))) for r in range(4)]  # srun/mpirun --bind-to core
    one_mask = [("n1", socket0 + socket1)] * 8  # torchrun, --nproc, unbound MPI
    per_socket = [("n1", socket0)] * 4 + [("n1", socket1)] * 4  # Open MPI's default for > 2 ranks
    two_nodes = [("n1", socket0), ("n1", socket0), ("n2", socket0)]  # the same CPU ids on another node
    uneven = [("n1", [0, 1]), ("n1", [1])]  # CPU 1 shared: rank 0 gets 1 + 1/2, rank 1 gets 1/2
    assert [share_of_node(per_core, r) for r in range(4)] == [16] * 4
    assert [share_of_node(one_mask, r) for r in range(8)] == [8] * 8
    assert [share_of_node(per_socket, r) for r in range(8)] == [8] * 8
    assert [share_of_node(two_nodes, r) for r in range(3)] == [16, 16, 32]
    assert [share_of_node(uneven, r) for r in range(2)] == [1.5, 0.5]
    mpirun = detect_launch({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
                            "OMPI_COMM_WORLD_LOCAL_RANK": "5", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"})
    assert cpu_threads_per_rank(mpirun, per_socket, {}) == 8  # the old rule, mask / 8 local ranks, gave 4
    assert cpu_threads_per_rank(mpirun, per_socket, {"SLURM_CPUS_PER_TASK": "6"}) == 6  # Slurm's allotment caps it
    torchrun = detect_launch(TORCHRUN)  # rank 2 of 4 local ranks
    assert cpu_threads_per_rank(torchrun, one_mask[:4], {"SLURM_CPUS_PER_TASK": "64"}) == 16
    assert cpu_threads_per_rank(torchrun, [("n1", [0])] * 4, {}) == 1  # never 0


def test_group_layout_is_contiguous_blocks():
    assert Layout(8, 4, 4).rank_lists == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [Layout(6, 2, 2).group_of_rank(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]


# --- data plans: pure functions of (seed, stream, epoch, rank in the comm) ----------------
@pytest.mark.parametrize("pool_size, size", [(64, 1), (64, 4), (63, 4), (65, 4), (10, 3), (7, 8), (24, 3), (68, 4),
                                             (73, 8), (9, 1)])
def test_train_indices_split_each_epoch_disjointly(pool_size, size):
    pool = torch.arange(100, 100 + pool_size)  # a shard: its own sample ids
    orders = []
    for epoch in range(3):
        parts = [train_indices(pool, seed=5, stream=100, epoch=epoch, rank=r, size=size) for r in range(size)]
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= (pool_size % size > 0)
        seen = torch.cat(parts)
        assert sorted(seen.tolist()) == pool.tolist()  # every sample exactly once, none dropped
        for batch_size in (1, 3, 8):  # every rank takes the same number of steps
            steps = train_steps(pool_size, size, batch_size)
            assert {len(batch_slices(len(p), batch_size, steps)) for p in parts} == {steps}
            covered = [i for p in parts if steps for part in batch_slices(len(p), batch_size, steps)
                       for i in p[part].tolist()]
            if pool_size >= size:  # fewer samples than ranks: nothing to step on
                assert sorted(covered) == pool.tolist()
                sizes = [part.stop - part.start for p in parts for part in batch_slices(len(p), batch_size, steps)]
                assert max(sizes) <= batch_size + 2
                assert min(sizes) > 1 or batch_size == 1 or steps == 1  # BatchNorm on a 1x1 map needs 2
        again = [train_indices(pool, seed=5, stream=100, epoch=epoch, rank=r, size=size) for r in range(size)]
        assert all(torch.equal(a, b) for a, b in zip(parts, again))  # pure: a resumed run sees the same
        orders.append(seen)
    if pool_size > 8:
        assert not torch.equal(orders[0], orders[1])  # reshuffled per epoch
        other = torch.cat([train_indices(pool, seed=5, stream=101, epoch=0, rank=r, size=size) for r in range(size)])
        assert not torch.equal(orders[0], other)  # streams (groups, phases) differ


@pytest.mark.parametrize("num_samples, size", [
    (64, 4), (63, 4), (1, 1), (100, 3),
    (5, 8),  # fewer test samples than ranks: the last ranks score none
])
def test_eval_indices_score_every_sample_exactly_once(num_samples, size):
    seen = torch.cat([eval_indices(num_samples, rank=r, size=size) for r in range(size)])
    assert sorted(seen.tolist()) == list(range(num_samples))


@pytest.mark.parametrize("groups", [1, 2, 3, 4])
def test_shards_partition_the_training_set(groups):
    shards = [subset_for_group(50, subnet_data="shard", group=k, groups=groups, seed=1) for k in range(groups)]
    assert sorted(torch.cat(shards).tolist()) == list(range(50))
    assert torch.equal(subset_for_group(50, subnet_data="full", group=1, groups=groups, seed=1), torch.arange(50))


def test_crop_flip_shifts_and_mirrors_each_image_by_its_own_draw():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)  # pad = 8 // 8 = 1
    same = random_crop_flip(images, torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([False, True]))
    assert torch.equal(same[0], images[0]) and torch.equal(same[1], images[1].flip(-1))
    moved = random_crop_flip(images, torch.tensor([0, 2]), torch.tensor([2, 0]), torch.tensor([False, False]))
    assert torch.equal(moved[0, :, 1:, :-1], images[0, :, :-1, 1:]) and (moved[0, :, 0] == 0).all()
    assert torch.equal(moved[1, :, :-1, 1:], images[1, :, 1:, :-1]) and (moved[1, :, :, 0] == 0).all()


def test_flat_state_round_trips_channels_last_models_in_logical_order():
    spec = ModelSpec("resnet20", 0.5, 10)
    torch.manual_seed(0)
    source = build_model(spec).to(memory_format=torch.channels_last)
    target = build_model(spec).to(memory_format=torch.channels_last)
    state = source.state_dict()
    flat = flatten_state(state)
    assert torch.equal(flat, torch.cat([t.reshape(-1).float() for t in state.values()]))
    unflatten_into(target, flat)
    assert all(torch.equal(state[k], v) for k, v in target.state_dict().items())


def _batches(comm: Comm, epoch: int, stream: int = 100) -> list[torch.Tensor]:
    data = make_synthetic(64, 16, seed=3)
    plan = DataPlan(data, torch.device("cpu"), seed=3, batch_size=8)  # a fresh plan, as after a restart
    return [torch.cat([images.flatten(), labels.float()])
            for images, labels in plan.train(comm, torch.arange(64), stream=stream, epoch=epoch)]


def _comm(ranks: list[int], rank: int) -> Comm:
    return Comm(ranks, rank, None, torch.device("cpu"))


@pytest.mark.parametrize("crop_to", [None, 24], ids=["pad-and-crop", "resized-crop"])
def test_fused_nets_get_exactly_the_batches_each_would_get_alone(crop_to):
    """The k nets' batches are gathered and augmented as one batch of k·n images: each net's
    channels and labels must still be, bit for bit, its batches trained alone."""
    data = make_synthetic(96, 16, seed=3)
    if crop_to is not None:  # stored larger, as a --cache-dir cache: random-resized crops
        data = replace(data, train=InMemorySplit(data.train.images, data.train.labels, crop_to=crop_to))
    plan = DataPlan(data, torch.device("cpu"), seed=3, batch_size=8)
    comm = _comm([0, 1], 1)
    streams = [Stream(torch.arange(32) + 32 * j, 100 + j) for j in range(3)]
    fused = list(plan.train_fused(comm, streams, epoch=2))
    assert len(fused) == 2
    for j, stream in enumerate(streams):
        alone = list(plan.train(comm, stream.pool, stream=stream.stream, epoch=2))
        assert len(alone) == len(fused)
        for (images, labels), (own_images, own_labels) in zip(fused, alone):
            assert images.shape[1] == 9 and torch.equal(images[:, 3 * j:3 * j + 3], own_images)
            assert torch.equal(labels[:, j], own_labels)
    assert not torch.equal(fused[0][0][:, :3], fused[0][0][:, 3:6])  # the nets' batches differ


def test_batches_and_augmentation_depend_only_on_seed_stream_epoch_and_rank_in_comm():
    first = _batches(_comm([0, 1], 1), epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(first, _batches(_comm([0, 1], 1), epoch=2)))
    # the same place in another group (world ranks 2, 3): the same batches
    assert all(torch.equal(a, b) for a, b in zip(first, _batches(_comm([2, 3], 1), epoch=2)))
    assert not torch.equal(first[0], _batches(_comm([0, 1], 1), epoch=3)[0])
    assert not torch.equal(first[0], _batches(_comm([0, 1], 0), epoch=2)[0])


def test_the_synthetic_test_set_does_not_depend_on_the_training_sets_size():
    """Runs that vary --train-samples (a scaling study, the paper's split at 4x the data) are
    scored on the same test images."""
    small, large, other = make_synthetic(64, 16, seed=3), make_synthetic(128, 16, seed=3), make_synthetic(64, 16, seed=4)
    assert torch.equal(small.test.images, large.test.images) and torch.equal(small.test.labels, large.test.labels)
    assert not torch.equal(small.test.images, other.test.images)


def test_an_uneven_epoch_trains_every_sample_once_in_the_same_number_of_steps_per_rank():
    data = make_synthetic(66, 16, seed=3)  # 66 over 4 ranks: 17, 17, 16, 16
    plan = DataPlan(data, torch.device("cpu"), seed=3, batch_size=8)
    per_rank = [[labels for _, labels in plan.train(_comm([0, 1, 2, 3], r), torch.arange(66), stream=1, epoch=0)]
                for r in range(4)]
    assert [len(b) for b in per_rank] == [2, 2, 2, 2]  # the 17th sample rides in the last batch
    assert [sum(len(x) for x in b) for b in per_rank] == [17, 17, 16, 16]
    assert sorted(torch.cat([x for b in per_rank for x in b]).tolist()) == sorted(data.train.labels.tolist())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_run_whose_sub_nets_compose_back(name):
    cfg = parse_config(["--preset", name])
    classes = {"cifar10": 10, "cifar100": 100, "food101": 101}[cfg.dataset]
    assert name.startswith(cfg.dataset) and cfg.arch in name and cfg.subnets == (8 if name.endswith("-n8") else 4)
    global_spec = cfg.model_spec(classes)
    sub = subnet_spec(global_spec, cfg.subnets)  # raises if a width is not divisible by N
    with torch.device("meta"):
        wide, narrow = build_model(global_spec), build_model(sub)
        composed = build_model(composed_spec(sub, cfg.subnets))
    assert count_parameters(composed) == count_parameters(wide)  # composes into the preset's net
    assert count_parameters(narrow) * cfg.subnets ** 2 < 1.5 * count_parameters(wide)  # ~1/N² each
    doc = PRESETS[name]["_doc"]  # what --help says is what runs
    for value in (cfg.subnet_epochs, cfg.finetune_epochs, cfg.baseline_epochs, cfg.subnets):
        assert str(value) in doc
    assert parse_config(["--preset", name, "--subnet-epochs", "3"]).subnet_epochs == 3  # later flags win


def test_a_batch_given_over_a_preset_wins_over_its_global_batch(tmp_path):
    """--batch-size (per rank) and --global-batch-size are two ways to give one batch: the
    later layer's wins, so --batch-size on a paper preset (global 128) is the batch trained."""
    def batches(argv, ranks=4):
        cfg = parse_config(argv)
        plan = build_plan(cfg, level_layouts(cfg, ranks), ranks, 10)
        return [level.batch_size for level in plan.levels], plan.baseline.batch_size

    assert batches(["--preset", "cifar10-resnet32"]) == ([128, 32], 32)  # 128 over 1 rank / 4 ranks
    assert batches(["--preset", "cifar10-resnet32", "--batch-size", "64"]) == ([64, 64], 64)
    config = tmp_path / "run.yaml"
    config.write_text("preset: cifar10-resnet32\nbatch_size: 16\n")
    assert batches(["--config", str(config)]) == ([16, 16], 16)
    assert batches(["--config", str(config), "--global-batch-size", "256"]) == ([256, 64], 64)
    assert batches(["--strategy", "both", "--batch-size", "8", "--global-batch-size", "64"]) == ([32, 16], 16)  # one layer: global


def test_a_net_with_no_step_to_take_is_refused_before_the_run():
    """Fewer samples an epoch than the ranks that train a net: no step, and a net reported
    as trained at chance. Refused with the numbers, before anything runs."""
    def check(argv, samples, ranks, image_size=32):
        cfg = parse_config(argv)
        refuse_empty_epochs(build_plan(cfg, level_layouts(cfg, ranks), ranks, 10), samples, cfg, image_size)

    shard = ["--subnets", "4", "--subnet-data", "shard"]
    with pytest.raises(UsageError, match=r"subnet: each net has 0 training samples of 3 \(--subnet-data shard") as error:
        check(shard, 3, 2)
    # one rank per group: the fix is not fewer ranks
    assert str(error.value).endswith("for the rank that trains it, so no step to take: give more samples "
                                     "(--train-samples) or --subnet-data full or fewer --subnets"), error.value
    check(shard, 4, 2)  # one sample per sub-net, one rank each
    with pytest.raises(UsageError, match="baseline: each net has 1 training samples of 1 for the 2 ranks"):
        check(["--strategy", "baseline"], 1, 2)
    check(["--strategy", "baseline", "--baseline-epochs", "0"], 1, 2)  # nothing to train: nothing to refuse
    with pytest.raises(UsageError, match="finetune: each net has 3 training samples of 3 for the 4 ranks"):
        check(["--subnets", "4"], 3, 4)  # phase 1 (all data, one rank per sub-net) could; all 4 ranks cannot
    # one image a step where the maps shrink to 1x1: BatchNorm's ValueError traceback on every rank
    r50 = ["--arch", "resnet50", "--width", "0.25", "--subnets", "2", "--strategy", "dd"]
    with pytest.raises(UsageError) as error:
        check(r50, 5, 4)  # 2 ranks a sub-net: 2 images each, but the fine-tune's 4 ranks take 1 each
    assert str(error.value) == ("finetune: each step takes 1 image per rank, and resnet50 at 32 px has a 1x1 feature "
                                "map, where BatchNorm needs 2 values per channel to train: give more samples per rank "
                                "(--train-samples, fewer ranks) or a larger --image-size")
    with pytest.raises(UsageError, match="subnet: each step takes 1 image per rank.*give a batch of 2 or more per rank"):
        check([*r50, "--batch-size", "1"], 64, 2)
    check(r50, 8, 4)  # 2 images a step on every rank
    check(r50, 5, 4, image_size=64)  # the last maps 2x2
    check(["--subnets", "4"], 4, 4)  # resnet20 at 32 px: its smallest map is 8x8, one image a step trains


# --- flags: every bad value is refused with one line that names the flag -------------------
@pytest.mark.parametrize("argv, message", [
    (["--subnets", "0"], "--subnets 0 is invalid"),
    (["--arch", "resnet21"], "--arch 'resnet21' is unknown"),
    (["--arch", "vgg16"], "--arch 'vgg16' is unknown"),
    (["--arch", "resnet２０"], "--arch 'resnet２０' is unknown"),  # (full-width digits: str.isdigit)
    (["--arch", "resnet6000002"], "--arch resnet6000002 is deeper than dd_mpi builds (up to resnet2402)"),
    (["--dataset", "mnist"], "--dataset 'mnist' is unknown"),
    (["--preset", "nope"], "--preset 'nope' is unknown"),
    (["--strategy", "fast"], "--strategy 'fast' is unknown"),
    (["--subnet-epochs", "-1"], "--subnet-epochs -1 is invalid"),
    (["--finetune-epochs", "-2"], "--finetune-epochs -2 is invalid"),
    (["--batch-size", "0"], "--batch-size 0 is invalid"),
    (["--lr", "0"], "--lr 0.0 is invalid"),
    (["--lr", "-0.1"], "--lr -0.1 is invalid"),
    (["--finetune-lr", "nan"], "--finetune-lr nan is invalid"),
    (["--subnet-lr", "inf"], "--subnet-lr inf is invalid"),
    (["--width", "0"], "--width 0.0 is invalid"),
    (["--timeout", "0"], "--timeout 0.0 is invalid"),
    (["--signal-check-steps", "0"], "--signal-check-steps 0 is invalid"),
    (["--subnets", "2", "--only-group", "2"], "--only-group 2 is invalid"),
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir"),
    (["--timeout", "nan"], "--timeout nan is invalid"),
    (["--timeout", "1e10"], "--timeout 10000000000.0 is invalid: use 1 to 2,592,000 seconds"),  # (torch: 0 s)
    (["--io-timeout", "0.001"], "--io-timeout 0.001 is invalid: use 1 to"),  # (a rank 'lost' at start-up)
    (["--momentum", "-0.5"], "--momentum -0.5 is invalid"),
    (["--momentum", "1"], "--momentum 1.0 is invalid"),
    (["--weight-decay", "-0.0001"], "--weight-decay -0.0001 is invalid"),
    (["--offdiag-std", "-0.01"], "--offdiag-std -0.01 is invalid"),
    (["--finetune-warmup-epochs", "-1"], "--finetune-warmup-epochs -1.0 is invalid"),
    (["--workers", "-1"], "--workers -1 is invalid"),
    (["--subnet-batch-size", "0"], "--subnet-batch-size 0 is invalid: use 1 or more"),
    (["--global-batch-size", "0"], "--global-batch-size 0 is invalid: use 1 or more"),
    (["--groups", "0"], "--groups 0 is invalid: use 1 or more"),
    # an array task's ranks do not use --groups, but the final job would refuse it
    (["--subnets", "4", "--groups", "3", "--only-group", "0"], "--groups 3 does not divide the 4 sub-networks"),
    (["--subnet-eval-every", "0"], "--subnet-eval-every 0 is invalid: use 1 or more"),
    (["--compile", "--compile-mode", "fast"], "--compile-mode 'fast' is unknown: choose one of default, reduce"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead applies to compiled models: add --compile"),
    (["--dataset", "cifar10", "--image-size", "64"], "--image-size 64 does not apply to --dataset cifar10"),
    (["--dataset", "food101", "--cache-dir", ""], "--cache-dir '' is empty: give a folder"),
    (["--out", ""], "--out '' is empty: give a folder"),  # wrote the run into the working directory
    (["--preset", ""], "--preset '' is unknown: choose one of cifar10-resnet32"),  # ran the defaults
    (["--config", ""], "--config '' is empty: give a YAML file"),  # read as no file: the defaults ran
    (["--seed", str(10 ** 20)], "--seed 100000000000000000000 is out of range: use one from -2**53 to 2**53"),
])
def test_config_validation_names_the_flag(argv, message):
    with pytest.raises(UsageError) as error:
        parse_config(argv)
    assert message in str(error.value)


def test_cuda_graphs_are_asked_of_torch_compile_only_for_one_rank_groups():
    assert compile_mode("reduce-overhead", 1) == ("reduce-overhead", None)
    assert compile_mode("max-autotune", 1) == ("max-autotune", None)
    assert compile_mode("reduce-overhead", 2)[0] == "default"  # DDP's hooks between graphs
    assert compile_mode("max-autotune", 4) == (
        "max-autotune-no-cudagraphs", "trained on 4 ranks, so compiled in mode max-autotune-no-cudagraphs "
        "(--compile-mode max-autotune captures CUDA graphs only on a GPU, where a group is one rank)")
    assert compile_mode("default", 4) == ("default", None)
    assert compile_mode("reduce-overhead", 1, "cpu") == (
        "default", "on the CPU, which has no CUDA graphs, so compiled in mode default (--compile-mode "
        "reduce-overhead captures CUDA graphs only on a GPU, where a group is one rank)")
    assert parse_config(["--compile", "--compile-mode", "reduce-overhead"]).compile_mode == "reduce-overhead"


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "--lr 0.0 is invalid"),
    (["--width", "1", "--subnets", "3", "--only-group", "0"], "--subnets 3 does not divide layer1 of resnet20"),
    (["--width", "0.3", "--subnets", "1"], "--width 0.3 gives 4.8 channels"),
    (["--width", "2", "--subnets", "32"], "--subnets 32 (each sub-net at width 0.0625, --width 2 / 32): option A "
                                          "shortcut from 1 to 2 channels cannot be padded evenly (an odd number "
                                          "more): use --shortcut B, another --width or another --subnets"),
    (["--preset", "cifar10-resnet999"], "--preset 'cifar10-resnet999' is unknown"),
    (["--subnets", "x"], "argument --subnets: invalid int value: 'x' (dd-train --help lists the flags)"),
    (["--bogus", "4"], "unrecognized arguments: --bogus 4"),
    # no prefix of a flag stands for it: a wrapper that looks for --out (dd_array_submit.sh) or
    # keeps the last of each flag (the benchmarks) would miss it
    (["--subnet-epoch", "3"], "unrecognized arguments: --subnet-epoch 3"),
    (["--nproc", "100000"], "--nproc 100000 would start 100000 ranks on this machine's"),  # it started them
    # the OOM killer ended it minutes later, exit 137 and no word
    (["--width", "10000"], "--width 10000 makes resnet20 2.67e+13 weights, which take at least"),
])
def test_dd_train_refuses_bad_flags_in_one_line_writing_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dd-train: error: ") and message in lines[0]
    assert captured.out == ""
    assert not out.exists()


LAUNCHER_PROCESS = r"""
import sys
from dd_mpi.cli import main
code = main(sys.argv[1:])
print(f"exit {code},", "torch imported" if "torch" in sys.modules else "no torch")
"""


@pytest.mark.slow
def test_the_nproc_launcher_process_never_imports_torch(tmp_path):
    """`dd-train --nproc K` checks the flags, starts K ranks and waits: importing torch there
    cost every run ~2 s of CPU before the first rank could start, and ~300 MB held to the end.
    Its ranks make the checks that need torch: a split that cannot work is said once, exit 2."""
    result = subprocess.run([sys.executable, "-c", LAUNCHER_PROCESS, "--nproc", "2", "--width", "1", "--subnets", "3",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                            env=launcher_free_env())
    assert "exit 2, no torch" in result.stdout, (result.stdout, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("dd-train: error: ")]
    assert len(errors) == 1 and "--subnets 3 does not divide layer1 of resnet20" in errors[0], result.stderr[-3000:]


RANK_PROCESS = r"""
import sys
from dd_mpi.cli import main
code = main(sys.argv[1:])
print(f"exit {code},", "torchvision imported" if "torchvision" in sys.modules else "no torchvision")
"""


@pytest.mark.slow
def test_a_rank_on_the_synthetic_set_never_imports_torchvision(tmp_path):
    """torchvision (its models and ops) cost each rank ~2 s of CPU at start-up, as much as
    torch: only a rank that reads image files or CIFAR imports it (``bundle``'s docstring)."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", RANK_PROCESS, *TINY, "--subnets", "2", "--baseline-epochs", "0",
                             "--out", str(out)], capture_output=True, text=True, timeout=300, env=launcher_free_env())
    assert "exit 0, no torchvision" in result.stdout, (result.stdout, result.stderr[-3000:])
    assert (out / "report.json").exists()


def test_resume_names_every_setting_that_differs():
    saved = RunConfig(arch="resnet20", width=2.0, subnets=2).to_dict()
    assert RunConfig(arch="resnet20", width=2.0, subnets=2, resume=True, timeout=5).incompatible_with(saved) == []
    differences = RunConfig(arch="resnet32", width=4.0, subnets=2, dataset="cifar10").incompatible_with(saved)
    assert differences == ["--arch: 'resnet20' -> 'resnet32'", "--width: 2.0 -> 4.0",
                           "--dataset: 'synthetic' -> 'cifar10'"]
    four = RunConfig(subnets=4).to_dict()  # --levels: what it means counts, not how it is spelt
    assert RunConfig(subnets=4, levels="4,1").incompatible_with(four) == []
    assert RunConfig(subnets=4, levels="4, 1").incompatible_with(RunConfig(subnets=4, levels="4,1").to_dict()) == []
    assert RunConfig(subnets=4, levels="4,2,1").incompatible_with(four) == ["--levels: 4,1 -> 4,2,1"]
    assert RunConfig(subnets=2).incompatible_with(four) == ["--subnets: 4 -> 2"]
    # --groups sets each sub-net's batch: sub-nets finished under one G and others under another
    # would mix two recipes
    assert RunConfig(subnets=4, groups=1).incompatible_with(four) == ["--groups: None -> 1"]
    # ... but giving the G that the job's ranks take by default, or leaving it out, is the same run
    assert RunConfig(subnets=4, groups=2).incompatible_with(four, default_groups=2) == []
    assert RunConfig(subnets=4).incompatible_with(RunConfig(subnets=4, groups=2).to_dict(), default_groups=2) == []
    assert RunConfig(subnets=4, groups=1).incompatible_with(four, default_groups=2) == ["--groups: None -> 1"]
    cached = RunConfig(dataset="food101", cache_dir="/scratch/a").to_dict()
    assert RunConfig(dataset="food101", cache_dir="/scratch/b").incompatible_with(cached) == []  # moved: fine
    (dropped,) = RunConfig(dataset="food101").incompatible_with(cached)
    assert dropped.startswith("--cache-dir: '/scratch/a' -> None")


ONE_TORCHRUN_RANK = {"TORCHELASTIC_RUN_ID": "none", "RANK": "0", "WORLD_SIZE": "1"}  # (its counters count there only)


@pytest.mark.parametrize("env, flags, message", [
    ({**ONE_TORCHRUN_RANK, "TORCHELASTIC_RESTART_COUNT": "1"}, [],
     "this job was restarted (TORCHELASTIC_RESTART_COUNT=1) but has no --out"),
    ({"SLURM_RESTART_COUNT": "2"}, [], "this job was restarted (SLURM_RESTART_COUNT=2) but has no --out"),
    ({**ONE_TORCHRUN_RANK, "TORCHELASTIC_MAX_RESTARTS": "3"}, [], "torchrun --max-restarts 3 restarts a failed job"),
    ({}, ["--resume"], "--resume continues the run in --out, and there is none: add --out DIR"),
    ({}, ["--only-group", "1"], "--only-group 1 trains one group of the run in --out"),
])
def test_a_job_that_continues_a_run_needs_out(monkeypatch, tmp_path, capsys, env, flags, message):
    """Without --out each attempt names a new run after its start time: a restart or a
    --resume would silently train from scratch, and an array task's sub-net would land where
    the final job never looks."""
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["--train-samples", "64", "--test-samples", "32", "--subnet-epochs", "1", "--finetune-epochs", "0",
                 *flags]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dd-train: error: ") and message in line
    assert not (tmp_path / "runs").exists()


def test_flags_the_run_does_not_read_are_noted_once(tmp_path):
    """Forgetting --dataset with --data-dir ~/cifar trained the built-in synthetic set without a
    word; --groups with --strategy baseline was dropped silently. Each is a note (a config file
    may set them for other runs), said once for the job (rank 0), not once per rank."""
    from helpers import explain, run_dd
    argv = ["--train-samples", "64", "--test-samples", "32", "--baseline-epochs", "1", "--strategy", "baseline",
            "--width", "1", "--data-dir", str(tmp_path / "cifar"), "--groups", "2", "--out", str(tmp_path / "run")]
    result = run_dd(argv, nproc=2)
    assert result.returncode == 0, explain(result)
    notes = [line for line in result.stderr.splitlines() if line.startswith("dd-train: note: ")]
    assert notes == [f"dd-train: note: --data-dir {tmp_path / 'cifar'} is not read: --dataset synthetic (the default) "
                     "is built in; give --dataset (cifar10, cifar100, food101, imagefolder) to train on it",
                     "dd-train: note: --groups 2 is not used: --strategy baseline has no phase 1"]
    assert parse_config(["--dataset", "cifar10", "--data-dir", "d", "--groups", "2"]).unused_flags() == []
    # the levels' flags without a level between the sub-nets and the global net; --levels N,1 is the default
    assert parse_config(["--level-epochs", "7", "--level-lr", "0.3", "--levels", "2,1"]).unused_flags() == [
        "--level-epochs 7 and --level-lr 0.3 are not used: no level lies between the sub-networks and the global "
        "net (--levels N,...,1 adds some)"]
    assert parse_config(["--strategy", "baseline", "--subnets", "4", "--levels", "4,2,1"]).unused_flags() == [
        "--levels 4,2,1 is not used: --strategy baseline has no phase 1"]
    assert parse_config(["--subnets", "4", "--levels", "4,2,1", "--level-epochs", "3"]).unused_flags() == []
    # a --config key a flag overrode (a job script's --out beat the file's, without a word)
    config = tmp_path / "run.yaml"
    config.write_text("out: mine\nlr: 0.2\nsubnets: 2\n")
    assert parse_config(["--config", str(config), "--out", "runs/job-1", "--lr", "0.2"]).unused_flags() == [
        f"out: mine in --config {config} is not used: --out runs/job-1 on the command line wins (the slurm/ job "
        "scripts give --out: give yours after the script's name)"]
    assert parse_config(["--config", str(config)]).unused_flags() == []
    # --levels as YAML's own list ("['4', '2', '1'] is not text"), checked as the flag is
    config.write_text("subnets: 4\nlevels: [4, 2, 1]\n")
    assert parse_config(["--config", str(config)]).level_counts == [4, 2, 1]
    config.write_text("subnets: 4\nlevels: [4, 3, 1]\n")
    with pytest.raises(UsageError, match="--levels 4,3,1 is invalid"):
        parse_config(["--config", str(config)])
    # the conventional run of 0 epochs: an untrained net reported as the baseline
    assert parse_config(["--strategy", "both", "--baseline-epochs", "0"]).unused_flags() == [
        "--baseline-epochs 0 with --strategy both: the conventional net is not trained, and its row (random_T) is "
        "an untrained net: use --strategy dd to leave it out"]
    # ... and DD's phases of 0 epochs (their rows ran silently as if trained)
    assert parse_config(["--subnets", "4", "--levels", "4,2,1", "--subnet-epochs", "0", "--level-epochs", "0",
                         "--finetune-epochs", "0"]).unused_flags() == [
        "--subnet-epochs 0: the sub-nets are not trained: their rows (sub_net_k) and the composed net's (transfer) "
        "are untrained nets",
        "--level-epochs 0: the intermediate nets are not fine-tuned: their _T rows are the nets as composed",
        "--finetune-epochs 0: the composed net is not fine-tuned: its transfer_T row is the net as composed "
        "(transfer)"]
    assert parse_config(["--strategy", "baseline", "--subnet-epochs", "0"]).unused_flags() == []


def test_a_config_file_s_out_in_the_home_folder(tmp_path, monkeypatch):
    """`out: ~/runs/x` in a config file (no shell expands it) made a folder named ~ in the
    working directory; --data-dir and --cache-dir expanded it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("out: ~/runs/x\n")
    assert main(["--config", "run.yaml", "--train-samples", "64", "--test-samples", "32", "--subnet-epochs", "1",
                 "--finetune-epochs", "0", "--strategy", "dd", "--width", "1"]) == 0
    assert (tmp_path / "home" / "runs" / "x" / "report.json").exists() and not (tmp_path / "~").exists()


def test_a_resume_into_a_folder_without_a_run_says_it_starts_one(tmp_path, capsys):
    """Allowed (a job requeued before it wrote anything resumes into an empty --out), but a
    mistyped --out would otherwise train from scratch without a word."""
    out = tmp_path / "nothing-here"
    assert main(["--train-samples", "64", "--test-samples", "32", "--subnet-epochs", "1", "--finetune-epochs", "0",
                 "--strategy", "dd", "--width", "1", "--resume", "--out", str(out)]) == 0
    assert f"--resume: {out} held no run (no config.json): a new one starts there" in capsys.readouterr().out
    assert (out / "report.json").exists()
    # the run is over: its claim on --out too, though this process lives on (another job may continue the run)
    probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from dd_mpi import runlock; "
                            "print(runlock.claim(Path(sys.argv[1]), None, wait_seconds=0))", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout == "None\n", probe.stdout + probe.stderr


def test_a_batch_larger_than_the_data_trains_at_the_lr_of_the_batch_it_takes(tmp_path, capsys):
    """64 samples, a batch of 100,000: each step takes the 64. With the LR scaled for 100,000
    (78 instead of 0.05) the sub-nets' weights ran to ~1e12 and their test loss to NaN."""
    out = tmp_path / "run"
    assert main(["--train-samples", "64", "--test-samples", "32", "--subnet-epochs", "3", "--finetune-epochs", "0",
                 "--strategy", "dd", "--width", "1", "--subnet-batch-size", "100000", "--out", str(out)]) == 0
    assert ("subnet0-1: a batch of 100000 per rank is more than the 64 training samples a rank has an epoch: "
            "each step takes 64, and the LR is scaled for that") in capsys.readouterr().out
    for j in range(2):
        state = ckpt.load(ckpt.checkpoint_path(out, f"subnet{j}", "final"))
        assert max(v.abs().max().item() for v in state["model"].values() if v.is_floating_point()) < 1e3
        assert math.isfinite(state["test"]["loss"]), state["test"]


def test_nproc_is_not_passed_on_to_the_ranks():
    assert _without_nproc(["--nproc", "4", "--out", "x", "--nproc=2", "--lr", "0.1"]) == ["--out", "x", "--lr", "0.1"]


def test_a_stopped_array_task_is_told_to_run_as_a_task_again():
    """The stop's advice: --resume made a task the whole job (the other sub-nets, composition,
    fine-tune, all in one task)."""
    assert _how_to_continue(parse_config(["--subnets", "2", "--only-group", "1", "--out", "x"])) == \
        "run the task again (--only-group 1 --out x; no --resume)"
    assert _how_to_continue(parse_config(["--out", "x"])) == "run again with its flags and --resume --out x"


# --- checkpoint files ---------------------------------------------------------------------
def test_checkpoint_round_trip_and_names(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, "subnet1", "last")
    assert path == tmp_path / "checkpoints" / "subnet1-last.pt"
    assert ckpt.checkpoint_path(tmp_path, "composed", "").name == "composed.pt"
    state = {"model": {"w": torch.arange(5.0)}, "epoch": 3, "rng": ckpt.rng_state()}
    ckpt.save(path, state)
    loaded = ckpt.load(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert ckpt.load(tmp_path / "checkpoints" / "missing.pt") is None


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    expected = torch.rand(3)
    torch.rand(7)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"", lambda b: b"not a checkpoint"],
                         ids=["truncated", "empty", "garbage"])
def test_a_damaged_checkpoint_is_a_usage_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "finetune-last.pt"
    ckpt.save(path, {"model": {"w": torch.zeros(1000)}})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UsageError) as error:
        ckpt.load(path)
    assert f"checkpoint {path} is unreadable" in str(error.value) and "delete it" in str(error.value)
    assert not error.value.everywhere  # only the ranks that read it know: each says so


def test_every_truncation_of_a_checkpoint_is_called_damaged(tmp_path):
    """torch's zip reader raises OSError (EINVAL) on some truncated files: that was taken for an
    I/O error, whose advice (check the file system, rerun) met the same error again."""
    path = tmp_path / "finetune-last.pt"
    ckpt.save(path, {"model": {f"w{i}": torch.zeros(500) for i in range(8)}, "epoch": 3})
    whole = path.read_bytes()
    for length in range(64, len(whole), len(whole) // 80):
        path.write_bytes(whole[:length])
        with pytest.raises(UsageError) as error:
            ckpt.load(path)
        assert f"checkpoint {path} is unreadable" in str(error.value), (length, str(error.value))


def test_a_checkpoint_that_fails_to_read_is_not_called_damaged(tmp_path):
    """An I/O error (here: a directory where the file should be) says nothing against the
    file: the message names the error and does not advise deleting a good checkpoint."""
    path = tmp_path / "finetune-last.pt"
    path.mkdir()
    with pytest.raises(UsageError) as error:
        ckpt.load(path)
    message = str(error.value)
    assert f"checkpoint {path} could not be read (Is a directory)" in message, message
    assert "delete" not in message and "unreadable" not in message
    assert not error.value.everywhere


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "baseline-last.pt"
    ckpt.atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", broken_replace)
    with pytest.raises(OSError):
        ckpt.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


# --- failures: which errors mean "another rank died" (one line, not a traceback) -------------
@pytest.mark.parametrize("error, lost", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"), True),
    (RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"), True),
    (RuntimeError("Connection reset by peer"), True),
    (ValueError("invalid literal for int()"), False),
    (RuntimeError("CUDA out of memory"), False),
])
def test_peer_loss_is_told_apart_from_a_real_error(error, lost):
    assert exit_quietly_if_peer_lost(error) is lost


def test_a_failed_group_outranks_the_groups_it_stopped():
    """Groups stopped because another failed report a stop: the phase must end with the
    failure (exit 1), not the stop (75, a requeue that would fail again); the first of the
    gravest decides, so every rank raises the same one."""
    ok, stop = (Outcome.OK, ""), (Outcome.PREEMPTED, "")
    assert deciding([stop, ok, (Outcome.FAILED, "subnet2 diverged"), (Outcome.FAILED, "subnet3 diverged")]) == \
        (Outcome.FAILED, "subnet2 diverged")
    assert deciding([(Outcome.FAILED, "x"), (Outcome.USAGE, "bad flag"), stop]) == (Outcome.USAGE, "bad flag")
    assert deciding([ok, stop, ok]) == stop and deciding([ok, ok]) == ok


def test_the_group_alarm_is_raised_only_by_its_file_and_never_ends_a_rank(tmp_path):
    """The alarm is an early stop: a stat or a write that fails (ESTALE, EIO on a sick network
    file system; here a name too long, which Path.exists() would re-raise) answers "not
    raised" and is no error, so the rank still reaches its group's verdict."""
    alarm = GroupAlarm(tmp_path / f"{GroupAlarm.PREFIX}run1")
    assert not alarm.raised()
    alarm.raise_("subnet2 epoch 3: the loss became NaN")
    assert alarm.raised() and alarm.path.read_text() == "subnet2 epoch 3: the loss became NaN"
    assert not GroupAlarm(tmp_path / f"{GroupAlarm.PREFIX}run2").raised()  # another run's token
    broken = GroupAlarm(tmp_path / ("x" * 300))  # ENAMETOOLONG
    broken.raise_("lost")
    assert not broken.raised()
    assert not GroupAlarm(None).raised()


class FakeRank:
    """A child process for ``_wait_all``: exits with ``code`` after ``polls`` polls, or never."""

    def __init__(self, code: int | None, polls: int = 0):
        self.code, self.polls, self.returncode, self.killed = code, polls, None, False

    def poll(self):
        if self.returncode is None and self.code is not None:
            self.polls -= 1
            if self.polls < 0:
                self.returncode = self.code
        return self.returncode

    def kill(self):
        self.killed, self.returncode = True, -9

    def wait(self):
        return self.returncode


@pytest.mark.parametrize("codes, expected", [
    ([0, 0, 0, 0], 0),
    ([-9, None, None, None], 1),  # a killed rank: the others are stopped
    ([1, None, None, 1], 1),
    ([75, 75, 75, 75], 75),  # preempted after checkpointing
    ([2, None, None, None], 2),  # a usage error beats the failures it causes
    ([1, 75, 75, 75], 1),  # a failure outranks a stop: requeued, it would only fail again
    ([75, 1, 75, None], 1),
    ([75, 1, 2, 75], 2),
    ([-11, 75, 75, 75], 1),  # a rank that crashed (SIGSEGV) is a failure too
    ([75, None, None, None], 75),  # ranks the launcher kills were waiting: they add nothing
])
def test_the_local_launcher_stops_the_others_and_reports_the_cause(codes, expected):
    ranks = [FakeRank(code) for code in codes]
    assert _wait_all(ranks, grace_seconds=0.2) == expected
    assert all(r.returncode is not None for r in ranks)
    assert [r.killed for r in ranks] == [code is None for code in codes]


def test_a_rank_killed_by_the_stop_signal_the_job_was_sent_counts_as_preempted():
    """A SIGTERM that reaches a rank before it can catch it (while it imports torch) kills it:
    exit 75 all the same (nothing to checkpoint yet; the job is to be requeued), but a rank
    killed by a signal nobody sent the job is a failure."""
    assert _wait_all([FakeRank(-signal.SIGTERM), FakeRank(75)], 0.2, {signal.SIGTERM}) == 75
    assert _wait_all([FakeRank(-signal.SIGTERM), FakeRank(None)], 0.2, {signal.SIGTERM}) == 75
    assert _wait_all([FakeRank(-signal.SIGTERM), FakeRank(None)], 0.2) == 1


@pytest.mark.timing
def test_sigterm_while_the_ranks_start_up_ends_the_local_job_with_75(tmp_path):
    job = subprocess.Popen([sys.executable, "-m", "dd_mpi", "--nproc", "2", "--device", "cpu", "--train-samples", "64",
                            "--out", str(tmp_path / "run")], env=launcher_free_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = Path(f"/proc/{job.pid}/task/{job.pid}/children")
    deadline = time.monotonic() + 60
    while len(children.read_text().split()) < 2:  # both ranks started, still importing torch
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.01)
    time.sleep(0.2)  # the launcher's forwarding handler is in place
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 75, output
    assert output.strip().splitlines() == ["dd-train: stopped by SIGTERM while the ranks started up, before "
                                           "anything was trained: run the same command again"], output


@pytest.mark.timing
def test_sigterm_ends_a_rank_waiting_at_the_rendezvous_at_once(tmp_path):
    """Rank 0 of two, started alone, waits for rank 1 at the rendezvous (it hosts the store).
    A stop there has nothing to checkpoint and must end it, not wait out --io-timeout (it
    did: the flag is looked at only once training begins, and the rank exited 1 after it)."""
    port = free_port()
    env = launcher_free_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank = subprocess.Popen([sys.executable, "-m", "dd_mpi", "--device", "cpu", "--train-samples", "64",
                             "--io-timeout", "300", "--out", str(tmp_path / "run")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _accepts_connections(port):  # the store is up: the rank waits for rank 1
            assert time.monotonic() < deadline and rank.poll() is None, rank.communicate()[0]
            time.sleep(0.1)
        time.sleep(0.5)
        rank.send_signal(signal.SIGTERM)
        output, _ = rank.communicate(timeout=60)
    finally:
        if rank.poll() is None:
            rank.kill()
    assert rank.returncode == -signal.SIGTERM, output


def _accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_every_flag_of_dd_train_has_help_in_its_section():
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    undocumented = [a.option_strings[0] for a in flags if not a.help or a.help.startswith(" (default")]
    assert not undocumented, f"RunConfig fields without a comment: {undocumented}"
    titles = {g.title for g in parser._action_groups if g._group_actions}
    assert {"model", "method", "data", "optimisation", "processes", "outputs and recovery"} <= titles


def lines_of_two_writers_on_one_pipe(writer: str, *, slow_reader: bool = False) -> list[str]:
    """Two processes run ``writer`` (argv[1]: 0 or 1) into one pipe, under PYTHONUNBUFFERED
    (our tests', some launchers'); a slow reader lets the pipe fill, so writers block mid-write."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(rank)], stdout=write, env=env) for rank in (0, 1)]
    os.close(write)
    with os.fdopen(read) as pipe:
        chunks = []
        while chunk := pipe.read(1000 if slow_reader else -1):
            chunks.append(chunk)
            time.sleep(0.0005 if slow_reader else 0)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    return "".join(chunks).splitlines()


def test_ranks_sharing_a_pipe_never_split_each_others_lines():
    """Group leaders print to one pipe at once: `print` would write each text and its newline
    apart and interleave two lines (CI once read 'subnet1: resuming after epoch 1subnet0:
    resuming after epoch 2'); `progress.say` writes a line in one write."""
    lines = lines_of_two_writers_on_one_pipe("import sys; from dd_mpi.progress import say\n"
                                             "for i in range(3000): say(f'rank {sys.argv[1]} line {i} ' + 'x' * 60)")
    expected = {f"rank {rank} line {i} " + "x" * 60 for rank in (0, 1) for i in range(3000)}
    assert len(lines) == 6000 and set(lines) == expected


def test_ranks_sharing_a_pipe_never_split_each_others_long_texts_inside_a_line():
    """A traceback is longer than PIPE_BUF, and a pipe may cut a longer write anywhere to let
    another writer in: `say` writes such a text as whole lines, so two ranks failing at once
    interleave their tracebacks line by line (each line names its rank), never mid-line."""
    lines = lines_of_two_writers_on_one_pipe(
        "import sys; from dd_mpi.progress import say\n"
        "for b in range(40): say('\\n'.join(f'rank {sys.argv[1]} block {b} line {i} ' + 'x' * 60 for i in range(150)))",
        slow_reader=True)
    expected = {f"rank {rank} block {b} line {i} " + "x" * 60 for rank in (0, 1) for b in range(40) for i in range(150)}
    assert len(lines) == len(expected) and set(lines) == expected


def test_a_run_that_cannot_go_on_removes_only_a_config_json_it_wrote(tmp_path, monkeypatch):
    """--out that some rank cannot see is refused. A new run's config.json goes with it; a
    resumed run's stays: it is what the next --resume is checked against (removing it would
    let a resume with other settings mix two runs)."""
    from dd_mpi import pipeline
    monkeypatch.setattr(pipeline, "_sees", lambda path, patience=5.0: False)  # a rank on a node without --out
    one = Comm([0], 0, None, torch.device("cpu"))
    out = tmp_path / "run"
    data = (["a", "b"], 8, 4)
    with pytest.raises(UsageError, match=r"not visible from ranks \[0\]"):
        pipeline.prepare_output(parse_config(["--out", str(out)]), one, out, None, data=data)
    assert not (out / "config.json").exists() and not (out / "data.json").exists()
    (out / "config.json").write_text('{"seed": 0}')  # a run was started here (by an older dd_mpi: no data.json)
    with pytest.raises(UsageError, match=r"not visible from ranks \[0\]"):
        pipeline.prepare_output(parse_config(["--out", str(out), "--resume"]), one, out, None, data=data)
    assert (out / "config.json").exists()
    assert not (out / "data.json").exists()  # this job trained on nothing: no record of its data
    (out / "data.json").write_text('{"classes": ["a", "b"], "train": 8, "test": 4}')  # the run's own: kept
    with pytest.raises(UsageError, match=r"not visible from ranks \[0\]"):
        pipeline.prepare_output(parse_config(["--out", str(out), "--resume"]), one, out, None, data=data)
    assert (out / "data.json").exists()


def test_a_resume_without_config_json_is_checked_against_its_checkpoints(tmp_path, capsys):
    """config.json gone (removed, as its "unreadable" refusal advises): the run's settings are
    read from a checkpoint, which holds them. A resume with another --lr wrote config.json with
    it and was refused later by the checkpoints: then neither set of flags could continue."""
    from dd_mpi import pipeline
    one = Comm([0], 0, None, torch.device("cpu"))
    out = tmp_path / "run"
    flags = ["--out", str(out), "--subnets", "2", "--resume"]
    made = ckpt.checkpoint_path(out, "subnet0", "final")
    made.parent.mkdir(parents=True)
    ckpt.save(made, {"model": {}, "config": parse_config(flags[:4]).to_dict()})
    ckpt.checkpoint_path(out, "subnet1", "last").write_bytes(b"cut")  # damaged (and smallest): passed over
    other = parse_config([*flags, "--lr", "0.5"])
    with pytest.raises(UsageError, match=rf"^--resume: the run in {out} was made with other settings \(--lr: 0.1 -> "
                                         rf"0.5\), as {made} holds them \(config.json is gone\)"):
        pipeline.prepare_output(other, one, out, None)
    assert not (out / "config.json").exists()
    pipeline.prepare_output(parse_config(flags), one, out, None)
    assert f"--resume: {out} had no config.json: the run's settings, read from {made}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["lr"] == 0.1
    # a checkpoint holds the --groups its job spelled out (the default G there): not the run's layout
    (out / "config.json").unlink()
    ckpt.save(made, {"model": {}, "config": parse_config([*flags[:4], "--groups", "2"]).to_dict()})
    pipeline.prepare_output(parse_config(flags), one, out, 1)
    assert json.loads((out / "config.json").read_text())["groups"] is None  # this job's


def test_a_resume_checks_the_run_s_config_json(tmp_path):
    """What a resume reads of config.json: JSON that is no run's settings (a hand edit) is
    one line, not an AttributeError on rank 0; --groups at the G these ranks take anyway
    (here 1 rank: G = 1) is the run made without it; another G is a difference."""
    from dd_mpi import pipeline
    from dd_mpi.plan import default_groups
    one = Comm([0], 0, None, torch.device("cpu"))
    out = tmp_path / "run"
    out.mkdir()
    flags = ["--out", str(out), "--subnets", "4", "--resume"]
    for not_a_run in ("[1, 2]", '"resnet20"', "null"):
        (out / "config.json").write_text(not_a_run)
        with pytest.raises(UsageError, match=rf"--out {out}: config.json is unreadable: remove it"):
            pipeline.prepare_output(parse_config(flags), one, out, default_groups(parse_config(flags), 1))
    (out / "config.json").write_text(json.dumps(parse_config(flags[:4]).to_dict()))
    same = parse_config([*flags, "--groups", "1"])
    pipeline.prepare_output(same, one, out, default_groups(same, 1))
    # the run keeps its own spelling: a later resume on other ranks without --groups is still it
    assert json.loads((out / "config.json").read_text())["groups"] is None
    other = parse_config([*flags, "--groups", "2"])
    with pytest.raises(UsageError, match=r"^--resume: the run in .* other settings \(--groups: None -> 2\)"):
        pipeline.prepare_output(other, one, out, default_groups(other, 1))
    task = parse_config([*flags[:4], "--only-group", "1", "--lr", "0.5"])  # an array task gave no --resume
    with pytest.raises(UsageError, match=r"^--only-group 1: the run in .* other settings \(--lr: 0.1 -> 0.5\)"):
        pipeline.prepare_output(task, one, out, default_groups(task, 1))


def test_report_files_are_strict_json_when_a_number_is_nan(tmp_path):
    """A diverged net's loss is NaN: Python would write a bare NaN, which jq, JavaScript and
    other strict readers refuse. It is written as null, and the tables leave the cell empty."""
    from dd_mpi.report import format_table, write_metrics, write_report

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a report file"))

    row = {"top1": 10.0, "top5": 50.0, "loss": math.nan, "seconds": 1.0}
    timing = {"subnets": 2.0, "compose": 0.1, "finetune": 1.0, "dd_total": 3.1, "baseline_total": math.inf}
    report = {"sub_nets": [{"index": 0, **row}], "transfer": row, "transfer_T": {**row, "top1": math.nan},
              "timing": timing, "speedup": None}
    write_report(tmp_path, report)
    written = strict((tmp_path / "report.json").read_text())
    assert written["transfer"]["loss"] is None and written["timing"]["baseline_total"] is None
    assert written["sub_nets"][0]["top1"] == 10.0
    assert "| transfer_T |  |" in format_table(written)
    write_metrics(tmp_path, [{"phase": "subnet0", "loss": math.nan, "test_top1": 12.5}])
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict(line) == {"phase": "subnet0", "loss": None, "test_top1": 12.5}


@pytest.mark.parametrize("failure, why", [
    (OSError(errno.ENOLCK, "No locks available"), "its file system has no file locks"),
    (OSError(errno.EBADF, "Bad file descriptor"), "is read-only to this user"),  # NFS: exclusive needs write
])
def test_a_run_lock_that_cannot_be_taken_claims_nothing_and_says_why(tmp_path, monkeypatch, capsys, failure, why):
    (tmp_path / runlock.LOCK_NAME).touch()

    def another_users_file(*_):
        raise PermissionError(errno.EACCES, "Permission denied")

    def flock(handle, mode):
        raise failure

    if failure.errno == errno.EBADF:
        monkeypatch.setattr(runlock.os, "open", another_users_file)  # then it is opened read-only
    monkeypatch.setattr(runlock.fcntl, "flock", flock)
    assert runlock.claim(tmp_path, None, wait_seconds=0) is None
    assert why in capsys.readouterr().out and not runlock._held


def test_a_rank_s_memory_is_its_cgroup_s_limit_where_lower(tmp_path):
    """Slurm's --mem puts a job's tasks in a memory cgroup (the job's, or a step's below it):
    --width is checked against its limit, not the machine's memory."""
    from dd_mpi.rendezvous import node_memory
    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    job = v2 / "slurm" / "job_7"
    (job / "step_0").mkdir(parents=True)
    (v2 / "slurm" / "memory.max").write_text("max\n")
    (job / "memory.max").write_text(f"{2 << 30}\n")
    (job / "step_0" / "memory.max").write_text("max\n")
    (v1 / "memory" / "slurm" / "job_7").mkdir(parents=True)
    (v1 / "memory" / "slurm" / "job_7" / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
    (tmp_path / "cgroup-v2").write_text("0::/slurm/job_7/step_0\n")
    (tmp_path / "cgroup-v1").write_text("5:cpu,cpuacct:/slurm/job_7\n4:memory:/slurm/job_7\n0::/\n")
    assert node_memory(str(tmp_path / "cgroup-v2"), str(v2)) == min(machine, 2 << 30)
    assert node_memory(str(tmp_path / "cgroup-v1"), str(v1)) == min(machine, 3 << 30)
    (tmp_path / "none").write_text("0::/\n")
    assert node_memory(str(tmp_path / "none"), str(tmp_path / "empty")) == machine


def test_a_run_continues_only_on_the_data_it_started_with(tmp_path):
    """The flags were checked on --resume, the data not: a run stopped, its --data-dir's class
    folders swapped (a and b), resumed on the other labels and finished, exit 0."""
    from dd_mpi import pipeline
    one = Comm([0], 0, None, torch.device("cpu"))
    out = tmp_path / "run"
    flags = ["--out", str(out), "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    started = (["a", "b", "c"], 120, 30)
    pipeline.prepare_output(parse_config(flags), one, out, None, data=started)
    resume = parse_config([*flags, "--resume"])
    pipeline.prepare_output(resume, one, out, None, data=started)  # the same data: it goes on
    for data, says in (((["b", "a", "c"], 120, 30), "the same classes in another order"),
                       ((["a", "b", "c", "d"], 120, 30), "class 'd' on one and not the other"),
                       ((["a", "b", "c"], 160, 30), "160 train / 30 test samples, the run's 120 / 30")):
        with pytest.raises(UsageError, match=rf"^--resume: --data-dir \S+ does not hold the data the run in \S+ "
                                             rf"started with \({re.escape(says)}.*\): continue it with that data"):
            pipeline.prepare_output(resume, one, out, None, data=data)
    task = parse_config([*flags, "--only-group", "1"])  # an array task joins the run too
    with pytest.raises(UsageError, match=r"^--only-group 1: --data-dir"):
        pipeline.prepare_output(task, one, out, None, data=(["a", "b"], 120, 30))
    (out / "data.json").write_text("{")
    with pytest.raises(UsageError, match=r"data.json is unreadable"):
        pipeline.prepare_output(resume, one, out, None, data=started)
    (out / "data.json").unlink()  # a run of an older dd_mpi: nothing to check, and now it is recorded
    pipeline.prepare_output(resume, one, out, None, data=started)
    assert json.loads((out / "data.json").read_text()) == {"classes": ["a", "b", "c"], "train": 120, "test": 30}


def test_the_local_launcher_names_each_rank_a_signal_killed(capsys):
    """A rank killed by a signal says nothing itself: the launcher names it, and one killed
    while the others stop (the OOM killer's next), but not those it kills or a stop signal's."""
    ranks = [FakeRank(-signal.SIGKILL), FakeRank(-signal.SIGSEGV, polls=2), FakeRank(None),
             FakeRank(-signal.SIGTERM, polls=2)]
    assert _wait_all(ranks, 0.5, {signal.SIGTERM}) == 1
    assert capsys.readouterr().err.splitlines() == [
        "dd-train: rank 0 was killed by SIGKILL (out of memory? the kernel's OOM killer sends it, as does kill -9): "
        "the other ranks stop",
        "dd-train: rank 1 was killed by SIGSEGV (a crash in native code): the other ranks stop"]


def test_ranks_that_disagree_on_a_setting_are_named_with_both_values():
    """Node-local paths and resources may differ between nodes; what the run computes may not."""
    from dd_mpi.config import ranks_disagree
    base = RunConfig().to_dict()
    same = [("a", base), ("a", base), ("b", {**base, "data_dir": "/local/data", "threads": 3, "cache_dir": "$T",
                                             "resume": True, "out": "/gpfs/runs/x"})]
    assert ranks_disagree(same) is None
    other = [*same, ("b", {**base, "subnets": 4, "levels": [4, 1]})]
    assert ranks_disagree(other) == ("rank 3 (on b) was started with other settings than rank 0 (on a): "
                                     f"--subnets 4 (rank 0: {base['subnets']}), --levels [4, 1] (rank 0: None): "
                                     "start every rank with the same flags and config file")
