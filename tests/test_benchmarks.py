"""The benchmarks run from a checkout and end with their headline line.

Tiny settings (2 ranks, 64 images): these check that each script works end to end and that
its headline agrees with the run it measured, not the figures (those are in BENCHMARKS.md).
Bad input is refused before any work: one line naming the flag, exit 2.
"""

import json
import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import launcher_free_env

REPO = Path(__file__).resolve().parent.parent
TINY = ["--nproc", "2", "--arch", "resnet20", "--width", "2", "--subnets", "2",
        "--train-samples", "64", "--test-samples", "64", "--batch-size", "16"]


def run_benchmark(script: str, *args: str) -> list[str]:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300, env=launcher_free_env())
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    # the command and the machine come first: timings mean nothing without them
    assert lines[1].startswith("command: ") and lines[2].startswith("machine: "), lines[:3]
    return lines


def standard_error(top1: float, samples: int) -> float:
    """A top-1's binomial standard error in points, at least one test image's worth."""
    return 100 * max(math.sqrt(top1 / 100 * (1 - top1 / 100) / samples), 1 / samples)


def headline_numbers(line: str, pattern: str) -> list[float]:
    match = re.fullmatch(pattern, line)
    assert match, f"last line {line!r} does not match {pattern!r}"
    values = [float(v) for v in match.groups()]
    assert all(math.isfinite(v) and v > 0 for v in values), values
    return values


@pytest.mark.slow
def test_time_to_accuracy_headline_matches_its_runs(tmp_path):
    out = tmp_path / "tta"
    lines = run_benchmark("time_to_accuracy.py", *TINY, "--subnet-epochs", "2", "--finetune-epochs", "1",
                          "--baseline-epochs", "3", "--out", str(out))
    (speedup,) = headline_numbers(lines[-1], r"speedup: ([0-9.]+)(?: \[ratio of TOTAL times: target not reached\])?")
    report = json.loads((out / "full" / "report.json").read_text())
    # no target is read from the sub-nets: scored after phase 1 only, so DD's clock holds no
    # evaluation it does not need; the global nets every epoch (their curves are the clocks)
    (setup,) = [line for line in lines if line.startswith("setup: ")]
    assert setup.endswith("; sub-nets scored after phase 1 only, the global nets every 1"), setup
    assert [level["eval_every"] for level in report["layout"]] == [1000000, 1], report["layout"]
    rows = [json.loads(line) for line in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    for phase, scored in (("subnet", [False, True]), ("baseline", [True, True, True]), ("finetune", [True])):
        mine = sorted((r for r in rows if r["phase"] == phase and r["group"] in (0, None)), key=lambda r: r["epoch"])
        assert [r["test_top1"] is not None for r in mine] == scored, (phase, mine)
    assert json.loads((out / "shard" / "report.json").read_text())["config"]["subnet_data"] == "shard"
    target = next(line for line in lines if line.startswith("target: "))
    top1, samples = report["random_T"]["top1"], report["test_samples"]
    assert samples == 64  # --test-samples: what every accuracy is over
    assert target == (f"target: {top1:.2f} % test top-1 (64 test images: one standard error "
                      f"{standard_error(top1, samples):.2f} points)")
    if lines[-1].endswith("target not reached]"):
        assert speedup == pytest.approx(report["timing"]["baseline_total"] / report["timing"]["dd_total"], abs=0.006)
        (dd_line,) = [line for line in lines if line.startswith("DD full: ")]
        best, short = map(float, re.search(r"to target never \(best ([0-9.]+) %, (-?[0-9.]+) standard errors short\)",
                                           dd_line).groups())
        assert best < top1 and short == pytest.approx((top1 - best) / standard_error(top1, samples), abs=0.06)
    assert any(line.startswith("better default: --subnet-data ") for line in lines)


@pytest.mark.slow
def test_time_to_accuracy_at_a_reached_target_is_the_ratio_of_the_two_clocks(tmp_path):
    """Target 0: the baseline is there after its first epoch, DD at compose (phase 1's
    slowest group + phase 2 + the composed net's evaluation). The baseline's 1 epoch against
    DD's 1 + 1 is called unfair only if it also had less time. Two seeds: the headline is
    their median, and the seeds' summary counts where DD ends at or above the baseline's
    final, the others' shortfall in the test set's standard errors."""
    out = tmp_path / "tta"
    lines = run_benchmark("time_to_accuracy.py", *TINY, "--subnet-epochs", "1", "--finetune-epochs", "1",
                          "--baseline-epochs", "1", "--modes", "full", "--target", "0", "--seeds", "0,1",
                          "--out", str(out))
    (median,) = headline_numbers(lines[-1], r"speedup: ([0-9.]+) \(median of 2 seeds\)")
    speedups = [float(m.group(1)) for line in lines if (m := re.fullmatch(r"this run: speedup ([0-9.]+)", line))]
    assert len(speedups) == 2 and median == pytest.approx(sum(speedups) / 2, abs=0.006), lines
    assert sum("(at compose)" in line for line in lines if line.startswith("DD full:")) == 2, lines
    budgets = [line for line in lines if "the baseline has fewer epochs (1) than DD (2)" in line]
    finals = []
    for seed, speedup, budget in zip((0, 1), speedups, budgets, strict=True):
        report = json.loads((out / f"seed{seed}" / "full" / "report.json").read_text())
        rows = [json.loads(line) for line in (out / f"seed{seed}" / "full" / "metrics.jsonl").read_text().splitlines()]
        baseline = next(r["elapsed"] for r in rows if r["phase"] == "baseline" and r["epoch"] == 1)
        t = report["timing"]
        assert speedup == pytest.approx(baseline / (t["subnets"] + t["compose"] + t["transfer_eval"]), abs=0.006)
        less_time = report["timing"]["baseline_total"] < t["dd_total"]
        assert budget.startswith("WARNING: " if less_time else "note: ") and ("less time" in budget) == less_time, budget
        finals.append((report["transfer_T"]["top1"], report["random_T"]["top1"], report["test_samples"]))
    (summary,) = [line for line in lines if line.startswith("seeds 0,1: ")]
    short = [f"{(base - final) / standard_error(base, samples):.1f}" for final, base, samples in finals if final < base]
    assert f"DD final >= baseline final on {2 - len(short)} of 2" in summary, summary
    assert summary.endswith(f" (the others short by {', '.join(short)} standard errors of the test set)"
                            if short else " of 2"), summary


@pytest.mark.slow
def test_phase_speed_headline(tmp_path):
    lines = run_benchmark("phase_speed.py", *TINY, "--groups", "1", "--epochs", "2", "--out", str(tmp_path / "speed"))
    full, shard = headline_numbers(lines[-1], r"speed ratio: ([0-9.]+) \(full; shard ([0-9.]+)\)")
    (setup,) = [line for line in lines if line.startswith("setup: ")]  # the layout the ratios are of
    assert "phase 1 in 1 group(s) of 2 rank(s) x 2 net(s), 16/rank per net" in setup, setup
    assert any(line.startswith("phase 1 (full): ") and f"= {full:.2f} " in line for line in lines)
    assert any(line.startswith("phase 1 (shard): ") and f"= {shard:.2f} " in line for line in lines)


@pytest.mark.slow
def test_overhead_headline():
    lines = run_benchmark("overhead.py", "--nproc", "2", "--arch", "resnet20", "--width", "1",
                          "--train-samples", "64", "--batch-size", "16", "--reps", "2")
    (ratio,) = headline_numbers(lines[-1], r"throughput ratio: ([0-9.]+)")
    pairs = [float(m.group(1)) for line in lines if (m := re.search(r", ratio ([0-9.]+)$", line))]
    assert len(pairs) == 2 and min(pairs) - 0.001 <= ratio <= max(pairs) + 0.001, (ratio, pairs)


@pytest.mark.slow
def test_comm_headline(tmp_path):
    out = tmp_path / "comm"
    lines = run_benchmark("comm.py", *TINY, "--subnet-epochs", "1", "--finetune-epochs", "1", "--out", str(out))
    share, peak = headline_numbers(lines[-1], r"compose share: ([0-9.]+) %, peak memory: ([0-9.]+)x model")
    timing = json.loads((out / "report.json").read_text())["timing"]
    assert share == pytest.approx(100 * timing["compose"] / timing["dd_total"], abs=0.006)
    assert peak >= 1.0  # rank 0 holds at least the composed model


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu_throughput measures a GPU; none visible")
def test_gpu_throughput_headline():
    lines = run_benchmark("gpu_throughput.py", "--quick", "--batch-size", "32")
    headline_numbers(lines[-1], r"projected speedup: ([0-9.]+)")


@pytest.mark.slow
def test_gpu_throughput_measures_a_cpu_too():
    """--device cpu: the fp32 line last (no projection), its ratios those of its own figures;
    a bf16 line before it where the CPU has bf16 units."""
    lines = run_benchmark("gpu_throughput.py", "--device", "cpu", "--threads", "1", "--quick", "--batch-size", "8")
    numbers = r"[0-9,.]+"
    match = re.search(rf"fp32: sub-net ({numbers}) img/s, 4 fused ({numbers}) sub-net img/s \(fused / alone "
                      rf"({numbers})x\), global net ({numbers}) img/s.*fused / global ({numbers})x", lines[-1])
    assert match, lines
    sub, fused, fused_vs_alone, glob, fused_vs_global = (float(g.replace(",", "")) for g in match.groups())
    assert fused_vs_alone == pytest.approx(fused / sub, rel=0.02)
    assert fused_vs_global == pytest.approx(fused / glob, rel=0.02)
    bf16 = [line for line in lines if line.startswith("bf16: sub-net ")]  # where the CPU has bf16 units
    assert len(bf16) == int(torch.ops.mkldnn._is_mkldnn_bf16_supported()), lines


@pytest.mark.slow
def test_decode_speed_says_how_many_workers_keep_up():
    lines = run_benchmark("decode_speed.py", "--images", "12", "--consume", "1000")
    (rate,) = [float(m.group(1)) for line in lines if (m := re.match(r"decode \+ train transform: ([0-9.]+) img/s", line))]
    workers, consume, shown_rate = headline_numbers(
        lines[-1], r"workers per rank to keep up: ([0-9]+) \(([0-9.]+) / ([0-9.]+) img/s\)")
    assert shown_rate == round(rate)
    assert math.ceil(1000 / (rate + 0.5)) <= workers <= math.ceil(1000 / (rate - 0.5))  # rate is rounded
    (cache,) = [m.groups() for line in lines if (m := re.match(
        r"cache \(--cache-dir\): gather ([0-9.]+) img/s, gather \+ train augmentation on CPU ([0-9.]+) img/s "
        r"per rank \(([0-9.]+)x one decoding worker\)", line))]
    gather, augmented, versus = (float(v) for v in cache)
    assert gather > 0 and 0 < augmented and versus == pytest.approx(augmented / rate, abs=0.1)


CPU = ("--device", "cpu")  # gpu_throughput's checks come before its GPU check, but not on every machine
BAD_INPUT = [  # (script, its arguments, the flag its one line names); {out}: a directory in tmp_path, {file}: a file
    # one case per kind of mistake a script met badly (each case starts a Python that imports torch)
    ("comm.py", ["--quick", "--subnets", "0", "--out", "{out}"], "--subnets"),
    ("comm.py", ["--bogus-flag", "--out", "{out}"], "--bogus-flag"),
    ("phase_speed.py", ["--quick", "--subnets", "0", "--out", "{out}"], "--subnets"),
    ("phase_speed.py", ["--quick", "--out", "{file}"], "--out"),
    ("phase_speed.py", ["--quick", "--nproc", "0", "--out", "{out}"], "--nproc"),
    ("overhead.py", ["--quick", "--arch", "foo"], "--arch"),
    ("overhead.py", ["--quick", "--nproc", "0"], "--nproc"),
    ("overhead.py", ["--quick", "--reps", "0"], "--reps"),
    ("time_to_accuracy.py", ["--quick", "--seeds", "1,x", "--out", "{out}"], "--seeds"),
    ("time_to_accuracy.py", ["--quick", "--target", "101", "--out", "{out}"], "--target"),
    ("time_to_accuracy.py", ["--quick", "--modes", "full,full", "--out", "{out}"], "--modes"),
    ("time_to_accuracy.py", ["--quick", "--seeds", "1,1", "--out", "{out}"], "--seeds"),
    ("gpu_throughput.py", [*CPU, "--preset", "bogus"], "--preset"),
    ("gpu_throughput.py", [*CPU, "--subnets", "0"], "--subnets"),
    ("gpu_throughput.py", [*CPU, "--subnets", "3"], "--subnets"),
    ("gpu_throughput.py", [*CPU, "--batch-size", "0"], "--batch-size"),
    ("decode_speed.py", ["--images", "0"], "--images"),
    ("decode_speed.py", ["--image-size", "0"], "--image-size"),
    ("decode_speed.py", ["--consume", "nan"], "--consume"),
    ("decode_speed.py", ["--preset", "bogus"], "--preset"),
    ("digits.py", ["{out}", "0"], "size"),
    ("digits.py", ["--bogus-flag"], "--bogus-flag"),  # (it wrote 1,797 images into a folder of that name)
]


@pytest.mark.parametrize("script,args,flag", BAD_INPUT, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_INPUT])
def test_bad_input_is_one_line_naming_the_flag_before_any_work(tmp_path, script, args, flag, monkeypatch, capsys):
    """The project's standard for bad input: one line naming the flag and the fix, exit 2;
    never a traceback, a value silently replaced, or a failure only after the runs. Run as
    ``__main__`` in this process (a Python per case, ~3 s of imports each, cost CI over a
    minute); the next test starts one as a user does."""
    (tmp_path / "file").write_text("not a directory\n")
    args = [a.format(out=tmp_path / "out", file=tmp_path / "file") for a in args]
    path = str(REPO / "benchmarks" / script)
    monkeypatch.setattr(sys, "argv", [path, *args])
    monkeypatch.setattr(sys, "path", [str(REPO / "benchmarks"), *sys.path])  # as python SCRIPT has it (and the
    # scripts then put the repository first: undone after the case)
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(path, run_name="__main__")
    captured = capsys.readouterr()
    assert ended.value.code == 2, f"exit {ended.value.code}:\n{captured.out[-2000:]}\n{captured.err[-2000:]}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and flag in lines[0], captured.err
    assert captured.out == "" and not (tmp_path / "out").exists()  # refused before the header, before any run


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "phase_speed.py"), "--quick", "--subnets", "0",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                          env=launcher_free_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("phase_speed.py: error: ") and "--subnets 0 is invalid" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_a_preset_overridden_by_later_flags_runs_and_prints_each_flag_once():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from harness import last_flags_win

    preset = ["--arch", "resnet20", "--width", "2", "--compile", "--seed", "-1", "--lr=0.1"]
    merged = last_flags_win([*preset, "--arch", "resnet32", "--no-compile", "--lr", "0.2", "--seed", "3"])
    assert merged == ["--arch", "resnet32", "--width", "2", "--no-compile", "--seed", "3", "--lr", "0.2"]
    # what dd-train's own parser makes of the merged list is what it makes of the original
    from dd_mpi.config import build_parser
    original = [*preset, "--arch", "resnet32", "--no-compile", "--lr", "0.2", "--seed", "3"]
    assert vars(build_parser().parse_args(merged)) == vars(build_parser().parse_args(original))


def test_dd_train_runs_where_the_benchmark_was_started(tmp_path, monkeypatch):
    """A relative --config (or --data-dir) is the user's path: dd-train once ran in the
    repository and answered `--config conf.yaml: No such file or directory`. And `-m dd_mpi`
    is still this checkout's copy, ahead of any other on PYTHONPATH."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import harness

    decoy = tmp_path / "elsewhere" / "dd_mpi"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(decoy.parent))
    (tmp_path / "conf.yaml").write_text("subnet_epochs: 1\n")
    monkeypatch.chdir(tmp_path)
    # stands in for dd-train: says which dd_mpi it imports and where --config leads
    probe = ("import json, os, sys; from pathlib import Path; import dd_mpi; args = sys.argv[1:]; "
             "out = Path(args[args.index('--out') + 1]); "
             "(out / 'report.json').write_text(json.dumps({'dd_mpi': dd_mpi.__file__, "
             "'config': os.path.abspath(args[args.index('--config') + 1])})); "
             "(out / 'metrics.jsonl').write_text('')")
    real_run = subprocess.run
    monkeypatch.setattr(harness.subprocess, "run",
                        lambda cmd, **kwargs: real_run([sys.executable, "-c", probe, *cmd[3:]], **kwargs))

    report, _ = harness.run_dd_train(["--config", "conf.yaml"], 1, tmp_path / "run")
    assert report["config"] == str(tmp_path / "conf.yaml")
    assert Path(report["dd_mpi"]) == REPO / "dd_mpi" / "__init__.py"
