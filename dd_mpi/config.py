"""The one configuration object of a run: every setting, its flag, its unit, its validation.

``RunConfig`` is built from the command line (``parse_config``), validated with messages that
name the flag, saved as ``OUT/config.json`` and inside every checkpoint; on resume the saved
values that shape the run must match (``incompatible_with``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from .errors import UsageError
from .models import ModelSpec, parse_depth

DATASETS = ("synthetic", "cifar10", "cifar100", "food101", "imagefolder")

# The paper's runs (Gu et al., ETNA 2022, §5). Epoch counts follow the common CIFAR recipe
# (~160-200 epochs for a conventional run) split the paper's way: the N narrow sub-nets take
# the bulk of the epochs (each costs ~1/N² of a global epoch), the composed net a short
# fine-tune at a lower LR, since it starts from the sub-nets' mean and needs no warm start.
PRESETS: dict[str, dict] = {
    **{f"{ds}-resnet{d}": dict(
        dataset=ds, arch=f"resnet{d}", width=4.0, subnets=4, batch_size=128, lr=0.1,
        schedule="cosine", subnet_epochs=160, finetune_epochs=40, baseline_epochs=200,
        finetune_lr=0.02, subnet_data="full",
        _doc=f"{ds.upper()}, 4x-wide ResNet{d} split into 4 standard ResNet{d}s; sub-nets "
             "160 epochs, fine-tune 40 at LR/5, baseline 200; cosine schedule")
        for ds in ("cifar10", "cifar100") for d in (32, 56, 110)},
    **{f"food101-resnet{d}{suffix}": dict(
        dataset="food101", arch=f"resnet{d}", width=1.0, subnets=n, batch_size=64, lr=0.1,
        schedule="cosine", subnet_epochs=60, finetune_epochs=20, baseline_epochs=90,
        finetune_lr=0.02, subnet_data="full", image_size=224,
        _doc=f"Food-101, ResNet{d} (standard width) split into {n}; "
             "sub-nets 60 epochs, fine-tune 20 at LR/5, baseline 90 (ImageNet-style); cosine")
        for d in (50, 101) for n, suffix in ((4, ""), (8, "-n8"))},
}


@dataclass
class RunConfig:
    # --- model ---
    arch: str = "resnet20"  # resnet20/32/44/56/110 (any 6n+2), resnet50, resnet101
    width: float = 2.0  # width factor w of the global net
    subnets: int = 2  # N: sub-networks = rank groups
    shortcut: str = "A"  # CIFAR nets: A zero-padding (per group), B 1x1 conv + BN
    # --- method ---
    strategy: str = "dd"  # dd | baseline | both (DD then the conventional run, same job)
    subnet_data: str = "full"  # phase 1 data per group: full set, or shard k of N
    offdiag_std: float = 0.0  # std of off-diagonal blocks at composition (0 = exact mean)
    # --- data ---
    dataset: str = "synthetic"  # synthetic (built in, offline) | cifar10 | cifar100 | food101 | imagefolder
    data_dir: str | None = None  # where the dataset lies (torchvision's layout; imagefolder: train/ and val/)
    download: bool = False  # torchvision download (rank 0), for machines with internet
    image_size: int | None = None  # pixels; None: the dataset's (32 CIFAR, 224 Food-101)
    train_samples: int | None = None  # cap the training set (smoke runs)
    test_samples: int | None = None  # cap the test set
    workers: int = 2  # DataLoader workers per rank for on-disk image datasets
    # --- optimisation (Goyal et al. 2017: LR linear in the global batch, warm-up) ---
    batch_size: int = 32  # per rank (4 ranks: 128, the batch He et al.'s LR 0.1 was tuned at)
    lr: float = 0.1  # LR at a global batch of 128 (scaled linearly to the real global batch)
    subnet_lr: float | None = None  # phase 1 LR (default --lr)
    finetune_lr: float | None = None  # phase 3 LR (default --lr / 5)
    baseline_lr: float | None = None  # baseline LR (default --lr)
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4  # not applied to BN parameters and biases
    label_smoothing: float = 0.0  # cross-entropy label smoothing, in [0, 1)
    schedule: str = "cosine"  # cosine | step (x0.1 at 50% and 75% of the epochs)
    warmup_epochs: float = 1.0  # linear warm-up, in epochs (fractions allowed)
    finetune_warmup_epochs: float = 0.0  # the composed net starts trained: no warm-up
    # The demo's budget (presets carry the paper's): most epochs in cheap phase 1, one
    # fine-tune epoch, the baseline the same total (BENCHMARKS.md: the split that wins)
    subnet_epochs: int = 5  # phase 1: epochs of every sub-network
    finetune_epochs: int = 1  # phase 3: epochs of the composed net
    baseline_epochs: int = 6  # the conventional run (--strategy baseline|both)
    eval_every: int = 1  # evaluate every k epochs (and always after the last)
    # --- processes ---
    nproc: int | None = None  # start this many local processes (no launcher present)
    backend: str = "auto"  # auto | torch | horovod
    device: str = "auto"  # cpu | cuda | auto
    threads: int | None = None  # torch threads per rank (default: cores / local ranks)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model of each phase
    timeout: float = 60.0  # seconds a collective may wait for a dead or stuck rank
    seed: int = 0  # weights, data order and augmentation (group k: its own seed from it)
    deterministic: bool = False  # deterministic kernels (bit-identical resume on CPU)
    # --- outputs and recovery ---
    out: str | None = None  # default: runs/<date>-<time>, named by rank 0
    resume: bool = False  # continue the run in --out from its checkpoints
    only_group: int | None = None  # run phase 1 of this group only, then exit
    preset: str | None = None  # the paper's runs (listed below); flags given win over it
    signal_check_steps: int = 20  # look for SIGTERM/SIGUSR1 every k steps (one tiny allreduce)

    # ---------------------------------------------------------------------------------
    def model_spec(self, num_classes: int) -> ModelSpec:
        return ModelSpec(self.arch, self.width, num_classes, self.shortcut)

    @property
    def only_group_mode(self) -> bool:
        return self.only_group is not None

    @property
    def strategies(self) -> tuple[str, ...]:
        return {"dd": ("dd",), "baseline": ("baseline",), "both": ("dd", "baseline")}[self.strategy]

    def bf16(self, device_type: str) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")

    def phase_lr(self, phase: str) -> float:
        return {"subnet": self.subnet_lr or self.lr,
                "finetune": self.finetune_lr or self.lr / 5,
                "baseline": self.baseline_lr or self.lr}[phase]

    def validate(self) -> RunConfig:
        """Raise UsageError naming the flag for any value that cannot work."""
        parse_depth(self.arch)
        _choice("--strategy", self.strategy, ("dd", "baseline", "both"))
        _choice("--subnet-data", self.subnet_data, ("full", "shard"))
        _choice("--dataset", self.dataset, DATASETS)
        _choice("--schedule", self.schedule, ("cosine", "step"))
        _choice("--backend", self.backend, ("auto", "torch", "horovod"))
        _choice("--device", self.device, ("auto", "cpu", "cuda"))
        _choice("--shortcut", self.shortcut, ("A", "B"))
        _choice("--precision", self.precision, ("auto", "fp32", "bf16"))
        if self.subnets < 1:
            raise UsageError(f"--subnets {self.subnets} is invalid: use 1 or more sub-networks")
        if not (self.width > 0 and math.isfinite(self.width)):
            raise UsageError(f"--width {self.width} is invalid: use a positive width factor")
        for flag in ("subnet_epochs", "finetune_epochs", "baseline_epochs"):
            if getattr(self, flag) < 0:
                raise UsageError(f"--{flag.replace('_', '-')} {getattr(self, flag)} is invalid: use 0 or more")
        for flag in ("batch_size", "eval_every", "signal_check_steps"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {getattr(self, flag)} is invalid: use 1 or more")
        for flag in ("lr", "subnet_lr", "finetune_lr", "baseline_lr"):
            value = getattr(self, flag)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UsageError(f"--{flag.replace('_', '-')} {value} is invalid: use a positive learning rate")
        for flag in ("train_samples", "test_samples", "nproc", "threads", "image_size"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {value} is invalid: use 1 or more")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise UsageError(f"--timeout {self.timeout} is invalid: use a positive number of seconds")
        for flag in ("workers", "warmup_epochs", "finetune_warmup_epochs", "momentum", "weight_decay",
                     "offdiag_std"):
            value = getattr(self, flag)
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"--{flag.replace('_', '-')} {value} is invalid: use 0 or more")
        if self.momentum >= 1:
            raise UsageError(f"--momentum {self.momentum} is invalid: use [0, 1)")
        if self.image_size not in (None, 32) and self.dataset in ("cifar10", "cifar100"):
            raise UsageError(f"--image-size {self.image_size} does not apply to --dataset {self.dataset} "
                             "(32x32 images): leave it out")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing {self.label_smoothing} is invalid: use [0, 1)")
        if self.only_group is not None and not 0 <= self.only_group < self.subnets:
            raise UsageError(f"--only-group {self.only_group} is invalid: use 0..{self.subnets - 1}")
        if self.only_group is not None and self.strategy == "baseline":
            raise UsageError("--only-group runs one sub-network's phase 1: it needs --strategy dd or both")
        if self.dataset in ("imagefolder",) and not self.data_dir:
            raise UsageError(f"--dataset {self.dataset} needs --data-dir DIR (with train/ and val/)")
        return self

    # Settings that change what is trained: a resumed run must agree on all of them.
    SHAPING = ("arch", "width", "subnets", "shortcut", "dataset", "subnet_data", "image_size",
               "train_samples", "test_samples", "seed", "offdiag_std", "batch_size", "lr",
               "subnet_lr", "finetune_lr", "baseline_lr", "schedule", "subnet_epochs",
               "finetune_epochs", "baseline_epochs", "strategy", "label_smoothing",
               "momentum", "weight_decay", "warmup_epochs", "finetune_warmup_epochs")

    def incompatible_with(self, saved: dict) -> list[str]:
        """'flag: saved -> now' for every shaping setting that differs from a saved config."""
        return [f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {getattr(self, k)!r}"
                for k in self.SHAPING if saved.get(k) != getattr(self, k)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r} is unknown: choose one of {', '.join(map(str, choices))}")


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    presets = "\n".join(f"  {name:<20} {p['_doc']}" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="dd-train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Domain-decomposition training: N narrow sub-nets trained by N rank groups, "
                    "composed into the wide net, fine-tuned by all ranks.",
        epilog=f"presets (--preset NAME; later flags override):\n{presets}\n\n"
               "launch: dd-train --nproc 4 | torchrun --nproc-per-node 4 -m dd_mpi | "
               "mpiexec -n 4 dd-train | srun dd-train | horovodrun -np 4 dd-train --backend horovod")
    comments, sections = _field_comments()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(RunConfig):
        section = sections.get(f.name, "other")
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = comments.get(f.name, "")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} (default: {'on' if default else 'off'})")
            continue
        shown = f" (default: {default})" if default is not None else ""  # None: the comment says
        group.add_argument(flag, type=_field_type(f), default=None, metavar=f.name.upper(),
                           help=f"{text}{shown}".replace("%", "%%"))
    return parser


def _field_comments() -> tuple[dict[str, str], dict[str, str]]:
    """Each field's help and section, from RunConfig's own source: the comment on a field's
    line is its documentation, so --help and the code cannot drift apart."""
    import inspect
    import re
    try:
        source = inspect.getsource(RunConfig)
    except (OSError, TypeError):  # no source shipped: flags without help
        return {}, {}
    comments, sections, section = {}, {}, "other"
    for line in source.splitlines():
        heading = re.match(r"\s+# --- (.+?) (\(.*\) )?---", line)
        if heading:
            section = heading.group(1)
            continue
        match = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
        named = re.match(r"\s+(\w+): ", line)
        if named:
            sections[named.group(1)] = section
    return comments, sections


def _field_type(f: dataclasses.Field):
    text = str(f.type)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Defaults, then the preset, then the flags given (later flags win)."""
    args = vars(build_parser().parse_args(argv))
    values = {}
    if args.get("preset"):
        if args["preset"] not in PRESETS:
            raise UsageError(f"--preset {args['preset']!r} is unknown: choose one of {', '.join(PRESETS)}")
        values.update({k: v for k, v in PRESETS[args["preset"]].items() if not k.startswith("_")})
    values.update({k: v for k, v in args.items() if v is not None})
    return RunConfig(**values).validate()
