"""Which samples each rank sees, and batches of them, for phase 1, phase 3 and the baseline.

Index plans are pure functions of (seed, group, epoch, rank), so a resumed run sees exactly
the data order of an uninterrupted one. Small datasets (synthetic, CIFAR) stay in memory
(on the GPU when there is one) as uint8 and are augmented per batch with tensor ops;
on-disk image datasets (Food-101, ImageFolder) go through a DataLoader with workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .comm import Comm
from .config import RunConfig
from .datasets import DatasetBundle, InMemorySplit, load_dataset
from .errors import UsageError
from .synthetic import make_synthetic


def load_data(cfg: RunConfig, world: Comm) -> DatasetBundle:
    """The dataset named by --dataset; integrity checks run once, on rank 0 (see datasets).

    After rank 0's check every rank parses its own view of --data-dir, and on a cluster that
    may be another copy (node-local disks): the ranks then compare what they read, so that a
    rank with other classes or other sample counts, or one whose parse failed, stops every
    rank with one line instead of training on other labels or leaving the others waiting."""
    if cfg.dataset == "synthetic":
        return make_synthetic(cfg.train_samples, cfg.test_samples, image_size=cfg.image_size or 32,
                              seed=cfg.seed)
    data, error = None, None
    try:
        data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size,
                            train_samples=cfg.train_samples, test_samples=cfg.test_samples,
                            verify_once=world.verdict_of_root)
    except UsageError as raised:
        error = str(raised)
    except (OSError, ValueError) as raised:  # this rank's copy would not parse (files, formats)
        error = f"--data-dir {cfg.data_dir}: {type(raised).__name__}: {raised}"
    seen = None if data is None else (data.class_names, split_size(data.train), split_size(data.test))
    views = world.allgather_object((error, seen))
    failed = [(rank, message) for rank, (message, _) in enumerate(views) if message is not None]
    if failed:
        if len(failed) == world.size and len({m for _, m in failed}) == 1:
            raise UsageError(failed[0][1])  # the same on every rank (a flag, rank 0's verdict)
        rank, message = failed[0]
        others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise UsageError(f"rank {rank}{others}: {message}")
    differ = [rank for rank, (_, view) in enumerate(views) if view != views[0][1]]
    if differ:
        (classes, train, test), (root_classes, root_train, root_test) = views[differ[0]][1], views[0][1]
        odd = sorted(set(classes) ^ set(root_classes))
        if odd:
            what = f"class {odd[0]!r} on one and not the other"
        elif classes != root_classes:
            what = "the same classes in another order"
        else:
            what = f"{train} train / {test} test samples, rank 0 {root_train} / {root_test}"
        raise UsageError(f"--data-dir {cfg.data_dir}: rank {differ[0]} reads other data than rank 0 ({what}; "
                         f"another copy on its node?): give every rank the same data")
    return data


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2 ** 62)
    return torch.Generator().manual_seed(seed)


def subset_for_group(num_samples: int, *, subnet_data: str, group: int, groups: int, seed: int) -> torch.Tensor:
    """The training samples a sub-network group draws from: all, or its shard k of N."""
    if subnet_data == "full" or groups == 1:
        return torch.arange(num_samples)
    order = torch.randperm(num_samples, generator=_generator(seed, 77))  # fixed across epochs
    return order[group * num_samples // groups:(group + 1) * num_samples // groups].sort().values


def train_indices(pool: torch.Tensor, *, seed: int, stream: int, epoch: int, rank: int, size: int) -> torch.Tensor:
    """This rank's samples for one training epoch: the pool reshuffled per epoch and dealt
    out whole, every sample to exactly one rank; the first ``len(pool) % size`` ranks get one
    more than the rest (it rides in their last batch, see ``train_steps``)."""
    shuffled = pool[torch.randperm(len(pool), generator=_generator(seed, stream, epoch))]
    base, extra = divmod(len(shuffled), size)
    start = rank * base + min(rank, extra)
    return shuffled[start:start + base + (rank < extra)]


def train_steps(pool_size: int, size: int, batch_size: int) -> int:
    """Optimizer steps per training epoch, the same on every rank (DDP needs that): the
    batches of the smaller parts. A rank with one sample more puts it into its last batch
    instead of taking a step the others would not. (With fewer samples than ranks there is
    nothing to step on and the epoch is empty.)"""
    return -(-(pool_size // size) // batch_size)


def batch_slices(count: int, batch_size: int, steps: int | None = None) -> list[slice]:
    """Batches of ``batch_size`` over ``count`` samples; with ``steps``, exactly that many,
    the last taking the rest (so it may hold one more than ``batch_size``)."""
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


@dataclass
class Batches:
    """One epoch of batches for this rank (iterate once)."""

    split: object  # InMemorySplit or a torch Dataset
    indices: torch.Tensor
    batch_size: int
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    augment_generator: torch.Generator | None = None  # None: no augmentation (evaluation)
    loader: DataLoader | None = None
    steps: int | None = None  # training: the step count every rank takes (train_steps)

    def __len__(self) -> int:
        return len(batch_slices(len(self.indices), self.batch_size, self.steps))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.split, InMemorySplit):
            yield from self._in_memory()
        else:
            try:
                for images, labels in self.loader:
                    yield (images.to(self.device, non_blocking=True),
                           labels.to(self.device, non_blocking=True))
            except UsageError as error:  # from a worker: keep the one line, drop the traceback
                last = str(error).strip().splitlines()[-1]
                raise UsageError(last.split("UsageError: ", 1)[-1], everywhere=False) from None

    def _in_memory(self):
        # Everything random or indexed is drawn for the whole epoch and moved to the device
        # once: per-batch host-to-device copies of small tensors each wait for the GPU queue.
        images_device = self.split.images.device
        indices = self.indices.to(images_device)
        crops = None
        if self.augment_generator is not None:
            crops = [t.to(images_device) for t in draw_crop_flip(len(indices), self.split.images.shape[2],
                                                                 self.augment_generator)]
        for part in batch_slices(len(indices), self.batch_size, self.steps):
            idx = indices[part]
            images = self.split.images[idx].to(self.device, non_blocking=True)
            labels = self.split.labels[idx].to(self.device, non_blocking=True)
            if crops is not None:
                dy, dx, flip = (t[part].to(self.device) for t in crops)
                images = random_crop_flip(images, dy, dx, flip)
            images = (images.float().div_(255) - self.mean) / self.std
            yield images.contiguous(memory_format=torch.channels_last), labels


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


class DataPlan:
    """Builds each epoch's batches for one comm; keeps DataLoader workers alive across epochs."""

    def __init__(self, data: DatasetBundle, cfg: RunConfig, device: torch.device):
        self.data, self.cfg, self.device = data, cfg, device
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        for split in (data.train, data.test):
            if isinstance(split, InMemorySplit) and device.type == "cuda":
                object.__setattr__(split, "images", split.images.to(device))
                object.__setattr__(split, "labels", split.labels.to(device))
        self._loaders: dict[int, tuple[DataLoader, _IndexBatches]] = {}

    def train(self, comm: Comm, pool: torch.Tensor, *, stream: int, epoch: int) -> Batches:
        indices = train_indices(pool, seed=self.cfg.seed, stream=stream, epoch=epoch,
                                rank=comm.rank, size=comm.size)
        gen = _generator(self.cfg.seed, stream, epoch, comm.rank, 1)  # rank in the comm: placement-free
        return self._batches(self.data.train, indices, gen, train_steps(len(pool), comm.size, self.cfg.batch_size))

    def test(self, comm: Comm) -> Batches:
        indices = eval_indices(split_size(self.data.test), rank=comm.rank, size=comm.size)
        return self._batches(self.data.test, indices, None, None)

    def _batches(self, split, indices: torch.Tensor, gen: torch.Generator | None, steps: int | None) -> Batches:
        loader = None
        if not isinstance(split, InMemorySplit):
            loader = self._loader(split, indices, gen, steps)
        return Batches(split, indices, self.cfg.batch_size, self.device, self.mean, self.std, gen, loader, steps)

    def _loader(self, split, indices: torch.Tensor, gen: torch.Generator | None, steps: int | None) -> DataLoader:
        if id(split) not in self._loaders:
            sampler = _IndexBatches(self.cfg.batch_size)
            workers = self.cfg.workers
            loader = DataLoader(_SeededSamples(split), batch_sampler=sampler, num_workers=workers,
                                pin_memory=self.device.type == "cuda",
                                persistent_workers=workers > 0)
            self._loaders[id(split)] = (loader, sampler)
        loader, sampler = self._loaders[id(split)]
        seeds = [None] * len(indices) if gen is None else \
            torch.randint(2 ** 62, (len(indices),), generator=gen).tolist()
        sampler.keys, sampler.steps = list(zip(indices.tolist(), seeds)), steps
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
    """A batch sampler of (index, seed) keys set per epoch (works with persistent workers)."""

    def __init__(self, batch_size: int):
        self.batch_size, self.keys, self.steps = batch_size, [], None

    def __iter__(self):
        for part in batch_slices(len(self.keys), self.batch_size, self.steps):
            yield self.keys[part]

    def __len__(self):
        return len(batch_slices(len(self.keys), self.batch_size, self.steps))


def split_size(split) -> int:
    return len(split.labels) if isinstance(split, InMemorySplit) else len(split)
