"""The figures of dd-scaling: scaling.png (speedup, strong and weak efficiency vs P) and
model.png (the model's projected seconds per epoch and speedup)."""

from __future__ import annotations

from pathlib import Path

from ..reporting import pyplot


def _by_p(rows: list[dict], value: str) -> tuple[list[int], list[float]]:
    """Mean of a column per P (runs of the same P and another N, e.g. the baseline)."""
    per_p: dict[int, list[float]] = {}
    for r in rows:
        if r.get(value) is not None:
            per_p.setdefault(r["P"], []).append(r[value])
    ps = sorted(per_p)
    return ps, [sum(per_p[p]) / len(per_p[p]) for p in ps]


def plot_scaling(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    ns = sorted({r["N"] for r in rows})

    def select(strategy, phase, n=None):
        return [r for r in rows if r["strategy"] == strategy and r["phase"] == phase and (n is None or r["N"] == n)]

    ax = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(ns):
        total = select("dd", "total", n)
        for column, style, text in (("speedup", "o-", "total time"), ("tta_speedup", "s--", "time to target")):
            ps, ys = _by_p(total, column)
            if ps:
                ax.plot(ps, ys, style, color=colors[i % len(colors)], label=f"N={n}: {text}")
    ax.axhline(1.0, color="0.5", linewidth=0.8)
    ax.set_title("DD speedup over the baseline")
    ax.set_ylabel("baseline / DD")
    for ax, column, title in ((axes[1], "strong_efficiency", "strong scaling: t_ref·P_ref / (P·t_P)"),
                              (axes[2], "weak_efficiency", "weak scaling: per-rank images/s vs P_ref")):
        curves = [(f"DD phase 1, N={n}", select("dd", "subnet", n)) for n in ns]
        curves += [("DD fine-tune", select("dd", "finetune")), ("baseline", select("baseline", "baseline"))]
        if column == "strong_efficiency":
            curves += [(f"DD total, N={n}", select("dd", "total", n)) for n in ns]
        for label, subset in curves:
            ps, ys = _by_p(subset, column)
            if ps:
                ax.plot(ps, ys, "o-" if "total" not in label else "x:", label=label)
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("efficiency")
    _finish_p_axes(plt, fig, axes, sorted({r["P"] for r in rows}), "ranks P", path)


def plot_model(projections: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    for n in sorted({r["N"] for r in projections}):
        rows = [r for r in projections if r["N"] == n]
        ps = [r["P"] for r in rows]
        axes[0].plot(ps, [r["subnet_epoch_s"] for r in rows], "o-", label=f"DD phase 1 epoch, N={n}")
        axes[1].plot(ps, [r["speedup"] for r in rows], "o-", label=f"N={n}")
    rows = [r for r in projections if r["N"] == projections[0]["N"]]
    axes[0].plot([r["P"] for r in rows], [r["global_epoch_s"] for r in rows], "s--", color="k",
                 label="global net epoch (fine-tune, baseline)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds per epoch (model)")
    axes[0].set_title("projected seconds per epoch")
    axes[1].axhline(1.0, color="0.5", linewidth=0.8)
    axes[1].set_ylabel("baseline / DD time to accuracy")
    axes[1].set_title("projected DD speedup (time to accuracy)")
    _finish_p_axes(plt, fig, axes, sorted({r["P"] for r in projections}), "GPUs (ranks) P", path, fontsize=7)


def _finish_p_axes(plt, fig, axes, ps: list[int], xlabel: str, path: Path, **tick_style) -> None:
    """Every figure here plots against P: a log2 axis with one tick per P measured or projected
    (tick_style: e.g. a smaller font for the many P of a projection); then write and close it."""
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ps, [str(p) for p in ps], **tick_style)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
