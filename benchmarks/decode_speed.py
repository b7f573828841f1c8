"""Decoding a large-image set (Food-101's kind): images/s one DataLoader worker delivers
through dd_mpi's training transform, and one rank reading the same images from a
``--cache-dir`` cache instead, next to what a phase-1 rank consumes.

    python benchmarks/decode_speed.py --quick                    # ~20 s on 2 cores
    python benchmarks/decode_speed.py --quick --photos           # JPEGs cut from real photos
    python benchmarks/decode_speed.py --consume 2400             # a rank that trains 2,400 img/s

Writes ``--images`` JPEGs of Food-101's size (at most 512 px a side, quality 90, smooth
random content; an upper bound for photos) to a temporary directory, then times one process (= one worker) loading each
file and applying the train transform of ``--dataset food101`` (RandomResizedCrop 224 + flip
+ normalise), after one warm pass so the page cache holds the files. Then builds the cache
of these files (``dd_mpi.decoded``) and times one process reading shuffled batches of 32 from
it (the memory map in the page cache) with the train augmentation on the CPU (on a GPU rank
it runs on the GPU: the gather alone is the CPU's part, printed too). ``--photos`` cuts the
JPEGs from scikit-learn's two sample photos (real detail, larger files) instead. Last line:
the workers one rank needs to keep up with ``--consume`` images/s (default: the rate this
script measures for one training step of the preset's sub-net on this machine's device, fp32,
batch 32).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from dd_mpi import data, decoded, formats  # noqa: E402
from dd_mpi.argtypes import OneLineParser, positive  # noqa: E402
from dd_mpi.decompose import subnet_spec  # noqa: E402
from dd_mpi.models import ModelSpec  # noqa: E402
from dd_mpi.presets import PRESETS  # noqa: E402
from harness import print_header  # noqa: E402


def write_jpegs(root: Path, count: int, seed: int = 0) -> list[Path]:
    """Food-101-sized files: 512 x 384..512 px, smooth random content (~30 KiB each; real photos
    carry more detail, are larger and decode somewhat slower: the rate here is an upper bound)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        height = int(rng.integers(384, 513))
        coarse = rng.integers(0, 256, (height // 32 + 1, 17, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((512, height), Image.BICUBIC)
        path = root / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def write_photo_jpegs(root: Path, count: int, seed: int = 0) -> list[Path]:
    """Food-101-sized files cut from scikit-learn's two sample photos (427 x 640): random
    crops of 384..427 x 384..512 px, quality 90."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = int(rng.integers(384, 428)), int(rng.integers(384, 513))
        top, left = int(rng.integers(0, photo.shape[0] - height + 1)), int(rng.integers(0, photo.shape[1] - width + 1))
        path = root / f"{i:05d}.jpg"
        Image.fromarray(photo[top:top + height, left:left + width]).save(path, quality=90)
        paths.append(path)
    return paths


def cache_rates(paths: list[Path], size: int, cache_dir: Path, batch: int = 32) -> tuple[float, float]:
    """Images/s of one rank reading shuffled batches from a cache of ``paths``: the gather
    from the memory map alone, and with the train augmentation (resized crop, flip,
    normalise) on this CPU. Built first (not timed), then one warm pass."""
    samples = [(str(path), 0) for path in paths]
    stem = cache_dir / "bench"
    decoded.build_cache(stem, samples, size, workers=0)
    images = decoded.open_cache(stem, size).images
    mean = torch.tensor(formats.IMAGENET_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(formats.IMAGENET_STD).view(1, -1, 1, 1)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))
    parts = [order[i:i + batch] for i in range(0, len(order), batch)]
    images[order].sum()  # warm: the cache in the page cache, as on a node's second epoch
    start = time.perf_counter()
    for part in parts:
        images.index_select(0, part)
    gather = len(paths) / (time.perf_counter() - start)
    boxes = data.draw_resized_crops(len(paths), images.shape[-1], torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for i, part in enumerate(parts):
        window = slice(i * batch, i * batch + len(part))
        batch_images = data.resized_crop_flip(images.index_select(0, part), *(t[window] for t in boxes), size=size)
        (batch_images.float().div_(255) - mean) / std
    return gather, len(paths) / (time.perf_counter() - start)


def decode_rate(paths: list[Path], size: int) -> float:
    """Images/s of dd_mpi's loader + Food-101 train transform, files already in the page cache."""
    load = formats.CheckedLoader()
    train, _ = formats._large_transforms(size)
    for path in paths:  # warm: the files in the page cache, as on a node's second epoch
        path.read_bytes()
    start = time.perf_counter()
    for path in paths:
        train(load(path))
    return len(paths) / (time.perf_counter() - start)


def training_rate(preset: str, size: int, batch: int = 32, steps: int = 5) -> float:
    """Images/s of training steps of the preset's sub-net at ``size`` px on this device."""
    from gpu_throughput import images_per_second
    options = PRESETS[preset]
    spec = subnet_spec(ModelSpec(options["arch"], options["width"], num_classes=101), options["subnets"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return images_per_second(spec, batch, False, steps, None, device, torch.channels_last, image_size=size)


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 images (default 400)")
    parser.add_argument("--images", type=positive(int))
    parser.add_argument("--photos", action="store_true", help="JPEGs cut from real photos (needs scikit-learn)")
    parser.add_argument("--image-size", type=positive(int), default=224)
    parser.add_argument("--preset", default="food101-resnet50", choices=tuple(PRESETS))
    parser.add_argument("--consume", type=positive(float), help="images/s one rank trains (default: measured here)")
    args = parser.parse_args()
    count = args.images if args.images is not None else 100 if args.quick else 400
    torch.set_num_threads(1)
    print_header("decoding a large-image set: one worker, and the --cache-dir cache")
    print("# one process = one worker, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "files").mkdir()
        paths = (write_photo_jpegs if args.photos else write_jpegs)(Path(tmp) / "files", count)
        kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        rate = decode_rate(paths, args.image_size)
        gather, cached = cache_rates(paths, args.image_size, Path(tmp) / "cache")
    kind = "photo crops" if args.photos else "synthetic"
    print(f"decode + train transform: {rate:.0f} img/s per worker ({count} {kind} JPEGs, mean {kib:.0f} KiB)")
    print(f"cache (--cache-dir): gather {gather:.0f} img/s, gather + train augmentation on CPU {cached:.0f} img/s "
          f"per rank ({cached / rate:.1f}x one decoding worker)")
    consume = args.consume
    if consume is None:
        consume = training_rate(args.preset, args.image_size)
        where = "GPU" if torch.cuda.is_available() else "CPU, 1 thread"
        print(f"{args.preset} sub-net training step ({where}, fp32, batch 32): {consume:.0f} img/s")
    print(f"workers per rank to keep up: {math.ceil(consume / rate)} ({consume:.0f} / {rate:.0f} img/s)")


if __name__ == "__main__":
    main()
