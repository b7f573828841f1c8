"""The run's outputs: metrics.jsonl, report.json and report.md with the paper's table."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .comm import World
from .config import RunConfig


def write_metrics(out: Path, rows: list[dict]) -> None:
    """The whole file, rewritten atomically (a few hundred lines at most)."""
    atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


def build_report(cfg: RunConfig, world: World, results: dict) -> dict:
    timing = dict(results.get("timing", {}))
    timing["baseline_total"] = results["random_T"]["seconds"] if "random_T" in results else None
    for key in ("subnets", "compose", "finetune", "dd_total"):
        timing.setdefault(key, None)
    report = {
        "sub_nets": results.get("sub_nets", []),
        "transfer": results.get("transfer"),
        "transfer_T": results.get("transfer_T"),
        "random_T": results.get("random_T"),
        "timing": timing,
        "speedup": (timing["baseline_total"] / timing["dd_total"]
                    if timing["baseline_total"] and timing["dd_total"] else None),
        "world_size": world.size,
        "groups": results.get("groups", [list(range(world.size))]),
        "checksums": results.get("checksums"),
        "backend": world.backend_name,
        "device": str(world.comm.device),
        "launcher": world.launch.launcher,
        "config": cfg.to_dict(),
    }
    return report


def format_table(report: dict) -> str:
    """The paper's table: accuracy and time of every net the run trained."""
    has_top5 = any(r and "top5" in r for r in [*report["sub_nets"], report["transfer"],
                                                  report["transfer_T"], report["random_T"]])
    head = f"| net | top-1 (%) |{' top-5 (%) |' if has_top5 else ''} seconds |"
    lines = [head, "|---|---:|" + ("---:|" if has_top5 else "") + "---:|"]

    def row(name: str, r: dict | None) -> None:
        if r:
            top5 = f" {r['top5']:.2f} |" if has_top5 and "top5" in r else (" |" if has_top5 else "")
            lines.append(f"| {name} | {r['top1']:.2f} |{top5} {r['seconds']:.1f} |")

    for sub in report["sub_nets"]:
        row(f"sub_net_{sub['index']}", sub)
    row("transfer", report["transfer"])
    row("transfer_T", report["transfer_T"])
    row("random_T", report["random_T"])
    t = report["timing"]
    parts = [f"{k} {t[k]:.1f}s" for k in ("subnets", "compose", "finetune", "dd_total", "baseline_total")
             if t.get(k) is not None]
    lines.append("")
    lines.append("time: " + ", ".join(parts))
    if report.get("speedup"):
        lines.append(f"speedup (baseline / DD): {report['speedup']:.2f}x")
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    table = format_table(report)
    atomic_write_bytes(out / "report.md", f"# dd_mpi report: {out}\n\n{table}\n".encode())
    print(table, flush=True)
