"""The paper's published numbers, as data: the one source of truth for PAPER.md and `dd-report --paper`.

Source: Gu, Zhang, Liu, Cai, "Decomposition and composition of deep convolutional neural
networks and training acceleration via sub-network transfer learning", ETNA 56 (2022)
157-186: its result tables for CIFAR-10, CIFAR-100 and Food-101 (top-1 %, and top-5 % for
Food-101) and its training-time rows (hours, CIFAR-10 only). The CIFAR-10 reference row
"He et al. 2016" is He, Zhang, Ren, Sun, "Deep residual learning for image recognition"
(CVPR 2016), as the paper quotes it. Nothing here is measured by this project; what the
project measured goes into PAPER.md's ledger beside these numbers.

One entry per dd-train preset that reproduces a paper experiment. Row names are the paper's;
`REPORT_KEYS` maps each to where a run's report.json holds the same quantity.
Pure data, no torch: `python -c "from dd_mpi import paper; print(paper.for_preset('cifar10-resnet32'))"`.
"""

from __future__ import annotations

from dataclasses import dataclass

Score = tuple[float, float | None]  # (top-1 %, top-5 % or None where the paper gives none)

# Paper row -> where report.json holds it. "sub_net_k" is 1-based in the paper, 0-based in
# report.json's list "sub_nets". The reference row is not produced by any run.
REPORT_KEYS: dict[str, str] = {
    "sub_net_1": "sub_nets[0]", "sub_net_2": "sub_nets[1]", "sub_net_3": "sub_nets[2]", "sub_net_4": "sub_nets[3]",
    "transfer": "transfer", "transfer_T": "transfer_T", "random_T": "random_T",
}
REFERENCE_ROWS: frozenset[str] = frozenset({"He et al. 2016"})


@dataclass(frozen=True)
class PaperResult:
    """One experiment of the paper: one column of its table, reproduced by one preset."""

    preset: str  # the dd-train preset (and Slurm job) that reproduces it
    dataset: str  # cifar10 | cifar100 | food101 (dd-train --dataset)
    arch: str  # the global net (dd-train --arch)
    subnets: int  # N, the number of sub-networks
    rows: dict[str, Score]  # paper row name -> (top-1 %, top-5 % or None), in the paper's order
    hours_dd: float | None  # the paper's wall-clock hours, DD (None: not given)
    hours_conventional: float | None  # the same for conventional training (random_T)
    reading: str  # the assumption the reproduction rests on
    notes: tuple[str, ...] = ()  # caveats about the printed numbers (misprints)

    @property
    def time_ratio(self) -> float | None:
        """Conventional hours / DD hours: the paper's speed-up, the figure to compare across hardware."""
        if self.hours_dd is None or self.hours_conventional is None:
            return None
        return self.hours_conventional / self.hours_dd


# --- the readings (PAPER.md states them at length) -------------------------------------
_CIFAR_READING = (
    "standard-width ResNet{depth} (16-32-64 channels, 1x1-projection shortcuts, option B) split into 4 "
    "sub-nets of 4-8-16 channels, each trained on its own quarter of the training set (--subnet-data shard); "
    "conventional baseline = He et al. 2016's CIFAR recipe; DD's phase epochs are the project's choice")
_FOOD_READING = (
    "standard-width bottleneck ResNet{depth} split into {n} sub-nets of 1/{n} of the width, each trained on "
    "its own part of the data; the paper gives no recipe: the preset's (dd-train --help) is the project's choice")
_FOOD101_MISPRINT = (
    "ResNet101 random_T: top-5 is printed as 53.04, below its own top-1 72.37, which is impossible "
    "(top-5 >= top-1): a misprint, kept as printed")


def _cifar(dataset: str, depth: int, subs: tuple[float, float, float, float], transfer: float,
           transfer_t: float, random_t: float, he2016: float | None = None,
           hours: tuple[float, float] | None = None) -> PaperResult:
    rows: dict[str, Score] = {f"sub_net_{k + 1}": (top1, None) for k, top1 in enumerate(subs)}
    rows.update(transfer=(transfer, None), transfer_T=(transfer_t, None), random_T=(random_t, None))
    if he2016 is not None:
        rows["He et al. 2016"] = (he2016, None)
    return PaperResult(
        preset=f"{dataset}-resnet{depth}", dataset=dataset, arch=f"resnet{depth}", subnets=4, rows=rows,
        hours_dd=hours[0] if hours else None, hours_conventional=hours[1] if hours else None,
        reading=_CIFAR_READING.format(depth=depth))


def _food101(depth: int, n: int, transfer: Score, transfer_t: Score, random_t: Score,
             notes: tuple[str, ...] = ()) -> PaperResult:
    return PaperResult(
        preset=f"food101-resnet{depth}" + ("-n8" if n == 8 else ""), dataset="food101", arch=f"resnet{depth}",
        subnets=n, rows={"transfer": transfer, "transfer_T": transfer_t, "random_T": random_t},
        hours_dd=None, hours_conventional=None, reading=_FOOD_READING.format(depth=depth, n=n), notes=notes)


# The paper's Food-101 rows transfer_4 / transfer_4_T belong to the N=4 presets (as transfer /
# transfer_T), transfer_8 / transfer_8_T to the -n8 presets; its one random_T row to both.
_ALL = (
    #      dataset     depth  sub_net_1..4                       transfer transfer_T random_T He2016  hours (DD, conv.)
    _cifar("cifar10", 32, (81.25, 81.40, 79.99, 79.92), 88.63, 94.09, 92.82, 92.49, (5.65, 8.53)),
    _cifar("cifar10", 56, (81.18, 80.78, 80.26, 79.97), 89.03, 94.34, 93.09, 93.03, (9.61, 13.98)),
    _cifar("cifar10", 110, (81.15, 81.53, 80.10, 79.81), 88.86, 94.14, 92.80, 93.57, (18.78, 26.74)),
    _cifar("cifar100", 32, (52.30, 52.28, 52.88, 52.94), 60.85, 73.14, 68.91),
    _cifar("cifar100", 56, (53.57, 53.34, 53.04, 52.44), 61.54, 73.20, 72.84),
    _cifar("cifar100", 110, (51.60, 49.33, 51.80, 51.44), 59.14, 73.75, 73.48),
    _food101(50, 4, transfer=(45.25, 71.84), transfer_t=(71.69, 90.26), random_t=(70.49, 89.53)),
    _food101(50, 8, transfer=(12.00, 32.09), transfer_t=(72.92, 90.73), random_t=(70.49, 89.53)),
    _food101(101, 4, transfer=(59.95, 82.48), transfer_t=(73.70, 90.49), random_t=(72.37, 53.04),
             notes=(_FOOD101_MISPRINT,)),
    _food101(101, 8, transfer=(29.09, 55.14), transfer_t=(74.53, 91.30), random_t=(72.37, 53.04),
             notes=(_FOOD101_MISPRINT,)),
)
RESULTS: dict[str, PaperResult] = {r.preset: r for r in _ALL}


def for_preset(name: str) -> PaperResult | None:
    """The paper experiment a preset reproduces, or None for a preset (or run) the paper has no column for."""
    return RESULTS.get(name)


def report_score(report: dict, row: str) -> Score | None:
    """A run's (top-1, top-5 or None) for a paper row, from report.json's dict; None where the run lacks it."""
    key = REPORT_KEYS.get(row)
    if key is None:  # a reference row, or a name the paper does not use
        return None
    if key.startswith("sub_nets["):
        index = int(key[len("sub_nets["):-1])
        subs = report.get("sub_nets") or []
        entry = next((s for s in subs if s.get("index") == index), None)
    else:
        entry = report.get(key)
    if not entry or entry.get("top1") is None:
        return None
    return float(entry["top1"]), (float(entry["top5"]) if entry.get("top5") is not None else None)


def by_report_name(result: PaperResult) -> dict[str, Score]:
    """The paper's rows under the names a run's table uses (``report.net_rows``): its 1-based
    ``sub_net_k`` become ``sub_net_{k-1}``; reference rows are left out."""
    renamed = {}
    for row, score in result.rows.items():
        if row in REFERENCE_ROWS:
            continue
        if row.startswith("sub_net_"):
            row = f"sub_net_{int(row[len('sub_net_'):]) - 1}"
        renamed[row] = score
    return renamed
