"""The paper's numbers (dd_mpi/paper.py) and the reproduction ledger (PAPER.md) agree.

Pure text and data, no processes, no torch:

    .venv/bin/python -m pytest -q tests/test_paper.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dd_mpi import paper

ROOT = Path(__file__).resolve().parent.parent
LEDGER = (ROOT / "PAPER.md").read_text(encoding="utf-8")


def ledger_lines() -> dict[tuple[str, str], list[str]]:
    """(preset, row) -> the cells of its ledger line; ledger lines start with a backticked preset."""
    lines: dict[tuple[str, str], list[str]] = {}
    for line in LEDGER.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = (cells[0].strip("`"), cells[1].strip("`"))
        assert key not in lines, f"PAPER.md has two ledger lines for {key}"
        lines[key] = cells
    return lines


def number(cell: str) -> float:
    """'81.25', '5.65 h', '1.51x', '53.04 (misprint, R8)' -> the leading number."""
    return float(cell.split()[0].rstrip("x"))


LINES = ledger_lines()
PAPER_ROWS = [(r.preset, row, score) for r in paper.RESULTS.values() for row, score in r.rows.items()]


@pytest.mark.parametrize("preset, row, score", PAPER_ROWS, ids=[f"{p}:{r}" for p, r, _ in PAPER_ROWS])
def test_every_paper_number_is_on_its_ledger_line(preset, row, score):
    top1, top5 = score
    cells = LINES.get((preset, row))
    assert cells is not None, f"PAPER.md has no ledger line for {preset} {row}"
    assert cells[2] == f"{top1:.2f}", (preset, row, cells[2])
    if top5 is not None:
        assert cells[3].split()[0] == f"{top5:.2f}", (preset, row, cells[3])
    assert f"{top1:.2f}" in LEDGER


def test_every_number_appears_in_paper_md_with_two_decimals():
    for r in paper.RESULTS.values():
        values = [v for score in r.rows.values() for v in score if v is not None]
        values += [h for h in (r.hours_dd, r.hours_conventional) if h is not None]
        for value in values:
            assert f"{value:.2f}" in LEDGER, f"{r.preset}: {value:.2f} is not in PAPER.md"


def test_ledger_holds_no_number_that_paper_py_lacks():
    """The other direction: a ledger line is one of paper.py's rows, with paper.py's value."""
    for (preset, row), cells in LINES.items():
        result = paper.for_preset(preset)
        assert result is not None, f"PAPER.md names a preset paper.py lacks: {preset}"
        if row == "hours DD":
            assert number(cells[2]) == result.hours_dd
        elif row == "hours conventional":
            assert number(cells[2]) == result.hours_conventional
        elif row.startswith("ratio"):
            assert cells[2] == f"{result.time_ratio:.2f}x"
        else:
            assert row in result.rows, f"PAPER.md: {preset} has no row {row!r} in paper.py"
            assert number(cells[2]) == result.rows[row][0]


def test_every_preset_is_in_paper_md_with_its_command():
    for name, result in paper.RESULTS.items():
        assert f"`{name}`" in LEDGER, name
        commands = {cells[4] if result.dataset == "food101" else cells[3]
                    for (preset, row), cells in LINES.items() if preset == name and row not in paper.REFERENCE_ROWS}
        assert len(commands) == 1, f"{name}: one job fills all its lines, found {commands}"
        command = commands.pop()
        depth = result.arch.removeprefix("resnet")
        if result.dataset == "cifar10":
            assert command == f"`sbatch slurm/resnet{depth}.sh --data-dir DIR`"
        elif result.dataset == "cifar100":
            assert command == f"`DEPTH={depth} sbatch slurm/cifar100.sh --data-dir DIR`"
        else:
            extra = f" --preset {name}" if result.subnets == 8 else ""
            assert command == f"`sbatch slurm/food101_{result.arch}.sh --data-dir DIR{extra}`"


def test_presets_and_their_experiments():
    assert set(paper.RESULTS) == {f"{ds}-resnet{d}" for ds in ("cifar10", "cifar100") for d in (32, 56, 110)} | {
        f"food101-resnet{d}{s}" for d in (50, 101) for s in ("", "-n8")}
    for name, r in paper.RESULTS.items():
        assert r.preset == name and name.startswith(r.dataset) and r.arch in name
        assert r.subnets == (8 if name.endswith("-n8") else 4)
        assert r.reading
        assert paper.for_preset(name) is r
    assert paper.for_preset("no-such-preset") is None
    # the paper gives sub-net rows for CIFAR only, times for CIFAR-10 only
    for r in paper.RESULTS.values():
        assert ("sub_net_1" in r.rows) == r.dataset.startswith("cifar")
        assert (r.hours_dd is not None) == (r.dataset == "cifar10")
        assert ("He et al. 2016" in r.rows) == (r.dataset == "cifar10")


def test_food101_misprint_is_flagged():
    """ResNet101 random_T: top-5 53.04 printed below its top-1 72.37; kept as printed, flagged."""
    for r in paper.RESULTS.values():
        impossible = [row for row, (top1, top5) in r.rows.items() if top5 is not None and top5 < top1]
        if r.preset.startswith("food101-resnet101"):
            assert impossible == ["random_T"]
            assert r.rows["random_T"] == (72.37, 53.04)
            assert any("misprint" in note and "53.04" in note for note in r.notes)
        else:
            assert impossible == [] and r.notes == ()
    assert "misprint" in LEDGER and "53.04 (misprint" in LEDGER


def test_time_ratios_are_what_paper_md_prints():
    ratios = {name: r.time_ratio for name, r in paper.RESULTS.items() if r.time_ratio is not None}
    assert set(ratios) == {"cifar10-resnet32", "cifar10-resnet56", "cifar10-resnet110"}
    for name, ratio in ratios.items():
        r = paper.RESULTS[name]
        assert LINES[(name, "ratio conventional / DD")][2] == f"{ratio:.2f}x"
        assert f"{r.hours_conventional:.2f} / {r.hours_dd:.2f} = {ratio:.2f}×" in LEDGER
    assert [f"{ratios[f'cifar10-resnet{d}']:.2f}" for d in (32, 56, 110)] == ["1.51", "1.45", "1.42"]


def test_report_keys_and_report_score():
    rows = {row for r in paper.RESULTS.values() for row in r.rows}
    assert rows == set(paper.REPORT_KEYS) | paper.REFERENCE_ROWS
    assert paper.REPORT_KEYS["sub_net_1"] == "sub_nets[0]" and paper.REPORT_KEYS["sub_net_4"] == "sub_nets[3]"
    report = {"sub_nets": [{"index": 1, "top1": 80.5}, {"index": 0, "top1": 79.0, "top5": 95.0}],
              "transfer": {"top1": 88.0}, "transfer_T": {"top1": 94.0, "top5": 99.5}, "random_T": None}
    assert paper.report_score(report, "sub_net_1") == (79.0, 95.0)
    assert paper.report_score(report, "sub_net_2") == (80.5, None)
    assert paper.report_score(report, "sub_net_3") is None
    assert paper.report_score(report, "transfer_T") == (94.0, 99.5)
    assert paper.report_score(report, "random_T") is None
    assert paper.report_score(report, "He et al. 2016") is None


def test_paper_md_sections():
    reduced = LEDGER.split("## Reduced-scale runs measured here", 1)[1].split("\n## ", 1)[0]
    assert "python benchmarks/time_to_accuracy.py --quick --paper-split" in reduced  # each figure's command
    assert "--digits" in reduced  # checked on real images, not only the synthetic task
    header = next(line for line in reduced.splitlines() if line.startswith("| data, epochs"))
    assert all(name in header for name in ("sub_net_1..4", "transfer", "transfer_T", "random_T"))
    assert "dd-report --paper RUN_DIR" in LEDGER
    assert "dd-train --nproc 4 --preset cifar10-resnet32 --data-dir DIR" in LEDGER
    for reading in (f"R{i}" for i in range(1, 9)):
        assert f"**{reading} —" in LEDGER, f"reading {reading} is used but not stated"


def test_paper_py_is_pure_data():
    """No torch, no project imports: it can be read anywhere, by tests, docs and dd-report alike."""
    tree = ast.parse((ROOT / "dd_mpi" / "paper.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= {"__future__", "dataclasses"}, imported
