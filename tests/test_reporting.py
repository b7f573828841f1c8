"""dd-report: the paper's table (Markdown, CSV) and plots, on hand-made runs and on a real one."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import explain, fake_run, read_metrics, read_report, run_dd

from dd_mpi import reporting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a tiny real run: 2 ranks, 2 sub-nets of one rank each, then the baseline (2 epochs);
# one torch thread per rank, so that ranks sharing a loaded machine do not oversubscribe it
TINY_BOTH = ["--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "--width", "1",
             "--subnets", "2", "--strategy", "both", "--threads", "1", "--subnet-epochs", "2",
             "--finetune-epochs", "1", "--baseline-epochs", "2", "--train-samples", "256",
             "--test-samples", "128", "--batch-size", "32"]


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 1024, f"{path} is only {len(data)} bytes"


# ---------------------------------------------------------------------------------------
# Pure functions on hand-made runs
def test_dd_timeline_follows_the_phases(tmp_path):
    run = reporting.RunFiles(fake_run(tmp_path))
    timeline = reporting.dd_timeline(run.report, run.metrics)
    # phase 1: the slowest group's elapsed, the sub-nets' mean accuracy
    assert timeline["phase1"] == [(6.0, 32.0), (12.0, 42.0)]
    # the composed net once phases 1 and 2 are over and it is scored (phase 3's first 0.5 s),
    # then the fine-tune offset by phases 1 and 2
    assert timeline["transfer"] == (13.5, 50.0)
    assert timeline["finetune"] == [(17.0, 56.0), (21.0, 60.0)]
    assert reporting.baseline_curve(run.metrics) == [(10.0, 35.0), (20.0, 50.0), (30.0, 55.0)]
    # --levels: the intermediate levels' 4 s come before the global net exists
    staged = {**run.report, "timing": {**run.report["timing"], "intermediate": 4.0, "dd_total": 25.0}}
    timeline = reporting.dd_timeline(staged, run.metrics)
    assert timeline["transfer"] == (17.5, 50.0) and timeline["finetune"][-1] == (25.0, 60.0)
    # ... and they have curves of their own (the plot went from phase 1 to the global net): level
    # 1's two nets after phase 1 and half the compositions' 1 s (the other half: into the global net)
    staged["intermediate"] = [{"level": 1, "nets": []}]
    level1 = [{"phase": "level1", "group": g, "epoch": e, "test_top1": top1, "elapsed": elapsed}
              for g, e, top1, elapsed in ((0, 1, 45.0, 2.0), (1, 1, 47.0, 1.5), (0, 2, 48.0, 4.0), (1, 2, 50.0, 3.0))]
    assert reporting.dd_timeline(staged, run.metrics + level1)["levels"] == [[(14.5, 46.0), (16.5, 49.0)]]


def test_table_rows_carry_the_report_numbers(tmp_path):
    run = reporting.RunFiles(fake_run(tmp_path, top5=True))
    rows = {r["name"]: r for r in reporting.table_rows(run)}
    assert [n for n in rows if rows[n]["section"] == "net"] == ["sub_net_0", "sub_net_1", "transfer",
                                                               "transfer_T", "random_T"]
    assert rows["sub_net_1"]["top1"] == 44.0 and rows["sub_net_1"]["top5"] == 72.0
    assert rows["transfer_T"]["top5"] == 85.0 and rows["random_T"]["seconds"] == 30.0
    assert rows["phase1_subnets"]["seconds"] == 12.0 and rows["phase2_compose"]["seconds"] == 1.0
    assert rows["phase3_finetune"]["seconds"] == 8.0 and rows["dd_total"]["seconds"] == 21.0
    assert rows["baseline_total"]["seconds"] == 30.0
    assert rows["speedup"]["ratio"] == pytest.approx(30 / 21)
    text = reporting.markdown([run])
    assert "| sub_net_0 | 40.00 | 70.00 | 1.5000 | 10.0 |" in text
    assert "| transfer_T | 60.00 | 85.00 | 1.0000 | 8.0 |" in text
    assert "| speedup (baseline / DD) | 1.43x |" in text
    assert "top-5 (%)" in text


def test_markdown_without_top5_has_no_top5_column(tmp_path):
    text = reporting.markdown([reporting.RunFiles(fake_run(tmp_path))])
    assert "top-5" not in text and "dd_mpi 0" not in text  # (a report without its software: no such line)
    assert "| random_T | 55.00 | 1.1000 | 30.0 |" in text


def test_several_runs_one_block_each_and_plots(tmp_path):
    a, b = fake_run(tmp_path, "P2-N2"), fake_run(tmp_path, "P4-N2", world=4)
    out = tmp_path / "out"
    again = a.parent / ".." / a.parent.name / a.name  # a named twice: reported once
    assert reporting.main([str(a), str(b), str(again), "--out", str(out)]) == 0
    md = (out / "dd_report.md").read_text()
    assert md.count("## ") == 2 and str(a) in md and str(b) in md
    rows = list(csv.DictReader(io.StringIO((out / "dd_report.csv").read_text())))
    assert {r["run"] for r in rows} == {str(a), str(b)}
    assert {r["P"] for r in rows} == {"2", "4"}
    for name in ("accuracy_vs_time.png", "phase_times.png"):
        assert_png(out / name)
    assert reporting.default_out([a, b]) == tmp_path.resolve()
    assert reporting.default_out([a]) == a


def test_runs_of_the_same_name_are_told_apart_in_the_plots(tmp_path):
    """Two studies' P2-N2 were both 'P2-N2 (P=2, N=2)' in the legend and the bars' ticks."""
    one, two = fake_run(tmp_path / "study1", "P2-N2"), fake_run(tmp_path / "study2", "P2-N2")
    runs = reporting.load_runs([one, two])
    assert reporting.short_names(runs) == ["study1/P2-N2", "study2/P2-N2"]
    assert reporting.short_names([runs[0], reporting.RunFiles(fake_run(tmp_path, "P4-N2"))]) == ["P2-N2", "P4-N2"]
    assert runs[0].label_as("study1/P2-N2") == "study1/P2-N2 (P=2, N=2)"
    assert reporting.main([str(one), str(two), "--out", str(tmp_path / "out")]) == 0


def test_the_legend_explains_only_what_was_drawn(tmp_path, monkeypatch):
    """A run without a baseline had 'baseline (random_T)' in its legend; one with --levels had
    no key for its intermediate curves."""
    from matplotlib.figure import Figure
    legends = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: legends.append(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    run = fake_run(tmp_path)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics if r["phase"] != "baseline"))
    reporting.plot_accuracy_vs_time([reporting.RunFiles(run)], tmp_path / "a.png")
    assert legends[-1] == ["DD phase 1: sub-nets (mean top-1, slowest group's time)",
                           "DD phases 2-3: composed (transfer), fine-tuned"]
    report = json.loads((run / "report.json").read_text())
    report["intermediate"] = [{"level": 1, "nets": []}]
    (run / "report.json").write_text(json.dumps(report))
    with (run / "metrics.jsonl").open("a") as rows:
        rows.write(json.dumps({"phase": "level1", "group": 0, "epoch": 1, "test_top1": 45.0, "elapsed": 2.0,
                               "images_per_s": 50.0, "seconds": 2.0}) + "\n")
    reporting.plot_accuracy_vs_time([reporting.RunFiles(run)], tmp_path / "b.png")
    assert "DD intermediate levels (--levels: mean top-1 of each level's nets)" in legends[-1]


def test_runs_on_two_file_systems_ask_for_out(tmp_path, capsys):
    """Runs that share no directory but / had their report written into / (or failed there)."""
    import tempfile
    top = Path(tmp_path.resolve().parts[1])  # another top-level folder than tmp_path's (TMPDIR may be anywhere)
    with tempfile.TemporaryDirectory(dir="/tmp" if top.name == "var" else "/var/tmp") as elsewhere:
        a, b = fake_run(tmp_path, "a"), fake_run(Path(elsewhere), "b")
        assert os.path.commonpath([a.resolve(), b.resolve()]) == "/"
        assert reporting.main([str(a), str(b)]) == 2
        assert capsys.readouterr().err.strip() == ("dd-report: error: the runs share no directory but /: "
                                                   "give --out, where to write the report")
        assert not Path("/dd_report.md").exists()
        assert reporting.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0


def test_without_matplotlib_the_tables_are_written_and_the_plots_skipped(tmp_path):
    """matplotlib is an extra ('dd_mpi[plot]'): without it dd-report still prints and writes
    its tables (it once exited 2 with nothing but the install hint)."""
    run = fake_run(tmp_path)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import sys\nsys.modules['matplotlib'] = None  # import matplotlib: ImportError\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                                                     os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "dd_mpi.reporting", str(run)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, explain(result)
    assert "| transfer_T |" in result.stdout and "plots skipped: the plots need matplotlib" in result.stderr
    assert (run / "dd_report.md").exists() and (run / "dd_report.csv").exists()
    assert not list(run.glob("*.png"))


def test_dd_only_and_baseline_only_runs(tmp_path):
    dd_only = fake_run(tmp_path, "dd")
    report = json.loads((dd_only / "report.json").read_text())
    report["random_T"] = None
    report["timing"]["baseline_total"] = None
    report["speedup"] = None
    (dd_only / "report.json").write_text(json.dumps(report))
    base_only = fake_run(tmp_path, "base")
    report = json.loads((base_only / "report.json").read_text())
    report.update(sub_nets=[], transfer=None, transfer_T=None,
                  timing={"subnets": None, "compose": None, "finetune": None, "dd_total": None,
                          "baseline_total": 30.0}, speedup=None)
    report["config"]["strategy"] = "baseline"
    (base_only / "report.json").write_text(json.dumps(report))
    out = tmp_path / "out"
    assert reporting.main([str(dd_only), str(base_only), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "dd_report.csv").read_text())))
    names = [r["name"] for r in rows]
    assert "random_T" in names and "transfer_T" in names and "speedup" not in names
    # a conventional run has no sub-networks: not the --subnets default's 2
    assert {r["N"] for r in rows if r["run"] == str(base_only)} == {""}
    md = (out / "dd_report.md").read_text()
    assert "P = 2 ranks, conventional training (no sub-networks), backend" in md
    assert md.count("N = 2 sub-networks") == 1  # the DD run's
    assert_png(out / "phase_times.png")


def test_missing_report_is_a_usage_error(tmp_path, capsys):
    """A path that does not exist, or a checkpoint file, said 'no report.json' too."""
    (tmp_path / "a.pt").write_bytes(b"")
    for path, what in ((tmp_path, "has no report.json (a run writes it when it ends)"),
                       (tmp_path / "nope", "does not exist"), (tmp_path / "a.pt", "is a file, not a run directory")):
        assert reporting.main([str(path)]) == 2
        assert capsys.readouterr().err.endswith(f"{path} {what}: give a finished dd-train run's --out directory\n")


def damage(run: Path, file: str, edit) -> None:
    path = run / file
    if file == "metrics.jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(r) + "\n" for r in edit(rows)) if callable(edit) else edit)
    else:
        text = edit(json.loads(path.read_text())) if callable(edit) else edit
        path.write_bytes(text if isinstance(text, bytes) else text.encode() if isinstance(text, str)
                         else json.dumps(text).encode())


def replaced(key, value):
    return lambda report: {**report, key: value}


DAMAGED = [  # (file, edit, what the line says): each was a traceback or a line naming no file
    ("report.json", lambda r: json.dumps(r)[:300], "not JSON (Expecting"),
    ("report.json", "", "not JSON (Expecting value at line 1 column 1)"),
    ("report.json", b"\x8d\xff binary", "not UTF-8 text"),
    ("report.json", [1, 2], "a JSON list, not an object"),
    ("report.json", replaced("timing", [1]), '"timing" is not an object'),
    ("report.json", lambda r: {**r, "transfer": {**r["transfer"], "top1": "50.0"}}, "transfer: its result is not"),
    ("report.json", replaced("transfer", 12.5), "transfer: its result is not an object of numbers"),
    ("report.json", lambda r: {**r, "sub_nets": [{"top1": 1.0}]}, "has no index"),
    ("report.json", lambda r: {**r, "config": {**r["config"], "subnets": "four"}}, 'the config\'s "subnets"'),
    ("report.json", replaced("groups", 5), '"groups" is not a list'),
    # a TypeError in dd-scaling --model ('int' object is not subscriptable, in the catalog)
    ("report.json", lambda r: {**r, "config": {**r["config"], "arch": 5, "width": "1"}},
     "the config's 'arch', 'width' are not of the flag's type"),
    ("metrics.jsonl", lambda rows: [{**rows[0], "elapsed": None}, *rows[1:]], "metrics.jsonl line 1: phase, epoch"),
    ("metrics.jsonl", lambda rows: [*rows[:2], [1]], "metrics.jsonl line 3: a JSON list"),
    ("metrics.jsonl", lambda rows: [{k: v for k, v in r.items() if k != "epoch"} for r in rows], "line 1: phase"),
    ("metrics.jsonl", '{"phase": "subnet", "epo\n', "metrics.jsonl line 1: not JSON"),
]


@pytest.mark.parametrize("file, edit, says", DAMAGED)
def test_a_damaged_run_file_is_one_line_naming_it(tmp_path, capsys, file, edit, says):
    """dd-report and dd-scaling --collect read the same files (``RunFiles``): one line that
    names the file (and the line of metrics.jsonl), exit 2, and nothing written."""
    from dd_mpi import scaling
    run = fake_run(tmp_path)
    damage(run, file, edit)
    for main, tool in ((reporting.main, "dd-report"), (scaling.main, "dd-scaling")):
        flags = [str(run)] if tool == "dd-report" else ["--collect", str(run)]
        assert main([*flags, "--out", str(tmp_path / "out")]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"{tool}: error: ") and f"{file}" in line and says in line, line
        assert line.endswith("not a finished dd-train run's file, or damaged (dd-train --resume with the run's "
                             "flags writes it again from its checkpoints; or leave the run out)")
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("error")
def test_a_report_without_timings_is_still_reported(tmp_path, capsys):
    """"timing": null (a run that ended before any phase) crashed the plot after the tables
    (and then matplotlib warned of an empty legend)."""
    run = fake_run(tmp_path)
    damage(run, "report.json", replaced("timing", None))
    assert reporting.main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert_png(tmp_path / "out" / "accuracy_vs_time.png")


def test_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys):
    from dd_mpi import scaling
    run = fake_run(tmp_path)
    (tmp_path / "afile").write_text("")
    for out, why in ((tmp_path / "afile", "File exists"), (tmp_path / "afile" / "sub", "Not a directory")):
        assert reporting.main([str(run), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"dd-report: error: --out {out}: {why}: choose a directory you can write\n"
        assert scaling.main(["--collect", str(run), "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"dd-scaling: error: {out}: {why}: check --out"), line


# ---------------------------------------------------------------------------------------
# A real run
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    result = run_dd(TINY_BOTH + ["--out", str(out)], nproc=2, timeout=900)
    assert result.returncode == 0, explain(result)
    return out


@pytest.mark.slow
def test_report_on_a_real_run(real_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dd_mpi.reporting", str(real_run), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report, metrics = read_report(real_run), read_metrics(real_run)
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO((tmp_path / "dd_report.csv").read_text()))}
    for sub in report["sub_nets"]:
        assert float(rows[f"sub_net_{sub['index']}"]["top1"]) == pytest.approx(sub["top1"])
        assert float(rows[f"sub_net_{sub['index']}"]["seconds"]) == pytest.approx(sub["seconds"])
    for name in ("transfer", "transfer_T", "random_T"):
        assert float(rows[name]["top1"]) == pytest.approx(report[name]["top1"])
        assert float(rows[name]["loss"]) == pytest.approx(report[name]["loss"])
    for key, name in (("subnets", "phase1_subnets"), ("compose", "phase2_compose"),
                      ("finetune", "phase3_finetune"), ("dd_total", "dd_total"),
                      ("baseline_total", "baseline_total")):
        assert float(rows[name]["seconds"]) == pytest.approx(report["timing"][key])
    assert float(rows["speedup"]["ratio"]) == pytest.approx(report["speedup"])
    md = (tmp_path / "dd_report.md").read_text()
    assert f"| transfer_T | {report['transfer_T']['top1']:.2f} |" in md
    assert f"| DD total | {report['timing']['dd_total']:.1f} |" in md
    assert md in result.stdout
    chip = report["ranks"][0]["processor"]
    assert f"dd_mpi {report['software']['dd_mpi']}, torch {report['software']['torch']}, on {chip}\n" in md

    # The curves end where the report says the phases end, at the report's accuracies.
    timeline = reporting.dd_timeline(report, metrics)
    subnet_rows = [r for r in metrics if r["phase"] == "subnet"]
    assert timeline["phase1"][-1][0] == pytest.approx(max(r["elapsed"] for r in subnet_rows))
    assert timeline["phase1"][-1][0] == pytest.approx(report["timing"]["subnets"])
    assert len(timeline["phase1"]) == 2  # --subnet-epochs 2, both groups merged per epoch
    t = report["timing"]
    assert 0 < t["transfer_eval"] < t["finetune"]  # phase 3 opens with the composed net's evaluation
    assert timeline["transfer"] == pytest.approx((t["subnets"] + t["compose"] + t["transfer_eval"],
                                                 report["transfer"]["top1"]))
    assert timeline["finetune"][-1] == pytest.approx((report["timing"]["dd_total"], report["transfer_T"]["top1"]))
    base = reporting.baseline_curve(metrics)
    assert len(base) == 2
    assert base[-1] == pytest.approx((report["timing"]["baseline_total"], report["random_T"]["top1"]))
    for name in ("accuracy_vs_time.png", "phase_times.png"):
        assert_png(tmp_path / name)


@pytest.mark.slow
def test_report_defaults_to_the_run_directory(real_run):
    assert reporting.main([str(real_run)]) == 0
    for name in reporting.REPORT_FILES:
        assert (real_run / name).stat().st_size > 0
    assert (real_run / "report.md").exists()  # dd-train's own file is left alone


def test_paper_puts_the_papers_numbers_beside_a_runs(tmp_path, capsys):
    run = fake_run(tmp_path)
    report = json.loads((run / "report.json").read_text())
    from dd_mpi.presets import PRESETS
    paper_run = {k: v for k, v in PRESETS["cifar10-resnet32"].items() if not k.startswith("_")}
    report["config"].update(preset="cifar10-resnet32", **paper_run, train_samples=None, test_samples=None)
    (run / "report.json").write_text(json.dumps(report))
    assert reporting.main(["--paper", str(run)]) == 0
    text = capsys.readouterr().out
    assert "paper top-1 (%)" in text and "this run differs" not in text
    assert "| sub_net_0 | 40.00 | 1.5000 | 10.0 | 81.25 |" in text  # the paper's sub_net_1 (1-based)
    assert "| transfer_T | 60.00 | 1.0000 | 8.0 | 94.09 |" in text and "| random_T | 55.00 | 1.1000 | 30.0 | 92.82 |" in text
    assert "| DD total | 21.0 | 5.65 |" in text and "| speedup (baseline / DD) | 1.43x | 1.51x |" in text
    report["config"].update(dataset="imagefolder", subnets=2)  # the preset, then another experiment
    (run / "report.json").write_text(json.dumps(report))
    assert reporting.main(["--paper", str(run)]) == 0
    assert ("(the paper's numbers are those of its cifar10 resnet32 into 4 experiment; this run differs: "
            "--dataset imagefolder (paper cifar10), --subnets 2 (paper 4))") in capsys.readouterr().out
    # a smoke run of the preset: fewer epochs on a capped set (only its dataset and net were said)
    report["config"].update(dataset="cifar10", subnets=4, subnet_epochs=4, train_samples=512, width=4.0)
    (run / "report.json").write_text(json.dumps(report))
    assert reporting.main(["--paper", str(run)]) == 0
    assert ("this run differs: --width 4.0 (preset 1.0), --subnet-epochs 4 (preset 164), --train-samples 512 "
            "(paper all))") in capsys.readouterr().out
    # a per-rank batch instead of the preset's global one; no baseline trained: its epochs are no difference
    report["config"].update(width=1.0, subnet_epochs=164, train_samples=None, global_batch_size=None, batch_size=32,
                            strategy="dd", baseline_epochs=0)
    assert reporting.paper_differences(reporting.paper.for_preset("cifar10-resnet32"), report["config"]) == [
        "--batch-size 32 a rank (preset --global-batch-size 128)"]
    other = fake_run(tmp_path, "other")
    assert reporting.main(["--paper", str(other)]) == 0
    assert "no paper numbers: the run's preset is None" in capsys.readouterr().out
