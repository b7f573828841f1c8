"""A small real image dataset for the benchmarks: scikit-learn's handwritten digits (1,797
8x8 grey images of 10 classes, shipped inside the package: no download) written as an
ImageFolder (`train/<digit>/*.png`, `val/<digit>/*.png`), so dd-train reads them through its
real image-file path (decoded once into memory at --image-size, 32 by default).

    python benchmarks/digits.py runs/digits              # writes the folder, prints its path
    dd-train --dataset imagefolder --data-dir runs/digits ...
    python benchmarks/digits.py runs/digits-96 96        # upscaled 96 px JPEGs: the large-image
                                                         # path (decoded per epoch, or --cache-dir)

The split is fixed (seed 0, 20 % of each class for validation). Needs `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, val_fraction: float = 0.2, seed: int = 0, size: int | None = None) -> Path:
    """The digits as RGB PNGs (grey to 0..255, three equal channels); with ``size``, upscaled
    (bicubic) to size x size JPEGs (quality 90). Idempotent."""
    from sklearn.datasets import load_digits
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        cut = int(round(len(indices) * val_fraction))
        for split, part in (("val", indices[:cut]), ("train", indices[cut:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                image = Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2))
                if size is None:
                    image.save(folder / f"{i:04d}.png")
                else:
                    image.resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def main(argv: list[str]) -> int:
    # (a plain sys.argv read wrote 1,797 PNGs into a folder named --help)
    sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])  # (as the other benchmarks: this checkout's dd_mpi)
    from dd_mpi.argtypes import OneLineParser, positive
    parser = OneLineParser(description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=Path("runs/digits"),
                        help="the ImageFolder to write (default runs/digits)")
    parser.add_argument("size", nargs="?", type=positive(int), help="upscale to SIZE px JPEGs (default: 8 px PNGs)")
    args = parser.parse_args(argv)
    print(write_digits(args.out, size=args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
