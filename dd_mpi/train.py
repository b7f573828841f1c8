"""One model, one comm: the optimiser recipe, a training epoch, an exact evaluation.

Nothing here knows about phases or sub-networks: the pipeline calls it with the group comm
in phase 1 and the world comm in phase 3 and the baseline. Metrics stay on the device
during an epoch and are reduced once at its end (no per-step host sync).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .comm import Comm

REFERENCE_BATCH = 128  # --lr is the LR at this global batch (Goyal et al. 2017: linear scaling)


class NonFiniteLoss(RuntimeError):
    """The loss or the weights became NaN/inf: training stops, the last good checkpoint stays."""


@dataclass(frozen=True)
class Recipe:
    """Optimiser settings for one phase."""

    lr: float  # at REFERENCE_BATCH
    epochs: int
    warmup_epochs: float
    schedule: str  # cosine | step
    momentum: float
    weight_decay: float
    label_smoothing: float


def make_optimizer(model: nn.Module, recipe: Recipe, global_batch: int) -> torch.optim.Optimizer:
    """SGD + Nesterov; no weight decay on BN parameters and biases (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    lr = recipe.lr * global_batch / REFERENCE_BATCH
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """Per-step LR factor: linear warm-up, then cosine to 0 or x0.1 steps at 50% and 75%."""
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(total, int(round(recipe.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if recipe.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 0.1 ** sum(progress >= m for m in (0.5, 0.75))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochStats:
    loss: float
    top1: float  # percent, on the training batches seen
    samples: int  # over the whole comm
    seconds: float
    stopped: bool = False  # a stop was requested (signal) and the epoch was cut short
    stop_requested: bool = False  # a stop was requested after the epoch's last check: it is whole

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked (--precision bf16, or auto on a GPU); a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def train_epoch(model: nn.Module, batches, optimizer, scheduler, comm: Comm, *,
                label_smoothing: float, should_stop: Callable[[], bool],
                check_every: int, progress=None, bf16: bool = False) -> EpochStats:
    """One epoch. Every ``check_every`` steps the comm agrees on ``should_stop()``
    (a signal arrived on some rank): then the epoch ends early, marked ``stopped``."""
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    device = comm.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    start = time.perf_counter()
    stopped = False
    for step, (images, labels) in enumerate(batches):
        if step % check_every == 0 and step > 0 and comm.any(should_stop()):
            stopped = True
            break
        with autocast(device, bf16):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double() * labels.numel()
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += labels.numel()
        if progress is not None:
            progress.update(1)
    # the last step's update can overflow the weights while every loss seen was finite
    broken = torch.stack([~torch.isfinite(p).all() for p in model.parameters()]).any().double()
    late_stop = 0.0 if stopped else float(should_stop())  # agreed by the one reduction below
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64),
                          broken, torch.tensor(late_stop, device=device, dtype=torch.float64)])
    comm.allreduce_sum_(totals)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_total, correct_total, count, broken_ranks, late_stops = totals.tolist()
    if not math.isfinite(loss_total) or broken_ranks:
        raise NonFiniteLoss("loss or weights are not finite")
    count = max(count, 1.0)
    return EpochStats(loss_total / count, 100.0 * correct_total / count, int(count), seconds, stopped,
                      stop_requested=late_stops > 0)


@torch.no_grad()
def evaluate(model: nn.Module, batches, comm: Comm, num_classes: int, bf16: bool = False) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 10 classes), every test sample counted once."""
    model.eval()
    device = comm.device
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    k = min(5, num_classes)
    for images, labels in batches:
        with autocast(device, bf16):
            logits = model(images).float()
        totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.numel()
    comm.allreduce_sum_(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    result = {"loss": loss / count, "top1": 100.0 * top1 / count, "samples": int(count)}
    if num_classes > 10:
        result["top5"] = 100.0 * top5 / count
    return result
