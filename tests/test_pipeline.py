"""The whole method end to end, as real processes under the real launchers (gloo on CPU)."""

from __future__ import annotations

import pytest
import torch

from dd_mpi.checkpoint import checkpoint_path, load
from dd_mpi.decompose import composed_spec, subnet_spec
from dd_mpi.models import ModelSpec, build_model
from dd_mpi.reporting import RunFiles
from dd_mpi.synthetic import make_synthetic

from helpers import TINY, check_run_report, explain, read_metrics, read_report, run_dd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("launcher, data", [
    ("local", "shard"), ("torchrun", "full"), pytest.param("mpiexec", "shard", marks=pytest.mark.mpi),
])
def test_whole_pipeline_under_each_launcher(tmp_path, launcher, data):
    """N = 4 on 4 ranks, then the baseline. (N = 2 under each launcher, phase 1 and 3 only, is
    test_launchers' run of each launch/*.sh with its tiny default.)"""
    out, subnets = tmp_path / "run", 4
    result = run_dd([*TINY, "--subnets", str(subnets), "--subnet-data", data, "--strategy", "both",
                     "--out", str(out)], launcher=launcher)
    assert result.returncode == 0, explain(result)
    report = check_run_report(out, world_size=4, subnets=subnets)
    assert report["launcher"] == {"local": "local", "torchrun": "torchrun", "mpiexec": "mpi"}[launcher]
    assert ("mpi" in report["software"]) == (launcher == "mpiexec")  # the MPI library, where one is loaded
    assert "| transfer_T |" in result.stdout  # rank 0 prints the table


def test_phase1_groups_exchange_no_gradients(tmp_path):
    """Sub-net k trained inside a 4-rank job equals, bit for bit, sub-net k trained alone on
    2 ranks: nothing from the other group reached it."""
    together = tmp_path / "together"
    args = [*TINY, "--subnets", "2", "--strategy", "dd", "--threads", "1"]
    result = run_dd([*args, "--out", str(together)], nproc=4)
    assert result.returncode == 0, explain(result)
    for k in range(2):
        alone = tmp_path / f"alone{k}"
        result = run_dd([*args, "--only-group", str(k), "--out", str(alone)], nproc=2)
        assert result.returncode == 0, explain(result)
        a = load(checkpoint_path(together, f"subnet{k}", "final"))["model"]
        b = load(checkpoint_path(alone, f"subnet{k}", "final"))["model"]
        assert all(torch.equal(a[key], b[key]) for key in a), f"sub-net {k} differs"
    s0 = load(checkpoint_path(together, "subnet0", "final"))["model"]
    s1 = load(checkpoint_path(together, "subnet1", "final"))["model"]
    assert not torch.equal(s0["conv1.weight"], s1["conv1.weight"])


def test_composed_net_scores_like_the_mean_of_the_subnets(tmp_path):
    out = tmp_path / "run"
    result = run_dd([*TINY, "--subnets", "2", "--strategy", "dd", "--out", str(out)], nproc=4)
    assert result.returncode == 0, explain(result)
    report = read_report(out)
    cfg = report["config"]
    data = make_synthetic(cfg["train_samples"], cfg["test_samples"], seed=cfg["seed"])
    sub_spec = subnet_spec(ModelSpec("resnet20", 1.0, 10), 2)
    subs = []
    for k in range(2):
        model = build_model(sub_spec).eval()
        model.load_state_dict(load(checkpoint_path(out, f"subnet{k}", "final"))["model"])
        subs.append(model)
    composed = build_model(composed_spec(sub_spec, 2)).eval()
    composed.load_state_dict(load(checkpoint_path(out, "composed", ""))["model"])
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    images = (data.test.images.float() / 255 - mean) / std
    with torch.no_grad():
        ensemble = torch.stack([m(images) for m in subs]).mean(0)
        logits = composed(images)
    assert (logits - ensemble).abs().max() < 1e-4
    labels = data.test.labels
    ensemble_top1 = 100 * (ensemble.argmax(1) == labels).float().mean().item()
    assert report["transfer"]["top1"] == pytest.approx(ensemble_top1, abs=100 / len(labels) + 1e-9)


def test_epochs_without_evaluation_carry_no_test_score(tmp_path):
    """--eval-every 2 with phase 1's own --subnet-eval-every 3: an epoch not on its phase's
    cadence has no test score of its own (not the one before it), the last epoch always has
    one, and the 'best' checkpoint is an evaluated epoch."""
    out = tmp_path / "run"
    result = run_dd([*TINY, "--subnets", "2", "--strategy", "dd", "--subnet-epochs", "3",
                     "--finetune-epochs", "2", "--eval-every", "2", "--subnet-eval-every", "3", "--out", str(out)],
                    nproc=2)
    assert result.returncode == 0, explain(result)
    rows = read_metrics(out)
    for phase, group, scored in (("subnet", 0, [False, False, True]), ("subnet", 1, [False, False, True]),
                                 ("finetune", None, [False, True])):
        mine = sorted((r for r in rows if r["phase"] == phase and r["group"] == group), key=lambda r: r["epoch"])
        assert [r["test_top1"] is not None for r in mine] == scored, mine
    for name, epoch in (("subnet0", 3), ("subnet1", 3), ("finetune", 2)):
        assert load(checkpoint_path(out, name, "best"))["epoch"] == epoch


def test_an_epoch_s_lr_is_the_one_it_trained_at(tmp_path):
    """metrics.jsonl's (and TensorBoard's) lr was read after the epoch's last scheduler step:
    the next epoch's, so each x0.1 of --schedule step showed one epoch early, and a cosine
    phase's last epoch always said 0."""
    out = tmp_path / "run"
    result = run_dd([*TINY, "--subnets", "2", "--strategy", "dd", "--subnet-epochs", "4", "--schedule", "step",
                     "--warmup-epochs", "0", "--finetune-epochs", "1", "--eval-every", "4", "--out", str(out)], nproc=1)
    assert result.returncode == 0, explain(result)
    rows = read_metrics(out)
    base = 0.1 * 32 / 128  # --lr at a batch of 128, each sub-net's batch 32
    for group in (0, 1):
        lrs = [r["lr"] for r in sorted((r for r in rows if r["phase"] == "subnet" and r["group"] == group),
                                       key=lambda r: r["epoch"])]
        assert lrs == pytest.approx([base, base, base / 10, base / 100]), lrs  # x0.1 at 50 % and 75 %
    (finetune,) = [r["lr"] for r in rows if r["phase"] == "finetune"]
    assert finetune > 0  # cosine: its one epoch's last step


@pytest.mark.parametrize("launcher", ["local", pytest.param("mpiexec", marks=pytest.mark.mpi)])
def test_groups_that_split_neither_ranks_nor_subnets_fail_fast_on_every_rank(tmp_path, launcher):
    """Any N runs on any P (gcd(N, P) groups by default); a --groups that divides neither is
    the one layout that cannot be: one line naming it and the choices, nothing written."""
    result = run_dd([*TINY, "--subnets", "2", "--groups", "2", "--out", str(tmp_path / "run")], launcher=launcher,
                    nproc=3, timeout=120)
    assert result.returncode == 2, explain(result)
    assert result.seconds < 60
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--groups 2" in errors[0] and "3 ranks" in errors[0] and "choose one of 1" in errors[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_baseline_alone(tmp_path):
    """--strategy baseline: the conventional run only (a scaling study's or a benchmark's
    reference), with no DD level in the plan."""
    out = tmp_path / "run"
    result = run_dd([*TINY, "--strategy", "baseline", "--out", str(out)], nproc=4)
    assert result.returncode == 0, explain(result)
    report = read_report(out)
    assert 0 <= report["random_T"]["top1"] <= 100 and not report.get("sub_nets")
    rows = read_metrics(out)
    assert rows and {r["phase"] for r in rows} == {"baseline"}
    assert RunFiles(out).label == "run (P=4, conventional)"  # (a plot's legend: no sub-nets to count)
