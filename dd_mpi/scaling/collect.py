"""Finished runs -> the rows of scaling.csv: one per run, strategy and phase, with images/s,
seconds, final accuracy, time to a target accuracy, speedup and strong/weak efficiency against
the smallest P measured (the columns are described in cli.py)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..config import RunConfig
from ..reporting import RunFiles, baseline_curve, dd_timeline, run_stack, subnet_rows_by_epoch
from .errors import ScalingError

SCALING_FIELDS = ("run", "P", "N", "strategy", "phase", "epochs", "images_per_s", "images_per_s_per_rank",
                  "seconds_per_epoch", "seconds", "final_top1", "final_top5", "target_top1",
                  "time_to_target", "tta_speedup", "speedup", "P_ref", "strong_efficiency",
                  "weak_efficiency")


def find_runs(dirs: list[Path]) -> list[RunFiles]:
    """Every finished run (a report.json) at or under each directory, by (P, N, path)."""
    paths: list[Path] = []
    for d in dirs:
        if (d / "report.json").is_file():
            paths.append(d)
        elif d.is_dir():
            paths += sorted(f.parent for f in d.rglob("report.json"))
        else:
            raise ScalingError(f"{d}: not a directory (give run or study directories)" if d.exists()
                               else f"{d}: no such directory")
    if not paths:
        raise ScalingError(f"no report.json under {', '.join(map(str, dirs))}: no finished runs")
    runs = [RunFiles(p) for p in dict.fromkeys(p.resolve() for p in paths)]  # a run named twice counts once
    return sorted(runs, key=lambda r: (r.world_size, r.subnets, str(r.path)))


# What may differ between the runs of one study: P and N (its axes), the seed (runs that
# share P and N are averaged), the strategy (its rows are kept apart). Anything else that
# shapes the run, or its speed, makes another workload, whose times are no reference.
STUDY_AXES = ("subnets", "seed", "strategy")
WORKLOAD = tuple(k for k in RunConfig.SHAPING if k not in STUDY_AXES) + (
    "levels", "device", "precision", "compile", "compile_mode", "backend",  # what runs it, and how fast
    "threads", "workers", "eval_every", "subnet_eval_every", "deterministic")


def workload_differences(first: dict, config: dict, keys: tuple[str, ...] = WORKLOAD) -> list[str]:
    """'--flag first vs other' for each workload setting (of ``keys``) two runs' configs differ
    in (a setting a config predates counts as its default)."""
    defaults = RunConfig().to_dict()
    return [f"--{k.replace('_', '-')} {first.get(k, defaults[k])!r} vs {config.get(k, defaults[k])!r}"
            for k in keys if first.get(k, defaults[k]) != config.get(k, defaults[k])]


def refuse_mixed_workloads(runs: list[RunFiles]) -> None:
    """Efficiencies compare each run with the smallest P's: one study's runs must differ only
    in P, N and the seed. Runs of another workload (a sweep rerun with other flags, a second
    study collected with the first, or one run on other chips or another torch) would pass
    its times off as this one's."""
    def stack(run: RunFiles) -> dict:  # (the interpreter's patch level moves no time that torch spends)
        return {k: v for k, v in run_stack(run.report).items() if k != "python"}

    first, first_stack = runs[0].report.get("config") or {}, stack(runs[0])
    for run in runs[1:]:
        differ = workload_differences(first, run.report.get("config") or {})
        differ += [f"{k} {first_stack[k]!r} vs {v!r}" for k, v in stack(run).items()
                   if k in first_stack and v != first_stack[k]]
        if differ:
            raise ScalingError(f"{runs[0].path} and {run.path} are runs of different workloads "
                               f"({'; '.join(differ)}): collect each study on its own")


def mean_or_none(values: list[float]) -> float | None:
    """The mean of the values that are known (not None); None when none is."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def steady(epochs: list) -> list:
    """The epochs that time a phase: all but the first when there are more. The first carries
    the process's warm-up (kernels chosen, memory first touched, a compile): on CPU it took
    several times a later epoch of a small net, which no more ranks would scale away."""
    return epochs[1:] if len(epochs) > 1 else epochs


def rate_of(epochs: list[dict]) -> float | None:
    """Images/s over the epochs: their harmonic mean, which is all the images over all the
    training time when every epoch trains the same images (the mean of the rates is not)."""
    rates = [e["images_per_s"] for e in epochs if e.get("images_per_s")]
    return len(rates) / sum(1.0 / r for r in rates) if rates else None


def phase1_epochs(metrics: list[dict]) -> list[dict]:
    """Phase 1 per epoch over all groups: images/s summed (all ranks), seconds of the slowest."""
    return [{"epoch": e, "images_per_s": sum(r["images_per_s"] for r in rows),
             "seconds": max(r["seconds"] for r in rows)} for e, rows in sorted(subnet_rows_by_epoch(metrics).items())]


def time_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first wall-clock time at which test top-1 >= target (None: never)."""
    for x, y in curve:
        if y is not None and y >= target - 1e-9:
            return x
    return None


def default_target(report: dict) -> float | None:
    finals = [(report.get(k) or {}).get("top1") for k in ("transfer_T", "random_T")]
    finals = [top1 for top1 in finals if top1 is not None]
    return min(finals) if finals else None


def speedup(t_baseline: float | None, t_dd: float | None) -> float | None:
    return t_baseline / t_dd if t_baseline and t_dd else None


def run_rows(run: RunFiles, target: float | None = None) -> list[dict]:
    """The rows of scaling.csv for one run (efficiencies are filled in over all runs)."""
    report, metrics = run.report, run.metrics
    timing = report.get("timing") or {}
    P = run.world_size
    base = {"run": str(run.path), "P": P, "N": run.subnets}
    target = target if target is not None else default_target(report)
    rows = []

    def add(strategy: str, phase: str, seconds, result: dict | None, epochs: list[dict] | None = None, **extra):
        timed = steady(epochs or [])
        ips = rate_of(timed)
        rows.append({**base, "strategy": strategy, "phase": phase, "epochs": len(epochs) if epochs else None,
                     "images_per_s": ips, "images_per_s_per_rank": ips / P if ips else None,
                     "seconds_per_epoch": mean_or_none([e["seconds"] for e in timed]) if timed else None,
                     "seconds": seconds, "final_top1": (result or {}).get("top1"),
                     "final_top5": (result or {}).get("top5"), **extra})

    tta = {}
    if report.get("transfer") is not None:
        timeline = dd_timeline(report, metrics)
        dd_curve = [timeline["transfer"], *timeline["finetune"]]
        tta["dd"] = time_to_target(dd_curve, target) if target is not None else None
        subs = report.get("sub_nets") or []
        sub_mean = {"top1": mean_or_none([s.get("top1") for s in subs]), "top5": mean_or_none([s.get("top5") for s in subs])}
        add("dd", "subnet", timing.get("subnets"), sub_mean, phase1_epochs(metrics))
        levels = report.get("intermediate") or []
        if levels:  # --levels: the nets between, composed and trained in stages (the compose row's
            # time holds every composition; their epochs are per level, so none is per epoch here)
            last = [(net.get("finetuned") or {}).get("top1") for net in levels[-1].get("nets") or []]
            add("dd", "intermediate", timing.get("intermediate"), {"top1": mean_or_none(last)})
        add("dd", "compose", timing.get("compose"), report["transfer"])
        add("dd", "finetune", timing.get("finetune"), report.get("transfer_T"),
            [r for r in metrics if r.get("phase") == "finetune"])
    if report.get("random_T") is not None:
        tta["baseline"] = time_to_target(baseline_curve(metrics), target) if target is not None else None
        add("baseline", "baseline", timing.get("baseline_total"), report["random_T"],
            [r for r in metrics if r.get("phase") == "baseline"])
    if "dd" in tta:
        add("dd", "total", timing.get("dd_total"), report.get("transfer_T"), target_top1=target,
            time_to_target=tta["dd"], tta_speedup=speedup(tta.get("baseline"), tta["dd"]),
            speedup=report.get("speedup"))
    if "baseline" in tta:
        add("baseline", "total", timing.get("baseline_total"), report["random_T"], target_top1=target,
            time_to_target=tta["baseline"])
    return rows


def strong_efficiency(t_ref: float, p_ref: int, t: float, p: int) -> float:
    """Fixed global problem: t_ref·P_ref / (P·t_P); 1 = perfect, t1/(P·tP) when P_ref = 1."""
    return t_ref * p_ref / (p * t)


def weak_efficiency(ips_ref: float, p_ref: int, ips: float, p: int) -> float:
    """Per-rank throughput kept: (ips_P / P) / (ips_ref / P_ref); ips_P / (P·ips_1) when P_ref = 1."""
    return (ips / p) / (ips_ref / p_ref)


def _reference_key(row: dict) -> tuple:
    depends_on_n = row["strategy"] == "dd" and row["phase"] in ("subnet", "intermediate", "compose", "total")
    return (row["strategy"], row["phase"], row["N"] if depends_on_n else None)


def _epoch_or_total(row: dict) -> float | None:
    return row["seconds_per_epoch"] if row["seconds_per_epoch"] is not None else row["seconds"]


def add_efficiencies(rows: list[dict]) -> list[dict]:
    """Fill P_ref, strong_efficiency and weak_efficiency of every row against its reference:
    the rows of the smallest P of the same key (their mean when several runs share it)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_reference_key(row), []).append(row)
    for members in groups.values():
        p_ref = min(r["P"] for r in members)
        refs = [r for r in members if r["P"] == p_ref]
        t_ref = mean_or_none([_epoch_or_total(r) for r in refs])
        ips_ref = mean_or_none([r["images_per_s"] for r in refs])
        for r in members:
            r["P_ref"] = p_ref
            if r["phase"] == "compose":  # a fixed cost, not a parallel workload: no efficiency
                r["strong_efficiency"] = r["weak_efficiency"] = None
                continue
            t = _epoch_or_total(r)
            r["strong_efficiency"] = strong_efficiency(t_ref, p_ref, t, r["P"]) if t and t_ref else None
            r["weak_efficiency"] = (weak_efficiency(ips_ref, p_ref, r["images_per_s"], r["P"])
                                    if r["images_per_s"] and ips_ref else None)
    return rows


def collect(runs: list[RunFiles], target: float | None = None) -> list[dict]:
    refuse_mixed_workloads(runs)
    rows = [row for run in runs for row in run_rows(run, target)]
    return add_efficiencies(rows)


def rows_csv(rows: list[dict], fields=SCALING_FIELDS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buffer.getvalue()


def _cell(value, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)


def collect_table(rows: list[dict]) -> str:
    lines = [f"{'P':>5} {'N':>3} {'strategy':<9} {'phase':<9} {'img/s':>9} {'s/epoch':>8} {'seconds':>8} "
             f"{'top-1':>6} {'t->target':>9} {'strong':>6} {'weak':>6} {'speedup':>7} {'tta-spd':>7}"]
    for r in rows:
        lines.append(f"{r['P']:>5} {r['N']:>3} {r['strategy']:<9} {r['phase']:<9} "
                     f"{_cell(r['images_per_s'], '9.1f')} "
                     f"{_cell(r['seconds_per_epoch'], '8.2f')} {_cell(r['seconds'], '8.2f')} "
                     f"{_cell(r['final_top1'], '6.2f')} {_cell(r.get('time_to_target'), '9.2f')} "
                     f"{_cell(r['strong_efficiency'], '6.2f')} {_cell(r['weak_efficiency'], '6.2f')} "
                     f"{_cell(r.get('speedup'), '7.2f')} {_cell(r.get('tta_speedup'), '7.2f')}")
    return "\n".join(lines)
