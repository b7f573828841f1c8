"""The alpha-beta performance model of DD and of the baseline: calibrated on measured runs,
validated on them, projected to machines we do not have.

The model (Hockney α-β; ring allreduce as in Thakur, Rabenseifner, Gropp 2005):
  ring allreduce of n bytes over p ranks   2(p-1)·α + 2·(p-1)/p · n/β  (per DDP bucket: α term)
  broadcast of n bytes to p ranks          (⌈log2 p⌉ + p - 1)·α + 2·(p-1)/p · n/β  (scatter +
                                           allgather, van de Geijn)
  gather of N pieces of m bytes            ⌈log2 N⌉·α + (N-1)·m/β
  one epoch on p ranks                     (D/p)·c + ⌈(D/p)/b⌉ · allreduce(4·params, p)
DD phase 1: p = P/N ranks per group, the sub-net's c_S and |S| ≈ |G|/N² parameters, groups in
parallel with no traffic between them; phase 2: gather of N sub-nets + broadcast of |G|;
phase 3 and the baseline: p = P, c_G and |G|. c (seconds per sample on one rank) comes from
the runs' images/s per rank, minus the modelled allreduce of the run it came from (the run with
the fewest ranks per communicator, ideally 1), or from --global-ips / --subnet-ips. No overlap
of communication with the backward pass is assumed (an upper bound), and evaluation is not
modelled. Time to accuracy = the recipe's epochs per phase times seconds per epoch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from ..errors import UsageError
from ..layout import layout_for
from ..reporting import RunFiles
from .collect import mean_or_none, steady
from .errors import ScalingError

DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel's default bucket_cap_mb=25
BYTES_PER_PARAM = 4  # fp32 gradients (bf16 autocast keeps fp32 parameters and gradients)
DEFAULT_ALPHA = 10e-6  # s per message: an InfiniBand/NCCL-class latency
DEFAULT_BETA = 12.5e9  # bytes/s: 100 Gb/s per rank
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "food101": 75_750}  # full training sets
NUM_CLASSES = {"synthetic": 10, "cifar10": 10, "cifar100": 100, "food101": 101}


@dataclass(frozen=True)
class Network:
    alpha: float  # seconds per message (latency)
    beta: float  # bytes per second (bandwidth)
    bucket_bytes: int = DDP_BUCKET_BYTES  # DDP reduces gradients in buckets: one α term each


def ring_allreduce_seconds(n_bytes: float, p: int, net: Network) -> float:
    """Ring allreduce of n bytes over p ranks: 2(p-1)α + 2((p-1)/p)·n/β."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * net.alpha + 2 * (p - 1) / p * n_bytes / net.beta


def gradient_allreduce_seconds(n_bytes: float, p: int, net: Network) -> float:
    """One training step's gradient allreduce, as DDP does it: one ring per bucket."""
    if p <= 1:
        return 0.0
    buckets = max(1, math.ceil(n_bytes / net.bucket_bytes))
    return buckets * 2 * (p - 1) * net.alpha + 2 * (p - 1) / p * n_bytes / net.beta


def broadcast_seconds(n_bytes: float, p: int, net: Network) -> float:
    """Broadcast of n bytes to p ranks, scatter + ring allgather: (⌈log2 p⌉+p-1)α + 2((p-1)/p)n/β."""
    if p <= 1:
        return 0.0
    return (math.ceil(math.log2(p)) + p - 1) * net.alpha + 2 * (p - 1) / p * n_bytes / net.beta


def gather_seconds(piece_bytes: float, n: int, net: Network) -> float:
    """N pieces of m bytes to the root (binomial tree): ⌈log2 N⌉α + (N-1)m/β."""
    if n <= 1:
        return 0.0
    return math.ceil(math.log2(n)) * net.alpha + (n - 1) * piece_bytes / net.beta


def epoch_seconds(samples: int, ranks: int, batch: int, per_sample_s: float, grad_bytes: float,
                  net: Network) -> float:
    """One epoch of data-parallel training: ⌈D/p⌉·c (the busiest rank) + steps·allreduce, with
    dd_mpi.data's step count (batches of ⌊D/p⌋; a rank's extra sample rides in its last batch)."""
    steps = math.ceil((samples // ranks) / batch)
    return math.ceil(samples / ranks) * per_sample_s + steps * gradient_allreduce_seconds(grad_bytes, ranks, net)


@dataclass(frozen=True)
class Workload:
    """What one projection needs: the data, the nets, the recipe and the machine."""

    samples: int  # training samples per epoch (D)
    batch: int  # per rank
    global_params: int  # |G|
    subnet_params: int  # |S| ≈ |G| / N²
    subnets: int  # N
    global_sample_s: float  # c_G: seconds per sample per rank, global net
    subnet_sample_s: float  # c_S: seconds per sample per rank, sub-net
    subnet_epochs: int
    finetune_epochs: int
    baseline_epochs: int
    subnet_data: str = "full"  # full: every group sees D samples; shard: D/N
    compose_s: float = 0.0  # rank 0's compose compute (measured), seconds
    bytes_per_param: int = BYTES_PER_PARAM


def _phase1_samples(w: Workload) -> int:
    return w.samples if w.subnet_data == "full" or w.subnets == 1 else w.samples // w.subnets


def phase1_layout(P: int, N: int) -> tuple[int, int]:
    """dd-train's default layout: (ranks per group, nets per rank)."""
    layout = layout_for(P, N)
    return layout.ranks_per_group, layout.nets_per_group


def subnet_epoch_seconds(w: Workload, P: int, net: Network) -> float:
    """Phase 1, one epoch: the default G groups in parallel, each of P/G ranks training N/G
    sub-nets fused (k times the work and the gradients of one), no traffic between groups."""
    ranks, k = phase1_layout(P, w.subnets)
    return epoch_seconds(_phase1_samples(w), ranks, w.batch, k * w.subnet_sample_s,
                         k * w.subnet_params * w.bytes_per_param, net)


def global_epoch_seconds(w: Workload, P: int, net: Network) -> float:
    """Phase 3 or the baseline, one epoch: the global net on all P ranks."""
    return epoch_seconds(w.samples, P, w.batch, w.global_sample_s, w.global_params * w.bytes_per_param, net)


STATE_BYTES = 4  # a weight in the messages of phase 2 (fp32)


def compose_comm_seconds(global_params: int, subnet_params: int, N: int, P: int, net: Network) -> float:
    """Phase 2's messages: the N leaders send |S| to rank 0, which broadcasts |G|."""
    return (gather_seconds(subnet_params * STATE_BYTES, N, net)
            + broadcast_seconds(global_params * STATE_BYTES, P, net))


def compose_seconds(w: Workload, P: int, net: Network) -> float:
    """Phase 2: the messages, and rank 0 composing |G| between them."""
    return compose_comm_seconds(w.global_params, w.subnet_params, w.subnets, P, net) + w.compose_s


def projectable(w: Workload, P: int) -> bool:
    """Every rank gets at least one sample per epoch (any N runs on any P)."""
    return _phase1_samples(w) // phase1_layout(P, w.subnets)[0] >= 1 and w.samples // P >= 1


def project(w: Workload, P: int, net: Network) -> dict:
    """Seconds per epoch of each phase and time to accuracy of DD and of the baseline at P ranks."""
    t_sub, t_glob = subnet_epoch_seconds(w, P, net), global_epoch_seconds(w, P, net)
    t_comp = compose_seconds(w, P, net)
    dd = w.subnet_epochs * t_sub + t_comp + w.finetune_epochs * t_glob
    baseline = w.baseline_epochs * t_glob
    comm_sub = subnet_epoch_seconds(replace(w, subnet_sample_s=0.0), P, net)  # the allreduce part
    comm_glob = global_epoch_seconds(replace(w, global_sample_s=0.0), P, net)
    return {"P": P, "N": w.subnets, "subnet_epoch_s": t_sub, "compose_s": t_comp, "global_epoch_s": t_glob,
            "comm_share_subnet": comm_sub / t_sub if t_sub else 0.0,
            "comm_share_global": comm_glob / t_glob if t_glob else 0.0,
            "dd_seconds": dd, "baseline_seconds": baseline, "speedup": baseline / dd if dd else None}


# ---- calibration from runs -------------------------------------------------------------
def train_size(config: dict) -> int | None:
    """Training samples per epoch of a run (its --train-samples cap, or the dataset's size)."""
    if config.get("train_samples"):
        return int(config["train_samples"])
    if config.get("dataset") == "synthetic":
        from ..synthetic import DEFAULT_TRAIN_SAMPLES
        return DEFAULT_TRAIN_SAMPLES
    return TRAIN_SIZES.get(config.get("dataset"))


def model_params(config: dict, subnets: int, num_classes: int | None = None) -> tuple[int, int, int, int]:
    """(|G|, |S|, MACs of G, MACs of S) per image, from the run's config (meta tensors: no memory)."""
    from ..decompose import subnet_spec
    from ..inspection import model_sizes
    from ..models import ModelSpec
    classes = num_classes or NUM_CLASSES.get(config.get("dataset"))
    if classes is None:
        raise ScalingError(f"--dataset {config.get('dataset')}: pass --classes for the model's parameter count")
    spec = ModelSpec(config["arch"], config["width"], classes, config.get("shortcut", "A"))
    image = config.get("image_size") or spec.default_image_size
    g_params, g_flops = model_sizes(spec, image)
    s_params, s_flops = model_sizes(subnet_spec(spec, subnets), image)
    return g_params, s_params, g_flops, s_flops


@dataclass
class Measurement:
    """Measured training seconds per epoch of one phase of one run, and what it implies for c."""

    run: RunFiles
    phase: str  # subnet | finetune | baseline
    net: str  # 'global' or 'subnet N'
    ranks: int  # ranks in the communicator (P/G in phase 1, P otherwise)
    samples_per_rank: int
    batch: int
    grad_bytes: float  # of all the nets a rank trains
    train_epoch_s: float  # measured: samples / images_per_s (the slowest group in phase 1)
    members: int = 1  # nets trained fused on each rank (N/G in phase 1)


def measurements(run: RunFiles, num_classes: int | None = None, samples: int | None = None) -> list[Measurement]:
    """The run's measured phases; ``samples`` (--samples) gives D where the run's config can't
    (an imagefolder run without --train-samples)."""
    cfg = run.report.get("config") or {}
    D = train_size(cfg) or samples
    if D is None:
        raise ScalingError(f"{run.path.name}: --dataset {cfg.get('dataset')} doesn't say how many samples "
                           "it trained on: pass --samples (its training samples per epoch)")
    P, N = run.world_size, run.subnets
    g_params, s_params, _, _ = model_params(cfg, N, num_classes)
    out = []
    sub_rows = [r for r in run.metrics if r.get("phase") == "subnet"]
    if sub_rows:
        layout = (run.report.get("layout") or [{}])[0]
        ranks, k = ((layout["ranks_per_group"], layout["nets_per_group"]) if "ranks_per_group" in layout
                    else phase1_layout(P, N))
        pool = D if cfg.get("subnet_data", "full") == "full" or N == 1 else D // N
        per_rank = pool // ranks
        by_epoch: dict[int, float] = {}
        for r in sub_rows:  # the slowest group per epoch, as the phase waits for it
            by_epoch[r["epoch"]] = max(by_epoch.get(r["epoch"], 0.0), per_rank * ranks / r["images_per_s"])
        batch = layout.get("batch_size") or _batch_of_an_older_report(cfg, ranks, cfg.get("subnet_batch_size"))
        epochs = steady([by_epoch[e] for e in sorted(by_epoch)])
        out.append(Measurement(run, "subnet", "global" if N == 1 else f"subnet {N}", ranks, per_rank,
                               batch, k * s_params * BYTES_PER_PARAM, mean_or_none(epochs), k))
    trained = {"finetune": (run.report.get("layout") or [{}])[-1].get("batch_size"),
               "baseline": run.report.get("baseline_batch_size")}
    for phase in ("finetune", "baseline"):
        rows = [r for r in run.metrics if r.get("phase") == phase and r.get("images_per_s")]
        if rows:
            per_rank = D // P
            out.append(Measurement(run, phase, "global", P, per_rank,
                                   trained[phase] or _batch_of_an_older_report(cfg, P), g_params * BYTES_PER_PARAM,
                                   mean_or_none([per_rank * P / r["images_per_s"] for r in steady(rows)])))
    return out


def _batch_of_an_older_report(cfg: dict, ranks: int, own: int | None = None) -> int:
    """The batch per rank a run made before its report recorded it: ``own`` (phase 1's), else
    --global-batch-size over the net's ranks, else --batch-size."""
    if own:
        return own
    return cfg["global_batch_size"] // ranks if cfg.get("global_batch_size") else cfg["batch_size"]


def per_sample_seconds(m: Measurement, net: Network) -> float:
    """c from one measurement: its epoch minus the modelled allreduces, per sample per rank
    and per net (a rank training k nets fused does k nets' work per sample)."""
    steps = math.ceil(m.samples_per_rank / m.batch)
    compute = m.train_epoch_s - steps * gradient_allreduce_seconds(m.grad_bytes, m.ranks, net)
    return max(compute, 0.05 * m.train_epoch_s) / m.samples_per_rank / m.members


def calibrate(ms: list[Measurement], net: Network) -> dict[str, tuple[float, list[Measurement]]]:
    """Per net: c from the measurements with the fewest ranks per communicator (their mean)."""
    by_net: dict[str, list[Measurement]] = {}
    for m in ms:
        by_net.setdefault(m.net, []).append(m)
    result = {}
    for name, group in by_net.items():
        fewest = min(m.ranks for m in group)
        sources = [m for m in group if m.ranks == fewest]
        result[name] = (statistics.mean(per_sample_seconds(m, net) for m in sources), sources)
    return result


def predict(m: Measurement, c: float, net: Network) -> float:
    return epoch_seconds(m.samples_per_rank * m.ranks, m.ranks, m.batch, c * m.members, m.grad_bytes, net)


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


# ---- what --model projects -------------------------------------------------------------
def ips_overrides(text: str | None) -> dict[int | None, float]:
    """'2500' (any N) or '2=9000,4=20000' (per N) -> {N or None: images/s per rank}."""
    if not text:
        return {}
    result = {}
    for item in text.split(","):
        key, _, value = item.rpartition("=")
        result[int(key) if key else None] = float(value)
    return result


def measured_note(sources: list[Measurement], per: str) -> str:
    """Where a calibrated per-sample time came from: one measurement, or the mean of several."""
    what = ", ".join(f"{m.run.path.name} {'phase 1' if m.phase == 'subnet' else m.phase}" for m in sources)
    mean = f"the mean of {len(sources)}, " if len(sources) > 1 else ""
    return f"measured: {mean}{what} on {sources[0].ranks} rank(s){per}"


def build_workloads(runs: list[RunFiles], calibration: dict, args, net: Network) -> list[tuple[Workload, str]]:
    """One workload per N to project, with a note on where each per-sample time came from."""
    cfg = runs[0].report.get("config") or {}
    D = args.samples or train_size(cfg)
    if D is None:
        raise ScalingError("the runs' dataset size is unknown: pass --samples")
    epochs = args.epochs or [cfg.get(k, 1) for k in ("subnet_epochs", "finetune_epochs", "baseline_epochs")]
    subnet_ns = args.model_subnets or sorted({r.subnets for r in runs if r.subnets > 1}) or [4]
    global_override = ips_overrides(args.global_ips).get(None)
    subnet_override = ips_overrides(args.subnet_ips)
    unused = sorted(n for n in subnet_override if n is not None and n not in subnet_ns)
    if unused:
        raise ScalingError(f"--subnet-ips {args.subnet_ips}: N={unused[0]} is not projected (N = "
                           f"{', '.join(map(str, subnet_ns))}): --model-subnets sets the N to project")
    if global_override:
        c_g, g_note = 1.0 / global_override, f"--global-ips {global_override:g}"
    elif "global" in calibration:
        c_g, sources = calibration["global"]
        g_note = measured_note(sources, "")
    else:
        raise ScalingError("no global-net measurement in the runs (finetune or baseline): pass --global-ips")
    # rank 0's compose compute: a run's measured phase 2 less the messages the projection adds back
    # (model_params: |G|, |S| first)
    composes = [max(r.report["timing"]["compose"] - compose_comm_seconds(
                    *model_params(r.report.get("config") or cfg, r.subnets, args.classes)[:2], r.subnets,
                    r.world_size, net), 0.0)
                for r in runs if (r.report.get("timing") or {}).get("compose")]
    compose_s = min(composes) if composes else 0.0
    out = []
    for n in subnet_ns:
        try:
            g_params, s_params, g_flops, s_flops = model_params(cfg, n, args.classes)
        except UsageError as error:  # (it names dd-train's --subnets)
            raise ScalingError(f"--model-subnets {n}: {error}") from None
        if n in subnet_override or None in subnet_override:
            ips = subnet_override.get(n, subnet_override.get(None))
            c_s, s_note = 1.0 / ips, f"--subnet-ips {ips:g}"
        elif n == 1:
            c_s, s_note = c_g, "N=1: the global net"
        elif f"subnet {n}" in calibration and not global_override:
            c_s, sources = calibration[f"subnet {n}"]
            s_note = measured_note(sources, " per group")
        else:
            c_s, s_note = c_g * s_flops / g_flops, "scaled from the global net by MACs (not measured)"
        w = Workload(samples=D, batch=args.per_rank_batch or cfg.get("batch_size", 64), global_params=g_params,
                     subnet_params=s_params, subnets=n, global_sample_s=c_g, subnet_sample_s=c_s,
                     subnet_epochs=epochs[0], finetune_epochs=epochs[1], baseline_epochs=epochs[2],
                     subnet_data=cfg.get("subnet_data", "full"), compose_s=compose_s)
        out.append((w, f"N={n}: |G|={g_params:,} |S|={s_params:,} (|G|/N²={g_params / n ** 2:,.0f}); "
                       f"c_G={c_g * 1e3:.3f} ms/sample ({g_note}); c_S={c_s * 1e3:.3f} ms/sample ({s_note})"))
    return out


def validation_rows(runs: list[RunFiles], net: Network, classes: int | None,
                    samples: int | None = None) -> list[dict]:
    ms = [m for run in runs for m in measurements(run, classes, samples)]
    calibration = calibrate(ms, net)
    rows = []
    for m in ms:
        c, sources = calibration[m.net]
        predicted = predict(m, c, net)
        rows.append({"run": str(m.run.path), "P": m.run.world_size, "N": m.run.subnets, "phase": m.phase,
                     "ranks": m.ranks, "measured_s": m.train_epoch_s, "predicted_s": predicted,
                     "relative_error": relative_error(predicted, m.train_epoch_s),
                     "calibration": m in sources})
    return rows
