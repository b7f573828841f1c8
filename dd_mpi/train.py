"""One model, one comm: the optimiser recipe, a training epoch, an exact evaluation.

Nothing here knows about phases or sub-networks: the pipeline calls it with a group's comm
for the sub-nets and with the world's for the global net. A model may be k nets fused into
one (``models``: logits [B, k, C], labels [B, k]); every sum below is then per member, and
the loss is the sum of the members' losses, so each member gets its own gradient. Metrics
stay on the device during an epoch and are reduced once at its end (no per-step host sync).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

REFERENCE_BATCH = 128  # --lr is the LR at this global batch (Goyal et al. 2017: linear scaling)


class NonFiniteLoss(RuntimeError):
    """The loss or the weights became NaN/inf: training stops, the last good checkpoint stays."""


@dataclass(frozen=True)
class Recipe:
    """Optimiser settings for one phase."""

    lr: float  # at REFERENCE_BATCH
    epochs: int
    warmup_epochs: float
    schedule: str  # cosine | step (x0.1 at 50 % and 75 %: He et al.'s 32k/48k of 64k iterations)
    momentum: float
    weight_decay: float
    label_smoothing: float
    nesterov: bool = True
    decay_all: bool = False  # weight decay on BN parameters and biases too (He et al.)
    warmup_style: str = "linear"  # linear ramp, or constant at LR/10 (He et al.'s ResNet-110)


def make_optimizer(model: nn.Module, recipe: Recipe, global_batch: int) -> torch.optim.Optimizer:
    """SGD with momentum; by default no weight decay on BN parameters and biases (1-D)."""
    decay = [p for p in model.parameters() if p.ndim > 1 or recipe.decay_all]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not recipe.decay_all]
    lr = recipe.lr * global_batch / REFERENCE_BATCH
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """Per-step LR factor: warm-up, then cosine to 0 or x0.1 steps at 50% and 75%."""
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(total, int(round(recipe.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 if recipe.warmup_style == "constant" else (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if recipe.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 0.1 ** sum(progress >= m for m in (0.5, 0.75))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochProgress:
    """An epoch under way: the next step and what its steps have summed so far. Saved when a
    stop signal cuts an epoch short (sums reduced over the comm), so that the resumed epoch
    continues from that step and reports the same numbers as an uninterrupted one."""

    step: int = 0
    loss_sum: list[float] = field(default_factory=list)  # per member
    correct: list[float] = field(default_factory=list)  # per member
    seen: float = 0.0  # samples per member, over the comm
    seconds: float = 0.0


@dataclass
class EpochStats:
    loss: list[float]  # per member
    top1: list[float]  # percent, on the training batches seen, per member
    samples: int  # per member, over the whole comm
    seconds: float
    members: int = 1
    stopped: EpochProgress | None = None  # a stop cut the epoch short: where it stood
    stop_requested: bool = False  # a stop was requested after the epoch's last check: it is whole
    lr: float | None = None  # the LR its last step took (after it, the scheduler holds the next step's)

    @property
    def images_per_s(self) -> float:
        """Images trained per second, all members together."""
        return self.samples * self.members / self.seconds if self.seconds > 0 else 0.0


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision where asked (bf16 or fp16 autocast); a no-op context for fp32."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def member_losses(logits: torch.Tensor, labels: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
    """Each member's mean loss over its batch: [k] (k = 1 for a plain net)."""
    if logits.dim() == 2:
        return criterion(logits, labels).mean()[None]
    # member by member, on contiguous copies: the very ops (and roundings) of a plain net's loss
    return torch.stack([criterion(logits[:, j].contiguous(), labels[:, j].contiguous()).mean()
                        for j in range(logits.shape[1])])


def train_epoch(model: nn.Module, batches, optimizer, scheduler, comm, *, members: int = 1,
                label_smoothing: float, should_stop: Callable[[], bool], check_every: int,
                progress=None, precision: str = "fp32", scaler=None,
                resume: EpochProgress | None = None) -> EpochStats:
    """One epoch (from ``resume.step`` when given). Every ``check_every`` steps the comm
    agrees on ``should_stop()`` (a signal arrived on some rank): then the epoch stops early
    and ``stopped`` says where."""
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="none")
    device = comm.device
    loss_sum = torch.zeros(members, device=device, dtype=torch.float64)
    correct = torch.zeros(members, device=device, dtype=torch.float64)
    seen, step, before, lr = 0, 0, 0.0, None
    if resume is not None and comm.rank == 0:  # the sums so far are the comm's: added once
        loss_sum += torch.tensor(resume.loss_sum, device=device, dtype=torch.float64)
        correct += torch.tensor(resume.correct, device=device, dtype=torch.float64)
        seen = int(resume.seen)
    if resume is not None:
        step, before = resume.step, resume.seconds
    start = time.perf_counter()
    stopped = False
    for images, labels in batches:
        if step % check_every == 0 and step > (resume.step if resume else 0) and comm.any(should_stop()):
            stopped = True
            break
        torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA graphs (if any) may reuse outputs
        with autocast(device, precision):
            logits = model(images)
            losses = member_losses(logits.float(), labels, criterion)
        loss = losses.sum()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            comm.scaled_step(optimizer, scaler)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        batch = labels.shape[0]
        loss_sum += losses.detach().double() * batch
        hits = logits.detach().argmax(dim=-1) == labels
        correct += (hits if hits.dim() == 2 else hits[:, None]).sum(dim=0).double()
        seen += batch
        step += 1
        if progress is not None:
            progress.update(loss_sum, seen)
    # the last step's update can overflow the weights while every loss seen was finite
    broken = torch.stack([~torch.isfinite(p).all() for p in model.parameters()]).any().double()
    late_stop = 0.0 if stopped else float(should_stop())  # agreed by the one reduction below
    scalars = torch.tensor([float(seen), 0.0, late_stop], device=device, dtype=torch.float64)
    scalars[1] = broken
    totals = comm.allreduce_sum_(torch.cat([loss_sum, correct, scalars]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = before + time.perf_counter() - start
    loss_total, correct_total = totals[:members].tolist(), totals[members:2 * members].tolist()
    count, broken_ranks, late_stops = totals[2 * members:].tolist()
    if not all(math.isfinite(v) for v in loss_total) or broken_ranks:
        raise NonFiniteLoss("loss or weights are not finite")
    if stopped:
        where = EpochProgress(step, loss_total, correct_total, count, seconds)
        return EpochStats([], [], int(count), seconds, members, stopped=where)
    count = max(count, 1.0)
    return EpochStats([v / count for v in loss_total], [100.0 * c / count for c in correct_total],
                      int(count), seconds, members, stop_requested=late_stops > 0, lr=lr)


@torch.no_grad()
def evaluate(model: nn.Module, batches, comm, num_classes: int, *, members: int = 1,
             precision: str = "fp32") -> list[dict[str, float]]:
    """Per member: top-1 (and top-5 when there are more than 10 classes), every test sample
    counted once. A fused net's members all see the same test images."""
    model.eval()
    device = comm.device
    totals = torch.zeros(members, 4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    k = min(5, num_classes)
    for images, labels in batches:
        with autocast(device, precision):
            logits = model(images).float()
        logits = logits if logits.dim() == 3 else logits[:, None]
        labels = labels if labels.dim() == 2 else labels[:, None]
        totals[:, 0] += nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(0).double()
        hits = logits.topk(k, dim=-1).indices == labels[..., None]
        totals[:, 1] += hits[..., 0].sum(0).double()
        totals[:, 2] += hits.any(dim=-1).sum(0).double()
        totals[:, 3] += labels.shape[0]
    comm.allreduce_sum_(totals)
    results = []
    for loss, top1, top5, count in totals.tolist():
        count = max(count, 1.0)
        result = {"loss": loss / count, "top1": 100.0 * top1 / count, "samples": int(count)}
        if num_classes > 10:
            result["top5"] = 100.0 * top5 / count
        results.append(result)
    return results
