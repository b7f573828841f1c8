"""Which samples each rank sees, and batches of them, for every phase.

Index plans are pure functions of (seed, stream, epoch, rank in the comm), so a resumed run
sees exactly the data order of an uninterrupted one, and a net's data does not depend on
which rank, or beside which other nets, it trains. Small datasets (synthetic, CIFAR, small
ImageFolders) stay in memory (on the GPU when there is one) as uint8 and are augmented per
batch with tensor ops, and so are large image sets cached with --cache-dir (memory-mapped,
random-resized crops); without a cache, large image files go through a DataLoader with workers.

A batch for k nets fused into one (``models``) stacks the nets' own batches along channels:
images [B, 3k, H, W], labels [B, k]; each net keeps its own samples and augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .bundle import DatasetBundle, InMemorySplit
from .datasets import split_size
from .errors import UsageError
from .launch import worker_ignores_stop_signals


def generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2 ** 62)
    return torch.Generator().manual_seed(seed)


def subset_for_group(num_samples: int, *, subnet_data: str, group: int, groups: int, seed: int) -> torch.Tensor:
    """The training samples sub-network ``group`` draws from: all, or its shard k of N."""
    if subnet_data == "full" or groups == 1:
        return torch.arange(num_samples)
    order = torch.randperm(num_samples, generator=generator(seed, 77))  # fixed across epochs
    return order[group * num_samples // groups:(group + 1) * num_samples // groups].sort().values


def train_indices(pool: torch.Tensor, *, seed: int, stream: int, epoch: int, rank: int, size: int,
                  take: int | None = None) -> torch.Tensor:
    """This rank's samples for one training epoch: the pool reshuffled per epoch and dealt
    out whole, every sample to exactly one rank; the first ``len(pool) % size`` ranks get one
    more than the rest (it rides in their last batch, see ``train_steps``).

    ``take``: only the first ``take`` of the reshuffled pool. Nets trained fused need equal
    epochs, and N shards of a set N does not divide differ by one sample: each then leaves a
    different sample out each epoch."""
    shuffled = pool[torch.randperm(len(pool), generator=generator(seed, stream, epoch))][:take]
    base, extra = divmod(len(shuffled), size)
    start = rank * base + min(rank, extra)
    return shuffled[start:start + base + (rank < extra)]


def train_steps(pool_size: int, size: int, batch_size: int) -> int:
    """Optimizer steps per training epoch, the same on every rank (DDP needs that): the
    batches of the smaller parts. A rank with one sample more puts it into its last batch
    instead of taking a step the others would not; so does a last batch of one sample, which
    BatchNorm cannot train on where a map is 1x1 (resnet50's last stage at 32 px). (With
    fewer samples than ranks there is nothing to step on and the epoch is empty.)"""
    per_rank = pool_size // size
    if per_rank > batch_size and per_rank % batch_size == 1:
        return per_rank // batch_size
    return -(-per_rank // batch_size)


def batch_slices(count: int, batch_size: int, steps: int | None = None) -> list[slice]:
    """Batches of ``batch_size`` over ``count`` samples; with ``steps``, exactly that many,
    the last taking the rest (so it may hold up to two more than ``batch_size``)."""
    if steps is None:
        steps = -(-count // batch_size)
    if steps == 0:
        return []
    last = (steps - 1) * batch_size
    return [slice(i * batch_size, (i + 1) * batch_size) for i in range(steps - 1)] + [slice(last, count)]


def eval_indices(num_samples: int, *, rank: int, size: int) -> torch.Tensor:
    """Exact evaluation: every sample on exactly one rank, none dropped, none padded (a rank
    beyond the last sample gets none)."""
    return torch.arange(rank, max(rank, num_samples), size)


@dataclass(frozen=True)
class Stream:
    """One net's training data: the samples it draws from and its random stream."""

    pool: torch.Tensor
    stream: int
    take: int | None = None  # samples per epoch (None: the whole pool); see epoch_samples


def epoch_samples(streams: list[Stream]) -> int:
    """Samples per net and epoch when ``streams`` train fused: equal for all. A level's
    streams carry its smallest pool as ``take`` (``pipeline.streams_of``), so a net trains
    the same epochs alone or fused with any others: N shards of a set N does not divide
    differ by one sample."""
    return min(len(s.pool) if s.take is None else s.take for s in streams)


@dataclass
class Batches:
    """One epoch of batches for this rank (iterate once): one index list per fused net."""

    split: object  # InMemorySplit or a torch Dataset
    indices: list[torch.Tensor]  # per net, all of one length
    batch_size: int
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    generators: list[torch.Generator] | None = None  # per net; None: no augmentation (evaluation)
    loader: DataLoader | None = None
    steps: int | None = None  # training: the step count every rank takes (train_steps)
    start_step: int = 0  # a resumed epoch continues here
    replicate: int = 1  # evaluation of k fused nets: every net sees the same images

    @property
    def members(self) -> int:
        return max(len(self.indices), self.replicate)

    def slices(self) -> list[slice]:
        return batch_slices(len(self.indices[0]), self.batch_size, self.steps)[self.start_step:]

    def __len__(self) -> int:
        return len(self.slices())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._in_memory() if isinstance(self.split, InMemorySplit) else self._from_loader()
        for images, labels in batches:
            if self.replicate > 1:
                images, labels = images.repeat(1, self.replicate, 1, 1), labels[:, None].expand(-1, self.replicate)
            yield images.contiguous(memory_format=torch.channels_last), labels

    def _from_loader(self):
        k = len(self.indices)
        try:
            for images, labels in self.loader:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                if k > 1:  # the loader's batch is net 0's samples, then net 1's, ...
                    n, c, h, w = images.shape
                    images = images.view(k, n // k, c, h, w).transpose(0, 1).reshape(n // k, k * c, h, w)
                    labels = labels.view(k, n // k).t()
                yield images, labels
        except UsageError as error:  # from a worker: keep the one line, drop the traceback
            last = str(error).strip().splitlines()[-1]
            raise UsageError(last.split("UsageError: ", 1)[-1], everywhere=False) from None

    def _in_memory(self):
        # Everything random or indexed is drawn for the whole epoch and moved to the device
        # once: per-batch host-to-device copies of small tensors each wait for the GPU queue.
        # The k fused nets' batches are gathered, augmented and normalised as one batch of
        # k·n images (net 0's, then net 1's, ...; every op is per image, so each image's
        # values are those of its net trained alone): one launch per op, not k, which is what
        # a GPU's step time is made of at these sizes (BENCHMARKS.md §6).
        images_device = self.split.images.device
        stored, crop_to = self.split.images.shape[2], self.split.crop_to
        k = len(self.indices)
        indices = torch.stack(self.indices).to(images_device)  # [k, epoch samples]
        crops = None
        if self.generators is not None:
            draw = draw_crop_flip if crop_to is None else draw_resized_crops
            crops = [torch.stack(drawn).to(images_device)  # per crop parameter: [k, epoch samples]
                     for drawn in zip(*(draw(indices.shape[1], stored, g) for g in self.generators))]
            augment = random_crop_flip if crop_to is None else partial(resized_crop_flip, size=crop_to)
        for part in self.slices():
            idx = indices[:, part].reshape(-1)
            images = self.split.images.index_select(0, idx).to(self.device, non_blocking=True)
            if crops is not None:
                images = augment(images, *(t[:, part].reshape(-1).to(self.device) for t in crops))
            elif crop_to is not None:
                images = centre_crop(images, crop_to)
            images = (images.float().div_(255) - self.mean) / self.std
            labels = self.split.labels.index_select(0, idx).to(self.device, non_blocking=True)
            if k > 1:  # as the loader's batches: net j's images are channels 3j..3j+2
                n, c, h, w = images.shape
                images = images.view(k, n // k, c, h, w).transpose(0, 1).reshape(n // k, k * c, h, w)
                labels = labels.view(k, n // k).t()
            yield images, labels


def draw_crop_flip(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Crop offsets (dy, dx in 0..2*size/8) and flips for ``n`` images, from ``generator``."""
    pad = size // 8
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return dy, dx, flip


def random_crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """CIFAR augmentation on a uint8 batch: zero-pad by size/8, crop at (dy, dx), h-flip
    where ``flip``; one gather, no per-image loop."""
    n, _, h, w = images.shape
    pad = h // 8
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def draw_resized_crops(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random-resized-crop boxes (the ImageNet recipe: 8-100 % of the area, aspect 3/4-4/3)
    in a ``size``-square image, and flips, for ``n`` images: (left, top, width, height) in
    whole pixels. One draw per image where torchvision retries up to ten: a box that would
    not fit is clipped to the image (its aspect then nearer 1)."""
    area = torch.empty(n).uniform_(0.08, 1.0, generator=generator) * size * size
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    width = (area * log_ratio.exp()).sqrt().round().clamp(1, size).long()
    height = (area / log_ratio.exp()).sqrt().round().clamp(1, size).long()
    left = (torch.rand(n, generator=generator) * (size - width + 1)).long()
    top = (torch.rand(n, generator=generator) * (size - height + 1)).long()
    flip = torch.rand(n, generator=generator) < 0.5
    return left, top, width, height, flip


def resized_crop_flip(images: torch.Tensor, left: torch.Tensor, top: torch.Tensor, width: torch.Tensor,
                      height: torch.Tensor, flip: torch.Tensor, *, size: int, batched: bool | None = None) -> torch.Tensor:
    """Each image's box resampled bilinearly to ``size``×``size``, h-flipped where ``flip``.
    On a GPU one ``grid_sample`` for the batch (float out); on a CPU a uint8 resize per image,
    ~3x faster there (``batched`` forces either; they agree to within rounding). The box is
    at most 1.14x the output (the cache stores 256 px for 224): no antialiasing needed."""
    if not (images.device.type != "cpu" if batched is None else batched):
        boxes = torch.stack([left, top, width, height], 1).tolist()
        crops = [F.interpolate(images[i:i + 1, :, t:t + h, l:l + w], size=(size, size), mode="bilinear",
                               align_corners=False) for i, (l, t, w, h) in enumerate(boxes)]
        out = torch.cat(crops)
        return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)
    n, _, h, w = images.shape
    left, top, width, height = (t.to(images.device, torch.float32) for t in (left, top, width, height))
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = width / w * torch.where(flip.to(images.device), -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + width) / w - 1
    theta[:, 1, 1] = height / h
    theta[:, 1, 2] = (2 * top + height) / h - 1
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    # sample inside the box only (its edge pixels repeat), as a crop followed by a resize does
    low = torch.stack([(2 * left + 1) / w - 1, (2 * top + 1) / h - 1], 1).view(n, 1, 1, 2)
    high = torch.stack([(2 * (left + width) - 1) / w - 1, (2 * (top + height) - 1) / h - 1], 1).view(n, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, high), low)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop on a batch (same offsets)."""
    top, left = int(round((images.shape[2] - size) / 2.0)), int(round((images.shape[3] - size) / 2.0))
    return images[:, :, top:top + size, left:left + size]


class DataPlan:
    """Builds each epoch's batches for one comm; keeps DataLoader workers alive across epochs."""

    def __init__(self, data: DatasetBundle, device: torch.device, *, seed: int, batch_size: int,
                 workers: int = 0):
        self.data, self.device, self.seed = data, device, seed
        self.batch_size, self.workers = batch_size, workers  # batch_size: evaluation, and the default
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        for split in (data.train, data.test):
            if isinstance(split, InMemorySplit) and split.crop_to is None and device.type == "cuda":
                object.__setattr__(split, "images", split.images.to(device))
                object.__setattr__(split, "labels", split.labels.to(device))
        self._loaders: dict[int, tuple[DataLoader, _IndexBatches]] = {}

    def train(self, comm, pool: torch.Tensor, *, stream: int, epoch: int, batch_size: int | None = None,
              start_step: int = 0) -> Batches:
        """One net's epoch on this rank."""
        return self.train_fused(comm, [Stream(pool, stream)], epoch=epoch, batch_size=batch_size,
                                start_step=start_step)

    def train_fused(self, comm, streams: list[Stream], *, epoch: int, batch_size: int | None = None,
                    start_step: int = 0) -> Batches:
        """An epoch of k nets trained as one: each net its own pool, stream and augmentation,
        ``epoch_samples(streams)`` samples each."""
        batch_size = batch_size or self.batch_size
        take = epoch_samples(streams)
        indices = [train_indices(s.pool, seed=self.seed, stream=s.stream, epoch=epoch, rank=comm.rank,
                                 size=comm.size, take=take) for s in streams]
        gens = [generator(self.seed, s.stream, epoch, comm.rank, 1) for s in streams]  # rank in the comm
        steps = train_steps(take, comm.size, batch_size)
        return self._batches(self.data.train, indices, gens, steps, batch_size, start_step)

    def test(self, comm, members: int = 1) -> Batches:
        indices = eval_indices(split_size(self.data.test), rank=comm.rank, size=comm.size)
        batches = self._batches(self.data.test, [indices], None, None, self.batch_size, 0)
        batches.replicate = members
        return batches

    def _batches(self, split, indices: list[torch.Tensor], gens, steps, batch_size: int, start_step: int) -> Batches:
        batches = Batches(split, indices, batch_size, self.device, self.mean, self.std, gens, None, steps,
                          start_step)
        if not isinstance(split, InMemorySplit):
            batches.loader = self._loader(split, batches)
        return batches

    def _loader(self, split, batches: Batches) -> DataLoader:
        if id(split) not in self._loaders:
            sampler = _IndexBatches()
            loader = DataLoader(_SeededSamples(split), batch_sampler=sampler, num_workers=self.workers,
                                worker_init_fn=worker_ignores_stop_signals,
                                pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0)
            self._loaders[id(split)] = (loader, sampler)
        loader, sampler = self._loaders[id(split)]
        keys = []
        for j, indices in enumerate(batches.indices):
            gen = None if batches.generators is None else batches.generators[j]
            seeds = [None] * len(indices) if gen is None else torch.randint(2 ** 62, (len(indices),), generator=gen).tolist()
            keys.append(list(zip(indices.tolist(), seeds)))
        sampler.keys, sampler.slices = keys, batches.slices()
        return loader


class _SeededSamples(Dataset):
    """Each sample's augmentation seeded by its own key, (index, seed): the same crops and
    flips whichever worker loads it and however long the workers have lived, so persistent
    workers and a resumed run see exactly the data of an uninterrupted one."""

    def __init__(self, split: Dataset):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int | None]):
        index, seed = key
        if seed is not None:
            torch.manual_seed(seed)  # torchvision's random transforms draw from torch's RNG
        return self.split[index]


class _IndexBatches:
    """A batch sampler of (index, seed) keys set per epoch (works with persistent workers):
    each batch is net 0's keys of that step, then net 1's, ..."""

    def __init__(self):
        self.keys: list[list] = []
        self.slices: list[slice] = []

    def __iter__(self):
        for part in self.slices:
            yield [key for keys in self.keys for key in keys[part]]

    def __len__(self):
        return len(self.slices)

