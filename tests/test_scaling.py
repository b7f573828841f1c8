"""dd-scaling: sweeps, the collected CSV (efficiency, speedup, time to accuracy) and the
alpha-beta performance model, on hand-computed cases and on a real local sweep."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reporting import assert_png, fake_run

import dd_mpi
from dd_mpi import scaling
from dd_mpi.checkpoint import checkpoint_path
from dd_mpi.reporting import RunFiles
from dd_mpi.scaling import Network, Workload
from dd_mpi.scaling.perfmodel import measurements

REPO = Path(__file__).resolve().parent.parent
# The README's tiny sweep: one torch thread per rank (see the README's note on loaded machines)
TINY = ["--threads", "1", "--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "--width", "1",
        "--subnet-epochs", "1", "--finetune-epochs", "1", "--baseline-epochs", "2",
        "--train-samples", "256", "--test-samples", "128", "--batch-size", "32"]


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def num(value: str) -> float | None:
    return float(value) if value != "" else None


# ---------------------------------------------------------------------------------------
# Arguments and sweeps
def test_lists_and_pairs():
    assert scaling.int_list("1,2,4") == [1, 2, 4]
    assert scaling.int_list("2,1,2") == [2, 1]  # a value given twice is one run
    assert scaling.gpu_list("8-64") == [8, 16, 32, 64]
    assert scaling.gpu_list("8,24") == [8, 24]
    # any N on any P: dd-train lays N sub-nets out on P ranks (layout.choose_groups)
    assert scaling.valid_pairs([1, 2], [1, 4]) == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert scaling.valid_pairs([3], [2]) == [(3, 2)]


def test_flags_dd_scaling_sets_are_refused(tmp_path, capsys):
    for flag in ("--nproc", "--out", "--subnets"):
        assert scaling.main(["--local", "--nprocs", "1", "--out", str(tmp_path), "--", flag, "2"]) == 2
        assert flag in capsys.readouterr().err
    for mode in (["--local", "--nprocs", "1"], ["--slurm", "--dry-run"]):  # each run printed it, exit 0
        for flag in ("--help", "-h", "--version", "--print-config"):
            assert scaling.main([*mode, "--out", str(tmp_path), "--", "--width", "1", flag]) == 2
            assert f"{flag} after -- would make every run print and exit without training" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("flags, says", [
    (["--measure-comm", "-2"], "--measure-comm -2: an allreduce needs 2 or more ranks"),  # hung: no rank to answer
    (["--beta", "0"], "argument --beta: '0': expected a number above 0"),  # ZeroDivisionError
    (["--alpha", "-1"], "argument --alpha: '-1': expected a number of 0 or more"),  # negative seconds
    (["--subnet-ips", "2=0"], "--subnet-ips '2=0': give images/s per rank above 0"),  # ZeroDivisionError
    (["--global-ips", "2=100"], "--global-ips '2=100': give images/s per rank above 0, X (the global net"),
    (["--samples", "0"], "argument --samples: '0': expected a number above 0"),  # silently the runs' own
    (["--classes", "-3"], "argument --classes: '-3': expected a number above 0"),  # torch's RuntimeError
    (["--gpus", "9-15"], "argument --gpus: '9-15': no power of two from 9 to 15"),  # an empty projection
    (["--target", "nan"], "argument --target: 'nan': expected a number above 0"),
])
def test_bad_model_numbers_are_refused(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as exit_:
        scaling.main(["--model", str(fake_run(tmp_path)), *flags])
    (line,) = capsys.readouterr().err.splitlines()  # one line, no usage block first
    assert exit_.value.code == 2 and line.startswith(f"dd-scaling: error: {says}"), line


def test_bad_sweep_flags_are_refused(tmp_path, capsys):
    for flags, says in ((["--local", "--run-timeout", "-1"], "argument --run-timeout: '-1': expected a number above 0"),
                        (["--slurm", "--dry-run", "--sbatch", "-p 'gpu"],
                         "--sbatch \"-p 'gpu\": No closing quotation (quote it as a shell would)")):
        with pytest.raises(SystemExit) as exit_:
            scaling.main([*flags, "--out", str(tmp_path / "study")])
        assert exit_.value.code == 2 and capsys.readouterr().err == f"dd-scaling: error: {says}\n"
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("argv, says", [
    (["--slurm", "--dry-run", "--nprocs", "8"], "--nprocs is read by --local only, not --slurm"),  # ran on --nodes
    (["--local", "--nodes=2"], "--nodes is read by --slurm only, not --local"),
    (["--model", "RUN", "--target", "50"], "--target is read by --local and --collect only, not --model"),
    (["--collect", "RUN", "--samples", "9"], "--samples is read by --model only, not --collect"),
    (["--collect", "RUN", "--", "--lr", "1"], "the dd-train flags after -- are for --local and --slurm sweeps"),
])
def test_a_flag_the_mode_does_not_read_is_refused(tmp_path, capsys, argv, says):
    """Each of these was silently ignored: a study made with other settings than the user asked for."""
    run = str(fake_run(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        scaling.main([run if arg == "RUN" else arg for arg in argv] + ["--out", str(tmp_path / "study")])
    (line,) = capsys.readouterr().err.splitlines()  # one line, no usage block first
    assert exit_.value.code == 2 and line.startswith(f"dd-scaling: error: {says}"), line
    assert not (tmp_path / "study").exists()


def test_a_sweep_checks_every_run_s_flags_before_the_first(tmp_path, capsys, monkeypatch):
    """A typo in the dd-train flags failed every run of a --local sweep in turn (each with its
    log tail), and a --slurm sweep only once its jobs started in the queue."""
    study = tmp_path / "study"
    assert scaling.main(["--local", "--nprocs", "1", "--subnets", "1", "--out", str(study), "--", "--width", "abc"]) == 2
    assert capsys.readouterr().err == ("dd-scaling: error: the run P=1 N=1: argument --width: invalid float value: "
                                       "'abc' (dd-train --help lists the flags)\n")
    # the layout of each (P, N), as dd-train checks it: N = 3 does not split resnet20 at width 1
    assert scaling.main(["--local", "--nprocs", "1,2", "--subnets", "2,3", "--out", str(study), "--", "--width", "1"]) == 2
    assert capsys.readouterr().err.startswith("dd-scaling: error: the run P=1 N=3: --subnets 3 does not divide layer1")
    assert not study.exists()
    monkeypatch.chdir(REPO)  # (finds slurm/scaling_study.sh)
    assert scaling.main(["--slurm", "--dry-run", "--out", "runs/study", "--", "--widht", "2"]) == 2
    assert "dd-scaling: error: the dd-train arguments: unrecognized arguments: --widht 2" in capsys.readouterr().err
    # values that the job script's preset makes valid are left to the jobs
    assert scaling.main(["--slurm", "--dry-run", "--out", "runs/study", "--", "--cache-dir", "/scratch"]) == 0


def test_slurm_dry_run_command(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # --slurm finds slurm/scaling_study.sh under the working directory
    rc = scaling.main(["--slurm", "--dry-run", "--nodes", "1,2", "--subnets", "2,4", "--tasks-per-node", "8",
                       "--out", "runs/study", "--sbatch", "-p gpu -A proj", "--",
                       "--preset", "cifar10-resnet32"])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("NODES='1 2' SUBNETS='2 4' TASKS_PER_NODE=8 STUDY=runs/study bash ")
    assert line.endswith("slurm/scaling_study.sh -p gpu -A proj -- --strategy both --preset cifar10-resnet32")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_runs_the_study_script_with_our_environment(tmp_path):
    """slurm/scaling_study.sh under a stand-in sbatch that records what it is asked."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f"""#!/bin/bash
n=$(( $(cat {record}/count 2>/dev/null || echo 0) + 1 )); echo $n > {record}/count
echo "$*" >> {record}/calls
if [[ " $* " == *" --job-name=scaling-report "* ]]; then cat > {record}/report_job.sh; fi
echo "10$n"
""")
    fake.chmod(0o755)
    study = tmp_path / "study"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dd_mpi.scaling", "--slurm", "--nodes", "1,2",
                             "--subnets", "2,4", "--tasks-per-node", "2", "--out", str(study),
                             "--", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (record / "calls").read_text().splitlines()
    runs = [c for c in calls if "scaling-report" not in c]
    # every (nodes, N): any N runs on any number of ranks (1 node x 2 ranks fuses 2 of 4 sub-nets per rank)
    assert len(runs) == 4, calls
    for nodes, n in ((1, 2), (1, 4), (2, 2), (2, 4)):
        match = [c for c in runs if f"--nodes={nodes} " in c and f"--subnets {n} " in c]
        assert len(match) == 1, (nodes, n, runs)
        assert "--strategy both --device cpu" in match[0]
        assert match[0].endswith(f"--out {study}/nodes{nodes}-N{n}")
    assert f"dd-scaling --collect {study}" in (record / "report_job.sh").read_text()
    assert f"study={study}" in result.stdout


def test_slurm_without_a_study_script_says_which_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no slurm/ here
    monkeypatch.delenv("DD_MPI_SLURM_DIR", raising=False)
    assert scaling.main(["--slurm", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--study-script" in err and "DD_MPI_SLURM_DIR" in err
    monkeypatch.setenv("DD_MPI_SLURM_DIR", str(REPO / "slurm"))  # the other way to name it
    assert scaling.main(["--slurm", "--dry-run"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: one line, not the study script's bash errors
    assert scaling.main(["--slurm", "--out", str(tmp_path / "study")]) == 2
    assert capsys.readouterr().err == ("dd-scaling: error: --slurm submits with sbatch, which is not on PATH: run it "
                                       "on a Slurm login node (or add --dry-run to see the command)\n")


def test_collect_says_what_is_wrong_with_a_path(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for path, says in ((tmp_path / "afile", "not a directory (give run or study directories)"),
                       (tmp_path / "nothing", "no such directory")):
        assert scaling.main(["--collect", str(path)]) == 2
        assert capsys.readouterr().err == f"dd-scaling: error: {path}: {says}\n"


def test_the_model_names_its_own_flag_for_an_n_that_does_not_split_the_net(tmp_path, capsys):
    assert scaling.main(["--model", str(fake_run(tmp_path)), "--model-subnets", "3"]) == 2
    assert capsys.readouterr().err.startswith("dd-scaling: error: --model-subnets 3: --subnets 3 does not divide")


# ---------------------------------------------------------------------------------------
# Efficiency, speedup, time to accuracy
def test_efficiency_arithmetic():
    assert scaling.strong_efficiency(10.0, 1, 6.0, 2) == pytest.approx(10 / 12)  # t1 / (P tP)
    assert scaling.strong_efficiency(10.0, 1, 2.5, 4) == pytest.approx(1.0)
    assert scaling.strong_efficiency(8.0, 2, 5.0, 4) == pytest.approx(16 / 20)  # reference at P=2
    assert scaling.weak_efficiency(100.0, 1, 180.0, 2) == pytest.approx(0.9)  # ips_P / (P ips_1)
    assert scaling.weak_efficiency(200.0, 2, 320.0, 4) == pytest.approx(0.8)
    assert scaling.speedup(30.0, 20.0) == pytest.approx(1.5)
    assert scaling.speedup(None, 20.0) is None


def test_time_to_target():
    curve = [(1.0, 10.0), (2.0, 50.0), (3.0, 40.0), (4.0, 60.0)]
    assert scaling.time_to_target(curve, 50.0) == 2.0
    assert scaling.time_to_target(curve, 55.0) == 4.0
    assert scaling.time_to_target(curve, 70.0) is None


def test_add_efficiencies_against_the_smallest_p():
    def row(P, N, strategy, phase, t, ips):
        return {"P": P, "N": N, "strategy": strategy, "phase": phase, "seconds_per_epoch": t, "seconds": t,
                "images_per_s": ips}
    rows = [row(1, 1, "baseline", "baseline", 10.0, 100.0), row(2, 1, "baseline", "baseline", 6.0, 170.0),
            row(2, 2, "baseline", "baseline", 5.0, 190.0), row(4, 2, "baseline", "baseline", 4.0, 250.0),
            row(2, 2, "dd", "subnet", 3.0, 300.0), row(4, 2, "dd", "subnet", 2.0, 450.0),
            row(4, 4, "dd", "subnet", 1.0, 900.0)]
    scaling.add_efficiencies(rows)
    base = [r for r in rows if r["strategy"] == "baseline"]
    assert [r["P_ref"] for r in base] == [1, 1, 1, 1]  # the baseline's work does not depend on N
    assert [r["strong_efficiency"] for r in base] == pytest.approx([1.0, 10 / 12, 1.0, 10 / 16])
    assert [r["weak_efficiency"] for r in base] == pytest.approx([1.0, 0.85, 0.95, 0.625])
    sub2 = [r for r in rows if r["phase"] == "subnet" and r["N"] == 2]
    assert [r["P_ref"] for r in sub2] == [2, 2]  # phase 1 with N=2 needs P >= 2
    assert sub2[1]["strong_efficiency"] == pytest.approx(3.0 * 2 / (4 * 2.0))
    assert sub2[1]["weak_efficiency"] == pytest.approx((450 / 4) / (300 / 2))
    sub4 = [r for r in rows if r["phase"] == "subnet" and r["N"] == 4]
    assert sub4[0]["strong_efficiency"] == 1.0 and sub4[0]["P_ref"] == 4


def test_run_rows_on_a_known_run(tmp_path):
    run = RunFiles(fake_run(tmp_path))
    rows = {(r["strategy"], r["phase"]): r for r in scaling.run_rows(run)}
    sub = rows[("dd", "subnet")]
    assert sub["images_per_s"] == 190.0 and sub["images_per_s_per_rank"] == 95.0  # groups summed
    assert sub["seconds_per_epoch"] == 6.0 and sub["seconds"] == 12.0  # the slowest group
    assert sub["final_top1"] == 42.0  # the sub-nets' mean
    assert rows[("dd", "finetune")]["images_per_s"] == 60.0 and rows[("dd", "finetune")]["seconds_per_epoch"] == 4.0
    assert rows[("baseline", "baseline")]["images_per_s"] == 50.0
    assert rows[("dd", "compose")]["final_top1"] == 50.0 and rows[("dd", "compose")]["seconds"] == 1.0
    total = rows[("dd", "total")]
    # default target: min(transfer_T 60, random_T 55) = 55; DD reaches it at 13 + 4, the baseline at 30
    assert total["target_top1"] == 55.0
    assert total["time_to_target"] == 17.0 and rows[("baseline", "total")]["time_to_target"] == 30.0
    assert total["tta_speedup"] == pytest.approx(30 / 17)
    assert total["speedup"] == pytest.approx(30 / 21) and total["seconds"] == 21.0
    rows50 = {(r["strategy"], r["phase"]): r for r in scaling.run_rows(run, target=50.0)}
    assert rows50[("dd", "total")]["time_to_target"] == 13.5  # the composed net has it, once scored
    assert rows50[("baseline", "total")]["time_to_target"] == 20.0
    assert scaling.run_rows(run, target=99.0)[-1]["time_to_target"] is None


def test_a_phase_is_timed_by_its_images_over_its_time_after_its_first_epoch(tmp_path):
    """images_per_s was the mean of the epochs' rates, first epoch included: a first epoch of
    79 img/s (the process's warm-up) and a second of 1511 made 795, where the phase ran at
    ~140; the model calibrated on the warm-up too."""
    out = fake_run(tmp_path)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    baseline = [r for r in rows if r["phase"] == "baseline"]
    for row, (ips, seconds) in zip(baseline, ((10.0, 20.0), (50.0, 10.0), (100.0, 5.0))):
        row.update(images_per_s=ips, seconds=seconds)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = {(r["strategy"], r["phase"]): r for r in scaling.run_rows(RunFiles(out))}[("baseline", "baseline")]
    assert row["images_per_s"] == pytest.approx(2 / (1 / 50 + 1 / 100))  # not (10 + 50 + 100) / 3
    assert row["seconds_per_epoch"] == pytest.approx(7.5) and row["epochs"] == 3
    measured = {m.phase: m for m in measurements(RunFiles(out), samples=256)}["baseline"]
    per_rank = measured.samples_per_rank * measured.ranks
    assert measured.train_epoch_s == pytest.approx((per_rank / 50 + per_rank / 100) / 2)


def test_the_model_calibrates_on_the_batch_each_phase_trained_with(tmp_path):
    """A preset's --global-batch-size 128 on 2 ranks: phase 1 trained 128 per rank (one rank
    per sub-net), the fine-tune and the baseline 64; the model once took --batch-size (32)
    for all three, and so the wrong step and allreduce counts."""
    def batches(report_changes: dict) -> dict:
        out = fake_run(tmp_path / str(len(list(tmp_path.iterdir()))))
        report = json.loads((out / "report.json").read_text())
        report["config"]["global_batch_size"] = 128
        report.update(report_changes)
        (out / "report.json").write_text(json.dumps(report))
        return {m.phase: m.batch for m in measurements(RunFiles(out))}

    recorded = {"layout": [{"level": 0, "nets": 2, "groups": 2, "ranks_per_group": 1, "nets_per_group": 1,
                            "batch_size": 128},
                           {"level": 1, "nets": 1, "groups": 1, "ranks_per_group": 2, "nets_per_group": 1,
                            "batch_size": 64}], "baseline_batch_size": 64}
    assert batches(recorded) == {"subnet": 128, "finetune": 64, "baseline": 64}
    assert batches({}) == {"subnet": 128, "finetune": 64, "baseline": 64}  # a report from before they were recorded


def test_a_run_with_levels_shows_its_levels_between(tmp_path, capsys):
    """--levels: the levels between had no row (subnet + compose + finetune fell short of the DD
    total), and the model left them out without a word."""
    run = fake_run(tmp_path, "P2-N2")
    report = json.loads((run / "report.json").read_text())
    report["intermediate"] = [{"level": 1, "nets": [
        {"index": 0, "ranks": [0], "composed": {"top1": 45.0}, "finetuned": {"top1": 47.0, "seconds": 3.0}},
        {"index": 1, "ranks": [1], "composed": {"top1": 46.0}, "finetuned": {"top1": 49.0, "seconds": 3.0}}]}]
    report["timing"].update(intermediate=3.0, dd_total=24.0)
    report["config"]["groups"] = 1  # (a layout the projection does not take: said too)
    (run / "report.json").write_text(json.dumps(report))
    rows = {(r["strategy"], r["phase"]): r for r in scaling.run_rows(RunFiles(run))}
    between = rows[("dd", "intermediate")]
    assert between["seconds"] == 3.0 and between["final_top1"] == 48.0
    dd = [r for r in rows.values() if r["strategy"] == "dd" and r["phase"] != "total"]
    assert sum(r["seconds"] for r in dd) == rows[("dd", "total")]["seconds"] == 24.0
    assert scaling.main(["--model", str(run), "--gpus", "8", "--out", str(tmp_path / "model")]) == 0
    said = capsys.readouterr().out
    assert "the projection has no term for the levels between" in said and "the runs set --groups" in said
    # an N the model does not project, given its own rate: said, not passed over
    assert scaling.main(["--model", str(run), "--gpus", "8", "--subnet-ips", "3=100",
                         "--out", str(tmp_path / "model")]) == 2
    assert "--subnet-ips 3=100: N=3 is not projected (N = 2)" in capsys.readouterr().err


def test_the_model_counts_phase_2_s_messages_once(tmp_path):
    """A run's measured phase 2 holds its gather and broadcast; the projection adds them for
    each P, so what it keeps of the measurement is the rest: rank 0's compose compute."""
    from dd_mpi.scaling.cli import parse_args
    from dd_mpi.scaling.perfmodel import (build_workloads, calibrate, compose_comm_seconds, compose_seconds,
                                          model_params)
    run = fake_run(tmp_path, "P2-N2")  # phase 2 took 1.0 s
    net = Network(1e-3, 1e7)  # a slow network: ~0.1 s of the second is messages
    args, _ = parse_args(["--model", str(run), "--alpha", "1e-3", "--beta", "1e7"])
    runs = [RunFiles(run)]
    workload = build_workloads(runs, calibrate([m for r in runs for m in measurements(r)], net), args, net)[0][0]
    g, sub, _, _ = model_params(runs[0].report["config"], 2)
    messages = compose_comm_seconds(g, sub, 2, 2, net)
    assert 0.05 < messages < 0.5 and workload.compose_s == pytest.approx(1.0 - messages)
    assert compose_seconds(workload, 2, net) == pytest.approx(1.0)  # at the run's P: what it measured


def test_the_model_measures_an_imagefolder_run_with_samples(tmp_path, capsys):
    """An imagefolder run's config doesn't say its training-set size: --samples does. The model
    once used --samples only to project, found no measurement, and asked for --global-ips."""
    run = fake_run(tmp_path, "P2-N2")
    report = json.loads((run / "report.json").read_text())
    del report["config"]["train_samples"]
    report["config"]["dataset"] = "imagefolder"
    (run / "report.json").write_text(json.dumps(report))

    assert [m.phase for m in measurements(RunFiles(run), 10, samples=256)] == ["subnet", "finetune", "baseline"]
    out = tmp_path / "model"
    assert scaling.main(["--model", str(run), "--samples", "256", "--classes", "10", "--gpus", "8-16",
                         "--out", str(out)]) == 0
    # c_G is the mean of the fine-tune's and the baseline's: the note names both (it named the first)
    assert "(measured: the mean of 2, P2-N2 finetune, P2-N2 baseline on 2 rank(s))" in capsys.readouterr().out
    checks = read_csv(out / "model_validation.csv")
    assert [r["phase"] for r in checks] == ["subnet", "finetune", "baseline"]
    baseline = checks[-1]  # 128 samples per rank at 50 images/s on 2 ranks
    assert num(baseline["measured_s"]) == pytest.approx(256 / 50.0)

    capsys.readouterr()
    assert scaling.main(["--model", str(run), "--classes", "10", "--out", str(out)]) == 2
    assert "pass --samples" in capsys.readouterr().err


def test_collect_writes_csv_and_plot(tmp_path):
    fake_run(tmp_path / "study", "P2-N2")
    fake_run(tmp_path / "study", "P4-N2", world=4)
    assert scaling.main(["--collect", str(tmp_path / "study")]) == 0
    rows = read_csv(tmp_path / "study" / "scaling.csv")
    assert set(scaling.SCALING_FIELDS) <= set(rows[0])
    assert len(rows) == 2 * 6
    assert_png(tmp_path / "study" / "scaling.png")
    assert scaling.main(["--collect", str(tmp_path / "nothing-here")]) == 2


def test_collect_refuses_runs_of_another_workload_and_counts_a_run_once(tmp_path, capsys):
    study = tmp_path / "study"
    fake_run(study, "P2-N2")
    other = fake_run(study, "P4-N2", world=4)
    report = json.loads((other / "report.json").read_text())
    report["config"]["train_samples"] = 1024  # a sweep rerun into the same --out with other flags
    (other / "report.json").write_text(json.dumps(report))
    assert scaling.main(["--collect", str(study)]) == 2
    err = capsys.readouterr().err
    assert "--train-samples 256 vs 1024" in err and "P4-N2" in err and "\n" not in err.strip()
    assert not (study / "scaling.csv").exists()
    report["config"]["train_samples"] = 256
    report["config"]["seed"] = 1  # another seed of the same workload: averaged, not refused
    (other / "report.json").write_text(json.dumps(report))
    assert scaling.main(["--collect", str(study), str(study / "P2-N2"), str(tmp_path / "study" / ".." / "study" / "P4-N2")]) == 0
    assert len(read_csv(study / "scaling.csv")) == 2 * 6  # each run once, however it was named
    # the same flags on another torch or other chips: another workload's times
    stack = {"software": {"dd_mpi": "0.1.0", "torch": "2.14.1", "python": "3.11.7"},
             "ranks": [{"rank": r, "processor": "AMD EPYC"} for r in range(2)]}
    first = json.loads((study / "P2-N2" / "report.json").read_text())
    (study / "P2-N2" / "report.json").write_text(json.dumps({**first, **stack}))
    for change, says in (({"torch": "2.13.0"}, "torch '2.14.1' vs '2.13.0'"),
                         ({"python": "3.12.1"}, None),  # the interpreter's version is no workload
                         ({"processor": "Intel Xeon"}, "processors 'AMD EPYC' vs 'Intel Xeon'")):
        software = {**stack["software"], **{k: v for k, v in change.items() if k != "processor"}}
        chip = change.get("processor", "AMD EPYC")
        (other / "report.json").write_text(json.dumps({**report, "software": software, "ranks": [
            {"rank": r, "processor": chip} for r in range(4)]}))
        assert scaling.main(["--collect", str(study)]) == (2 if says else 0)
        err = capsys.readouterr().err
        assert (says in err and "different workloads" in err) if says else err == "", err
    (other / "report.json").write_text(json.dumps(report))  # an older dd_mpi's report: nothing to compare
    assert scaling.main(["--collect", str(study)]) == 0


def test_collect_without_matplotlib_writes_the_table(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "study", "P2-N2")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the optional [plot] extra not installed
    assert scaling.main(["--collect", str(tmp_path / "study")]) == 0
    captured = capsys.readouterr()
    assert len(read_csv(tmp_path / "study" / "scaling.csv")) == 6
    assert not (tmp_path / "study" / "scaling.png").exists()
    assert "scaling.png skipped" in captured.err and "scaling.png" not in captured.out


def test_a_sweep_rerun_with_other_flags_refuses_the_runs_it_would_keep(tmp_path, capsys):
    from dd_mpi.config import parse_config
    from dd_mpi.scaling.sweep import run_argv
    out = tmp_path / "study"
    run_dir = fake_run(out, "P1-N1", world=1, subnets=1)
    (run_dir / "config.json").write_text(json.dumps(parse_config(run_argv(1, 1, ["--train-samples", "256"], run_dir)).to_dict()))
    before = sorted(p.name for p in run_dir.iterdir())
    assert scaling.main(["--local", "--nprocs", "1", "--subnets", "1", "--out", str(out), "--",
                         "--train-samples", "512"]) == 2
    err = capsys.readouterr().err
    assert "--train-samples: 256 -> 512" in err and "new --out" in err and str(run_dir) in err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing ran, nothing written
    kept = scaling.main(["--local", "--nprocs", "1", "--subnets", "1", "--out", str(out), "--",
                         "--train-samples", "256"])
    assert kept == 0 and "finished earlier, kept" in capsys.readouterr().out
    # --groups at the G one rank takes anyway is the same run, as dd-train's --resume has it
    kept = scaling.main(["--local", "--nprocs", "1", "--subnets", "1", "--out", str(out), "--",
                         "--train-samples", "256", "--groups", "1"])
    assert kept == 0 and "finished earlier, kept" in capsys.readouterr().out
    # a setting that moves only the speed: the kept run would be timed at another one
    assert scaling.main(["--local", "--nprocs", "1", "--subnets", "1", "--out", str(out), "--",
                         "--train-samples", "256", "--precision", "bf16"]) == 2
    assert "--precision 'auto' vs 'bf16'" in capsys.readouterr().err
    # a finished run the sweep does not name, of another workload: its collect would refuse it
    # after training the new runs, so the sweep is refused before it trains anything
    other = fake_run(out, "P2-N2", world=2, subnets=2)
    report = json.loads((other / "report.json").read_text())
    report["config"] = parse_config(run_argv(2, 2, ["--train-samples", "512"], other)).to_dict()
    (other / "report.json").write_text(json.dumps(report))
    assert scaling.main(["--local", "--nprocs", "1", "--subnets", "1,4", "--out", str(out), "--",
                         "--train-samples", "256"]) == 2
    err = capsys.readouterr().err
    assert f"{other} holds a run of another workload (--train-samples 256 vs 512)" in err, err
    assert not (out / "P1-N4").exists()
    # ... or of another torch, however deep in --out (the collect reads every report under it)
    deeper = out / "old" / "P2-N2"
    deeper.parent.mkdir()
    other.rename(deeper)
    report["config"]["train_samples"] = 256
    report["software"] = {"dd_mpi": dd_mpi.__version__, "torch": "1.0.0"}
    (deeper / "report.json").write_text(json.dumps(report))
    assert scaling.main(["--local", "--nprocs", "1", "--subnets", "1,4", "--out", str(out), "--",
                         "--train-samples", "256"]) == 2
    err = capsys.readouterr().err
    assert f"{deeper} holds a run of another workload (torch '1.0.0' vs '{torch.__version__}' here)" in err, err
    assert not (out / "P1-N4").exists()
    other = deeper
    shutil.rmtree(other)
    (run_dir / "config.json").write_text("[]")  # valid JSON, no run's settings: was an AttributeError
    assert scaling.main(["--local", "--nprocs", "1", "--subnets", "1", "--out", str(out), "--",
                         "--train-samples", "256"]) == 2
    assert "(config.json is missing or unreadable): sweep into a new --out" in capsys.readouterr().err


def test_a_sweep_refuses_an_unfinished_run_of_other_settings_before_it_starts(tmp_path, capsys):
    """An interrupted point rerun with other flags was refused by its own --resume, but only in
    its turn, after the points before it had trained."""
    from dd_mpi.config import parse_config
    from dd_mpi.scaling.sweep import run_argv
    out = tmp_path / "study"
    stopped = out / "P2-N1"
    stopped.mkdir(parents=True)
    (stopped / "config.json").write_text(json.dumps(parse_config(run_argv(2, 1, ["--train-samples", "256"],
                                                                          stopped)).to_dict()))
    assert scaling.main(["--local", "--nprocs", "1,2", "--subnets", "1", "--out", str(out), "--",
                         "--train-samples", "512"]) == 2
    err = capsys.readouterr().err
    assert f"{stopped} holds an unfinished run made with other settings (--train-samples: 256 -> 512)" in err, err
    assert not (out / "P1-N1").exists()  # refused before the first point


def test_a_sweep_that_extends_a_study_reports_all_of_it(tmp_path, capsys):
    """dd_report.* of a sweep into a study's --out covered only the runs it named."""
    from dd_mpi.config import parse_config
    from dd_mpi.scaling.sweep import run_argv
    out = tmp_path / "study"
    for p, n in ((1, 1), (2, 2)):
        run_dir = fake_run(out, f"P{p}-N{n}", world=p, subnets=n)
        config = parse_config(run_argv(p, n, ["--train-samples", "256"], run_dir)).to_dict()
        (run_dir / "config.json").write_text(json.dumps(config))
        report = json.loads((run_dir / "report.json").read_text())
        (run_dir / "report.json").write_text(json.dumps({**report, "config": config}))
    assert scaling.main(["--local", "--nprocs", "1", "--subnets", "1", "--out", str(out), "--",
                         "--train-samples", "256"]) == 0
    assert "finished earlier, kept" in capsys.readouterr().out
    md = (out / "dd_report.md").read_text()
    assert f"## {out / 'P1-N1'}" in md and f"## {out / 'P2-N2'}" in md
    assert {Path(r["run"]).name for r in read_csv(out / "scaling.csv")} == {"P1-N1", "P2-N2"}


def test_the_default_target_skips_a_net_without_a_score():
    from dd_mpi.scaling.collect import default_target
    assert default_target({"transfer_T": {"top1": None}, "random_T": {"top1": 50.0}}) == 50.0
    assert default_target({"transfer_T": {"top1": 60.0}, "random_T": {}}) == 60.0


# ---------------------------------------------------------------------------------------
# The model's formulas, by hand
NET = Network(alpha=1e-5, beta=1e9)


def test_ring_allreduce_and_collectives():
    # 2(p-1)α + 2((p-1)/p) n/β = 6e-5 + 1.5e-3
    assert scaling.ring_allreduce_seconds(1e6, 4, NET) == pytest.approx(1.56e-3)
    assert scaling.ring_allreduce_seconds(0, 2, NET) == pytest.approx(2e-5)
    assert scaling.ring_allreduce_seconds(1e9, 1, NET) == 0.0
    # (⌈log2 8⌉ + 7)α + 2(7/8) n/β
    assert scaling.broadcast_seconds(1e6, 8, NET) == pytest.approx(1e-4 + 1.75e-3)
    # ⌈log2 4⌉α + 3m/β
    assert scaling.gather_seconds(1e6, 4, NET) == pytest.approx(2e-5 + 3e-3)
    assert scaling.gather_seconds(1e6, 1, NET) == 0.0
    # 60 MiB in DDP's 25 MiB buckets: 3 latency terms, one bandwidth term
    net = Network(alpha=1e-5, beta=1e10)
    assert scaling.gradient_allreduce_seconds(60 * 2 ** 20, 2, net) == pytest.approx(6e-5 + 60 * 2 ** 20 / 1e10)
    assert scaling.gradient_allreduce_seconds(1e6, 4, NET) == scaling.ring_allreduce_seconds(1e6, 4, NET)


def test_epoch_and_projection_by_hand():
    # 1000 samples on 4 ranks: 250 each, 8 steps of 32; 2.5 s compute + 8 x 1.56 ms
    assert scaling.epoch_seconds(1000, 4, 32, 0.01, 1e6, NET) == pytest.approx(2.5 + 8 * 1.56e-3)
    # 1002 over 4: the busiest rank trains 251 samples, still in 8 steps (ceil(250 / 32))
    assert scaling.epoch_seconds(1002, 4, 32, 0.01, 1e6, NET) == pytest.approx(2.51 + 8 * 1.56e-3)
    w = Workload(samples=1024, batch=32, global_params=1_000_000, subnet_params=250_000, subnets=2,
                 global_sample_s=0.004, subnet_sample_s=0.002, subnet_epochs=3, finetune_epochs=1,
                 baseline_epochs=4, compose_s=0.1)
    r = scaling.project(w, 8, NET)
    # phase 1: 4 ranks per group, 256 samples each, 8 steps; allreduce of 1e6 B over 4 = 1.56e-3
    assert r["subnet_epoch_s"] == pytest.approx(0.512 + 8 * 1.56e-3)
    # global: 8 ranks, 128 samples each, 4 steps; allreduce of 4e6 B over 8 = 1.4e-4 + 7e-3
    assert r["global_epoch_s"] == pytest.approx(0.512 + 4 * 7.14e-3)
    # compose: gather 2 x 1e6 B (1.01e-3) + 0.1 s + broadcast 4e6 B to 8 (1e-4 + 7e-3)
    assert r["compose_s"] == pytest.approx(1.01e-3 + 0.1 + 7.1e-3)
    assert r["dd_seconds"] == pytest.approx(3 * 0.52448 + 0.10811 + 0.54056)
    assert r["baseline_seconds"] == pytest.approx(4 * 0.54056)
    assert r["speedup"] == pytest.approx(2.16224 / 2.22211)
    assert r["comm_share_subnet"] == pytest.approx(8 * 1.56e-3 / 0.52448)
    # shard: each group sees 1024/2 samples
    shard = scaling.project(Workload(**{**w.__dict__, "subnet_data": "shard"}), 8, NET)
    assert shard["subnet_epoch_s"] == pytest.approx(0.256 + 4 * 1.56e-3)
    assert not scaling.projectable(w, 2048)  # fewer samples than ranks
    # 3 sub-nets on 8 ranks: one group of 8 (gcd), each rank training all 3 fused: 128 samples
    # x 3 nets x 2 ms, 4 steps of an allreduce of 3 x 1e6 B over 8 (1.4e-4 + 5.25e-3)
    three = Workload(**{**w.__dict__, "subnets": 3})
    assert scaling.projectable(three, 8)
    assert scaling.project(three, 8, NET)["subnet_epoch_s"] == pytest.approx(0.768 + 4 * 5.39e-3)


def test_fit_alpha_beta_recovers_the_line():
    alpha, beta, p = 2e-5, 1e9, 4
    timings = {n: 2 * (p - 1) * alpha + 2 * (p - 1) / p * n / beta for n in (4, 1024, 1 << 20, 4 << 20)}
    net = scaling.fit_alpha_beta(timings, p)
    assert net.alpha == pytest.approx(alpha, rel=1e-6) and net.beta == pytest.approx(beta, rel=1e-6)


def test_subnet_has_about_a_quarter_of_the_parameters():
    g, s, g_macs, s_macs = scaling.model_params({"arch": "resnet20", "width": 1.0, "dataset": "synthetic"}, 2)
    assert g == 269_722  # ResNet20 with option A (akamaster's table)
    assert s == pytest.approx(g / 4, rel=0.02) and s_macs == pytest.approx(g_macs / 4, rel=0.02)


def processes_naming(text: str) -> list[int]:
    """The pids whose command line names ``text`` (a run's directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # (gone meanwhile)
            pass
    return found


@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_local_sweep_stops_its_run(tmp_path, stop):
    """A sweep stopped by SIGTERM (a job's end, `timeout`) left its dd-train training on, orphaned:
    each run has a process group of its own, which no signal to dd-scaling reached. Killed
    outright, it can pass nothing on: the run has the parent-death signal."""
    out = tmp_path / "study"
    run_dir = out / "P2-N2"
    flags = [*TINY, "--subnet-epochs", "200"]  # far longer than the test waits
    sweep = subprocess.Popen([sys.executable, "-m", "dd_mpi.scaling", "--local", "--nprocs", "2", "--subnets", "2",
                              "--out", str(out), "--", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO, env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    try:
        deadline = time.monotonic() + 240
        while "epoch 1/200" not in ((run_dir / "dd-train.log").read_text() if (run_dir / "dd-train.log").exists()
                                    else ""):
            assert sweep.poll() is None and time.monotonic() < deadline, "the run never trained an epoch"
            time.sleep(0.5)
        sweep.send_signal(stop)
        stdout, stderr = sweep.communicate(timeout=180)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    if stop == signal.SIGTERM:
        assert sweep.returncode == 75, stdout[-2000:] + stderr[-2000:]
        assert stderr.strip() == ("dd-scaling: stopped by SIGTERM; the run in progress (if any) checkpointed: run "
                                  "the same command again to go on"), stderr
    deadline = time.monotonic() + 60
    while processes_naming(str(run_dir)):  # nothing of the run is left running
        assert time.monotonic() < deadline, f"still running: {processes_naming(str(run_dir))}"
        time.sleep(0.5)
    assert checkpoint_path(run_dir, "subnet0", "last").exists()  # the run checkpointed as it stopped


# ---------------------------------------------------------------------------------------
# A real local sweep, collected and modelled
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "study"
    cmd = [sys.executable, "-m", "dd_mpi.scaling", "--local", "--nprocs", "1,2", "--subnets", "1,2",
           "--out", str(out), "--", *TINY]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_local_sweep_end_to_end(sweep):
    out, result = sweep
    names = ("P1-N1", "P1-N2", "P2-N1", "P2-N2")  # P1-N2: both sub-nets fused on one rank
    runs = {name: json.loads((out / name / "report.json").read_text()) for name in names}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(names)
    for name, report in runs.items():
        assert report["world_size"] == int(name[1]) and report["config"]["subnets"] == int(name[-1])
        assert report["config"]["strategy"] == "both"
    rows = read_csv(out / "scaling.csv")
    assert len(rows) == 4 * 6  # per run: subnet, compose, finetune, baseline, and the two totals
    by = {(Path(r["run"]).name, r["strategy"], r["phase"]): r for r in rows}
    for name, report in runs.items():
        assert num(by[(name, "dd", "total")]["seconds"]) == pytest.approx(report["timing"]["dd_total"])
        assert num(by[(name, "baseline", "total")]["seconds"]) == pytest.approx(report["timing"]["baseline_total"])
        assert num(by[(name, "dd", "total")]["speedup"]) == pytest.approx(report["speedup"])
        assert num(by[(name, "dd", "total")]["final_top1"]) == pytest.approx(report["transfer_T"]["top1"])
        metrics = metrics_of(out / name)
        base = [m for m in metrics if m["phase"] == "baseline"]
        timed = base[1:]  # (2 epochs: the first, the process's warm-up, is left out)
        assert num(by[(name, "baseline", "baseline")]["images_per_s"]) == pytest.approx(
            len(timed) / sum(1 / m["images_per_s"] for m in timed))
        for strategy in ("dd", "baseline"):
            tta = num(by[(name, strategy, "total")]["time_to_target"])
            assert tta is not None and 0 < tta <= num(by[(name, strategy, "total")]["seconds"]) + 1e-9
    for r in rows:  # at P = 1 a run is its own reference, or shares it with the other N's run
        if r["P"] == "1" and r["phase"] != "compose":
            n_bound = r["strategy"] == "dd" and r["phase"] in ("subnet", "total")
            twins = [o for o in rows if o["P"] == "1" and (o["strategy"], o["phase"]) == (r["strategy"], r["phase"])
                     and (not n_bound or o["N"] == r["N"])]
            t = lambda row: num(row["seconds_per_epoch"]) or num(row["seconds"])  # noqa: E731
            assert num(r["strong_efficiency"]) == pytest.approx(sum(t(o) for o in twins) / len(twins) / t(r))
    t1 = (num(by[("P1-N1", "baseline", "baseline")]["seconds_per_epoch"])  # both P = 1 runs' baseline
          + num(by[("P1-N2", "baseline", "baseline")]["seconds_per_epoch"])) / 2
    t2 = num(by[("P2-N1", "baseline", "baseline")]["seconds_per_epoch"])
    assert num(by[("P2-N1", "baseline", "baseline")]["strong_efficiency"]) == pytest.approx(t1 / (2 * t2))
    assert num(by[("P2-N2", "dd", "subnet")]["P_ref"]) == 1  # the N=2 run at P=1 (fused) is the reference
    t1 = num(by[("P1-N2", "dd", "subnet")]["seconds_per_epoch"])
    t2 = num(by[("P2-N2", "dd", "subnet")]["seconds_per_epoch"])
    assert num(by[("P2-N2", "dd", "subnet")]["strong_efficiency"]) == pytest.approx(t1 / (2 * t2))
    for name in ("scaling.png", "accuracy_vs_time.png", "phase_times.png"):
        assert_png(out / name)
    assert "P2-N2" in (out / "dd_report.md").read_text()

    # A second call keeps what is finished
    again = subprocess.run([sys.executable, "-m", "dd_mpi.scaling", "--local", "--nprocs", "1,2", "--subnets",
                            "1,2", "--out", str(out), "--", *TINY], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 4, again.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_model_validates_and_projects_on_the_sweep(sweep, tmp_path):
    study, _ = sweep
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, "-m", "dd_mpi.scaling", "--model", str(study), "--alpha", "1e-4",
                             "--beta", "1e9", "--gpus", "8-64", "--samples", "50000", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "predicted vs measured" in result.stdout and "mean |relative error|" in result.stdout
    checks = read_csv(out / "model_validation.csv")
    assert len(checks) == 12  # 4 runs x (phase 1, fine-tune, baseline)

    # Recompute one prediction by hand: the global net's c from the P=1 runs (no communication:
    # the mean of their global-net phases' seconds per sample, over each phase's epochs after
    # its first where it has more: the baseline's second), then the 2-rank baseline epoch.
    net = Network(alpha=1e-4, beta=1e9)
    g_params = 269_722
    per_phase = []
    for run, phases in (("P1-N1", ("subnet", "finetune", "baseline")), ("P1-N2", ("finetune", "baseline"))):
        p1 = metrics_of(study / run)
        for phase in phases:
            rows = [m for m in p1 if m["phase"] == phase]
            rows = rows[1:] if len(rows) > 1 else rows
            per_phase.append(sum(256 / m["images_per_s"] for m in rows) / len(rows) / 256)
    c_g = sum(per_phase) / len(per_phase)
    expected = 128 * c_g + 4 * scaling.gradient_allreduce_seconds(4 * g_params, 2, net)
    row = next(r for r in checks if Path(r["run"]).name == "P2-N1" and r["phase"] == "baseline")
    assert num(row["predicted_s"]) == pytest.approx(expected, rel=1e-9)
    measured = [m for m in metrics_of(study / "P2-N1") if m["phase"] == "baseline"][1:]
    assert num(row["measured_s"]) == pytest.approx(sum(256 / m["images_per_s"] for m in measured) / len(measured))
    assert num(row["relative_error"]) == pytest.approx((expected - num(row["measured_s"])) / num(row["measured_s"]))
    # phase 1 of P1-N2 (2 sub-nets fused on 1 rank) and P2-N2 (1 per rank) calibrate the sub-net's c
    # together, per sample and net: their mean c predicts each, so their errors balance exactly
    own = [r for r in checks if Path(r["run"]).name in ("P1-N2", "P2-N2") and r["phase"] == "subnet"]
    assert [r["calibration"] for r in own] == ["True", "True"]
    assert sum(1 / (1 + num(r["relative_error"])) for r in own) / 2 == pytest.approx(1.0, rel=1e-9)

    projection = read_csv(out / "model_projection.csv")
    assert [int(r["P"]) for r in projection] == [8, 16, 32, 64]
    for r in projection:
        assert num(r["dd_seconds"]) > 0 and num(r["speedup"]) == pytest.approx(
            num(r["baseline_seconds"]) / num(r["dd_seconds"]))
    assert_png(out / "model.png")


@pytest.mark.slow
def test_measure_comm_with_gloo():
    net, timings = scaling.measure_network(2, repeats=5)
    assert len(timings) == 6 and all(t > 0 for t in timings.values())
    assert timings[max(timings)] > timings[min(timings)]  # 4 MiB takes longer than 4 bytes
    assert net.alpha > 0 and net.beta > 0 and math.isfinite(net.beta)
