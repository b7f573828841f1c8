"""What a run can name before anything is built: the architectures (``--arch``, by depth) and
the datasets (``--dataset``), torch-free.

``dd-train --nproc K`` checks its flags, then only starts K ranks and waits for them: it never
imports torch (about 2 s of CPU and 300 MB for a process that trains nothing, paid before the
first rank could start). So the names a flag is checked against live here, and each dataset's
loader imports its module when it is called, on the ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from .bundle import DatasetBundle, Verifier

# ---------------------------------------------------------------------------- architectures
BOTTLENECK_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}  # blocks per stage
KNOWN_ARCHS = "resnet20/32/44/56/110 (any other 6n+2), resnet50, resnet101, resnet152"


MAX_DEPTH = 2402  # twice He et al.'s ResNet1202; building resnet6000002 (to check it) never ended


def parse_depth(arch: str) -> int:
    digits = arch[len("resnet"):]
    if not arch.startswith("resnet") or not (digits.isascii() and digits.isdigit()) or digits.startswith("0"):
        # (not "resnet２０"; not "resnet020", which made another run's config of the same net)
        raise UsageError(f"--arch {arch!r} is unknown: choose one of {KNOWN_ARCHS}")
    depth = int(digits)
    if depth not in BOTTLENECK_LAYERS and (depth < 8 or (depth - 2) % 6):
        raise UsageError(f"--arch {arch!r} is unknown: choose one of {KNOWN_ARCHS}")
    if depth > MAX_DEPTH:
        raise UsageError(f"--arch {arch} is deeper than dd_mpi builds (up to resnet{MAX_DEPTH}): choose a "
                         "shallower one")
    return depth


# ---------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class LoadRequest:
    data_dir: str | None
    download: bool
    image_size: int | None
    verify_once: Verifier
    seed: int
    train_samples: int | None
    test_samples: int | None


@dataclass(frozen=True)
class DatasetKind:
    """One entry of the registry: how to load it and what its --data-dir holds."""

    load: Callable[[LoadRequest], DatasetBundle]
    where: str | None  # what --data-dir holds; None: it needs none
    downloadable: bool = False


def _synthetic(r: LoadRequest) -> DatasetBundle:
    from .synthetic import make_synthetic
    return make_synthetic(r.train_samples, r.test_samples, image_size=r.image_size or 32, seed=r.seed)


def _cifar(name: str) -> Callable[[LoadRequest], DatasetBundle]:
    def load(r: LoadRequest) -> DatasetBundle:
        from .formats import load_cifar
        return load_cifar(name, r.data_dir, r.download, r.verify_once)
    return load


def _food101(r: LoadRequest) -> DatasetBundle:
    from .formats import load_food101
    return load_food101(r.data_dir, r.download, r.image_size, r.verify_once)


def _imagefolder(r: LoadRequest) -> DatasetBundle:
    from .formats import load_imagefolder
    return load_imagefolder(r.data_dir, r.image_size, r.verify_once)


DATASETS: dict[str, DatasetKind] = {
    "synthetic": DatasetKind(_synthetic, None),
    "cifar10": DatasetKind(_cifar("cifar10"), "the folder that holds or will hold cifar-10-batches-py/", True),
    "cifar100": DatasetKind(_cifar("cifar100"), "the folder that holds or will hold cifar-100-python/", True),
    "food101": DatasetKind(_food101, "the folder that holds or will hold food-101/", True),
    "imagefolder": DatasetKind(_imagefolder, "with train/<class>/* and val/<class>/*"),
}
