"""The paper's presets, each run end to end at a tiny size (synthetic data, tiny epoch and
sample overrides, 2 local ranks, so N/2 sub-nets fused on each: the layout of a 2-GPU node,
and a third less time than 4 ranks on CI's 2 cores): every one writes the paper's whole table,
`random_T` included, and `dd-report --paper` prints it beside the paper's numbers.

    .venv/bin/python -m pytest -q tests/test_presets.py
"""

from __future__ import annotations

import pytest

from dd_mpi import paper, reporting
from dd_mpi.presets import PRESETS

from helpers import explain, read_report, run_dd

pytestmark = pytest.mark.slow

TINY_OVERRIDES = ["--device", "cpu", "--dataset", "synthetic", "--train-samples", "64",
                  "--test-samples", "32", "--subnet-epochs", "1", "--finetune-epochs", "1", "--baseline-epochs", "1",
                  "--batch-size", "4", "--global-batch-size", "16", "--eval-every", "1"]


@pytest.mark.parametrize("preset", sorted(paper.RESULTS))
def test_every_paper_preset_runs_and_writes_the_whole_table(tmp_path, preset, capsys):
    out = tmp_path / "run"
    small = ["--image-size", "32"] if PRESETS[preset]["dataset"] == "food101" else []  # not 224 px here
    overrides = [*TINY_OVERRIDES, *small]
    result = run_dd(["--preset", preset, *overrides, "--out", str(out)], nproc=2, timeout=900)
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
    printed = capsys.readouterr().out
    expected = paper.for_preset(preset).rows["transfer_T"][0]
    assert f"| transfer_T | {report['transfer_T']['top1']:.2f} |" in printed and f"{expected:.2f}" in printed
