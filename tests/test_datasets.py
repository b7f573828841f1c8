"""dd_mpi.datasets on tiny data in the real on-disk formats, through torchvision's real parsers."""

from __future__ import annotations

import pickle
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets import utils as tv_utils

from dd_mpi.datasets import IMAGENET_MEAN, IMAGENET_STD, InMemorySplit, load_dataset
from dd_mpi.errors import UsageError

from datagen import (CIFAR10_NAMES, patch_md5_table, write_cifar10, write_cifar100, write_food101,
                     write_imagefolder)


def on_root(check):
    """verify_once of a world of one: this process is rank 0."""
    return check()


def load(name, data_dir, *, download=False, image_size=None, train_samples=None,
         test_samples=None, verify_once=on_root):
    return load_dataset(name, None if data_dir is None else str(data_dir), download=download,
                        image_size=image_size, train_samples=train_samples,
                        test_samples=test_samples, verify_once=verify_once)


def usage_error(call, *needles) -> str:
    """``call()`` must raise a one-line UsageError that contains every needle."""
    with pytest.raises(UsageError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in: {message}"
    return message


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch):
    patch_md5_table(CIFAR10, write_cifar10(tmp_path, n_train=50, n_test=20), monkeypatch.setattr)
    return tmp_path


@pytest.fixture
def cifar100_dir(tmp_path, monkeypatch):
    patch_md5_table(CIFAR100, write_cifar100(tmp_path, n_train=200, n_test=100), monkeypatch.setattr)
    return tmp_path


# ---------------------------------------------------------------------------- CIFAR

def test_cifar10_loads_as_nchw_uint8_with_the_pickled_pixels(cifar10_dir):
    data = load("cifar10", cifar10_dir)
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == ("cifar10", 10, 3, 32)
    assert data.class_names == CIFAR10_NAMES
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2470, 0.2435, 0.2616)
    for split, n in ((data.train, 50), (data.test, 20)):
        assert isinstance(split, InMemorySplit)
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.images.is_contiguous()
        assert split.labels.shape == (n,) and split.labels.dtype == torch.int64
        assert set(split.labels.tolist()) == set(range(10))
    with open(cifar10_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # how the CIFAR site says to read the files
    first = torch.from_numpy(entry[b"data"][0].reshape(3, 32, 32))  # R plane, G plane, B plane
    assert torch.equal(data.train.images[0], first)
    assert data.train.labels[:len(entry[b"labels"])].tolist() == entry[b"labels"]


def test_cifar_images_carry_a_learnable_class_signal(cifar10_dir):
    data = load("cifar10", cifar10_dir)
    train, test = data.train.images.float(), data.test.images.float()
    means = torch.stack([train[data.train.labels == c].mean(0) for c in range(10)])
    nearest = torch.cdist(test.flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == data.test.labels).float().mean() > 0.9


def test_cifar100_loads_fine_labels(cifar100_dir):
    data = load("cifar100", cifar100_dir)
    assert (data.num_classes, len(data.class_names), data.class_names[7]) == (100, 100, "fine_07")
    assert data.train.images.shape == (200, 3, 32, 32) and data.test.images.shape == (100, 3, 32, 32)
    assert set(data.train.labels.tolist()) == set(range(100))
    assert data.mean == (0.5071, 0.4865, 0.4409)


def test_files_that_differ_from_the_real_md5_table_are_rejected(tmp_path):
    write_cifar10(tmp_path)  # torchvision's real table: these files cannot match it
    usage_error(lambda: load("cifar10", tmp_path), "data_batch_1", "corrupt", "md5")


def test_a_corrupted_cifar_file_is_detected_and_named(cifar10_dir):
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    usage_error(lambda: load("cifar10", cifar10_dir), str(path), "corrupt", "--download")


def test_verify_once_runs_every_md5_once_and_other_ranks_hash_nothing(cifar10_dir, monkeypatch):
    hashed, calls = [], []
    real_md5 = tv_utils.calculate_md5
    monkeypatch.setattr(tv_utils, "calculate_md5", lambda path, **kw: hashed.append(path) or real_md5(path, **kw))

    def rank0(check):
        calls.append(check)
        return check()

    load("cifar10", cifar10_dir, verify_once=rank0)
    assert len(calls) == 1
    assert sorted(Path(p).name for p in hashed) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])

    hashed.clear()
    other_rank = load("cifar10", cifar10_dir, verify_once=lambda check: None)  # rank 0 said OK
    assert hashed == [] and other_rank.train.images.shape == (50, 3, 32, 32)


@pytest.mark.parametrize("name", ["cifar10", "food101", "imagefolder"])
def test_the_verdict_of_rank_0_is_raised_and_the_check_not_run_elsewhere(tmp_path, name):
    ran = []
    message = usage_error(lambda: load(name, tmp_path, verify_once=lambda check: ran.append(1) or
                                       "rank 0: data_batch_2 is corrupt"), "rank 0: data_batch_2")
    assert message == "rank 0: data_batch_2 is corrupt" and ran == [1]
    with pytest.raises(UsageError):
        load(name, tmp_path / "missing", verify_once=lambda check: "verdict of rank 0")


def test_download_runs_inside_the_check_of_rank_0_only(tmp_path, monkeypatch):
    patch_md5_table(CIFAR10, write_cifar10(tmp_path / "reference"), monkeypatch.setattr)
    downloads = []

    def fake_download(url, root, filename=None, md5=None):
        downloads.append((url, filename, md5))
        write_cifar10(root)  # what extracting the real archive leaves behind

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    data_dir = tmp_path / "data"
    verdicts = []

    def rank0(check):
        verdicts.append(check())
        return verdicts[-1]

    load("cifar10", data_dir, download=True, verify_once=rank0)
    assert downloads == [(CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)] and verdicts == [None]
    load("cifar10", data_dir, download=True, verify_once=lambda check: None)  # another rank
    load("cifar10", data_dir, download=True)  # rank 0 again: the files are intact, no download
    assert len(downloads) == 1


def test_a_failed_download_is_a_usage_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    usage_error(lambda: load("cifar100", tmp_path, download=True), "--download", "unreachable",
                CIFAR100.url)
    usage_error(lambda: load("food101", tmp_path, download=True), "--download", "food-101")


# ---------------------------------------------------------------------------- bad input

def test_unknown_dataset_lists_the_choices(tmp_path):
    usage_error(lambda: load("mnist", tmp_path), "--dataset mnist", "cifar10", "cifar100",
                "food101", "imagefolder")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "food101", "imagefolder"])
def test_missing_data_dir(tmp_path, name):
    usage_error(lambda: load(name, None), "--data-dir")
    message = usage_error(lambda: load(name, tmp_path / "nowhere"), "--data-dir", "nowhere", "does not exist")
    if name != "imagefolder":
        assert "--download" in message
    (tmp_path / "afile").write_text("x")  # a path to a file: another typo, said as such
    usage_error(lambda: load(name, tmp_path / "afile"), "--data-dir", "afile is a file, not a folder")


def test_wrong_cifar_layout(tmp_path, monkeypatch):
    usage_error(lambda: load("cifar10", tmp_path), "cifar-10-batches-py", "--download")
    patch_md5_table(CIFAR100, write_cifar100(tmp_path, n_train=10, n_test=10), monkeypatch.setattr)
    (tmp_path / "cifar-100-python" / "test").unlink()
    usage_error(lambda: load("cifar100", tmp_path), "cifar-100-python lacks test")
    usage_error(lambda: load("cifar100", tmp_path / "cifar-100-python"),  # one level too deep: it said download
                "cifar-100-python is cifar100's own folder: give the folder that holds it, "
                f"--data-dir {tmp_path}")


def test_wrong_food101_layout(tmp_path):
    write_food101(tmp_path)
    (tmp_path / "food-101" / "meta" / "test.json").unlink()
    usage_error(lambda: load("food101", tmp_path), "meta/test.json", "food-101/images/<class>")
    (tmp_path / "food-101" / "meta" / "test.json").write_text("[1, 2")
    usage_error(lambda: load("food101", tmp_path), "test.json is not Food-101 metadata")
    shutil.rmtree(tmp_path / "food-101" / "images")
    (tmp_path / "food-101" / "images").write_text("")  # torchvision: "use download=True", no dd-train flag
    usage_error(lambda: load("food101", tmp_path), "food-101/images is a file, not a folder")


def test_wrong_imagefolder_layout(tmp_path):
    write_imagefolder(tmp_path / "d", per_class=1, val_per_class=1)
    shutil.rmtree(tmp_path / "d" / "val")
    usage_error(lambda: load("imagefolder", tmp_path / "d"), "val/", "train/<class>")
    usage_error(lambda: load("imagefolder", tmp_path, download=True), "--download")


def test_one_class_is_no_classifier(tmp_path):
    """train/images/*.jpg or train/train/<class>/ reads as one class: it trained to 100 % on
    nothing (loss 0) and wrote a report."""
    write_imagefolder(tmp_path / "d", classes=("images",), per_class=2, val_per_class=1)
    usage_error(lambda: load("imagefolder", tmp_path / "d"), "has one class (images): a classifier needs 2 or more")
    write_food101(tmp_path / "f", classes=("churros",), per_class=2, test_per_class=1)
    usage_error(lambda: load("food101", tmp_path / "f"), "train.json lists 1 class: a classifier needs 2")


def test_a_16_bit_grey_image_keeps_its_shades(tmp_path):
    """PIL's convert('RGB') clips 16-bit greys (a 16-bit PNG from a microscope or a scanner)
    to 255: the image trained as white."""
    from dd_mpi.formats import CheckedLoader
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    pixels = np.asarray(CheckedLoader()(tmp_path / "grey16.png"))
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels[..., 0], (ramp // 257).astype(np.uint8))
    Image.fromarray(np.full((4, 4), 200, np.int32), "I").save(tmp_path / "eight_bit_values.tif")
    assert (np.asarray(CheckedLoader()(tmp_path / "eight_bit_values.tif")) == 200).all()  # kept as they are
    # a 16-bit PGM opens as mode I: a dark one (all below 256) is still 16-bit, not 8
    (tmp_path / "dark16.pgm").write_bytes(b"P5\n64 64\n65535\n" + (ramp // 512).astype(">u2").tobytes())
    assert Image.open(tmp_path / "dark16.pgm").mode == "I"
    pixels = np.asarray(CheckedLoader()(tmp_path / "dark16.pgm"))
    assert np.array_equal(pixels[..., 0], (ramp // 512 // 257).astype(np.uint8))
    # plain (P2) and other depths: PIL decodes any maxval above 255 to 0..65535
    (tmp_path / "plain.pgm").write_text("P2\n2 2\n65535\n100 200\n50 30000\n")
    (tmp_path / "ten_bits.pgm").write_bytes(b"P5\n2 2\n1023\n" + np.array([3, 2, 1, 1023], ">u2").tobytes())
    assert np.asarray(CheckedLoader()(tmp_path / "plain.pgm"))[..., 0].tolist() == [[0, 0], [0, 30000 // 257]]
    assert np.asarray(CheckedLoader()(tmp_path / "ten_bits.pgm"))[..., 0].tolist() == [[0, 0], [0, 255]]


def test_a_32_bit_float_image_keeps_its_shades(tmp_path):
    """PIL's convert('RGB') clips a float image (mode F, e.g. a float TIFF of 0..1) to 0..255 as
    it is: a 0..1 gradient trained as black."""
    from dd_mpi.formats import CheckedLoader
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    pixels = np.asarray(CheckedLoader()(tmp_path / "unit.tif"))
    assert pixels.shape == (64, 64, 3) and abs(pixels.mean() - 127.5) < 1
    assert (pixels[0, 0, 0], pixels[-1, -1, 0]) == (0, 255)
    Image.fromarray(np.full((4, 4), 200.0, np.float32)).save(tmp_path / "eight_bit_values.tif")
    assert (np.asarray(CheckedLoader()(tmp_path / "eight_bit_values.tif")) == 200).all()  # kept as they are
    depth = ramp * 5000 - 1000  # no convention: stretched from its own range, not clipped to white
    depth[0, 1] = np.nan  # (no-data: the darkest)
    Image.fromarray(depth).save(tmp_path / "depth.tif")
    pixels = np.asarray(CheckedLoader()(tmp_path / "depth.tif"))[..., 0]
    assert (pixels[0, 0], pixels[0, 1], pixels[-1, -1]) == (0, 0, 255) and abs(pixels.mean() - 127.5) < 1


@pytest.mark.parametrize("recipe", ["large", "small"])
def test_a_very_long_thin_image_is_not_blown_up(tmp_path, recipe):
    """Resizing the shorter side of a 6000×2 image to 256 made it 768000×256 (1.5 GB): the longer
    side now stops at 16× the size, and the crops pad. Each transform that resizes is checked:
    the test transform, the small recipe's training one, and the decoder of caches and of
    in-memory sets."""
    from dd_mpi.decoded import _Decoded
    write_imagefolder(tmp_path, classes=("cat", "dog"), per_class=2, val_per_class=1,
                      size=96 if recipe == "large" else 24)
    strip = Image.new("RGB", (6000, 2), (200, 10, 10))
    for split in ("train", "val"):
        strip.save(tmp_path / split / "cat" / "strip.png")
    bundle = load("imagefolder", tmp_path, image_size=32)
    assert (bundle.decode_size is None) == (recipe == "large")
    resizing = [bundle.test.transform, _Decoded([], 36, 32).transform]
    if recipe == "small":
        resizing.append(bundle.train.transform)
    for transform in resizing:
        resize = transform.transforms[0]
        assert max(resize(strip).size) <= 16 * resize.size, transform
    for split in (bundle.test, bundle.train):
        index = next(i for i, (path, _) in enumerate(split.samples) if path.endswith("strip.png"))
        assert split[index][0].shape == (3, 32, 32)  # the crops pad what the resize left short
    decoded, _ = _Decoded([(str(tmp_path / "val" / "cat" / "strip.png"), 0)], 36, 32)[0]
    assert decoded.shape == (3, 32, 32) and decoded.dtype == torch.uint8


def test_imagefolder_class_lists_that_differ_are_named(tmp_path):
    write_imagefolder(tmp_path, classes=("cat", "dog", "emu"), per_class=2, val_per_class=1)
    (tmp_path / "val" / "emu").rename(tmp_path / "val" / "ferret")
    usage_error(lambda: load("imagefolder", tmp_path), "only in training: emu",
                "only in test: ferret")


def test_class_names_that_differ_only_in_unicode_normalisation_are_told_apart(tmp_path):
    """train/café (NFC, one code point é) and val/café (NFD, e + a combining accent) printed
    'only in training: café; only in test: café'."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    write_imagefolder(tmp_path, classes=("cat", nfc, "emu"), per_class=2, val_per_class=1)
    (tmp_path / "val" / nfc).rename(tmp_path / "val" / nfd)
    (tmp_path / "val" / "emu").rename(tmp_path / "val" / "ferret")
    usage_error(lambda: load("imagefolder", tmp_path), r"only in training: 'caf\xe9' (NFC), emu",
                r"only in test: 'cafe\u0301' (NFD), ferret", "Unicode normalisation NFC vs NFD",
                "give both splits the same classes, spelt alike (e.g. NFC)")


def test_food101_class_lists_that_differ_are_named(tmp_path):
    write_food101(tmp_path, classes=("apple_pie", "churros"), per_class=1, test_per_class=1)
    meta = tmp_path / "food-101" / "meta" / "test.json"
    meta.write_text(meta.read_text().replace('"churros":', '"gyoza":'))
    usage_error(lambda: load("food101", tmp_path), "churros", "gyoza")


def test_an_empty_class_is_named(tmp_path):
    write_imagefolder(tmp_path, classes=("cat", "dog"), per_class=2, val_per_class=1)
    (tmp_path / "train" / "gnu").mkdir()
    (tmp_path / "val" / "gnu").mkdir()
    (tmp_path / "train" / "gnu" / "notes.txt").write_text("not an image")
    usage_error(lambda: load("imagefolder", tmp_path), str(tmp_path / "train" / "gnu"), "no image")


def test_a_class_of_images_in_formats_not_read_says_so(tmp_path):
    """A class of GIFs only read 'holds no image files (empty: d)': the note that .gif is not
    read came after that check, never printed."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1)
    for split in ("train", "val"):
        (tmp_path / split / "d").mkdir()
        for i in range(5):
            Image.new("RGB", (8, 8)).save(tmp_path / split / "d" / f"{i}.gif")
    (tmp_path / "train" / "d" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "d" / ".DS_Store").write_bytes(b"")  # hidden: not counted
    usage_error(lambda: load("imagefolder", tmp_path), f"{tmp_path / 'train' / 'd'} holds no image files that dd_mpi "
                "reads, only 5 .gif and 1 .txt files (it reads .jpg .jpeg", "convert the images among them to PNG or JPEG")
    (tmp_path / "train" / "d" / "notes.txt").unlink()
    (tmp_path / "train" / "d" / "5.tiff").write_bytes(b"")  # read: the class is not empty
    usage_error(lambda: load("imagefolder", tmp_path), f"{tmp_path / 'val' / 'd'} holds no image files that dd_mpi "
                "reads, only 5 .gif files", "convert them to PNG or JPEG")


def test_an_empty_food101_class_is_named(tmp_path):
    write_food101(tmp_path, classes=("apple_pie", "churros"), per_class=1, test_per_class=1)
    meta = tmp_path / "food-101" / "meta" / "train.json"
    meta.write_text(meta.read_text().replace('"churros": ["churros/', '"churros": [], "x": ["churros/'))
    meta_test = tmp_path / "food-101" / "meta" / "test.json"
    meta_test.write_text(meta_test.read_text().replace('"churros": ["churros/', '"churros": [], "x": ["churros/'))
    usage_error(lambda: load("food101", tmp_path), "churros", "no images")


def test_an_unreadable_imagefolder_image_is_named_when_loaded(tmp_path):
    write_imagefolder(tmp_path, per_class=2, val_per_class=1)
    data = load("imagefolder", tmp_path)
    index, (path, _) = 3, data.train.samples[3]
    Path(path).write_bytes(b"this is not a png")
    usage_error(lambda: data.train[index], path, "cannot read image")
    data.train[0]  # the others still load


def test_an_unreadable_first_image_is_named(tmp_path):
    write_imagefolder(tmp_path, per_class=2, val_per_class=1)
    first = sorted((tmp_path / "train" / "cat").iterdir())[0]
    first.write_bytes(b"")
    usage_error(lambda: load("imagefolder", tmp_path), str(first))


def test_a_truncated_or_missing_food101_image_is_named_when_loaded(tmp_path):
    write_food101(tmp_path, per_class=2, test_per_class=1)
    data = load("food101", tmp_path)
    path = data.train._image_files[1]
    path.write_bytes(path.read_bytes()[:200])
    usage_error(lambda: data.train[1], str(path), "cannot read image")
    gone = data.test._image_files[0]
    gone.unlink()
    message = usage_error(lambda: data.test[0], str(gone), "is missing: restore it",
                          "meta/train.json and meta/test.json")
    assert "delete" not in message  # it is listed: deleting it cannot help


def test_a_broken_symbolic_link_in_an_imagefolder_is_named_with_its_target(tmp_path):
    """It read 'is missing: restore it, or leave it out of the dataset's lists (Food-101: ...)'
    for an ImageFolder, which has no lists: the link and where it points are what to fix."""
    from dd_mpi.decoded import _Decoded
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1)
    link = tmp_path / "train" / "a" / "link.png"
    link.symlink_to(tmp_path / "moved" / "a_0000.png")
    needles = (f"image {link} is a broken symbolic link to {tmp_path / 'moved' / 'a_0000.png'}", "remove the link")
    message = usage_error(lambda: load("imagefolder", tmp_path), *needles)  # the size check reads it
    assert "Food-101" not in message
    assert "Food-101" not in usage_error(lambda: _Decoded([(str(link), 0)], 32, 32)[0], *needles)  # decoding


# ---------------------------------------------------------------------------- image files

def test_food101_loads_with_the_imagenet_recipe(tmp_path):
    write_food101(tmp_path, classes=("churros", "apple_pie", "bibimbap"), per_class=4, test_per_class=2)
    data = load("food101", tmp_path, image_size=48)
    assert data.class_names == ("apple_pie", "bibimbap", "churros")  # sorted, like torchvision
    assert (data.num_classes, data.image_size, len(data.train), len(data.test)) == (3, 48, 12, 6)
    assert (data.mean, data.std) == (IMAGENET_MEAN, IMAGENET_STD)
    for split in (data.train, data.test):
        labels = []
        for i in range(len(split)):
            image, label = split[i]
            assert image.shape == (3, 48, 48) and image.dtype == torch.float32
            assert image.min() < 0 < image.max()  # normalised, not [0, 1]
            assert Path(split._image_files[i]).parent.name == data.class_names[label]
            labels.append(label)
        assert sorted(set(labels)) == [0, 1, 2]
    default = load("food101", tmp_path)
    assert default.image_size == 224 and default.test[0][0].shape == (3, 224, 224)
    pickle.loads(pickle.dumps(data.train))  # spawned DataLoader workers receive it pickled


def test_imagefolder_small_images_keep_their_pixels(tmp_path):
    write_imagefolder(tmp_path, classes=("emu", "cat", "dog"), per_class=3, val_per_class=2, size=16)
    data = load("imagefolder", tmp_path)
    assert data.class_names == ("cat", "dog", "emu") and data.num_classes == 3
    assert data.image_size == 32 and data.train[0][0].shape == (3, 32, 32)
    assert data.test[0][0].shape == (3, 32, 32)
    assert [label for _, label in data.test] == [0, 0, 1, 1, 2, 2]

    native = load("imagefolder", tmp_path, image_size=16)
    image, label = native.test[5]
    path = native.test.samples[5][0]
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255
    expected = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert label == 2 and torch.allclose(image, expected, atol=1e-6)
    assert native.train[0][0].shape == (3, 16, 16)
    pickle.loads(pickle.dumps(native.train))


@pytest.mark.parametrize("most, stray, recipe", [(16, 2000, 32), (80, 8, 224)])
def test_the_recipe_follows_most_images_not_the_first(tmp_path, most, stray, recipe):
    """Small or large was the first training image's size: a thumbnail first among photos put
    a Food-101-sized set in memory at the CIFAR recipe, a photo among thumbnails the reverse."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=4, val_per_class=1, size=most)
    Image.new("RGB", (stray, stray)).save(tmp_path / "train" / "a" / "!first.png")  # sorts first
    assert load("imagefolder", tmp_path).image_size == recipe


def test_image_files_torchvision_does_not_read_are_noted(tmp_path):
    """20 GIFs and a .jfif (a JPEG) were left out without a word; text files still are."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1)
    for name in ("x.gif", "y.GIF", "z.jfif"):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "b" / name, format="GIF" if "gif" in name.lower() else "JPEG")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a" / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # PIL's stub: no image to read
    data = load("imagefolder", tmp_path, image_size=16)
    assert len(data.train) == 4 and data.notes == (
        f"{tmp_path / 'train'}: 3 files of image formats not read (2 .gif, 1 .jfif): torchvision reads .jpg .jpeg "
        ".png .ppm .bmp .pgm .tif .tiff .webp; convert the images among them to use them",)
    write_imagefolder(tmp_path / "plain", classes=("a", "b"), per_class=2, val_per_class=1)
    assert load("imagefolder", tmp_path / "plain", image_size=16).notes == ()


@pytest.mark.parametrize("side, trained", [(64, 32), (16, 32), (80, 224)])
def test_the_size_chosen_for_an_imagefolder_is_noted(tmp_path, side, trained):
    """64×64 images trained at 32 px unless --image-size was given, and the log did not say so."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1, size=side)
    data = load("imagefolder", tmp_path)
    assert data.image_size == trained and data.notes == (
        f"{tmp_path / 'train'}: the images ({side} px, the median longer side) train at {trained}x{trained} px, "
        f"the default for {'small' if trained == 32 else 'large'} images: --image-size N trains at N px instead",)
    assert load("imagefolder", tmp_path, image_size=trained).notes == ()  # asked for: nothing to note
    write_imagefolder(tmp_path / "cifar_sized", classes=("a", "b"), per_class=2, val_per_class=1, size=32)
    assert load("imagefolder", tmp_path / "cifar_sized").notes == ()  # trained as they are


def test_a_symbolic_link_loop_is_refused(tmp_path):
    """os.walk follows links: `ln -s . again` listed class a's images ~40 times over."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1)
    (tmp_path / "train" / "a" / "again").symlink_to(".")
    usage_error(lambda: load("imagefolder", tmp_path),
                f"{tmp_path / 'train' / 'a' / 'again'} is {tmp_path / 'train' / 'a'} again, through a symbolic link")
    (tmp_path / "train" / "a" / "again").unlink()
    write_imagefolder(tmp_path / "outside", classes=("b",), per_class=3, val_per_class=0)
    (tmp_path / "train" / "b" / "more").symlink_to(tmp_path / "outside" / "train" / "b")  # a folder from outside: fine
    assert len(load("imagefolder", tmp_path).train) == 7


def test_a_symbolic_link_to_a_folder_already_read_is_refused(tmp_path):
    """`ln -s DATA/train/b DATA/train/a/more` counted every image of b as class a too, silently."""
    write_imagefolder(tmp_path, classes=("a", "b", "c"), per_class=2, val_per_class=1)
    more = tmp_path / "train" / "a" / "more"
    more.symlink_to(tmp_path / "train" / "b")
    usage_error(lambda: load("imagefolder", tmp_path), f"{more} is a symbolic link to {tmp_path / 'train' / 'b'}, "
                f"which is read already ({tmp_path / 'train' / 'b'}): remove the link", "twice, as a and as b")
    more.unlink()
    write_imagefolder(tmp_path / "outside", classes=("x",), per_class=2, val_per_class=0)
    for name in ("a", "c"):  # one folder from outside, linked into two classes
        (tmp_path / "train" / name / "x").symlink_to(tmp_path / "outside" / "train" / "x")
    usage_error(lambda: load("imagefolder", tmp_path), f"{tmp_path / 'train' / 'c' / 'x'} is a symbolic link to "
                f"{tmp_path / 'outside' / 'train' / 'x'}, which is read already ({tmp_path / 'train' / 'a' / 'x'})",
                "as a and as c")


def test_imagefolder_large_images_get_the_imagenet_recipe(tmp_path):
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1, size=80)
    data = load("imagefolder", tmp_path)
    assert data.image_size == 224 and data.test[0][0].shape == (3, 224, 224)
    small = load("imagefolder", tmp_path, image_size=40)
    assert small.train[1][0].shape == (3, 40, 40) and small.test[1][0].shape == (3, 40, 40)


# ---------------------------------------------------------------------------- caps

def test_caps_take_the_same_mixed_subset_every_time(cifar10_dir):
    data = load("cifar10", cifar10_dir, train_samples=12, test_samples=5)
    again = load("cifar10", cifar10_dir, train_samples=12, test_samples=5)
    full = load("cifar10", cifar10_dir)
    assert data.train.images.shape == (12, 3, 32, 32) and len(data.test.labels) == 5
    assert torch.equal(data.train.images, again.train.images)
    assert torch.equal(data.test.labels, again.test.labels)
    assert data.train.images.is_contiguous()
    assert len(set(data.train.labels.tolist())) >= 5  # mixed, not the first class only
    rows = [int(torch.nonzero((full.train.images == img).flatten(1).all(1))[0]) for img in data.train.images]
    assert rows == sorted(rows) and len(set(rows)) == 12 and rows != list(range(12))
    assert torch.equal(full.train.labels[rows], data.train.labels)

    uncapped = load("cifar10", cifar10_dir, train_samples=1000, test_samples=20)
    assert torch.equal(uncapped.train.images, full.train.images)
    assert torch.equal(uncapped.test.labels, full.test.labels)


def test_caps_on_image_file_datasets(tmp_path):
    write_imagefolder(tmp_path, classes=("a", "b", "c", "d"), per_class=5, val_per_class=3)
    data = load("imagefolder", tmp_path, train_samples=6, test_samples=100)
    assert len(data.train) == 6 and len(data.test) == 12
    labels = [label for _, label in data.train]
    assert len(set(labels)) >= 3
    again = load("imagefolder", tmp_path, train_samples=6)
    assert [label for _, label in again.train] == labels
    assert data.train[0][0].shape == (3, 32, 32)


# ------------------------------------------------------------- augmentation with workers

def test_image_file_augmentation_is_the_same_with_any_workers_and_after_a_restart(tmp_path):
    """Each sample's crops and flips follow its own seed: 0 or 2 workers, persistent workers
    several epochs old, or a fresh plan (a resumed run) all give the same batches."""
    from dd_mpi.comm import Comm
    from dd_mpi.data import DataPlan

    write_imagefolder(tmp_path, classes=("a", "b"), per_class=4, val_per_class=1, size=80)
    data = load("imagefolder", tmp_path, image_size=32)  # RandomResizedCrop + flip
    comm = Comm([0], 0, None, torch.device("cpu"))
    pool = torch.arange(len(data.train))

    def epochs(workers: int, which: list[int]) -> list[torch.Tensor]:
        plan = DataPlan(data, torch.device("cpu"), seed=0, batch_size=3, workers=workers)
        return [torch.cat([images.flatten() for images, _ in plan.train(comm, pool, stream=100, epoch=e)])
                for e in which]

    # an uneven split over 3 ranks (3, 3, 2 images): one step each, every image once
    uneven = [DataPlan(data, torch.device("cpu"), seed=0, batch_size=2, workers=0)
              .train(Comm([0, 1, 2], r, None, torch.device("cpu")), pool, stream=100, epoch=0) for r in range(3)]
    assert [len(b) for b in uneven] == [1, 1, 1]
    assert sorted(len(labels) for b in uneven for _, labels in b) == [2, 3, 3]

    long_lived = epochs(2, [0, 1, 2])
    assert torch.equal(long_lived[2], epochs(0, [2])[0])  # resumed at epoch 2, no workers
    assert torch.equal(long_lived[1], epochs(2, [1])[0])  # resumed at epoch 1, fresh workers
    assert not torch.equal(long_lived[0], long_lived[1])  # and the epochs do differ


def test_tools_folders_and_a_mac_s_metadata_files_are_no_classes_or_images(tmp_path):
    """train/.ipynb_checkpoints and val/__MACOSX were classes (one split lacked them, or they were
    empty), and a Mac's ._photo.png, metadata with an image's extension, an unreadable image."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "val" / "__MACOSX" / "a").mkdir(parents=True)
    (tmp_path / "val" / "__MACOSX" / "a" / "._a_0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "train" / "a" / "._a_0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    data = load("imagefolder", tmp_path, image_size=16)
    assert data.class_names == ("a", "b") and len(data.train) == 4 and len(data.test) == 2
    assert data.notes == (f"{tmp_path / 'train'}: .ipynb_checkpoints left out: tools' folders, not classes",
                          f"{tmp_path / 'val'}: __MACOSX left out: tools' folders, not classes")


@pytest.mark.parametrize("linked", ["split", "class"])
def test_a_test_image_that_is_a_training_image_through_a_link_is_refused(tmp_path, linked):
    """`val -> train` (or a class linked across) scored the run on its training images, 100 %,
    without a word."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1)
    train, val = tmp_path / "train", tmp_path / "val"
    if linked == "split":
        shutil.rmtree(val)
        val.symlink_to("train")
        shown = "val/a/a_0000.png is train/a/a_0000.png (through the symbolic link val -> train, as are 3 more"
    else:
        shutil.rmtree(val / "a")
        (val / "a").symlink_to(train / "a")
        shown = f"val/a/a_0000.png is train/a/a_0000.png (through the symbolic link val/a -> {train / 'a'}, as is 1 more"
    usage_error(lambda: load("imagefolder", tmp_path), f"--data-dir {tmp_path}: {shown}",
                "the test set must hold other images than the training set: remove the link")


def test_test_images_linked_from_elsewhere_are_fine(tmp_path):
    """Splits made of links into one pool of images are no leak while no image is in both."""
    write_imagefolder(tmp_path / "pool", classes=("a", "b"), per_class=1, val_per_class=0)
    write_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=2, val_per_class=0)
    for name in ("a", "b"):
        (tmp_path / "d" / "val" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "val" / name / "x.png").symlink_to(tmp_path / "pool" / "train" / name / f"{name}_0000.png")
    data = load("imagefolder", tmp_path / "d", image_size=16)
    assert len(data.train) == 4 and len(data.test) == 2


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_folder_that_is_a_broken_link_is_named_with_its_target(tmp_path, split):
    """train/zzz -> an unmounted NAS was dropped without a word ('only in test: zzz')."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=1, val_per_class=1)
    gone = tmp_path / "nas" / "zzz"
    (tmp_path / split / "zzz").symlink_to(gone)
    (tmp_path / split / ".zzz").symlink_to(gone)  # hidden: no class, broken or not
    usage_error(lambda: load("imagefolder", tmp_path), f"--data-dir {tmp_path}: {split}/zzz is a broken symbolic "
                f"link to {gone}: restore its target or remove the link")
    (tmp_path / split / "zzz").unlink()
    shutil.move(tmp_path / split, tmp_path / "moved")
    (tmp_path / split).symlink_to(tmp_path / "nowhere")  # the split's folder itself
    usage_error(lambda: load("imagefolder", tmp_path), f"{split} is a broken symbolic link to {tmp_path / 'nowhere'}")


def test_images_in_tools_folders_within_a_class_are_left_out_and_noted(tmp_path):
    """train/a/.thumbnails/t.png and a Synology's train/b/@eaDir/<image>/SYNOFILE_THUMB_M.jpg
    trained as their classes."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1)
    thumbnails = tmp_path / "train" / "a" / ".thumbnails"
    synology = tmp_path / "train" / "b" / "@eaDir" / "b_0000.png"
    for folder in (thumbnails, synology):
        folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(thumbnails / "t.png")
    for name in ("SYNOFILE_THUMB_M.jpg", "SYNOFILE_THUMB_S.jpg"):
        Image.new("RGB", (8, 8)).save(synology / name)
    (synology / "SYNOINDEX_MEDIA_INFO").write_text("{}")  # no image: not counted
    data = load("imagefolder", tmp_path, image_size=16)
    assert len(data.train) == 4 and data.notes == (
        f"{tmp_path / 'train'}: 3 images in hidden or tools' folders within the classes (.thumbnails, @eaDir) left "
        "out: tools' files, not images of the class",)
    (tmp_path / "val" / "@eaDir" / "a_0000.png").mkdir(parents=True)  # beside the classes: no class either
    assert load("imagefolder", tmp_path, image_size=16).notes[1:] == (
        f"{tmp_path / 'val'}: @eaDir left out: tools' folders, not classes",)


def test_images_directly_in_a_split_folder_are_noted(tmp_path):
    """train/*.png beside the class folders were left out without a word."""
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=2, val_per_class=1)
    for name in ("x.png", "y.JPG"):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / name)
    (tmp_path / "train" / "README.txt").write_text("not an image")
    (tmp_path / "train" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    data = load("imagefolder", tmp_path, image_size=16)
    assert len(data.train) == 4 and data.notes == (
        f"{tmp_path / 'train'}: 2 images directly in the folder, not in a class folder: left out",)
