"""The on-disk formats, parsed by torchvision's own loaders: CIFAR-10/100 (python pickles),
Food-101 and ImageFolder (image files), into the types of ``bundle``. Only a run that reads
one of them imports this module (and torchvision): ``catalog``'s loaders import it when called.

Two decisions shape this module:

* **md5 sums are checked once, on rank 0.** torchvision re-reads and hashes every CIFAR file
  each time a dataset object is built; with hundreds of ranks on one shared file system that
  is hundreds of full reads at start-up. So the caller passes ``verify_once(check)``, which
  runs ``check`` on rank 0 only (a download, if asked, then torchvision's ``check_integrity``
  against the md5 table of torchvision's own dataset class) and hands rank 0's verdict (None
  or a message) to every rank. Every rank then parses the files with torchvision's parser,
  its integrity check bypassed, and every rank raises the same ``UsageError`` on a bad
  verdict, so none is left waiting in a collective. This assumes the ranks see the same files
  (a shared file system or identical copies; ``datasets.load_for_run`` checks that they do).
  Food-101 and ImageFolder have no md5 table: their ``check`` downloads (Food-101) and checks
  the directory layout.
* **CIFAR comes back in memory, image files as Datasets.** CIFAR comes back as uint8 NCHW
  tensors (``InMemorySplit``); the trainer augments whole batches with tensor ops. Food-101
  and ImageFolder come back as torch Datasets whose transforms augment and normalise (small
  ImageFolders are then decoded once into memory, large ones with --cache-dir into a
  memory-mapped cache: ``decoded``). An
  unreadable image is only found when it is loaded, so the loader names the file in a
  ``UsageError``.
"""


from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.datasets import utils as tv_utils

from .bundle import IMAGENET_MEAN, IMAGENET_STD, DatasetBundle, InMemorySplit, Verifier
from .errors import UsageError


CIFAR_STATS = {  # per-channel mean and std of the training images, in [0, 1] units
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
SMALL_IMAGE_PX = 64  # ImageFolder images this size or smaller are treated like CIFAR
SIZE_SAMPLE = 32  # training images whose median size decides that
MAX_ASPECT = 16  # a resize of the shorter side stops where the longer one reaches this many times the size


def stored_size(size: int) -> int:
    """The ImageNet recipe's test resize for crops of ``size`` (256 for 224): what a cache stores.
    The margin is kept a multiple of 4, so that the cache's two centre crops (to the stored
    square, then to ``size``) land on the test transform's one: torchvision rounds an offset
    half to even, and an odd half-margin would shift some crops by a pixel."""
    return size + 4 * round(size * 32 / 224 / 4)


class ShorterSideResize:
    """T.Resize(size) (the shorter side to ``size``), but the longer side to at most MAX_ASPECT ×
    ``size``, and no side below 1 pixel (the centre crop then pads): a 6000×2 image became
    768000×256, 1.5 GB for one sample. (T.Resize's max_size rounds such a short side to 0.)"""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        longest = MAX_ASPECT * self.size
        if max(width, height) * self.size <= longest * min(width, height):
            return TF.resize(image, self.size)  # as T.Resize(size), to the pixel
        scale = longest / max(width, height)
        return TF.resize(image, [max(1, round(height * scale)), max(1, round(width * scale))])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, longer side <= {MAX_ASPECT * self.size})"


def raise_on(verdict: str | None) -> None:
    if verdict is not None:
        raise UsageError(verdict)


# ---------------------------------------------------------------------------- CIFAR

class _VerifiedOnce:
    """A torchvision CIFAR class whose md5 checks already ran once, on rank 0 (module doc).
    The parsing is torchvision's, unchanged."""

    def __init__(self, root: str, train: bool):
        # An instance attribute hides the class's meta md5: _load_meta then only checks that
        # the file exists. The class attribute (the md5 table) stays as it is.
        self.meta = {**type(self).meta, "md5": None}
        super().__init__(root, train=train, download=False)

    def _check_integrity(self) -> bool:
        return True


class _CIFAR10(_VerifiedOnce, tv_datasets.CIFAR10):
    pass


class _CIFAR100(_VerifiedOnce, tv_datasets.CIFAR100):
    pass


def _cifar_check(cls: type, name: str, root: str, download: bool) -> Callable[[], str | None]:
    """Rank 0's part: download if asked, then the md5 of every file against torchvision's table."""
    folder = os.path.join(root, cls.base_folder)
    files = [entry[0] for entry in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    md5s = [entry[1] for entry in cls.train_list + cls.test_list] + [cls.meta["md5"]]
    get = f"download {cls.url} and extract it into --data-dir {root}, or pass --download"

    def check() -> str | None:
        if download and not all(tv_utils.check_integrity(os.path.join(folder, f), m)
                                for f, m in zip(files, md5s)):
            try:
                tv_utils.download_and_extract_archive(cls.url, root, filename=cls.filename,
                                                      md5=cls.tgz_md5)
            except Exception as error:  # no network, a proxy, a full disk: all fixable by the user
                return (f"--download of {name} failed ({type(error).__name__}: {error}): "
                        f"download {cls.url} yourself and extract it into --data-dir {root}")
        if not os.path.isdir(root):
            return f"--data-dir {root} {_absent(root)}: {get}"
        if not os.path.isdir(folder):
            if os.path.basename(os.path.normpath(root)) == cls.base_folder:  # one level too deep
                return (f"--data-dir {root} is {name}'s own folder: give the folder that holds it, "
                        f"--data-dir {os.path.dirname(os.path.normpath(root)) or '.'}")
            return f"--data-dir {root} has no {cls.base_folder}/ ({name} in python format): {get}"
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            return (f"{folder} lacks {', '.join(missing)} (expected {', '.join(files)}): "
                    f"it is not the python version of {name}; {get}")
        for file, md5 in zip(files, md5s):
            if not tv_utils.check_integrity(os.path.join(folder, file), md5):
                return (f"{os.path.join(folder, file)} is corrupt (md5 differs from {md5}): "
                        f"delete {folder} and download it again (or pass --download)")
        return None

    return check


def load_cifar(name: str, root: str, download: bool, verify_once: Verifier) -> DatasetBundle:
    cls = _CIFAR10 if name == "cifar10" else _CIFAR100
    raise_on(verify_once(_cifar_check(cls, name, root, download)))
    splits = []
    for train in (True, False):
        parsed = cls(root, train=train)
        images = torch.from_numpy(parsed.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        splits.append(InMemorySplit(images, torch.tensor(parsed.targets, dtype=torch.int64)))
    mean, std = CIFAR_STATS[name]
    return DatasetBundle(name=name, num_classes=len(parsed.classes), in_channels=3, image_size=32,
                         mean=mean, std=std, train=splits[0], test=splits[1],
                         class_names=tuple(parsed.classes))


# ---------------------------------------------------------------------------- image files

FOOD101_LISTS = "Food-101: meta/train.json and meta/test.json"


class CheckedLoader:
    """torchvision's image loader, but a file PIL cannot read becomes a UsageError naming it
    (it would otherwise surface as a bare PIL error from inside a DataLoader worker).
    ``lists``: the files that list the images (Food-101's), named when one is missing; None
    for a folder that was scanned (an ImageFolder, and the decoders of ``decoded``).
    A class, not a closure, so that datasets pickle into spawned workers."""

    def __init__(self, lists: str | None = None):
        self.lists = lists

    def __call__(self, path) -> Image.Image:
        return _read_image(path, _rgb, self.lists)


def missing_image(path: str, lists: str | None) -> str:
    """What to do about an image that is not there: listed in ``lists`` (Food-101's), or found
    by a scan and gone since; a broken symbolic link is named with its target."""
    leave_out = f"leave it out of the dataset's lists ({lists})" if lists else "remove the link"
    if os.path.islink(path):
        return f"image {path} is a broken symbolic link to {os.readlink(path)}: restore its target, or {leave_out}"
    if lists:
        return f"image {path} is missing: restore it, or {leave_out}"
    return f"image {path} is missing (it was there when the dataset was read): restore it, or run again without it"


def _read_image(path, read: Callable[[Image.Image], object], lists: str | None = None):
    """``read`` of the image at ``path``; a file PIL cannot read is a UsageError naming it.
    A missing one was listed (``lists``) or scanned, then went; a broken symbolic link is
    named with its target, which is what to restore (an ImageFolder has no lists to edit)."""
    try:
        with open(path, "rb") as handle, Image.open(handle) as image:
            return read(image)
    except FileNotFoundError:
        raise UsageError(missing_image(path, lists), everywhere=False) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UsageError(f"cannot read image {path} ({type(error).__name__}: {error}): "
                         f"replace or delete the file", everywhere=False) from None


def _median_side(samples: list[tuple[str, int]]) -> int:
    """The median longer side of up to SIZE_SAMPLE training images spread over the list
    (headers only): it decides whether an ImageFolder holds small images (the CIFAR recipe,
    decoded into memory) or large ones. The first image alone decided: a thumbnail first
    among photos sent a Food-101-sized set into memory, and one photo first among thumbnails
    the reverse."""
    step = max(1, len(samples) // SIZE_SAMPLE)
    sides = sorted(_read_image(path, lambda image: max(image.size)) for path, _ in samples[::step][:SIZE_SAMPLE])
    return sides[len(sides) // 2]


def _real_folders(samples: list[tuple[str, int]]) -> dict[str, str]:
    """Each folder that holds images of ``samples`` -> its real path (links resolved): a realpath
    per folder, not per file, is cheap on any file system."""
    return {folder: os.path.realpath(folder) for folder in {os.path.dirname(path) for path, _ in samples}}


def _folder_read_twice(real_folders: dict[str, str], split_root: str) -> str | None:
    """A folder of images reached by two paths, through a symbolic link (os.walk follows
    links), or None; ``real_folders`` from ``_real_folders``. A link back into an ancestor (`ln
    -s . again`) listed every image ~40 times over, one class swamping the rest; a link to a
    folder already read (`ln -s ../b a/more`, or one folder linked into two classes) counted its
    images twice, under two classes."""
    first_path_of: dict[str, str] = {}
    for folder in sorted(real_folders, key=lambda f: (len(f), f)):
        earlier = first_path_of.setdefault(real_folders[folder], folder)
        if earlier == folder:
            continue
        if folder.startswith(earlier + os.sep):
            return (f"{folder} is {earlier} again, through a symbolic link: remove the link (its images would "
                    "count many times)")
        classes = {_class_of(path, split_root) for path in (folder, earlier)}
        counted = f"as {' and as '.join(sorted(classes))}" if len(classes) > 1 else f"in class {classes.pop()}"
        linked, other = (folder, earlier) if _first_link(folder, split_root) else (earlier, folder)
        link = _first_link(linked, split_root)
        if link is None:  # (a bind mount, say)
            return (f"{folder} is {earlier} again, by another path: read it once (its images would count twice, "
                    f"{counted})")
        again = (f"which is read already ({other})" if linked == link else
                 f"through which {linked} is {other} again")
        return (f"{link} is a symbolic link to {os.readlink(link)}, {again}: remove the link "
                f"(its images would count twice, {counted})")
    return None


def _first_link(path: str, split_root: str) -> str | None:
    """The first symbolic link on ``path`` below ``split_root``, or None."""
    current = split_root
    for part in os.path.relpath(path, split_root).split(os.sep):
        current = os.path.join(current, part)
        if os.path.islink(current):
            return current
    return None


def _test_images_trained_on(root: str, samples: dict[str, list[tuple[str, int]]],
                            real_folders: dict[str, dict[str, str]]) -> str | None:
    """A test image that is also a training image (``val`` a link to ``train``, or a class
    linked across), or None: the run scored on its training images (100 %) without a word.
    A file's real path is taken as its folder's (``_real_folders``) and its name: no system
    call per file, on every rank (an image file linked across alone goes unseen)."""
    both = set(real_folders["train"].values()) & set(real_folders["val"].values())
    if not both:  # (the usual answer, from the folders alone: no path per image built on every rank)
        return None

    def real_paths(split: str) -> dict[str, str]:
        real = {folder: real for folder, real in real_folders[split].items() if real in both}
        return {os.path.join(real[os.path.dirname(path)], os.path.basename(path)): path
                for path, _ in samples[split] if os.path.dirname(path) in real}

    trained, tested = real_paths("train"), real_paths("val")
    shared = sorted((tested[real], trained[real]) for real in trained.keys() & tested.keys())
    if not shared:
        return None
    (test_image, train_image), more = shared[0], len(shared) - 1
    also = f", as {'is 1 more test image' if more == 1 else f'are {more} more test images'}" if more else ""
    link = _first_link(test_image, root) or _first_link(train_image, root)
    how = (f"through the symbolic link {os.path.relpath(link, root)} -> {os.readlink(link)}" if link else
           "by another path")  # (a bind mount, say)
    return (f"--data-dir {root}: {os.path.relpath(test_image, root)} is {os.path.relpath(train_image, root)} "
            f"({how}{also}): the test set must hold other images than the training set: "
            f"{'remove the link' if link else 'read each image once'}")


def _class_of(path: str, split_root: str) -> str:
    return os.path.relpath(path, split_root).split(os.sep)[0]


def _rgb(image: Image.Image) -> Image.Image:
    """An image as 8-bit RGB (torchvision's loader, but 16-bit greys and float images scaled:
    PIL's convert clips them, and a 16-bit PNG became white, a 0..1 float TIFF black). PIL
    opens some 16-bit files as 32-bit mode I (PGM): their depth is the file's, read before
    the pixels, not guessed from their values (a dark one, all below 256, came out as bright
    as an 8-bit image)."""
    if image.mode == "F":
        return Image.fromarray(_float_to_8_bits(np.asarray(image))).convert("RGB")
    if image.mode == "I":
        raw = image.tile[0][3] if image.tile else ""  # the decoder's sample format, e.g. I;16B
        # (a PGM of any maxval above 255, P2 or P5, is decoded to 0..65535)
        sixteen_bits = image.format == "PPM" or "16" in (raw if isinstance(raw, str) else str(raw[0]) if raw else "")
    if image.mode.startswith("I;16") or (image.mode == "I" and (sixteen_bits or image.getextrema()[1] > 255)):
        grey = np.asarray(image).astype(np.int64).clip(0, 65535) // 257  # 65535 -> 255
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _float_to_8_bits(values: np.ndarray) -> np.ndarray:
    """A float image (PIL mode F) as uint8, by the first rule that its values fit: within
    [0, 1], the float convention (NumPy, scikit-image, ToTensor), times 255; within [0, 255],
    8-bit values saved as floats, as they are; otherwise (negative, HDR, depth, counts) no
    convention applies, and clipping would leave it black or white, so its own range is
    stretched to 0..255: per image, so such images' brightness is not comparable between them.
    NaN (no data) is the darkest value, an infinity the extreme it is on."""
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if low >= 0 and high <= 1:
        values = values * 255
    elif low < 0 or high > 255:
        values = (values - low) * (255 / (high - low) if high > low else 0)
    return values.round().clip(0, 255).astype(np.uint8)


def _large_transforms(size: int) -> tuple[T.Compose, T.Compose]:
    """The ImageNet recipe: random-resized crops for training, resize 256/224 + centre crop to test."""
    normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalise])
    test = T.Compose([ShorterSideResize(stored_size(size)), T.CenterCrop(size), *normalise])
    return train, test


def _small_transforms(size: int) -> tuple[T.Compose, T.Compose]:
    """The CIFAR recipe (pad by size/8, random crop, flip). The Resize makes images of another
    size the same scale in training as in testing; it does nothing to size×size images."""
    normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([ShorterSideResize(size), T.RandomCrop(size, padding=size // 8, pad_if_needed=True),
                       T.RandomHorizontalFlip(), *normalise])
    test = T.Compose([ShorterSideResize(size), T.CenterCrop(size), *normalise])
    return train, test


def _empty_classes(labels: list[int], classes: list[str]) -> list[str]:
    counts = torch.bincount(torch.tensor(labels, dtype=torch.int64), minlength=len(classes))
    return [classes[c] for c in range(len(classes)) if counts[c] == 0]


def _class_mismatch(train: list[str], test: list[str], where: str) -> str | None:
    """Which classes one split has and the other lacks. Names that print alike but differ in
    their code points (café as NFC in one split and NFD in the other, as macOS writes it; a
    zero-width or trailing space) are shown escaped, with their Unicode form: printed plainly,
    the line read 'only in training: café; only in test: café'."""
    if train == test:
        return None
    only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    alike = {_looks(name) for name in only_train} & {_looks(name) for name in only_test}

    def shown(names: list[str]) -> str:
        return ", ".join(f"{ascii(name)} ({_unicode_form(name)})" if _looks(name) in alike else name
                         for name in names) or "-"

    why = (" (the names shown escaped look alike but are other characters: Unicode normalisation NFC vs NFD, "
           "or invisible ones)" if alike else "")
    return (f"{where}: the training and test class lists differ (only in training: {shown(only_train)}; "
            f"only in test: {shown(only_test)}){why}: give both splits the same classes"
            f"{', spelt alike (e.g. NFC)' if alike else ''}")


def _looks(name: str) -> str:
    """How a name prints: its NFC form without format characters (zero-width) or outer spaces."""
    return unicodedata.normalize("NFC", "".join(c for c in name if unicodedata.category(c) != "Cf")).strip()


def _unicode_form(name: str) -> str:
    return next((form for form in ("NFC", "NFD") if unicodedata.is_normalized(form, name)), "neither NFC nor NFD")


def _food101_check(root: str, download: bool) -> Callable[[], str | None]:
    base = os.path.join(root, "food-101")
    url = tv_datasets.Food101._URL
    layout = "food-101/images/<class>/<id>.jpg and food-101/meta/{train,test}.json"

    def check() -> str | None:
        if download and not os.path.isdir(os.path.join(base, "meta")):
            try:
                tv_utils.download_and_extract_archive(url, download_root=root,
                                                      md5=tv_datasets.Food101._MD5)
            except Exception as error:  # no network, a proxy, a full disk: all fixable by the user
                return (f"--download of food101 failed ({type(error).__name__}: {error}): "
                        f"download {url} yourself and extract it into --data-dir {root}")
        if not os.path.isdir(root):
            return (f"--data-dir {root} {_absent(root)}: download {url} and extract it there, "
                    f"or pass --download")
        if not os.path.isdir(base):
            return (f"--data-dir {root} has no food-101/: download {url} and extract it there, "
                    f"or pass --download")
        for part in ("images", "meta/train.json", "meta/test.json"):
            if not os.path.exists(os.path.join(base, part)):
                return f"{base} lacks {part}: expected the Food-101 layout {layout}"
        if not os.path.isdir(os.path.join(base, "images")):  # (torchvision: "use download=True")
            return f"{base}/images is a file, not a folder: expected the Food-101 layout {layout}"
        for split in ("train", "test"):
            path = os.path.join(base, "meta", f"{split}.json")
            try:
                with open(path) as f:
                    meta = json.load(f)
                if not (isinstance(meta, dict) and all(isinstance(v, list) for v in meta.values())):
                    raise ValueError("not a mapping from class to a list of image ids")
            except (OSError, ValueError) as error:
                return f"{path} is not Food-101 metadata ({error}): restore it from food-101.tar.gz"
        return None

    return check


def load_food101(root: str, download: bool, image_size: int | None,
                  verify_once: Verifier) -> DatasetBundle:
    raise_on(verify_once(_food101_check(root, download)))
    size = image_size or 224
    train_tf, test_tf = _large_transforms(size)
    train = tv_datasets.Food101(root, split="train", transform=train_tf, loader=CheckedLoader(FOOD101_LISTS))
    test = tv_datasets.Food101(root, split="test", transform=test_tf, loader=CheckedLoader(FOOD101_LISTS))
    raise_on(_class_mismatch(train.classes, test.classes, f"{root}/food-101/meta"))
    if len(train.classes) < 2:
        raise UsageError(f"{root}/food-101/meta/train.json lists {len(train.classes)} class: a classifier needs 2 "
                         "or more: restore it from food-101.tar.gz")
    for split in (train, test):
        empty = _empty_classes(split._labels, split.classes)
        if empty:
            raise UsageError(f"{root}/food-101/meta/{split._split}.json lists no images for "
                             f"class {', '.join(empty)} (food-101/images/{empty[0]}/): "
                             f"list its images or remove the class")
    return DatasetBundle(name="food101", num_classes=len(train.classes), in_channels=3,
                         image_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=train,
                         test=test, class_names=tuple(train.classes))


def _class_dirs(path: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not _tool_debris(entry.name))


def _tool_debris(name: str) -> bool:
    """A folder that tools leave among the class folders or inside them, which holds no class
    and no images to train on: hidden ones (Jupyter's .ipynb_checkpoints, .git, .thumbnails),
    the __MACOSX of a zip made on a Mac and a Synology NAS's @eaDir (its thumbnails). Each was a
    class (empty, or one the other split lacked), or its thumbnails trained as their class."""
    return name.startswith(".") or name in ("__MACOSX", "@eaDir")


def _broken_link(root: str, paths: list[str]) -> str | None:
    """Why a class folder (or a split's) cannot be read when it is a symbolic link whose target
    is gone (an unmounted NAS), or None: it was dropped without a word (its class then 'only in'
    the other split). A broken link named as an image is a loose image's, left out with a note."""
    broken = [path for path in paths if os.path.islink(path) and not os.path.exists(path)
              and not tv_datasets.folder.has_file_allowed_extension(path, tv_datasets.folder.IMG_EXTENSIONS)]
    if not broken:
        return None
    also = f" (as are {len(broken) - 1} more links there)" if len(broken) > 1 else ""
    return (f"--data-dir {root}: {os.path.relpath(broken[0], root)} is a broken symbolic link to "
            f"{os.readlink(broken[0])}{also}: restore its target or remove the link")


class _ImageFolder(tv_datasets.ImageFolder):
    """torchvision's ImageFolder, whose classes leave tools' folders out (``_tool_debris``)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_dirs(directory)
        return classes, {name: index for index, name in enumerate(classes)}


def _absent(root: str) -> str:
    """Why a --data-dir that is no folder cannot be read: a path to a file is another typo."""
    return "is a file, not a folder" if os.path.exists(root) else "does not exist"


def _imagefolder_check(root: str) -> Callable[[], str | None]:
    layout = "DIR/train/<class>/<image> and DIR/val/<class>/<image>"

    def check() -> str | None:
        if not os.path.isdir(root):
            return f"--data-dir {root} {_absent(root)}: point it at a folder laid out as {layout}"
        for split in ("train", "val"):
            path = os.path.join(root, split)
            if not os.path.isdir(path):
                return _broken_link(root, [path]) or f"--data-dir {root} has no {split}/ folder: expected {layout}"
            broken = _broken_link(root, sorted(entry.path for entry in os.scandir(path)
                                               if not _tool_debris(entry.name)))
            if broken:
                return broken
            if not _class_dirs(path):
                return f"{path} has no class folders: expected {layout}"
        classes = _class_dirs(os.path.join(root, "train"))
        if len(classes) == 1:  # (train/images/*.jpg, or train/train/<class>/: a classifier of nothing)
            return (f"--data-dir {root} has one class ({classes[0]}): a classifier needs 2 or more; expected "
                    f"{layout}, one folder per class")
        return _class_mismatch(_class_dirs(os.path.join(root, "train")),
                               _class_dirs(os.path.join(root, "val")), f"--data-dir {root}")

    return check


def load_imagefolder(root: str, image_size: int | None, verify_once: Verifier) -> DatasetBundle:
    raise_on(verify_once(_imagefolder_check(root)))
    # Scan first without transforms: the image size decides which ones (every rank alike).
    kinds = {split: _ImageFiles(os.path.join(root, split)) for split in ("train", "val")}
    splits = {split: _ImageFolder(os.path.join(root, split), loader=CheckedLoader(),
                                  is_valid_file=kinds[split], allow_empty=True)
              for split in ("train", "val")}
    for split, folder in splits.items():
        empty = _empty_classes(folder.targets, folder.classes)
        if empty:
            raise UsageError(kinds[split].empty_class_message(empty))
    raise_on(_class_mismatch(splits["train"].classes, splits["val"].classes, f"--data-dir {root}"))
    real_folders = {split: _real_folders(folder.samples) for split, folder in splits.items()}
    for split in splits:
        read_twice = _folder_read_twice(real_folders[split], os.path.join(root, split))
        if read_twice:
            raise UsageError(f"--data-dir {root}: {read_twice}")
    raise_on(_test_images_trained_on(root, {split: folder.samples for split, folder in splits.items()},
                                     real_folders))
    median_side = _median_side(splits["train"].samples)
    small = median_side <= SMALL_IMAGE_PX
    size = image_size or (32 if small else 224)
    splits["train"].transform, splits["val"].transform = (_small_transforms if small else
                                                          _large_transforms)(size)
    classes = splits["train"].classes
    notes = tuple(f"{os.path.join(root, split)}: {note}"
                  for split in ("train", "val") for note in (*kinds[split].notes(), *_outside_classes(root, split)))
    if image_size is None and median_side != size:  # resized by default: the log says so (rank 0)
        notes += (f"{os.path.join(root, 'train')}: the images ({median_side} px, the median longer side) train at "
                  f"{size}x{size} px, the default for {'small' if small else 'large'} images: "
                  "--image-size N trains at N px instead",)
    return DatasetBundle(name="imagefolder", num_classes=len(classes), in_channels=3,
                         image_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         train=splits["train"], test=splits["val"], class_names=tuple(classes),
                         decode_size=size if small else None, notes=notes)


def _outside_classes(root: str, split: str) -> list[str]:
    """Notes of what lies beside the class folders and is left out: tools' folders, and images
    directly in the split's folder (they were ignored without a word)."""
    entries = list(os.scandir(os.path.join(root, split)))
    debris = sorted(entry.name for entry in entries if entry.is_dir() and _tool_debris(entry.name))
    loose = sum(1 for entry in entries if entry.is_file() and not entry.name.startswith(".")
                and tv_datasets.folder.has_file_allowed_extension(entry.name, tv_datasets.folder.IMG_EXTENSIONS))
    return ([f"{', '.join(debris)} left out: tools' folders, not classes"] if debris else []) + (
        [f"{loose} images directly in the folder, not in a class folder: left out"] if loose else [])


class _ImageFiles:
    """torchvision's test of an image file (its extensions), counting the files it leaves out
    whose extension PIL reads as an image (.gif, .jfif, ...): 20 GIFs of a class were left
    out without a word. Text, JSON and the like are left out silently, as before, unless a
    class holds nothing else: its error then says what it holds (it said 'no image files' of
    a folder of GIFs). Hidden files (.DS_Store) are not counted. Nor read are the files in
    tools' folders within a class (``_tool_debris``: .thumbnails, @eaDir), which trained as the
    class; the images among them are counted."""

    def __init__(self, split_root: str):
        self.split_root = split_root
        self.skipped: dict[str, int] = {}  # extension -> files of image formats not read
        self.in_tool_folders: dict[str, int] = {}  # tools' folder name -> images in it, left out
        self.unread_in_class: dict[str, dict[str, int]] = {}  # class -> {extension: files}
        self.images = {ext for ext, kind in Image.registered_extensions().items()  # (stubs: no pixels to
                       if kind in Image.OPEN and "Stub" not in Image.OPEN[kind][0].__module__}  # read, e.g. .h5)

    def __call__(self, path: str) -> bool:
        if os.path.basename(path).startswith("."):  # (a Mac's ._photo.jpg is its metadata, no image)
            return False
        is_image = tv_datasets.folder.has_file_allowed_extension(path, tv_datasets.folder.IMG_EXTENSIONS)
        # The scan joins its paths onto split_root, so a slice gives the folders within the class
        # (a relpath per file took 15 us: 20 s for ImageNet, on every rank).
        folders_in_class = path[len(self.split_root) + 1:].split(os.sep)[1:-1]
        tool_folder = next((name for name in folders_in_class if _tool_debris(name)), None)
        if tool_folder is not None:
            if is_image:
                self.in_tool_folders[tool_folder] = self.in_tool_folders.get(tool_folder, 0) + 1
            return False
        if is_image:
            return True
        extension = os.path.splitext(path)[1].lower()
        if extension in self.images:
            self.skipped[extension] = self.skipped.get(extension, 0) + 1
        unread = self.unread_in_class.setdefault(_class_of(path, self.split_root), {})
        unread[extension] = unread.get(extension, 0) + 1
        return False

    def empty_class_message(self, empty: list[str]) -> str:
        """The error for classes with no image read: the first one's files, if it has any."""
        folder = os.path.join(self.split_root, empty[0])
        others = f" (nor do {', '.join(empty[1:])})" if len(empty) > 1 else ""
        unread = self.unread_in_class.get(empty[0])
        if not unread:
            return f"{folder} holds no image files{others}: add images or remove the class folder"
        counts = [f"{n} {ext or '(no extension)'}" for ext, n in sorted(unread.items())]
        files = f"{', '.join(counts[:-1])} and {counts[-1]}" if len(counts) > 1 else counts[0]
        plural = "s" if sum(unread.values()) > 1 else ""
        them = "them" if set(unread) <= self.images else "the images among them"
        return (f"{folder} holds no image files that dd_mpi reads, only {files} file{plural} (it reads "
                f"{' '.join(tv_datasets.folder.IMG_EXTENSIONS)}){others}: convert {them} to PNG or JPEG, "
                "or remove the class folder")

    def notes(self) -> list[str]:
        """What was left out that one may take for images of the set."""
        notes = []
        if self.skipped:
            counts = ", ".join(f"{n} {ext}" for ext, n in sorted(self.skipped.items()))
            notes.append(f"{sum(self.skipped.values())} files of image formats not read ({counts}): torchvision "
                         f"reads {' '.join(tv_datasets.folder.IMG_EXTENSIONS)}; convert the images among them to "
                         "use them")
        if self.in_tool_folders:
            notes.append(f"{sum(self.in_tool_folders.values())} images in hidden or tools' folders within the "
                         f"classes ({', '.join(sorted(self.in_tool_folders))}) left out: tools' files, not images "
                         "of the class")
        return notes
