"""The datasets a run can train on (their registry: ``catalog.DATASETS``), loaded the same on
every rank.

``load_dataset`` parses one dataset (``formats``, or the built-in ``synthetic`` set) and caps
it; ``load_for_run`` is what a run calls: rank 0's integrity checks shared with all, every
rank's own parse compared across ranks, and image files decoded once (``decoded``).

Sample caps (``--train-samples``/``--test-samples``) keep a fixed-seed random subset, sorted,
so classes stay mixed and every rank keeps the same samples.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch.utils.data import Dataset, Subset

from .bundle import IMAGENET_MEAN, IMAGENET_STD, DatasetBundle, InMemorySplit, Verifier
from .catalog import DATASETS, LoadRequest
from .errors import UsageError
from .progress import log

__all__ = ["DATASETS", "DatasetBundle", "IMAGENET_MEAN", "IMAGENET_STD", "InMemorySplit", "load_dataset",
           "load_for_run", "split_size"]

SUBSET_SEED = 2020  # fixed, so a capped run sees the same samples on every rank and run


def load_dataset(name: str, data_dir: str | None, *, download: bool, image_size: int | None,
                 train_samples: int | None, test_samples: int | None, verify_once: Verifier,
                 seed: int = 0) -> DatasetBundle:
    """Load ``name`` from ``data_dir``; ``verify_once`` runs rank 0's checks (``formats``)."""
    kind = DATASETS.get(name)
    if kind is None:
        raise UsageError(f"--dataset {name} is unknown: use one of {', '.join(DATASETS)}")
    if kind.where is not None and not data_dir:
        raise UsageError(f"--dataset {name} needs --data-dir DIR ({kind.where})")
    if download and not kind.downloadable:
        raise UsageError(f"--download fetches {', '.join(n for n, k in DATASETS.items() if k.downloadable)} "
                         f"only: put {name} data under --data-dir yourself and drop --download")
    bundle = kind.load(LoadRequest(os.path.expanduser(data_dir) if data_dir else None, download, image_size,
                                   verify_once, seed, train_samples, test_samples))
    return _capped(bundle, train_samples, test_samples)  # (the synthetic set is made to size)


def load_for_run(cfg, comm, workers: int) -> DatasetBundle:
    """The dataset named by --dataset, the same on every rank of ``comm`` (the world);
    ``workers``: the rank's DataLoader workers, as resolved once by the CLI.

    After rank 0's check every rank parses its own view of --data-dir, and on a cluster that
    may be another copy (node-local disks): the ranks then compare what they read, so that a
    rank with other classes or other sample counts, or one whose parse failed, stops every
    rank with one line instead of training on other labels or leaving the others waiting.
    Small image files are then decoded once, by rank 0, and sent to all; large ones, with
    --cache-dir, go through a memory-mapped cache that rank 0 builds once (``decoded``)."""
    data, error = None, None
    try:
        data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size,
                            train_samples=cfg.train_samples, test_samples=cfg.test_samples,
                            verify_once=comm.verdict_of_root, seed=cfg.seed)
    except UsageError as raised:
        error = str(raised)
    except Exception as raised:  # this rank's copy would not parse: files, formats, and what
        # torchvision or pickle raise (RuntimeError 'Dataset not found', UnpicklingError, ...)
        error = f"--data-dir {cfg.data_dir}: {type(raised).__name__}: {raised}"
    seen = None if data is None else data_view(data)
    views = comm.slow.allgather_object((error, seen))
    _raise_for_views(views, cfg.data_dir, comm.size)
    for note in data.notes:
        log(f"note: {note}", rank=comm.rank)
    if data.decode_size is not None or cfg.cache_dir is not None:
        from .decoded import decoded_once  # torchvision: only where image files are read (``bundle``)
        data = decoded_once(data, cfg, comm, workers)
    return data


def _raise_for_views(views: list, data_dir: str | None, size: int) -> None:
    failed = [(rank, message) for rank, (message, _) in enumerate(views) if message is not None]
    if failed:
        if len(failed) == size and len({m for _, m in failed}) == 1:
            raise UsageError(failed[0][1])  # the same on every rank (a flag, rank 0's verdict)
        rank, message = failed[0]
        others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise UsageError(f"rank {rank}{others}: {message}")
    differ = [rank for rank, (_, view) in enumerate(views) if view != views[0][1]]
    if differ:
        what = data_difference(views[differ[0]][1], views[0][1], "rank 0")
        raise UsageError(f"--data-dir {data_dir}: rank {differ[0]} reads other data than rank 0 ({what}; "
                         f"another copy on its node?): give every rank the same data")


def data_view(data: DatasetBundle) -> tuple[list[str], int, int]:
    """What identifies a dataset to a run: its classes in label order, its split sizes."""
    return list(data.class_names), split_size(data.train), split_size(data.test)


def data_difference(view, reference, reference_name: str) -> str | None:
    """How a view of the data (``data_view``) differs from ``reference``'s, said in a few
    words; None when they agree (the same labels on the same number of images)."""
    (classes, train, test), (their_classes, their_train, their_test) = view, reference
    odd = sorted(set(classes) ^ set(their_classes))
    if odd:
        return f"class {odd[0]!r} on one and not the other"
    if list(classes) != list(their_classes):
        return "the same classes in another order: other labels"
    if (train, test) != (their_train, their_test):
        return f"{train} train / {test} test samples, {reference_name} {their_train} / {their_test}"
    return None


def split_size(split) -> int:
    return len(split.labels) if isinstance(split, InMemorySplit) else len(split)


# ---------------------------------------------------------------------------- caps

def capped_indices(total: int, cap: int | None) -> torch.Tensor | None:
    """A fixed-seed random subset of ``cap`` of ``total`` indices, sorted; None: keep all."""
    if cap is None or cap >= total:
        return None
    order = torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))
    return order[:cap].sort().values


def _cap(split: InMemorySplit | Dataset, cap: int | None) -> InMemorySplit | Dataset:
    keep = capped_indices(split_size(split), cap)
    if keep is None:
        return split
    if isinstance(split, InMemorySplit):
        return replace(split, images=split.images[keep].contiguous(), labels=split.labels[keep])
    return Subset(split, keep.tolist())


def _capped(bundle: DatasetBundle, train_samples: int | None, test_samples: int | None) -> DatasetBundle:
    return replace(bundle, train=_cap(bundle.train, train_samples), test=_cap(bundle.test, test_samples))
