"""The run as data: the levels of the method (and the baseline), built once from the config.

Level 0 trains N sub-nets from random init. Every later level composes each run of r
consecutive nets of the level before into one net (``decompose.compose``: exact, its logits
are the mean of its parts') and fine-tunes it; the last level is the global net, fine-tuned
by all ranks (the paper's phase 3). ``--levels 16,4,1`` composes in stages; the default
``N,1`` is the paper's method. Each level carries its layout of ranks (``layout``), its
recipe, its batch, its evaluation cadence and the names of its checkpoints and metrics, so
that one function runs any level (``pipeline.run_level``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RunConfig
from .decompose import subnet_spec
from .errors import UsageError
from .layout import Layout, choose_groups, layout_for
from .models import ModelSpec, smallest_normalised_map
from .train import Recipe


@dataclass(frozen=True)
class Level:
    index: int  # 0: the sub-nets; the last: the global net
    nets: int  # nets at this level
    spec: ModelSpec  # one net (composed nets: option A pads per sub-net)
    layout: Layout
    recipe: Recipe
    batch_size: int  # per rank and net
    eval_every: int  # test the nets every k epochs (and after the last)
    phase: str  # metrics' "phase": subnet | level<k> | finetune | baseline
    lr_flag: str  # the flag that sets this level's LR (named when its loss blows up)
    stream_base: int  # net j's data stream: stream_base + j (``stream``)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def world_wide(self) -> bool:
        """The global net trained by all ranks (the fine-tune, the baseline); not a lone
        sub-net (--subnets 1), which keeps its sub-net names."""
        return self.nets == 1 and not self.is_first

    @property
    def _net_prefix(self) -> str:
        return "subnet" if self.is_first else f"{self.phase}-net"

    def net_name(self, net: int) -> str:
        """The checkpoint name of one net's finished training (``<name>-final.pt``)."""
        if self.world_wide:
            return self.phase
        return f"{self._net_prefix}{net}"

    def group_name(self, nets: list[int]) -> str:
        """The checkpoint name of a group training ``nets`` fused (``-last``, ``-best``): a
        run ``subnet0-3``, other sets each member (``subnet0+3``: the rest of a group whose
        other nets finished elsewhere, as --only-group tasks), so no two sets share a name."""
        if len(nets) == 1:
            return self.net_name(nets[0])
        if list(nets) == list(range(nets[0], nets[-1] + 1)):
            return f"{self.net_name(nets[0])}-{nets[-1]}"
        return "+".join([self.net_name(nets[0]), *map(str, nets[1:])])

    def nets_named(self, name: str) -> list[int] | None:
        """The nets of a group named by ``group_name`` (None: not a set of this level's nets)."""
        prefix = self._net_prefix
        rest = name[len(prefix):] if name.startswith(prefix) and not self.world_wide else ""
        try:
            if "+" in rest:
                return [int(v) for v in rest.split("+")]
            first, _, last = rest.partition("-")
            return list(range(int(first), int(last or first) + 1))
        except ValueError:
            return None

    def stream(self, net: int) -> int:
        """Net ``net``'s data stream: ``stream_base + net`` while that stays in its base's
        room (sub-nets 100-199, fine-tune 200, baseline 300, level k 1000k-1000k+999: what
        runs so far used); beyond it (sub-net 100 would draw the fine-tune's data) one far
        above every base, still unique per level and net."""
        room = 100 if self.is_first else 1000
        return self.stream_base + net if net < room else (1 << 40) + self.stream_base * (1 << 20) + net


@dataclass(frozen=True)
class Plan:
    levels: tuple[Level, ...]
    baseline: Level | None  # the conventional run (--strategy baseline|both)
    global_spec: ModelSpec

    @property
    def subnets(self) -> int:
        return self.levels[0].nets


def level_layouts(cfg: RunConfig, world_size: int) -> list[Layout]:
    """Every level's layout of ranks (phase 1's ``--groups`` forced where given), without
    the data: what the engines need to create their groups before anything else."""
    counts = cfg.level_counts
    forced = None if cfg.only_group_mode else cfg.groups  # (the array's tasks share the final run's flags)
    layouts = [layout_for(world_size, m, forced if k == 0 else None) for k, m in enumerate(counts)]
    if cfg.only_group_mode:  # --only-group: this job's ranks all train that one sub-net
        layouts[0] = Layout(world_size, 1, 1)
    return layouts


def checked_layouts(cfg: RunConfig, world_size: int) -> list[Layout]:
    """``level_layouts`` (none without phase 1), with the split of the net into N checked too:
    what dd-train refuses before it starts anything (and a dd-scaling sweep before its first run)."""
    layouts = level_layouts(cfg, world_size) if "dd" in cfg.strategies else []
    if layouts:
        subnet_spec(cfg.model_spec(10), cfg.subnets)
    return layouts


def default_groups(cfg: RunConfig, world_size: int) -> int | None:
    """Phase 1's G on ``world_size`` ranks when --groups is left out (None: no phase 1, or an
    --only-group task, whose --groups is the final run's)."""
    if "dd" not in cfg.strategies or cfg.only_group_mode:
        return None
    return choose_groups(world_size, cfg.level_counts[0])


def comm_partitions(cfg: RunConfig, layouts: list[Layout]) -> list[list[list[int]]]:
    """Every split of the world the run will make, in order: each level's groups, and after
    every level but the last the leaders that send its nets to rank 0 (a one-list subset).
    Horovod registers them all at init; the torch engine creates them as it goes."""
    if not layouts or layouts[0].world_size == 1 or cfg.only_group_mode:
        return []  # (--only-group: this job's ranks all train one sub-net: no split)
    partitions: list[list[list[int]]] = []
    for k, layout in enumerate(layouts):
        partitions.append(layout.rank_lists)
        if k < len(layouts) - 1:
            partitions.append([layout.leaders])
    return partitions


def build_plan(cfg: RunConfig, layouts: list[Layout], world_size: int, num_classes: int) -> Plan:
    """The plan on ``layouts`` (``level_layouts``, computed once by the entry point)."""
    global_spec = cfg.model_spec(num_classes)
    counts = cfg.level_counts
    levels = []
    if "dd" in cfg.strategies:
        for k, (nets, layout) in enumerate(zip(counts, layouts)):
            spec = subnet_spec(global_spec, nets).with_width(global_spec.width / nets, counts[0] // nets)
            levels.append(_level(cfg, k, len(counts), nets, spec, layout))
    baseline = None
    if "baseline" in cfg.strategies:
        world = Layout(world_size, 1, 1)
        baseline = Level(-1, 1, global_spec, world, _recipe(cfg, "baseline", cfg.baseline_epochs, cfg.warmup_epochs),
                         _batch(cfg, cfg.batch_size, world), cfg.eval_every, "baseline", "--baseline-lr", 300)
    return Plan(tuple(levels), baseline, global_spec)


def _level(cfg: RunConfig, k: int, count: int, nets: int, spec: ModelSpec, layout: Layout) -> Level:
    if k == 0:
        recipe = _recipe(cfg, "subnet", cfg.subnet_epochs, cfg.warmup_epochs)
        # --subnet-batch-size is phase 1's own per-rank batch: it wins over --global-batch-size
        # (a preset's), which would otherwise set phase 1's batch too
        batch = cfg.subnet_batch_size or _batch(cfg, cfg.batch_size, layout)
        # the sub-nets' scores only inform (the composed net is what counts), and on a big test
        # set scoring every sub-net each epoch can cost phase 1 as much as its training
        every = cfg.subnet_eval_every or cfg.eval_every
        return Level(0, nets, spec, layout, recipe, batch, every, "subnet", "--subnet-lr", 100)
    if k == count - 1:
        recipe = _recipe(cfg, "finetune", cfg.finetune_epochs, cfg.finetune_warmup_epochs)
        return Level(k, nets, spec, layout, recipe, _batch(cfg, cfg.batch_size, layout), cfg.eval_every,
                     "finetune", "--finetune-lr", 200)
    recipe = _recipe(cfg, "level", cfg.level_epochs, cfg.finetune_warmup_epochs)
    return Level(k, nets, spec, layout, recipe, _batch(cfg, cfg.batch_size, layout), cfg.eval_every,
                 f"level{k}", "--level-lr", 1000 * k)


def _recipe(cfg: RunConfig, phase: str, epochs: int, warmup: float) -> Recipe:
    return Recipe(cfg.phase_lr(phase), epochs, warmup, cfg.schedule, cfg.momentum, cfg.weight_decay,
                  cfg.label_smoothing, cfg.nesterov, cfg.bn_weight_decay, cfg.warmup_style)


def _batch(cfg: RunConfig, per_rank: int, layout: Layout) -> int:
    """Per rank and net: ``per_rank``, or --global-batch-size over the net's ranks."""
    if cfg.global_batch_size is None:
        return per_rank
    ranks = layout.ranks_per_group
    if cfg.global_batch_size % ranks:
        raise UsageError(f"--global-batch-size {cfg.global_batch_size} is not divisible by the {ranks} ranks "
                         f"that train each net: launch a number of ranks dividing it, or change it")
    return cfg.global_batch_size // ranks


def pools(level: Level, plan: Plan, num_samples: int, cfg: RunConfig) -> list[torch.Tensor]:
    """Each net's training samples: all of them (``full``), or in ``shard`` mode sub-net j's
    shard j of N, and a composed net the union of its sub-nets' shards."""
    from .data import subset_for_group
    if level.world_wide or cfg.subnet_data == "full":  # (the baseline: also with no DD levels)
        return [torch.arange(num_samples)] * level.nets
    n = plan.subnets
    shards = [subset_for_group(num_samples, subnet_data=cfg.subnet_data, group=j, groups=n, seed=cfg.seed)
              for j in range(n)]
    per_net = n // level.nets
    return [torch.cat(shards[j * per_net:(j + 1) * per_net]).sort().values for j in range(level.nets)]


def refuse_empty_epochs(plan: Plan, num_samples: int, cfg: RunConfig, image_size: int) -> None:
    """A net with fewer samples an epoch than the ranks that share it would take no step at
    all and finish "trained" at chance; one whose steps take one image a rank cannot train
    where its maps shrink to 1x1 (BatchNorm has one value per channel): both refused before
    anything runs."""
    for level in (*plan.levels, *([plan.baseline] if plan.baseline else [])):
        take = min(len(pool) for pool in pools(level, plan, num_samples, cfg))
        ranks = level.layout.ranks_per_group
        if level.recipe.epochs and min(level.batch_size, take // ranks) == 1 \
                and smallest_normalised_map(level.spec, image_size) == 1:
            fix = ("a batch of 2 or more per rank" if level.batch_size == 1 else
                   "more samples per rank (--train-samples" + (", fewer ranks)" if ranks > 1 else ")"))
            raise UsageError(f"{level.phase}: each step takes 1 image per rank, and {level.spec.arch} at "
                             f"{image_size} px has a 1x1 feature map, where BatchNorm needs 2 values per channel "
                             f"to train: give {fix} or a larger --image-size")
        if level.recipe.epochs and take < ranks:
            shard = " (--subnet-data shard splits them)" if take < num_samples else ""
            fixes = ["more samples (--train-samples)", *(["fewer ranks"] if ranks > 1 else []),
                     *(["--subnet-data full or fewer --subnets"] if shard else [])]
            who = f"the {ranks} ranks that train it" if ranks > 1 else "the rank that trains it"
            raise UsageError(f"{level.phase}: each net has {take} training samples of {num_samples}{shard} for "
                             f"{who}, so no step to take: give "
                             + ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1])
