"""The paper's presets. Four run end to end at a tiny size (synthetic data, tiny epoch and
sample overrides, 2 local ranks, so N/2 sub-nets fused on each: the layout of a 2-GPU node,
and a third less time than 4 ranks on CI's 2 cores): every one writes the paper's whole table,
`random_T` included, and `dd-report --paper` prints it beside the paper's numbers.

The four cover every recipe (CIFAR's with and without the warm-up, Food-101's), every kind of
block (basic, bottleneck) and both N (4, 8). The other six are planned and reported in-process:
on the synthetic set a cifar100 preset trains what its cifar10 twin does (10 classes either
way), and resnet56, food101-resnet50-n8 and food101-resnet101 sit between two that run.

    .venv/bin/python -m pytest -q tests/test_presets.py
"""

from __future__ import annotations

import json

import pytest

from dd_mpi import paper, reporting
from dd_mpi.catalog import BOTTLENECK_LAYERS, parse_depth
from dd_mpi.config import parse_config
from dd_mpi.plan import build_plan, checked_layouts
from dd_mpi.presets import PRESETS

from helpers import explain, fake_run, read_report, run_dd

TINY_OVERRIDES = ["--device", "cpu", "--dataset", "synthetic", "--train-samples", "64",
                  "--test-samples", "32", "--subnet-epochs", "1", "--finetune-epochs", "1", "--baseline-epochs", "1",
                  "--batch-size", "4", "--global-batch-size", "16", "--eval-every", "1"]
RUN_END_TO_END = ("cifar10-resnet32", "cifar10-resnet110", "food101-resnet50", "food101-resnet101-n8")


def overrides_for(preset: str) -> list[str]:
    small = ["--image-size", "32"] if PRESETS[preset]["dataset"] == "food101" else []  # not 224 px here
    return [*TINY_OVERRIDES, *small]


def transfer_T_row(report: dict, preset: str) -> tuple[str, str]:
    """The table's transfer_T row as --paper prints it: the run's top-1, then the paper's."""
    expected = paper.for_preset(preset).rows["transfer_T"][0]
    return f"| transfer_T | {report['transfer_T']['top1']:.2f} |", f"{expected:.2f} |"


@pytest.mark.slow
@pytest.mark.parametrize("preset", RUN_END_TO_END)
def test_paper_presets_run_and_write_the_whole_table(tmp_path, preset, capsys):
    out = tmp_path / "run"
    result = run_dd(["--preset", preset, *overrides_for(preset), "--out", str(out)], nproc=2, timeout=900)
    assert result.returncode == 0, explain(result)
    report = read_report(out)
    assert report["config"]["preset"] == preset and report["config"]["strategy"] == "both"
    assert report["config"]["subnet_data"] == "shard"  # PAPER.md R2: each sub-net on its own part of the data
    n = PRESETS[preset]["subnets"]
    assert [s["index"] for s in report["sub_nets"]] == list(range(n))
    for name in ("transfer", "transfer_T", "random_T"):
        assert 0 <= report[name]["top1"] <= 100
    assert report["speedup"] is not None
    assert reporting.main(["--paper", str(out)]) == 0
    run_row, paper_figure = transfer_T_row(report, preset)
    printed = capsys.readouterr().out
    assert run_row in printed and paper_figure in printed


def test_the_run_presets_cover_every_recipe_block_and_n():
    def kinds(names) -> set:  # (recipe: the dataset's family and its warm-up; blocks; N)
        return {(PRESETS[p]["dataset"].rstrip("0123456789"), PRESETS[p].get("warmup_style"),
                 parse_depth(PRESETS[p]["arch"]) in BOTTLENECK_LAYERS, PRESETS[p]["subnets"]) for p in names}
    every = kinds(paper.RESULTS)
    for what in range(4):
        assert {k[what] for k in kinds(RUN_END_TO_END)} == {k[what] for k in every}


@pytest.mark.parametrize("preset", sorted(paper.RESULTS))
def test_every_paper_preset_plans_and_prints_beside_the_papers_numbers(tmp_path, preset, capsys):
    """What a tiny run of each would check before training (its flags, its split into N, the
    plan of every phase on 2 ranks), and its table beside the paper's, on a made-up run."""
    cfg = parse_config(["--preset", preset, *overrides_for(preset)])
    assert (cfg.preset, cfg.strategy, cfg.subnet_data) == (preset, "both", "shard")
    plan = build_plan(cfg, checked_layouts(cfg, 2), 2, 10)
    assert plan.subnets == PRESETS[preset]["subnets"] and plan.baseline is not None
    run = fake_run(tmp_path)
    report = json.loads((run / "report.json").read_text())
    report["config"] = {**{k: v for k, v in PRESETS[preset].items() if not k.startswith("_")}, "preset": preset,
                        "train_samples": None, "test_samples": None}
    (run / "report.json").write_text(json.dumps(report))
    assert reporting.main(["--paper", str(run)]) == 0
    printed = capsys.readouterr().out
    run_row, paper_figure = transfer_T_row(report, preset)
    assert f"{run_row} 1.0000 | 8.0 | {paper_figure}" in printed and "this run differs" not in printed
