"""Tiny datasets in the real on-disk formats, for tests that must not download anything.

Each writer produces the layout that the real archive extracts to, so the tests run
torchvision's real parsers on it:

* ``write_cifar10`` / ``write_cifar100``: the python-pickle versions (``cifar-10-batches-py``,
  ``cifar-100-python``). The real files were pickled by Python 2, whose ``str`` keys load as
  ``b"data"`` with ``encoding="bytes"`` and as ``"data"`` with ``encoding="latin1"`` (what
  torchvision uses); ``_Py2Pickler`` writes the same opcodes, so both readings work here too.
* ``write_food101``: ``food-101/images/<class>/<id>.jpg`` and ``food-101/meta`` (json and txt).
* ``write_imagefolder``: ``train/<class>/*.png`` and ``val/<class>/*.png``.

Images carry a learnable class signal (a class colour and stripe direction, plus noise),
deterministic by seed.

torchvision checks CIFAR files against md5 sums of the real files, which these cannot match.
The writers return the md5 sums of what they wrote, and ``patch_md5_table`` points
torchvision's own table at them (pass ``monkeypatch.setattr`` in pytest), so the real md5
machinery still runs and still catches a corrupted file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


def class_images(labels: np.ndarray, height: int, width: int, num_classes: int,
                 rng: np.random.Generator, noise: float = 0.08) -> np.ndarray:
    """uint8 [N, H, W, 3]: the class sets the colour and the stripes' direction."""
    labels = np.asarray(labels)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    hue = labels / num_classes
    colour = 0.5 + 0.4 * np.stack([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)], axis=-1)
    angle = np.pi * labels / num_classes
    stripes = np.sin(2 * np.pi * 3 * (xx[None] * np.cos(angle)[:, None, None]
                                      + yy[None] * np.sin(angle)[:, None, None]))
    images = colour[:, None, None, :] * (0.75 + 0.25 * stripes[..., None])
    images = images + rng.normal(0, noise, images.shape)
    return (images.clip(0, 1) * 255).round().astype(np.uint8)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Every class about equally often (all of them once n >= num_classes), in random order."""
    return rng.permutation(np.arange(n) % num_classes)


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- CIFAR

class Py2Str(bytes):
    """A Python 2 ``str``, as the keys and names in the real CIFAR pickles are."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj: Py2Str) -> None:
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def _py2(value):
    """Strings (and strings in lists and dict keys) as Python 2 str; everything else as is."""
    if isinstance(value, str):
        return Py2Str(value.encode("latin1"))
    if isinstance(value, list):
        return [_py2(v) for v in value]
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    return value


def _write_pickle(path: Path, obj: dict) -> str:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))
    return md5_of(path)


def _cifar_rows(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """[N, 3072] uint8: 1024 red, then 1024 green, then 1024 blue values, row-major (the real layout)."""
    images = class_images(labels, 32, 32, num_classes, rng)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(labels), 3072))


def write_cifar10(root, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, str]:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch, batches.meta.
    Returns {file name: md5}. The training samples are dealt over the 5 batches in order."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    md5s = {}
    train_labels = balanced_labels(n_train, 10, rng)
    bounds = np.linspace(0, n_train, 6).round().astype(int)
    for b in range(5):
        labels = train_labels[bounds[b]:bounds[b + 1]]
        md5s[f"data_batch_{b + 1}"] = _write_pickle(folder / f"data_batch_{b + 1}", {
            "batch_label": f"training batch {b + 1} of 5",
            "labels": [int(x) for x in labels],
            "data": _cifar_rows(labels, 10, rng),
            "filenames": [f"img_{bounds[b] + i:05d}.png" for i in range(len(labels))],
        })
    labels = balanced_labels(n_test, 10, rng)
    md5s["test_batch"] = _write_pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": [int(x) for x in labels],
        "data": _cifar_rows(labels, 10, rng),
        "filenames": [f"test_{i:05d}.png" for i in range(len(labels))],
    })
    md5s["batches.meta"] = _write_pickle(folder / "batches.meta", {
        "num_cases_per_batch": int(bounds[1]), "label_names": list(CIFAR10_NAMES), "num_vis": 3072})
    return md5s


def write_cifar100(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """``root/cifar-100-python`` with train, test, meta (100 fine, 20 coarse classes).
    Returns {file name: md5}."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    md5s = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = balanced_labels(n, 100, rng)
        md5s[split] = _write_pickle(folder / split, {
            "filenames": [f"{split}_{i:05d}.png" for i in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": [int(x) for x in fine],
            "coarse_labels": [int(x) // 5 for x in fine],
            "data": _cifar_rows(fine, 100, rng),
        })
    md5s["meta"] = _write_pickle(folder / "meta", {
        "fine_label_names": [f"fine_{c:02d}" for c in range(100)],
        "coarse_label_names": [f"coarse_{c:02d}" for c in range(20)]})
    return md5s


def patch_md5_table(cls, md5s: dict[str, str], setattr=setattr) -> None:
    """Point torchvision's md5 table of ``cls`` (CIFAR10 or CIFAR100) at the files written here."""
    setattr(cls, "train_list", [[name, md5s[name]] for name, _ in cls.train_list])
    setattr(cls, "test_list", [[name, md5s[name]] for name, _ in cls.test_list])
    setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})


# ---------------------------------------------------------------------------- image files

def write_food101(root, classes=("apple_pie", "bibimbap", "churros"), per_class: int = 4,
                  test_per_class: int = 2, seed: int = 0) -> Path:
    """``root/food-101`` as the real archive extracts: images/<class>/<id>.jpg (sizes vary, as
    in the real set) and meta/{classes,labels,train,test}.txt + {train,test}.json."""
    base = Path(root) / "food-101"
    meta = base / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = iter(rng.permutation(900_000)[:len(classes) * (per_class + test_per_class)] + 100_000)
    splits = {"train": {}, "test": {}}
    for c, name in enumerate(classes):
        (base / "images" / name).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", per_class), ("test", test_per_class)):
            splits[split][name] = []
            for _ in range(n):
                image_id = f"{name}/{next(ids)}"
                h, w = (int(v) for v in rng.integers(40, 72, size=2))
                pixels = class_images(np.array([c]), h, w, len(classes), rng)[0]
                Image.fromarray(pixels).save(base / "images" / f"{image_id}.jpg", quality=90)
                splits[split][name].append(image_id)
    (meta / "classes.txt").write_text("".join(f"{n}\n" for n in classes))
    (meta / "labels.txt").write_text("".join(f"{n.replace('_', ' ').capitalize()}\n" for n in classes))
    for split, listing in splits.items():
        (meta / f"{split}.json").write_text(json.dumps(listing))
        (meta / f"{split}.txt").write_text("".join(f"{i}\n" for ids_ in listing.values() for i in ids_))
    return base


def write_imagefolder(root, classes=("cat", "dog", "emu"), per_class: int = 6,
                      val_per_class: int = 2, size: int = 16, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``, size×size RGB. Returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = class_images(np.full(n, c), size, size, len(classes), rng)
            for i in range(n):
                Image.fromarray(pixels[i]).save(folder / f"{name}_{i:04d}.png")
    return root
