"""The run's outputs, and the one place their keys and the paper's table are defined.

``metrics.jsonl``: one row per net per epoch (``metrics_row``). ``report.json``: the paper's
table as data (``build_report``): ``sub_nets``, ``intermediate`` (composition in stages),
``transfer`` (the composed global net), ``transfer_T`` (fine-tuned), ``random_T`` (the
baseline), ``timing`` and the run's layout. ``net_table`` renders the table for dd-train's
console and ``report.md``, and for ``dd-report`` (with losses, and the paper's numbers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .progress import say

NET_KEYS = ("transfer", "transfer_T", "random_T")  # the global nets' rows, in the paper's order
RESULT_KEYS = ("top1", "top5", "loss", "seconds")  # what a net's row keeps of an evaluation
# timing keys (seconds) with the names dd-report and dd-scaling give them
PHASE_TIMES = (("subnets", "phase1_subnets", "phase 1: sub-nets"),
               ("intermediate", "levels_between", "intermediate levels"),
               ("compose", "phase2_compose", "phase 2: compose"),
               ("finetune", "phase3_finetune", "phase 3: fine-tune"))
TOTAL_TIMES = (("dd_total", "dd_total", "DD total"), ("baseline_total", "baseline_total", "baseline (random_T) total"))


def public(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k in RESULT_KEYS}


def metrics_row(phase: str, net: int | None, epoch: int, stats, member: int, test: dict, eval_seconds: float,
                elapsed: float, lr: float) -> dict:
    """One net's epoch: ``group`` is the net's index at its level (None for a world-wide
    net), ``elapsed`` its phase's clock at the epoch's end, ``test_*`` None if not evaluated."""
    return {"phase": phase, "group": net, "epoch": epoch, "loss": stats.loss[member], "top1": stats.top1[member],
            "test_top1": test.get("top1"), "test_top5": test.get("top5"),
            "images_per_s": stats.images_per_s / stats.members, "seconds": stats.seconds + eval_seconds,
            "elapsed": elapsed, "lr": lr}


def strict_json(value, **dumps) -> str:
    """JSON that every reader parses (jq, JavaScript, pandas): a NaN or infinite number (a
    diverged net's loss) is written as null, not as Python's bare NaN."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v
    return json.dumps(finite(value), allow_nan=False, **dumps)


def write_metrics(out: Path, rows: list[dict]) -> None:
    """The whole file, rewritten atomically (a few hundred lines at most)."""
    atomic_write_bytes(out / "metrics.jsonl", "".join(strict_json(r) + "\n" for r in rows).encode())


def software_versions() -> dict:
    """What produced the numbers, as loaded by this run (MPI and Horovod only where used):
    dd-scaling refuses to set runs of another stack side by side."""
    import platform
    import sys

    import torch

    from . import __version__
    found = {"dd_mpi": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
             "python": platform.python_version()}
    if "mpi4py.MPI" in sys.modules:
        found["mpi"] = " ".join(sys.modules["mpi4py.MPI"].Get_library_version().splitlines()[0].split())
    if "horovod" in sys.modules:
        found["horovod"] = getattr(sys.modules["horovod"], "__version__", None)
    return found


def build_report(cfg, world, results: dict) -> dict:
    timing = dict(results.get("timing", {}))
    timing["baseline_total"] = results["random_T"]["seconds"] if "random_T" in results else None
    for key, _, _ in (*PHASE_TIMES, *TOTAL_TIMES):
        timing.setdefault(key, None)
    return {
        "sub_nets": results.get("sub_nets", []),
        "intermediate": results.get("intermediate", []),
        "transfer": results.get("transfer"),
        "transfer_T": results.get("transfer_T"),
        "random_T": results.get("random_T"),
        "timing": timing,
        "speedup": (timing["baseline_total"] / timing["dd_total"]
                    if timing["baseline_total"] and timing["dd_total"] else None),
        "world_size": world.size,
        "ranks": results.get("ranks"),
        "groups": results.get("groups", [list(range(world.size))]),
        "layout": results.get("layout", []),
        "baseline_batch_size": results.get("baseline_batch_size"),  # per rank
        "test_samples": results.get("test_samples"),  # what every top-1 is over: its resolution
        "checksums": results.get("checksums"),
        "backend": world.backend_name,
        "device": str(world.comm.device),
        "precision": results.get("precision"),
        "threads": results.get("threads"),  # torch threads per rank
        "workers": results.get("workers"),  # DataLoader workers per rank
        "launcher": world.launch.launcher,
        "software": software_versions(),
        "config": cfg.to_dict(),
    }


def net_rows(report: dict) -> list[tuple[str, dict]]:
    """Every net of the paper's table, in its order: the sub-nets, the intermediate nets
    (composed, then fine-tuned), the composed and fine-tuned global net, the baseline."""
    rows = [(f"sub_net_{s['index']}", s) for s in report.get("sub_nets") or []]
    for level in report.get("intermediate") or []:
        for net in level["nets"]:
            rows.append((f"level{level['level']}_net_{net['index']}", net["composed"]))
            rows.append((f"level{level['level']}_net_{net['index']}_T", net["finetuned"]))
    rows += [(name, report.get(name)) for name in NET_KEYS]
    return [(name, r) for name, r in rows if r]


def _cell(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def net_table(report: dict, *, loss: bool = False, paper: dict | None = None) -> list[str]:
    """The paper's table as Markdown lines: top-1 (and top-5 where any net has it), the
    loss if asked, seconds, and with ``paper`` (row name -> (top-1, top-5)) the paper's."""
    rows = net_rows(report)
    top5 = any("top5" in r for _, r in rows)
    head = "| net | top-1 (%) |" + (" top-5 (%) |" if top5 else "") + (" loss |" if loss else "") + " seconds |"
    rule = "|---|---:|" + ("---:|" if top5 else "") + ("---:|" if loss else "") + "---:|"
    if paper is not None:
        head, rule = head + " paper top-1 (%) |" + (" paper top-5 (%) |" if top5 else ""), rule + "---:|" * (1 + top5)
    lines = [head, rule]
    for name, r in rows:
        line = f"| {name} | {_cell(r.get('top1'), '.2f')} |"
        line += f" {_cell(r.get('top5'), '.2f')} |" if top5 else ""
        line += f" {_cell(r.get('loss'), '.4f')} |" if loss else ""
        line += f" {_cell(r.get('seconds'), '.1f')} |"
        if paper is not None:
            ours = paper.get(name)
            line += f" {_cell(ours and ours[0], '.2f')} |" + (f" {_cell(ours and ours[1], '.2f')} |" if top5 else "")
        lines.append(line)
    return lines


def format_table(report: dict) -> str:
    """dd-train's closing table: the nets, then the time per phase and the speedup."""
    t = report["timing"]
    parts = [f"{k} {t[k]:.1f}s" for k, _, _ in (*PHASE_TIMES, *TOTAL_TIMES)
             if t.get(k) is not None and not (k == "intermediate" and not report.get("intermediate"))]
    lines = [*net_table(report), "", "time: " + ", ".join(parts)]
    if report.get("speedup"):
        lines.append(f"speedup (baseline / DD): {report['speedup']:.2f}x")
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    atomic_write_bytes(out / "report.json", strict_json(report, indent=2).encode())
    table = format_table(report)
    atomic_write_bytes(out / "report.md", f"# dd_mpi report: {out}\n\n{table}\n".encode())
    say(table)
