"""Any N on any P, as real processes: several sub-nets per rank trained fused, the same sub-nets
whatever the layout, under each launcher; and composition in stages (--levels) end to end.

    .venv/bin/python -m pytest -q tests/test_fused_run.py
"""

from __future__ import annotations

import shutil

import pytest
import torch

from dd_mpi.checkpoint import checkpoint_path, load

from helpers import REPORT_KEYS, explain, read_metrics, read_report, run_dd

pytestmark = pytest.mark.slow

# 4 sub-nets of a 1x ResNet20 on shards of 258 samples: 64 or 65 each (4 does not divide 258),
# and every sub-net takes 64 per epoch, alone or fused: 4 steps of 16 per sub-net (a sub-net
# alone once took all 65, 5 steps, and fused with a 64 only 64); one thread per rank, so that
# every layout sums in the same order where it can.
LAYOUT_RUN = ["--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "--width", "1", "--subnets", "4",
              "--subnet-epochs", "1", "--finetune-epochs", "1", "--train-samples", "258", "--test-samples", "64",
              "--batch-size", "16", "--strategy", "dd", "--subnet-data", "shard", "--deterministic", "--threads", "1"]
# Tolerance, per weight, between a sub-net trained alone (P = 4) and fused (P = 1 or 2), after
# its 4 steps in fp32. Fused and alone, a sub-net's forward pass is bit for bit the same
# (models.MemberLinear, MemberAvgPool); a grouped convolution's backward pass rounds in another
# order than a plain one's, and training amplifies it: measured at most 5.3e-6 (relative to
# a tensor's norm, 4e-4, on small BN biases). A sub-net that got another's data or seed, or
# another LR, is off by 1e-2 to 2 (two different sub-nets: ~2). So: 1e-4.
FUSED_VS_ALONE = 1e-4


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 4 sub-nets on 1, 2 and 4 ranks (4, 2 and 1 per rank), under --nproc."""
    outs = {}
    for nproc in (1, 2, 4):
        out = tmp_path_factory.mktemp(f"p{nproc}") / "run"
        result = run_dd([*LAYOUT_RUN, "--out", str(out)], nproc=nproc, timeout=600)
        assert result.returncode == 0, explain(result)
        outs[nproc] = (out, result)
    return outs


def subnet_states(out) -> list[dict]:
    return [load(checkpoint_path(out, f"subnet{j}", "final"))["model"] for j in range(4)]


def unfinished_copy(layouts, tmp_path, finals: str = "subnet*-final.pt"):
    """The 4-fused-on-one-rank run as if cut short: its ``finals`` and all after phase 1 gone."""
    out = tmp_path / "run"
    shutil.copytree(layouts[1][0], out)
    for path in [*(out / "checkpoints").glob(finals), *(out / "checkpoints").glob("finetune-*"),
                 out / "checkpoints" / "composed.pt", out / "report.json"]:
        path.unlink()
    return out


def test_a_runs_sub_nets_do_not_depend_on_the_layout(layouts):
    alone, two, four = (subnet_states(layouts[p][0]) for p in (4, 2, 1))
    for j in range(4):
        assert all(torch.equal(two[j][k], four[j][k]) for k in two[j]), f"sub-net {j}: 2 vs 4 per rank"
        worst = max((two[j][k].double() - alone[j][k].double()).abs().max().item() for k in two[j])
        assert worst < FUSED_VS_ALONE, f"sub-net {j}: fused vs alone differ by {worst:.2e}"
        other = max((alone[(j + 1) % 4][k].double() - alone[j][k].double()).abs().max().item() for k in two[j])
        assert other > 100 * FUSED_VS_ALONE  # the tolerance tells sub-nets apart


def test_n_greater_than_p_runs_end_to_end_with_its_layout_in_the_report(layouts):
    for nproc, per_rank in ((1, 4), (2, 2), (4, 1)):
        out, result = layouts[nproc]
        report = read_report(out)
        assert REPORT_KEYS <= set(report) and report["world_size"] == nproc
        assert report["groups"] == [[r] for r in range(nproc)]
        assert report["layout"][0] == {"level": 0, "nets": 4, "groups": nproc, "ranks_per_group": 1,
                                       "nets_per_group": per_rank, "batch_size": 16, "eval_every": 1}
        assert [s["index"] for s in report["sub_nets"]] == [0, 1, 2, 3]
        assert [s["ranks"] for s in report["sub_nets"]] == [[j // per_rank] for j in range(4)]
        rows = read_metrics(out)
        assert sorted(r["group"] for r in rows if r["phase"] == "subnet") == [0, 1, 2, 3]
        assert f"4 sub-networks of resnet20 width 0.25 on {nproc} group" in result.stdout
        if per_rank > 1:
            assert (out / "checkpoints" / f"subnet0-{per_rank - 1}-last.pt").exists()  # the group's
        assert all((out / "checkpoints" / f"subnet{j}-final.pt").exists() for j in range(4))  # each net's


def test_the_rest_of_a_fused_group_is_trained_alone_when_its_other_nets_finished_elsewhere(layouts, tmp_path):
    """Sub-nets 1 and 2 finished (say by --only-group tasks), 0 and 3 not: one rank trains
    0 and 3 fused, as a set of its own with its own checkpoints (it once took the whole group's
    subnet0-3-last.pt for its own and crashed on its shapes), into the same sub-nets."""
    out = unfinished_copy(layouts, tmp_path, "subnet[03]-final.pt")
    (out / "checkpoints" / "subnet0-3-last.pt").unlink()  # the 4 never trained together here
    result = run_dd([*LAYOUT_RUN, "--out", str(out), "--resume"], nproc=1, timeout=600)
    assert result.returncode == 0, explain(result)
    assert "subnet1: finished earlier" in result.stdout and "subnet2: finished earlier" in result.stdout
    assert f"phase 1: subnet0, subnet3 have no final checkpoint in {out}: this job trains" in result.stdout
    assert (out / "checkpoints" / "subnet0+3-last.pt").exists()
    before = subnet_states(layouts[1][0])
    for j, state in enumerate(subnet_states(out)):
        worst = max((state[k].double() - before[j][k].double()).abs().max().item() for k in state)
        assert worst < FUSED_VS_ALONE, f"sub-net {j}: retrained 2 fused vs 4 fused differ by {worst:.2e}"
    assert read_report(out)["world_size"] == 1
    # killed between the pair's final checkpoints: the resume takes the pair's own -last (at
    # the last epoch) and writes the same finals, not sub-net 3 retrained alone
    finished = subnet_states(out)
    (out / "checkpoints" / "subnet3-final.pt").unlink()
    again = run_dd([*LAYOUT_RUN, "--out", str(out), "--resume"], nproc=1, timeout=600)
    assert again.returncode == 0, explain(again)
    assert "subnet0+3: resuming after epoch 1" in again.stdout, explain(again)
    assert not (out / "checkpoints" / "subnet3-last.pt").exists()
    for j, state in enumerate(subnet_states(out)):
        assert all(torch.equal(state[k], finished[j][k]) for k in state), f"sub-net {j}"


def test_a_group_killed_between_its_final_checkpoints_writes_them_all_again(layouts, tmp_path):
    """4 sub-nets fused on one rank finished, and only 0 and 2 of their finals were written
    when the job was killed: the resume takes the group's own last checkpoint (at the last
    epoch) and writes the same 4 finals, instead of training 1 and 3 again alone."""
    out = unfinished_copy(layouts, tmp_path, "subnet[13]-final.pt")
    result = run_dd([*LAYOUT_RUN, "--out", str(out), "--resume"], nproc=1, timeout=600)
    assert result.returncode == 0, explain(result)
    assert "subnet0-3: resuming after epoch 1" in result.stdout, explain(result)
    assert "finished earlier" not in result.stdout and not (out / "checkpoints" / "subnet1+3-last.pt").exists()
    before = subnet_states(layouts[1][0])
    for j, state in enumerate(subnet_states(out)):
        assert all(torch.equal(state[k], before[j][k]) for k in state), f"sub-net {j}"


def test_progress_that_another_layout_made_is_named_when_a_resume_cannot_use_it(layouts, tmp_path):
    """Phase 1 ran with all 4 sub-nets fused on one rank and was cut before they finished;
    resumed on 2 ranks (2 fused per rank) the groups are other sets: they start afresh, and
    each says which checkpoint's progress it cannot continue (it once did so silently)."""
    out = unfinished_copy(layouts, tmp_path)
    result = run_dd([*LAYOUT_RUN, "--out", str(out), "--resume"], nproc=2, timeout=600)
    assert result.returncode == 0, explain(result)
    old = out / "checkpoints" / "subnet0-3-last.pt"
    for group in ("subnet0-1", "subnet2-3"):
        assert f"{group}: starts afresh: {old} holds progress of some of its nets" in result.stdout, explain(result)
    assert "subnet0-1: resuming" not in result.stdout
    assert (out / "checkpoints" / "subnet0-1-last.pt").exists() and old.exists()  # kept, for that layout


def test_a_resume_in_another_precision_says_so(layouts, tmp_path):
    """--precision auto is bf16 on one GPU model and fp16 on another, so a requeued job may
    resume on another: it goes on, and says so (it once switched silently)."""
    out = unfinished_copy(layouts, tmp_path)
    result = run_dd([*LAYOUT_RUN, "--out", str(out), "--resume", "--precision", "bf16"], nproc=1, timeout=600)
    assert result.returncode == 0, explain(result)
    assert "subnet0-3: resuming after epoch 1" in result.stdout, explain(result)
    assert "subnet0-3: note: it trained in fp32 so far and goes on in bf16" in result.stdout, explain(result)
    assert "finetune: note" not in result.stdout  # a phase started afresh has nothing to say


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("mpiexec", marks=pytest.mark.mpi)])
def test_fused_sub_nets_under_other_launchers_match_the_local_launcher(layouts, tmp_path, launcher):
    out = tmp_path / "run"
    result = run_dd([*LAYOUT_RUN, "--out", str(out)], launcher=launcher, nproc=2, timeout=600)
    assert result.returncode == 0, explain(result)
    for mine, theirs in zip(subnet_states(out), subnet_states(layouts[2][0])):
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert read_report(out)["transfer_T"]["top1"] == read_report(layouts[2][0])["transfer_T"]["top1"]


def test_compiled_sub_nets_train_as_the_eager_ones(layouts, tmp_path):
    """--compile on CPU (inductor, a fresh cache): the same 4 sub-nets, fused 2 per rank, as
    eager. Inductor fuses BatchNorm and the adds into kernels that sum in another order, and
    4 steps at this LR amplify it: measured 1.1e-3 to 1.9e-3 per weight, against ~1 between
    two different sub-nets (another seed and data); so 2e-2, and the test checks that it tells
    the compiled sub-nets apart."""
    out = tmp_path / "run"  # no fine-tuning: it would compile another net, compared nowhere
    result = run_dd([*LAYOUT_RUN, "--compile", "--finetune-epochs", "0", "--out", str(out)], nproc=2, timeout=900,
                    env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert result.returncode == 0, explain(result)
    eager = subnet_states(layouts[2][0])
    for j, compiled in enumerate(subnet_states(out)):
        worst = max((compiled[k].double() - eager[j][k].double()).abs().max().item() for k in compiled)
        other = max((compiled[k].double() - eager[(j + 1) % 4][k].double()).abs().max().item() for k in compiled)
        assert worst < 2e-2 < other / 10, f"sub-net {j}: compiled vs eager {worst:.2e}, vs another {other:.2e}"
    assert any((tmp_path / "inductor").rglob("*.py"))  # inductor really generated kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; none visible")
def test_cuda_graphs_capture_the_fused_sub_nets_and_train_them_as_eager(tmp_path):
    """--compile-mode reduce-overhead on one GPU: the 4 sub-nets fused on its one rank are
    captured and replayed as CUDA graphs (inductor's log records graphs and skips none) and
    train as eager fp32 does, within the CPU compile test's tolerance (inductor's kernels sum
    in another order; a graph replays the same kernels)."""
    on_gpu = [*LAYOUT_RUN, "--device", "cuda", "--precision", "fp32", "--no-deterministic"]  # last flags win
    eager = run_dd([*on_gpu, "--out", str(tmp_path / "eager")], nproc=1, timeout=600)
    assert eager.returncode == 0, explain(eager)
    graphs = run_dd([*on_gpu, "--compile", "--compile-mode", "reduce-overhead", "--out", str(tmp_path / "graphs")],
                    nproc=1, timeout=900, env={"TORCH_LOGS": "cudagraphs",
                                               "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert graphs.returncode == 0, explain(graphs)
    log = graphs.stdout + graphs.stderr
    assert "Recording function" in log and "skipping cudagraphs" not in log, explain(graphs)
    assert "compiled in mode default" not in log  # one rank: graphs in every phase
    eager_states = subnet_states(tmp_path / "eager")
    for j, captured in enumerate(subnet_states(tmp_path / "graphs")):
        worst = max((captured[k].double() - eager_states[j][k].double()).abs().max().item() for k in captured)
        other = max((captured[k].double() - eager_states[(j + 1) % 4][k].double()).abs().max().item()
                    for k in captured)
        assert worst < 2e-2 < other / 10, f"sub-net {j}: graphs vs eager {worst:.2e}, vs another {other:.2e}"


def test_composition_in_stages_16_4_1(tmp_path):
    """16 sub-nets (4 fused per rank), composed into 4 nets fine-tuned on one rank each, then
    into the global net fine-tuned by all: every level reported and checkpointed."""
    out = tmp_path / "run"
    result = run_dd(["--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "--width", "4",
                     "--subnets", "16", "--levels", "16,4,1", "--subnet-epochs", "1", "--level-epochs", "1",
                     "--finetune-epochs", "1", "--baseline-epochs", "1", "--train-samples", "256", "--test-samples",
                     "64", "--batch-size", "8", "--strategy", "both", "--out", str(out)], nproc=4, timeout=900)
    assert result.returncode == 0, explain(result)
    report = read_report(out)
    assert [s["index"] for s in report["sub_nets"]] == list(range(16))
    assert [lv["nets"] for lv in report["layout"]] == [16, 4, 1]
    assert [lv["nets_per_group"] for lv in report["layout"]] == [4, 1, 1]
    (middle,) = report["intermediate"]
    assert middle["level"] == 1 and [n["index"] for n in middle["nets"]] == [0, 1, 2, 3]
    assert [n["ranks"] for n in middle["nets"]] == [[0], [1], [2], [3]]
    for net in middle["nets"]:
        assert 0 <= net["composed"]["top1"] <= 100 and 0 <= net["finetuned"]["top1"] <= 100
        assert net["finetuned"]["seconds"] > 0
    t = report["timing"]
    assert t["intermediate"] > 0 and t["dd_total"] == pytest.approx(
        t["subnets"] + t["compose"] + t["intermediate"] + t["finetune"])
    assert report["random_T"]["top1"] >= 0 and report["transfer_T"]["top1"] >= 0
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert {"subnet0-3-last.pt", "subnet15-final.pt", "level1-composed.pt", "level1-net3-final.pt",
            "composed.pt", "finetune-final.pt"} <= names
    rows = read_metrics(out)
    assert sorted(r["group"] for r in rows if r["phase"] == "level1") == [0, 1, 2, 3]
    assert "| level1_net_0 |" in result.stdout and "| level1_net_0_T |" in result.stdout
    assert "intermediate" in (out / "report.md").read_text()
