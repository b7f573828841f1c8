"""What every dataset comes back as (the built-in synthetic set, CIFAR, Food-101, image
folders): a ``DatasetBundle`` of two splits, each in memory (``InMemorySplit``) or a torch Dataset.

Kept apart from ``formats``, which parses files with torchvision: importing torchvision costs
a rank about 2 s of CPU (its ``models`` and ``ops``), as much as torch itself, so a run on the
synthetic set (the demo, most of the tests' ranks) never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InMemorySplit:
    """A whole split as tensors: small datasets (CIFAR) live in memory, large ones can be a
    memory-mapped cache (``decoded``); augmentation is done by the trainer on batches."""

    images: torch.Tensor  # uint8, [N, C, H, W], contiguous
    labels: torch.Tensor  # int64, [N]
    crop_to: int | None = None  # None: images at training size (CIFAR's pad and crop); else
    # stored larger (a cache): random-resized crops to this size in training, the centre crop in testing


@dataclass(frozen=True)
class DatasetBundle:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    train: InMemorySplit | Dataset  # a Dataset yields (normalised float C×H×W, int label)
    test: InMemorySplit | Dataset
    class_names: tuple[str, ...]
    decode_size: int | None = None  # small images: decode once into memory at this size
    notes: tuple[str, ...] = ()  # for the log (rank 0): what was read otherwise than one may think


# verify_once(check): runs check on rank 0 only and hands its verdict (None or a message) to all
Verifier = Callable[[Callable[[], "str | None"]], "str | None"]
