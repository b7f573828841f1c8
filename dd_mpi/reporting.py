"""dd-report: the paper's table and plots for one or more finished runs.

    dd-report runs/20250101-120000                  # writes next to the run's report.json
    dd-report runs/study/P2-N2 runs/study/P4-N2 --out runs/study/report
    dd-report --paper runs/resnet32-1234             # the run's table beside the paper's numbers

For every RUN_DIR (a directory holding dd-train's report.json and metrics.jsonl) it writes
into --out (default: the run directory for one run, the runs' common parent for several):

  dd_report.md              the paper's table per run: top-1/top-5 of every sub_net_k, of the
                            composed net before (transfer) and after fine-tuning (transfer_T)
                            and of the baseline (random_T); seconds per phase, totals, speedup
  dd_report.csv             the same numbers, one row per net or phase
  accuracy_vs_time.png      test top-1 vs wall-clock, DD and baseline on one axis
  phase_times.png           seconds per phase as stacked bars, DD and baseline per run

The DD curve follows the method's timeline: phase 1 at the slowest group's
elapsed seconds (the groups run side by side; the phase ends when the last one does; the
curve shows the sub-nets' mean test top-1), then the composed net (`transfer`) once phase 2
has ended, then phase 3 offset by the seconds of phases 1 and 2. Times are dd-train's own
(training + evaluation per epoch), so they add up to report.json's `timing`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from . import paper
from .argtypes import OneLineParser, add_version
from .config import mistyped_keys
from .errors import UsageError
from .report import NET_KEYS, PHASE_TIMES, TOTAL_TIMES, net_rows, net_table

REPORT_FILES = ("dd_report.md", "dd_report.csv", "accuracy_vs_time.png", "phase_times.png")
PHASES = tuple((key, label) for key, _, label in PHASE_TIMES)  # the bars, in the order they run
CSV_FIELDS = ("run", "P", "N", "section", "name", "top1", "top5", "loss", "seconds", "ratio")


# ---------------------------------------------------------------------------------------
# Reading a run
class RunFiles:
    """One run directory: its report.json and metrics.jsonl, checked for what the readers
    use, so that a damaged or foreign file is one line naming it, not a traceback."""

    def __init__(self, path: Path):
        self.path = Path(path)
        report_file = self.path / "report.json"
        if not report_file.is_file():
            what = ("does not exist" if not self.path.exists() else
                    "is a file, not a run directory" if not self.path.is_dir() else
                    "has no report.json (a run writes it when it ends)")
            raise FileNotFoundError(f"{self.path} {what}: give a finished dd-train run's --out directory")
        self.report = _json(report_file, report_file.read_bytes())
        _check_report(report_file, self.report)
        metrics_file = self.path / "metrics.jsonl"
        self.metrics = []
        for i, line in enumerate(metrics_file.read_bytes().splitlines() if metrics_file.is_file() else [], 1):
            if line.strip():
                self.metrics.append(_json(f"{metrics_file} line {i}", line))
                _check_row(f"{metrics_file} line {i}", self.metrics[-1])

    @property
    def world_size(self) -> int:
        return int(self.report.get("world_size") or 1)

    @property
    def subnets(self) -> int:
        return int((self.report.get("config") or {}).get("subnets") or len(self.report.get("groups") or [1]))

    @property
    def baseline_only(self) -> bool:
        """A --strategy baseline run: no sub-nets (its N is only the flag's default)."""
        return (self.report.get("config") or {}).get("strategy") == "baseline"

    @property
    def label(self) -> str:
        return self.label_as(self.path.name)

    def label_as(self, name: str) -> str:
        return f"{name} (P={self.world_size}, {'conventional' if self.baseline_only else f'N={self.subnets}'})"


def short_names(runs: list[RunFiles]) -> list[str]:
    """Each run's directory, with as many of its parents as it takes to tell the runs apart
    (two studies' P2-N2 are study1/P2-N2 and study2/P2-N2 in a plot's legend, not twice P2-N2)."""
    paths = [run.path.resolve() for run in runs]
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _damaged(where, what: str) -> UsageError:
    return UsageError(f"{where}: {what}: not a finished dd-train run's file, or damaged (dd-train --resume "
                      "with the run's flags writes it again from its checkpoints; or leave the run out)")


def _json(where, data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _damaged(where, "not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise _damaged(where, f"not JSON ({error.msg} at line {error.lineno} column {error.colno})") from None


def _number(value, *, or_none: bool = True) -> bool:
    return (value is None and or_none) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_report(where, report) -> None:
    """The keys of report.json that dd-report and dd-scaling read, with their types."""
    if not isinstance(report, dict):
        raise _damaged(where, f"a JSON {type(report).__name__}, not an object")
    for key in ("timing", "config"):
        if not isinstance(report.get(key) or {}, dict):
            raise _damaged(where, f'"{key}" is not an object')
    if not all(_number(v) for v in (report.get("timing") or {}).values()):
        raise _damaged(where, '"timing" holds a value that is not a number of seconds')
    if not (_number(report.get("speedup")) and _number(report.get("world_size"))
            and _number((report.get("config") or {}).get("subnets"))):
        raise _damaged(where, '"speedup", "world_size" or the config\'s "subnets" is not a number')
    mistyped = mistyped_keys(report.get("config") or {})  # ("arch": 5 was a TypeError in dd-scaling --model)
    if mistyped:
        raise _damaged(where, f"the config's {', '.join(map(repr, mistyped))} {'is' if len(mistyped) == 1 else 'are'} "
                              "not of the flag's type")
    if not isinstance(report.get("groups") or [], list):
        raise _damaged(where, '"groups" is not a list')
    subnets = report.get("sub_nets") or []
    levels = report.get("intermediate") or []
    if not (isinstance(subnets, list) and isinstance(levels, list)
            and all(isinstance(level, dict) and isinstance(level.get("nets"), list) for level in levels)):
        raise _damaged(where, '"sub_nets" or "intermediate" is not a list of nets')
    nets = [*subnets, *(net for level in levels for net in level["nets"])]
    if not all(isinstance(net, dict) and isinstance(net.get("index"), int) for net in nets):
        raise _damaged(where, "a net of \"sub_nets\" or \"intermediate\" has no index")
    for name, row in [*((f"sub-net {r['index']}", r) for r in subnets),
                      *((f"level {level.get('level')} net {r['index']} {part}", r.get(part))
                        for level in levels for r in level["nets"] for part in ("composed", "finetuned")),
                      *((key, report.get(key)) for key in NET_KEYS)]:
        if row is not None and not (isinstance(row, dict) and all(_number(row.get(k)) for k in
                                                                  ("top1", "top5", "loss", "seconds"))):
            raise _damaged(where, f"{name}: its result is not an object of numbers")


def _check_row(where, row) -> None:
    """A metrics.jsonl row as the curves and dd-scaling read it."""
    if not isinstance(row, dict):
        raise _damaged(where, f"a JSON {type(row).__name__}, not an object")
    if not (isinstance(row.get("phase"), str) and isinstance(row.get("epoch"), int)
            and all(_number(row.get(k), or_none=False) for k in ("elapsed", "images_per_s", "seconds"))
            and _number(row.get("test_top1"))):
        raise _damaged(where, "phase, epoch, elapsed, images_per_s, seconds or test_top1 missing or not numbers")


def load_runs(paths: list[Path]) -> list[RunFiles]:
    """One RunFiles a run: a directory named twice (a shell glob and a path) is reported once."""
    given: dict[Path, Path] = {}
    for path in paths:
        given.setdefault(Path(path).resolve(), Path(path))  # (named as the user named it first)
    return [RunFiles(p) for p in given.values()]


# ---------------------------------------------------------------------------------------
# Curves: test accuracy vs wall-clock (pure functions of report.json and metrics.jsonl)
def subnet_rows_by_epoch(metrics: list[dict], phase: str = "subnet") -> dict[int, list[dict]]:
    """Phase 1's metrics rows (or an intermediate level's), every group's, gathered per epoch
    (the groups run side by side)."""
    by_epoch: dict[int, list[dict]] = {}
    for row in metrics:
        if row.get("phase") == phase:
            by_epoch.setdefault(row["epoch"], []).append(row)
    return by_epoch


def phase1_curve(metrics: list[dict], phase: str = "subnet", offset: float = 0.0) -> list[tuple[float, float]]:
    """Per epoch of phase 1 (or a level): (slowest group's elapsed seconds, mean test top-1 of its nets)."""
    by_epoch = subnet_rows_by_epoch(metrics, phase)
    points = []
    for epoch in sorted(by_epoch):
        rows = by_epoch[epoch]
        tops = [r["test_top1"] for r in rows if r.get("test_top1") is not None]
        if tops:
            points.append((offset + max(r["elapsed"] for r in rows), sum(tops) / len(tops)))
    return points


def level_curves(report: dict, metrics: list[dict]) -> list[list[tuple[float, float]]]:
    """The intermediate levels' curves (--levels), each after phase 1 and the levels before it.
    The compositions' time (timing.compose, all of them together, a small share) is spread
    evenly over them: per level it is not recorded."""
    timing = report.get("timing") or {}
    levels = [entry.get("level") for entry in report.get("intermediate") or [] if isinstance(entry, dict)]
    share = (timing.get("compose") or 0.0) / (len(levels) + 1)
    curves, start = [], (timing.get("subnets") or 0.0)
    for level in levels:
        start += share
        curve = phase1_curve(metrics, f"level{level}", offset=start)
        curves.append(curve)
        start = max([start, *(x for x, _ in curve)], default=start)
    return curves


def phase_curve(metrics: list[dict], phase: str, offset: float = 0.0) -> list[tuple[float, float]]:
    """(offset + elapsed, test top-1) per epoch of a world-wide phase (finetune, baseline)."""
    return [(offset + r["elapsed"], r["test_top1"]) for r in metrics
            if r.get("phase") == phase and r.get("test_top1") is not None]


def dd_timeline(report: dict, metrics: list[dict]) -> dict:
    """The DD curve in three parts, on one clock that starts with phase 1."""
    timing = report.get("timing") or {}
    if report.get("transfer") is None:
        return {"phase1": [], "levels": [], "transfer": None, "finetune": []}
    # the global net exists once phase 1, every composition and the levels between are done
    composed_at = sum(timing.get(key) or 0.0 for key in ("subnets", "compose", "intermediate"))
    # phase 3's clock starts with the composed net's evaluation (its elapsed includes it)
    scored_at = composed_at + (timing.get("transfer_eval") or 0.0)
    return {"phase1": phase1_curve(metrics), "levels": level_curves(report, metrics),
            "transfer": (scored_at, report["transfer"]["top1"]),
            "finetune": phase_curve(metrics, "finetune", offset=composed_at)}


def baseline_curve(metrics: list[dict]) -> list[tuple[float, float]]:
    return phase_curve(metrics, "baseline")


# ---------------------------------------------------------------------------------------
# The paper's table
def table_rows(run: RunFiles) -> list[dict]:
    """Rows of dd_report.csv for one run: every net, then every phase's seconds and the speedup."""
    report = run.report
    base = {"run": str(run.path), "P": run.world_size, "N": None if run.baseline_only else run.subnets}
    rows = [{**base, "section": "net", "name": name, "top1": r.get("top1"), "top5": r.get("top5"),
             "loss": r.get("loss"), "seconds": r.get("seconds"), "ratio": None} for name, r in net_rows(report)]
    timing = report.get("timing") or {}
    for key, name, _ in (*PHASE_TIMES, *TOTAL_TIMES):
        if timing.get(key) is not None and not (key == "intermediate" and not report.get("intermediate")):
            rows.append({**base, "section": "time", "name": name, "top1": None, "top5": None,
                         "loss": None, "seconds": timing[key], "ratio": None})
    if report.get("speedup"):
        rows.append({**base, "section": "time", "name": "speedup", "top1": None, "top5": None,
                     "loss": None, "seconds": None, "ratio": report["speedup"]})
    return rows


def paper_numbers(run: RunFiles) -> tuple[paper.PaperResult | None, dict | None]:
    """The paper's experiment for the run's preset, and its rows under the run's names."""
    result = paper.for_preset((run.report.get("config") or {}).get("preset") or "")
    return result, (paper.by_report_name(result) if result else None)


def paper_differences(result: paper.PaperResult, config: dict) -> list[str]:
    """'--flag run (paper paper)' where a run made from a paper preset left the paper's
    experiment: another dataset, net, N, data split, recipe or epochs than its preset's, or a
    capped set (the paper trains and tests on all of it). Its numbers are then beside another
    experiment's. (The strategy is no difference: DD's rows are the same experiment's.)"""
    from .presets import PRESETS
    paper_keys = {"dataset": result.dataset, "arch": result.arch, "subnets": result.subnets}
    strategies = {"both": ("dd", "baseline")}.get(config.get("strategy"), (config.get("strategy"),))
    unused = (() if "baseline" in strategies else ("baseline_",)) + (() if "dd" in strategies else (
        "subnet_", "finetune_", "level_"))  # (a phase the run did not train differs in nothing)
    preset = {key: value for key, value in PRESETS.get(config.get("preset") or "", {}).items()
              if not key.startswith(("_", "strategy", *unused)) and key not in paper_keys}
    differences = []
    for key, value in {**paper_keys, **preset, "train_samples": None, "test_samples": None}.items():
        if key not in config or config[key] == value:
            continue
        source = "paper" if key in paper_keys or value is None else "preset"  # (the paper gives no recipe)
        given = f"--{key.replace('_', '-')} {config[key]}"
        if key == "global_batch_size" and config[key] is None:  # a batch per rank given instead
            given = f"--batch-size {config.get('batch_size')} a rank"
            value = f"--global-batch-size {value}"
        differences.append(f"{given} ({source} {'all' if value is None else value})")
    return differences


def run_stack(report: dict) -> dict:
    """What a run ran on, from its report: ``software`` (versions) and ``processors`` (its
    ranks' chips, joined). A report of an older dd_mpi has neither: {}."""
    software = report.get("software")
    chips = sorted({place.get("processor") for place in report.get("ranks") or []
                    if isinstance(place, dict) and place.get("processor")})
    return {**(software if isinstance(software, dict) else {}),
            **({"processors": " + ".join(chips)} if chips else {})}


def software_line(report: dict) -> list[str]:
    """dd-report's line on what a run ran on (none for a report without it)."""
    stack = run_stack(report)
    parts = [f"{name} {stack[name]}" for name in ("dd_mpi", "torch", "mpi", "horovod") if stack.get(name)]
    parts += [f"on {stack['processors']}"] if "processors" in stack else []
    return [", ".join(parts)] if parts else []


def markdown_block(run: RunFiles, *, with_paper: bool = False) -> str:
    report = run.report
    lines = [f"## {run.path}", "",
             f"P = {run.world_size} ranks, "
             + ("conventional training (no sub-networks), " if run.baseline_only else
                f"N = {run.subnets} sub-networks, groups {report.get('groups')}, ")
             + f"backend {report.get('backend')}, device {report.get('device')}, "
             f"launcher {report.get('launcher')}", *software_line(report), ""]
    result, numbers = paper_numbers(run) if with_paper else (None, None)
    if with_paper and result is None:
        preset = (report.get("config") or {}).get("preset")
        lines += [f"(no paper numbers: the run's preset is {preset!r}, not one of the paper's: "
                  f"{', '.join(paper.RESULTS)})", ""]
    changed = paper_differences(result, report.get("config") or {}) if result else []
    if changed:
        lines += [f"(the paper's numbers are those of its {result.dataset} {result.arch} into {result.subnets} "
                  f"experiment; this run differs: {', '.join(changed)})", ""]
    lines += net_table(report, loss=True, paper=numbers)
    timing = report.get("timing") or {}
    lines += ["", "| phase | seconds |" + (" paper hours |" if result and result.hours_dd else ""),
              "|---|---:|" + ("---:|" if result and result.hours_dd else "")]
    hours = {"dd_total": result.hours_dd, "baseline_total": result.hours_conventional} if result else {}
    for key, _, name in (*PHASE_TIMES, *TOTAL_TIMES):
        if timing.get(key) is not None and not (key == "intermediate" and not report.get("intermediate")):
            extra = (f" {hours[key]:.2f} |" if hours.get(key) else " |") if result and result.hours_dd else ""
            lines.append(f"| {name} | {timing[key]:.1f} |{extra}")
    if report.get("speedup"):
        lines.append(f"| speedup (baseline / DD) | {report['speedup']:.2f}x |"
                     + (f" {result.time_ratio:.2f}x |" if result and result.time_ratio else ""))
    for note in result.notes if result else ():
        lines += ["", f"Note on the paper's numbers: {note}."]
    return "\n".join(lines)


def markdown(runs: list[RunFiles], *, with_paper: bool = False) -> str:
    head = ("# dd_mpi report\n\nPhase 1's time is the slowest group's; `transfer` is the composed "
            "net before fine-tuning, `transfer_T` after, `random_T` the baseline.\n")
    return head + "\n" + "\n\n".join(markdown_block(r, with_paper=with_paper) for r in runs) + "\n"


def csv_text(runs: list[RunFiles]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        for row in table_rows(run):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed on a cluster node)
NO_MATPLOTLIB = "the plots need matplotlib: pip install 'dd_mpi[plot]'"


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot():
    if not plots_available():
        raise UsageError(NO_MATPLOTLIB)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy_vs_time(runs: list[RunFiles], path: Path) -> None:
    """One colour per run; line style per strategy (dotted: DD phase 1, dash-dot: intermediate
    levels, solid: the composed net and its fine-tune, star: the composed net, dashed: the baseline)."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    single = len(runs) == 1
    fig, ax = plt.subplots(figsize=(7, 4.2) if single else (9.5, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = set()  # what the legend explains: only what some run drew (a dd-only run has no baseline)
    for i, run in enumerate(runs):
        dd_color = colors[i % len(colors)]
        base_color = colors[1] if single else dd_color
        dd = dd_timeline(run.report, run.metrics)
        if dd["phase1"]:
            ax.plot(*zip(*dd["phase1"]), "o:", color=dd_color, alpha=0.7)
            drawn.add("phase1")
        for curve in dd.get("levels") or []:
            if curve:
                ax.plot(*zip(*curve), "^-.", color=dd_color, alpha=0.7)
                drawn.add("levels")
        if dd["transfer"] is not None:
            drawn.add("composed")
            tx, ty = dd["transfer"]
            ax.plot(*zip(dd["transfer"], *dd["finetune"]), "o-", color=dd_color)
            ax.plot([tx], [ty], "*", color=dd_color, markersize=13)
            if single:  # the phase boundaries, labelled
                for x, text in (((run.report.get("timing") or {}).get("subnets"), "end of phase 1"),
                                (tx, "composed")):
                    if x is not None:
                        ax.axvline(x, color="0.5", linestyle=":", linewidth=0.8)
                        ax.annotate(text, (x, 0.98), xycoords=("data", "axes fraction"), rotation=90,  # (the legend
                                    fontsize=7, ha="right", va="top", color="0.3")  # sits below: it hid them)
        base = baseline_curve(run.metrics)
        if base:
            ax.plot(*zip(*base), "s--", color=base_color, alpha=0.9)
            drawn.add("baseline")
    dd_key = colors[0]
    keys = {"phase1": Line2D([], [], color=dd_key, marker="o", linestyle=":",
                             label="DD phase 1: sub-nets (mean top-1, slowest group's time)"),
            "levels": Line2D([], [], color=dd_key, marker="^", linestyle="-.",
                             label="DD intermediate levels (--levels: mean top-1 of each level's nets)"),
            "composed": Line2D([], [], color=dd_key, marker="*", markersize=11, linestyle="-",
                               label="DD phases 2-3: composed (transfer), fine-tuned"),
            "baseline": Line2D([], [], color=colors[1] if single else dd_key, marker="s", linestyle="--",
                               label="baseline (random_T)")}
    handles = [handle for key, handle in keys.items() if key in drawn]
    if not single:
        handles += [Line2D([], [], color=colors[i % len(colors)], linewidth=4, label=run.label_as(name))
                    for i, (run, name) in enumerate(zip(runs, short_names(runs)))]
    ax.set_xlim(left=0)
    ax.set_xlabel("wall-clock seconds (training + evaluation)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("test accuracy vs time: domain decomposition vs baseline")
    ax.grid(alpha=0.3)
    if single:
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    else:
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_phase_times(runs: list[RunFiles], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(min(12.0, max(4.5, 1.3 * 2 * len(runs) + 1.5)), 4.2))
    labels, x = [], 0
    colors = {"subnets": "#4c72b0", "intermediate": "#8172b3", "compose": "#dd8452", "finetune": "#55a868",
              "baseline": "#8c8c8c"}
    used = set()
    for run, name in zip(runs, short_names(runs) if len(runs) > 1 else [""] * len(runs)):
        timing = run.report.get("timing") or {}
        if timing.get("dd_total") is not None:
            bottom = 0.0
            for key, text in PHASES:
                value = timing.get(key) or 0.0
                if not value and key == "intermediate":  # no --levels: no bar, no legend entry
                    continue
                ax.bar(x, value, bottom=bottom, color=colors[key], label=None if key in used else text)
                used.add(key)
                bottom += value
            labels.append((x, f"DD\n{name}".strip()))
            x += 1
        if timing.get("baseline_total") is not None:
            ax.bar(x, timing["baseline_total"], color=colors["baseline"],
                   label=None if "baseline" in used else "baseline (random_T)")
            used.add("baseline")
            labels.append((x, f"baseline\n{name}".strip()))
            x += 1
        x += 0.5
    ax.set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=7 if len(runs) < 5 else 5.5)
    ax.set_ylabel("seconds")
    ax.set_title("time per phase")
    ax.grid(axis="y", alpha=0.3)
    if used:  # (no timings at all: no bars, and matplotlib would warn of an empty legend)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
def default_out(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0]
    common = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    if common == Path(common.anchor):  # (runs on two file systems: the report would go to / itself)
        raise UsageError(f"the runs share no directory but {common}: give --out, where to write the report")
    return common


def write_all(runs: list[RunFiles], out: Path, *, with_paper: bool = False) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in REPORT_FILES}
    files["dd_report.md"].write_text(markdown(runs, with_paper=with_paper))
    files["dd_report.csv"].write_text(csv_text(runs))
    if not plots_available():  # an optional extra: the tables are written all the same
        print(f"dd-report: plots skipped: {NO_MATPLOTLIB}", file=sys.stderr)
        return {name: path for name, path in files.items() if not name.endswith(".png")}
    plot_accuracy_vs_time(runs, files["accuracy_vs_time.png"])
    plot_phase_times(runs, files["phase_times.png"])
    return files


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="dd-report", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(parser)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="dd-train --out directories")
    parser.add_argument("--out", type=Path, help="where to write (default: the run directory, or the "
                                                  "runs' common parent)")
    parser.add_argument("--paper", action="store_true", help="beside each run's numbers, the paper's for the "
                                                             "run's preset (PAPER.md)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        out = args.out or default_out(args.runs)
    except (FileNotFoundError, UsageError) as error:
        print(f"dd-report: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a run's file this user cannot read
        print(f"dd-report: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        files = write_all(runs, out, with_paper=args.paper)
    except OSError as error:
        print(f"dd-report: error: --out {out}: {error.strerror or error}"
              + (f" ({error.filename})" if error.filename and str(error.filename) != str(out) else "")
              + ": choose a directory you can write", file=sys.stderr)
        return 2
    print(markdown(runs, with_paper=args.paper))
    for path in files.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
