"""The one configuration object of a run: every setting, its flag, its unit, its validation.

``RunConfig`` is built from defaults < a preset (``presets``) < a config file
(``--config run.yaml``, RunConfig's keys) < the flags given (``parse_config``), validated with
messages that name the flag (or the key and file), saved as ``OUT/config.json`` and inside
every checkpoint; on resume the saved values that shape the run must match
(``incompatible_with``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .argtypes import add_version
from .catalog import DATASETS, parse_depth
from .errors import UsageError
from .presets import PRESETS

if TYPE_CHECKING:
    from .models import ModelSpec


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes
TIMEOUT_RANGE = (1, 30 * 24 * 3600)  # seconds --timeout and --io-timeout may be


@dataclass
class RunConfig:
    # --- model ---
    arch: str = "resnet20"  # resnet20/32/44/56/110 (any 6n+2), resnet50, resnet101, resnet152
    width: float = 2.0  # width factor w of the global net
    subnets: int = 2  # N: sub-networks trained in phase 1 (any N on any number of ranks)
    shortcut: str = "A"  # CIFAR nets: A zero-padding (per group), B 1x1 conv + BN
    # --- method ---
    strategy: str = "dd"  # dd | baseline | both (DD then the conventional run, same job)
    subnet_data: str = "full"  # phase 1 data per sub-net: full set, or shard k of N
    offdiag_std: float = 0.0  # std of off-diagonal blocks at composition (0 = exact mean)
    levels: str | None = None  # nets per level, e.g. 16,4,1: compose in stages (default: N,1)
    level_epochs: int = 1  # fine-tune epochs of every intermediate level's nets
    level_lr: float | None = None  # LR of the intermediate fine-tunes (default: the fine-tune's)
    groups: int | None = None  # phase-1 rank groups G, dividing N and the ranks (default: the most)
    # --- data ---
    dataset: str = "synthetic"  # synthetic (built in, offline) | cifar10 | cifar100 | food101 | imagefolder
    data_dir: str | None = None  # where the dataset lies (torchvision's layout; imagefolder: train/ and val/)
    download: bool = False  # torchvision download (rank 0), for machines with internet
    image_size: int | None = None  # pixels; None: 32 CIFAR, 224 Food-101; ImageFolder 32 (median side <= 64 px) or 224
    train_samples: int | None = None  # cap the training set (smoke runs)
    test_samples: int | None = None  # cap the test set
    workers: int | None = None  # DataLoader workers per rank (default: the rank's CPUs - 1, at most 8)
    cache_dir: str | None = None  # large images (Food-101): decode once into a memory-mapped cache here
    # --- optimisation (Goyal et al. 2017: LR linear in the global batch, warm-up) ---
    batch_size: int = 32  # per rank and net (4 ranks: 128, the batch He et al.'s LR 0.1 was tuned at)
    subnet_batch_size: int | None = None  # phase 1 batch per rank and sub-net (default --batch-size; beats --global-batch-size)
    global_batch_size: int | None = None  # every net's batch over its ranks (He et al.: 128), instead of per rank
    lr: float = 0.1  # LR at a global batch of 128 (scaled linearly to the real global batch)
    subnet_lr: float | None = None  # phase 1 LR (default --lr)
    finetune_lr: float | None = None  # phase 3 LR (default --lr / 5)
    baseline_lr: float | None = None  # baseline LR (default --lr)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (He et al.: plain)
    weight_decay: float = 5e-4  # L2 penalty on the weights
    bn_weight_decay: bool = False  # weight decay on BN parameters and biases too (He et al.: yes)
    label_smoothing: float = 0.0  # cross-entropy label smoothing, in [0, 1)
    schedule: str = "cosine"  # cosine | step (x0.1 at 50% and 75% of the epochs, as He et al.)
    warmup_epochs: float = 1.0  # warm-up, in epochs (fractions allowed)
    warmup_style: str = "linear"  # linear ramp | constant (LR/10 throughout, He et al.'s ResNet-110)
    finetune_warmup_epochs: float = 0.0  # the composed net starts trained: no warm-up
    # The demo's budget (presets carry the paper's): most epochs in cheap phase 1, one
    # fine-tune epoch, the baseline the same total (BENCHMARKS.md: the split that wins)
    subnet_epochs: int = 5  # phase 1: epochs of every sub-network
    finetune_epochs: int = 1  # phase 3: epochs of the composed net
    baseline_epochs: int = 6  # the conventional run (--strategy baseline|both)
    eval_every: int = 1  # evaluate every k epochs (and always after the last)
    subnet_eval_every: int | None = None  # phase 1's own cadence: the sub-nets every k epochs (default --eval-every)
    # --- processes ---
    nproc: int | None = None  # start this many local processes (no launcher present)
    backend: str = "auto"  # auto | torch | horovod
    device: str = "auto"  # cpu | cuda | auto
    threads: int | None = None  # torch threads per rank (default: its share of the node, by affinity masks)
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model of each phase
    compile_mode: str = "default"  # with --compile: default | reduce-overhead (CUDA graphs, one-rank groups) | max-autotune
    timeout: float = 300.0  # seconds a training collective waits for a stuck (frozen) rank
    io_timeout: float = 1800.0  # seconds for start-up and I/O waits: data checks, checkpoints, compiling
    seed: int = 0  # weights, data order and augmentation (sub-net k: its own seed from it)
    deterministic: bool = False  # deterministic kernels (bit-identical resume on CPU)
    # --- outputs and recovery ---
    out: str | None = None  # default: runs/<date>-<time>, named by rank 0
    resume: bool = False  # continue the run in --out from its checkpoints
    only_group: int | None = None  # train (or continue) this sub-network's phase 1 only, then exit (job arrays)
    preset: str | None = None  # the paper's runs (listed below); flags given win over it
    config: str | None = None  # a YAML file of RunConfig's keys (preset < file < flags)
    print_config: bool = False  # print the effective config as YAML and exit
    log_every: float = 60.0  # seconds between progress lines in a batch log (no terminal); 0: off
    tensorboard: bool = False  # TensorBoard event files under OUT/tensorboard (pip install 'dd_mpi[tensorboard]')
    signal_check_steps: int = 20  # look for SIGTERM/SIGUSR1 every k steps (one tiny allreduce)

    # ---------------------------------------------------------------------------------
    def model_spec(self, num_classes: int) -> ModelSpec:
        from .models import ModelSpec  # torch: on the ranks only (catalog's docstring)
        return ModelSpec(self.arch, self.width, num_classes, self.shortcut)

    @property
    def only_group_mode(self) -> bool:
        return self.only_group is not None

    @property
    def continuing_flag(self) -> str:
        """The flag that makes this job continue the run in --out, as its messages name it: an array
        task continues its sub-network's checkpoints without --resume."""
        return f"--only-group {self.only_group}" if self.only_group_mode else "--resume"

    @property
    def strategies(self) -> tuple[str, ...]:
        return {"dd": ("dd",), "baseline": ("baseline",), "both": ("dd", "baseline")}[self.strategy]

    @property
    def level_counts(self) -> list[int]:
        """Nets per level: N first, 1 last (``--levels``, else N,1)."""
        return _level_counts(self.levels, self.subnets)

    def phase_lr(self, phase: str) -> float:
        return {"subnet": self.subnet_lr or self.lr,
                "finetune": self.finetune_lr or self.lr / 5,
                "level": self.level_lr or self.finetune_lr or self.lr / 5,
                "baseline": self.baseline_lr or self.lr}[phase]

    def validate(self) -> RunConfig:
        """Raise UsageError naming the flag for any value that cannot work."""
        parse_depth(self.arch)
        _choice("--strategy", self.strategy, ("dd", "baseline", "both"))
        _choice("--subnet-data", self.subnet_data, ("full", "shard"))
        _choice("--dataset", self.dataset, tuple(DATASETS))
        _choice("--schedule", self.schedule, ("cosine", "step"))
        _choice("--warmup-style", self.warmup_style, ("linear", "constant"))
        _choice("--backend", self.backend, ("auto", "torch", "horovod"))
        _choice("--device", self.device, ("auto", "cpu", "cuda"))
        _choice("--shortcut", self.shortcut, ("A", "B"))
        _choice("--precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("--compile-mode", self.compile_mode, COMPILE_MODES)
        if self.compile_mode != "default" and not self.compile:
            raise UsageError(f"--compile-mode {self.compile_mode} applies to compiled models: add --compile")
        if self.subnets < 1:
            raise UsageError(f"--subnets {self.subnets} is invalid: use 1 or more sub-networks")
        self._validate_levels()
        if not (self.width > 0 and math.isfinite(self.width)):
            raise UsageError(f"--width {self.width} is invalid: use a positive width factor")
        for flag in ("subnet_epochs", "finetune_epochs", "baseline_epochs", "level_epochs"):
            if getattr(self, flag) < 0:
                raise UsageError(f"--{flag.replace('_', '-')} {getattr(self, flag)} is invalid: use 0 or more")
        for flag in ("batch_size", "eval_every", "signal_check_steps"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {getattr(self, flag)} is invalid: use 1 or more")
        for flag in ("lr", "subnet_lr", "finetune_lr", "baseline_lr", "level_lr"):
            value = getattr(self, flag)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UsageError(f"--{flag.replace('_', '-')} {value} is invalid: use a positive learning rate")
        for flag in ("train_samples", "test_samples", "nproc", "threads", "image_size", "subnet_batch_size",
                     "global_batch_size", "groups", "subnet_eval_every"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {value} is invalid: use 1 or more")
        for flag in ("timeout", "io_timeout"):  # (below a second, a busy rank is taken for a lost one; past
            value = getattr(self, flag)           # ~1e9 s, torch's timeouts overflow: a traceback, or 0 s)
            if not TIMEOUT_RANGE[0] <= value <= TIMEOUT_RANGE[1]:
                raise UsageError(f"--{flag.replace('_', '-')} {value} is invalid: use {TIMEOUT_RANGE[0]} to "
                                 f"{TIMEOUT_RANGE[1]:,} seconds (30 days)")
        for flag in ("workers", "warmup_epochs", "finetune_warmup_epochs", "momentum", "weight_decay",
                     "offdiag_std", "log_every"):
            value = getattr(self, flag)
            if value is not None and not (value >= 0 and math.isfinite(value)) and flag != "momentum":
                raise UsageError(f"--{flag.replace('_', '-')} {value} is invalid: use 0 or more")
        if not 0 <= self.momentum < 1:
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
        if self.only_group is not None and self.groups is not None and self.subnets % self.groups:
            # the task's own ranks do not use it, the final job would refuse it (its ranks unknown here)
            divisors = [g for g in range(1, self.subnets + 1) if self.subnets % g == 0]
            raise UsageError(f"--groups {self.groups} does not divide the {self.subnets} sub-networks, so the "
                             f"final job could not use it: choose one of {', '.join(map(str, divisors))} (or leave it out)")
        if self.cache_dir is not None and self.dataset in ("synthetic", "cifar10", "cifar100"):
            raise UsageError(f"--cache-dir is for image files (food101, imagefolder); {self.dataset} is "
                             "held in memory already: drop --cache-dir")
        for flag in ("cache_dir", "out"):
            value = getattr(self, flag)
            if value is not None and not value.strip():  # an unset $VAR in a script
                raise UsageError(f"--{flag.replace('_', '-')} {value!r} is empty: give a folder (a variable it "
                                 "names may be unset)")
        if abs(self.seed) > 2 ** 53:  # (torch takes 64 bits, and the nets' seeds are seed * 1000 + k)
            raise UsageError(f"--seed {self.seed} is out of range: use one from -2**53 to 2**53")
        if self.dataset == "imagefolder" and not self.data_dir:  # the others say so when loading
            raise UsageError(f"--dataset {self.dataset} needs --data-dir DIR ({DATASETS[self.dataset].where})")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:  # at start, not an epoch in
            raise UsageError("--tensorboard needs the tensorboard package: pip install 'dd_mpi[tensorboard]', "
                             "or drop the flag")
        return self

    overridden: ClassVar[dict] = {}  # parse_config's: a --config key -> (its value, the flag's that won)

    def unused_flags(self) -> list[str]:
        """Flags (and --config keys) given that this run does not read: said once, not refused
        (a config file or a script may set them for other runs), so that a forgotten --dataset
        does not train the built-in synthetic set on the quiet."""
        notes = []
        for key, (in_file, given) in self.overridden.items():
            flag = f"--{key.replace('_', '-')}"
            notes.append(f"{key}: {in_file} in --config {self.config} is not used: {flag} {given} on the command "
                         "line wins" + (" (the slurm/ job scripts give --out: give yours after the script's name)"
                                        if key == "out" else ""))
        if "baseline" in self.strategies and self.baseline_epochs == 0:
            notes.append(f"--baseline-epochs 0 with --strategy {self.strategy}: the conventional net is not trained, "
                         "and its row (random_T) is an untrained net: use --strategy dd to leave it out")
        if "dd" in self.strategies:  # (an epoch count of 0 trains nothing there: its rows say less than they seem)
            untrained = [(self.subnet_epochs, "--subnet-epochs 0: the sub-nets are not trained: their rows "
                          "(sub_net_k) and the composed net's (transfer) are untrained nets"),
                         (self.level_epochs or len(self.level_counts) == 2, "--level-epochs 0: the intermediate "
                          "nets are not fine-tuned: their _T rows are the nets as composed"),
                         (self.finetune_epochs, "--finetune-epochs 0: the composed net is not fine-tuned: its "
                          "transfer_T row is the net as composed (transfer)")]
            notes += [note for epochs, note in untrained if not epochs]
        if self.data_dir and self.dataset == "synthetic":
            on_disk = ", ".join(name for name in DATASETS if name != "synthetic")
            notes.append(f"--data-dir {self.data_dir} is not read: --dataset synthetic (the default) is built in; "
                         f"give --dataset ({on_disk}) to train on it")
        if self.groups is not None and "dd" not in self.strategies:
            notes.append(f"--groups {self.groups} is not used: --strategy {self.strategy} has no phase 1")
        defaults = RunConfig()
        level_flags = [f"--{k.replace('_', '-')} {getattr(self, k)}" for k in ("levels", "level_epochs", "level_lr")
                       if getattr(self, k) != getattr(defaults, k)]
        if "dd" not in self.strategies:
            why = f"--strategy {self.strategy} has no phase 1"
        else:  # (--levels N,1 is the default itself)
            level_flags = [flag for flag in level_flags if not flag.startswith("--levels ")]
            why = "no level lies between the sub-networks and the global net (--levels N,...,1 adds some)"
        if level_flags and ("dd" not in self.strategies or len(self.level_counts) == 2):
            notes.append(f"{' and '.join(level_flags)} {'are' if len(level_flags) > 1 else 'is'} not used: {why}")
        return notes

    def _validate_levels(self) -> None:
        if self.levels is None:
            return
        text = f"--levels {self.levels}"
        try:
            counts = [int(v) for v in self.levels.split(",")]
        except ValueError:
            raise UsageError(f"{text} is invalid: give nets per level, e.g. 16,4,1") from None
        if min(counts) < 1:
            raise UsageError(f"{text} is invalid: each level has 1 net or more, e.g. 16,4,1")
        if len(counts) < 2 or counts[-1] != 1:
            raise UsageError(f"{text} is invalid: at least two levels, the last 1 (the global net), e.g. 16,4,1")
        if counts[0] != self.subnets:
            raise UsageError(f"{text} starts at {counts[0]} nets but --subnets is {self.subnets}: "
                             f"start the levels at {self.subnets} (or change --subnets)")
        if counts == [1, 1]:  # what --subnets 1 means without --levels
            return
        for before, after in zip(counts, counts[1:]):
            if after >= before or before % after:
                raise UsageError(f"{text} is invalid: each count must divide the one before and be smaller "
                                 f"({after} after {before})")

    # Settings that change what is trained: a resumed run must agree on all of them.
    SHAPING = ("arch", "width", "subnets", "shortcut", "dataset", "subnet_data", "image_size",
               "train_samples", "test_samples", "seed", "offdiag_std", "batch_size", "lr",
               "subnet_lr", "finetune_lr", "baseline_lr", "schedule", "subnet_epochs",
               "finetune_epochs", "baseline_epochs", "strategy", "label_smoothing",
               "momentum", "weight_decay", "warmup_epochs", "finetune_warmup_epochs",
               "level_epochs", "level_lr", "subnet_batch_size", "global_batch_size", "groups", "nesterov",
               "bn_weight_decay", "warmup_style")

    def incompatible_with(self, saved: dict, default_groups: int | None = None, *,
                          layout_free: bool = False) -> list[str]:
        """'flag: saved -> now' for every shaping setting that differs from a saved config
        (a setting the saved config predates counts as its default). ``default_groups``: the
        G that no --groups gives on this job's ranks, the same as giving it. ``layout_free``:
        --groups left out (a checkpoint's nets are the same in any layout)."""
        defaults = RunConfig()

        def same(key: str, before, now) -> bool:
            if key == "groups" and layout_free:
                return True
            if key == "groups" and default_groups is not None:
                before, now = (default_groups if g is None else g for g in (before, now))
            return before == now

        differ = [f"--{k.replace('_', '-')}: {saved.get(k, getattr(defaults, k))!r} -> {getattr(self, k)!r}"
                  for k in self.SHAPING if not same(k, saved.get(k, getattr(defaults, k)), getattr(self, k))]
        saved_subnets = saved.get("subnets", defaults.subnets)
        saved_counts = _level_counts(saved.get("levels"), saved_subnets)
        if saved_subnets == self.subnets and saved_counts != self.level_counts:  # "4,1" is the default 4
            differ.append(f"--levels: {','.join(map(str, saved_counts))} -> {','.join(map(str, self.level_counts))}")
        if (saved.get("cache_dir") is None) != (self.cache_dir is None):  # where it is may change, not whether
            differ.append(f"--cache-dir: {saved.get('cache_dir')!r} -> {self.cache_dir!r} (a cache's crops "
                          "are of the stored square, the files' of the whole image)")
        return differ

    def checkpoint_differences(self, saved: dict) -> list[str]:
        """``incompatible_with`` a checkpoint's settings: in any layout (a net is the same in all)."""
        return self.incompatible_with(saved, layout_free=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_saved_config(path: Path) -> dict | None:
    """A run's saved config.json (what ``incompatible_with`` compares against), or None when it
    is missing, unreadable or valid JSON that is no run's settings (a hand edit)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _level_counts(levels: str | None, subnets: int) -> list[int]:
    if levels is None:
        return [subnets, 1] if subnets > 1 else [1, 1]
    return [int(v) for v in levels.split(",")]


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r} is unknown: choose one of {', '.join(map(str, choices))}")


# ---------------------------------------------------------------------------------------
# The command line and config files
class _FlagParser(argparse.ArgumentParser):
    """A flag argparse cannot parse is bad input like any other: one line, printed once per
    job (not the 30-line usage on every rank)."""

    def error(self, message: str):
        raise UsageError(f"{message} (dd-train --help lists the flags)")


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    presets = "\n".join(f"  {name:<22} {p['_doc']}" for name, p in PRESETS.items())
    parser = _FlagParser(
        prog="dd-train",
        allow_abbrev=False,  # a flag is spelled out: wrappers that look for one (--out) see it as dd-train does
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Domain-decomposition training: N narrow sub-nets trained by rank groups, "
                    "composed into the wide net, fine-tuned by all ranks.",
        epilog=f"presets (--preset NAME; later flags override):\n{presets}\n\n"
               "launch: dd-train --nproc 4 | torchrun --nproc-per-node 4 -m dd_mpi | "
               "mpiexec -n 4 dd-train | srun dd-train | horovodrun -np 4 dd-train --backend horovod")
    add_version(parser)
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


def mistyped_keys(saved: dict) -> list[str]:
    """The keys of a saved config (a report's, by hand edited) whose value is not their flag's
    type, which the readers of a run's files would meet as a TypeError deep inside."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    bad = []
    for key, value in saved.items():
        field = fields.get(key)
        if field is None or (value is None and "None" in str(field.type)):
            continue
        if isinstance(field.default, bool):
            fits = isinstance(value, bool)
        elif _field_type(field) is str:
            fits = isinstance(value, str)
        else:
            fits = (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and (_field_type(field) is float or isinstance(value, int)))
        if not fits:
            bad.append(key)
    return bad


NOT_SETTINGS = ("config", "print_config", "nproc")  # how a job was started, not what it runs
JOB_ONLY = NOT_SETTINGS + ("out", "resume", "only_group")  # a job's, not a run's settings
# may differ from node to node: paths and resources of a node's own, and --resume, which a
# restart sets where the launcher counted one (torchrun counts it on the failed node's agent only)
PER_NODE = NOT_SETTINGS + ("data_dir", "cache_dir", "threads", "workers", "out", "resume")


def ranks_disagree(settings: list[tuple[str, dict]]) -> str | None:
    """Why the ranks cannot run together, from each rank's (host, ``to_dict()``), or None: the
    first rank whose settings differ from rank 0's (outside ``PER_NODE``; another --out that
    is not the same folder is found where the run's folder is made). Two torchrun nodes
    started with another --seed trained half the sub-nets from it, silently (config.json said
    rank 0's); with another --subnets the ranks hung at the composition."""
    host0, first = settings[0]
    for rank, (host, mine) in enumerate(settings):
        differ = [f"--{key.replace('_', '-')} {mine[key]} (rank 0: {first[key]})"
                  for key in first if key not in PER_NODE and mine.get(key) != first[key]]
        if differ:
            return (f"rank {rank} (on {host}) was started with other settings than rank 0 (on {host0}): "
                    f"{', '.join(differ)}: start every rank with the same flags and config file")
    return None


def read_config_file(path: str) -> dict:
    """RunConfig's keys from a YAML file, checked: an unknown key or a value of the wrong
    type is one line naming the key and the file."""
    import yaml
    if not path.strip():  # an unset $VAR in a script: it read as no file, and the defaults ran
        raise UsageError(f"--config {path!r} is empty: give a YAML file (a variable it names may be unset)")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=_yaml_loader()) or {}  # noqa: S506 -- a SafeLoader
    except OSError as error:
        raise UsageError(f"--config {path}: {error.strerror}: give a readable YAML file") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config {path} is not UTF-8 text: save it as UTF-8 (or give the YAML file)") from None
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path} is not valid YAML ({str(error).splitlines()[0]}): fix the file") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of RunConfig keys (key: value lines)")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    saved_run = "print_config" in values  # a run's config.json: its settings, not its job's
    read = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if saved_run and name in JOB_ONLY:
            continue  # (its --out and --resume would continue that run; its --only-group train one sub-net)
        if name not in fields or name in ("config", "print_config"):
            raise UsageError(f"--config {path}: unknown key {key!r}: use dd-train's flag names "
                             "(dd-train --print-config lists them)")
        read[name] = _coerce(fields[name], value, f"--config {path}: {key}")
    return read


def _yaml_loader():
    """PyYAML's safe loader, but plain scalars other than null stay text, for ``_coerce`` to
    read as their key's type. PyYAML reads YAML 1.1, where 010 is 8 (octal), 12:30 is 750
    (base 60), 2024-06-01 a date and on/yes true: `out: 0755` became the folder 493. A key
    given twice (also as batch-size and batch_size) is refused, not the last one taken."""
    import yaml

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers
                    if tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

        def construct_mapping(self, node, deep=False):
            if any(key.tag == "tag:yaml.org,2002:merge" for key, _ in node.value):
                return super().construct_mapping(node, deep)  # (<<: keys it merges are given again on purpose)
            seen = set()
            for key_node, _ in node.value:
                name = str(self.construct_object(key_node, deep=True)).replace("-", "_")
                if name in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {name} is given twice (line {key_node.start_mark.line + 1})",
                        key_node.start_mark)
                seen.add(name)
            return super().construct_mapping(node, deep)

    return Loader


INTEGER = re.compile(r"[-+]?(0|[1-9][0-9]*)")  # no leading zero: YAML 1.1 reads 010 as octal


def _coerce(field: dataclasses.Field, value, where: str):
    """A config file's value (text, as ``_yaml_loader`` reads it) as the key's type."""
    if value is None:
        if "None" in str(field.type):
            return None
        raise UsageError(f"{where} may not be empty")
    kind = _field_type(field)
    if isinstance(field.default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UsageError(f"{where}: {value!r} is not true or false")
    if isinstance(value, str) and kind is int:
        if INTEGER.fullmatch(value):
            return int(value)
        if INTEGER.fullmatch(value.lstrip("+-").lstrip("0") or "0"):
            raise UsageError(f"{where}: {value!r} has a leading zero (an octal number in YAML 1.1): "
                             "write the number without it")
    if isinstance(value, str) and kind is float:
        try:
            return float(value)
        except ValueError:
            pass
    if kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool) and (
            kind is float or isinstance(value, int)):  # a tagged value (!!int 5) comes typed
        return kind(value)
    if isinstance(value, str) and kind is str:
        return value
    if field.name == "levels" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # `levels: [16, 4, 1]`, YAML's own list (checked as --levels 16,4,1)
    raise UsageError(f"{where}: {value!r} is not {'an integer' if kind is int else 'a number' if kind is float else 'text'}")


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Defaults, then the preset, then the config file, then the flags given (later wins).
    --batch-size and --global-batch-size are two ways to give one batch: the later layer's
    wins (in one layer --global-batch-size does, as in the plan)."""
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    from_file = read_config_file(args["config"]) if "config" in args else {}
    preset = args["preset"] if "preset" in args else from_file.get("preset")
    values = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r} is unknown: choose one of {', '.join(PRESETS)}")
        values.update({k: v for k, v in PRESETS[preset].items() if not k.startswith("_")})
    for layer in (from_file, args):
        values.update(layer)
        if "batch_size" in layer and "global_batch_size" not in layer:
            values["global_batch_size"] = None  # a per-rank batch given over a preset's global one
    try:
        cfg = RunConfig(**values).validate()
    except UsageError as error:  # a bad value the file gave: the flag's message, and where it came from
        key = str(error).split(" ", 1)[0].removeprefix("--").replace("-", "_")
        if key in from_file and key not in args:
            raise UsageError(f"{error} (given as {key} in --config {args['config']})") from None
        raise
    # (a job script's own --out beat the file's out: without a word, the run went elsewhere)
    cfg.overridden = {key: (from_file[key], args[key]) for key in from_file
                      if key in args and key != "config" and from_file[key] != args[key]}
    return cfg


def config_yaml(cfg: RunConfig) -> str:
    """The effective config as a YAML file that ``--config`` reads back (run-only keys out)."""
    import yaml
    text = yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k not in NOT_SETTINGS}, sort_keys=False)
    if cfg.global_batch_size is not None:  # an edit of batch_size alone did nothing, without a word
        text = text.replace("\nglobal_batch_size:", "\n# global_batch_size wins over batch_size: make it null to "
                            "give a batch per rank\nglobal_batch_size:", 1)
    return text
