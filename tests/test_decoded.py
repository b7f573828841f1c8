"""The memory-mapped cache of large image files (``--cache-dir``), on Food-101's real layout:
what it stores, that training and testing read the right pixels from it, that it is reused
and rebuilt when it should be, and that a failed build leaves nothing behind."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from dd_mpi.comm import Comm
from dd_mpi.config import RunConfig, parse_config
from dd_mpi.data import DataPlan, centre_crop, draw_resized_crops, resized_crop_flip
from dd_mpi.datasets import load_dataset
from dd_mpi.decoded import cached_split, sample_list
from dd_mpi.errors import UsageError
from dd_mpi.formats import stored_size

from datagen import write_food101

CPU = torch.device("cpu")


def food101(tmp_path, image_size=28, train_samples=None):
    write_food101(tmp_path / "data", per_class=3, test_per_class=2)
    return load_dataset("food101", str(tmp_path / "data"), download=False, image_size=image_size,
                        train_samples=train_samples, test_samples=None, verify_once=lambda check: check())


def cache(tmp_path, split, image_size=28):
    cfg = RunConfig(dataset="food101", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    return cached_split(split, split_name="train", size=image_size, cfg=cfg, comm=Comm([0], 0, None, CPU),
                        workers=0)


def test_the_cached_test_split_gives_the_test_transforms_pixels(tmp_path):
    """28 px crops of 32 px stored squares: the centre crop is exactly Resize(32) + CentreCrop(28)."""
    data = food101(tmp_path)
    cached = cache(tmp_path, data.test)
    assert stored_size(224) == 256  # the ImageNet recipe's test resize
    assert cached.images.shape == (len(data.test), 3, stored_size(28), stored_size(28)) == (6, 3, 32, 32)
    assert cached.images.dtype == torch.uint8 and cached.crop_to == 28
    assert cached.labels.tolist() == [label for _, label in sample_list(data.test)]
    plan = DataPlan(replace(data, test=cached), CPU, seed=0, batch_size=4)
    got = torch.cat([images for images, _ in plan.test(Comm([0], 0, None, CPU))])
    expected = torch.stack([data.test[i][0] for i in range(len(data.test))])  # formats' own test transform
    assert got.shape == expected.shape == (6, 3, 28, 28)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("batched", [True, False])  # grid_sample (GPUs), a uint8 resize per image (CPUs)
def test_resized_crops_resample_the_box_they_drew(batched):
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    zero, full = torch.zeros(3, dtype=torch.long), torch.full((3,), 16)
    no, yes = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    crop = partial(resized_crop_flip, batched=batched)
    same = crop(images, zero, zero, full, full, no, size=16)
    assert torch.allclose(same.float(), images.float(), atol=1e-3)  # the whole image at its own size: itself
    flipped = crop(images, zero, zero, full, full, yes, size=16)
    assert torch.allclose(flipped.float(), images.flip(3).float(), atol=1e-3)
    left, top, side = torch.tensor([2, 5, 8]), torch.tensor([0, 3, 8]), torch.full((3,), 8)
    boxes = crop(images, left, top, side, side, no, size=8)  # a box at its own size: a slice
    for i in range(3):
        t, l = int(top[i]), int(left[i])
        assert torch.allclose(boxes[i].float(), images[i, :, t:t + 8, l:l + 8].float(), atol=1e-3)
    assert torch.equal(centre_crop(images, 12), images[:, :, 2:14, 2:14])


def test_both_resized_crop_paths_crop_then_resize_as_torchvision_does():
    images = torch.randint(0, 256, (16, 3, 48, 48), dtype=torch.uint8)
    draws = draw_resized_crops(16, 48, torch.Generator().manual_seed(0))
    batched = resized_crop_flip(images, *draws, size=40, batched=True)
    per_image = resized_crop_flip(images, *draws, size=40, batched=False)
    for i, (l, t, w, h, flip) in enumerate(zip(*(d.tolist() for d in draws))):
        expected = TF.resized_crop(images[i].float(), t, l, h, w, [40, 40], antialias=False)
        expected = expected.flip(2) if flip else expected
        assert (batched[i] - expected).abs().max() < 1e-2  # (of 255) edges too: only the box is sampled
        assert (per_image[i].float() - expected).abs().max() <= 1.0 + 1e-3  # uint8: rounded


def test_resized_crop_boxes_follow_the_imagenet_recipe_and_their_seed():
    draws = draw_resized_crops(20_000, 256, torch.Generator().manual_seed(1))
    left, top, width, height, flip = draws
    assert bool((left >= 0).all() and (top >= 0).all() and (left + width <= 256).all()
                and (top + height <= 256).all() and (width >= 1).all() and (height >= 1).all())
    area = (width * height).float() / 256 ** 2
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1  # (sides rounded to whole pixels)
    unclipped = (width < 256) & (height < 256)
    ratio = (width / height)[unclipped]
    assert ratio.min() >= 3 / 4 * 0.98 and ratio.max() <= 4 / 3 * 1.02
    assert abs(ratio.log().mean().item()) < 0.01 and 0.45 < flip.float().mean().item() < 0.55
    again = draw_resized_crops(20_000, 256, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    assert not torch.equal(left, draw_resized_crops(20_000, 256, torch.Generator().manual_seed(2))[0])
    assert math.isclose(area.mean().item(), 0.54, abs_tol=0.03)  # uniform in [0.08, 1] (a little clipped)


def test_a_cache_is_built_once_reused_and_rebuilt_for_other_samples(tmp_path, capsys):
    data = food101(tmp_path)
    first = cache(tmp_path, data.train)
    assert "built" in capsys.readouterr().out
    files = sorted((tmp_path / "cache").iterdir())
    assert [f.name.split(".", 1)[1] for f in files] == ["images.npy", "json", "labels.npy"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = cache(tmp_path, data.train)
    assert "reused" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == stamps and torch.equal(first.images, again.images)
    capped = food101(tmp_path, train_samples=5)  # another sample list: another cache beside it
    cache(tmp_path, capped.train)
    assert "built" in capsys.readouterr().out and len(list((tmp_path / "cache").iterdir())) == 6
    bigger = food101(tmp_path, image_size=32)  # another resolution: another cache too
    assert cache(tmp_path, bigger.train, image_size=32).images.shape[-1] == stored_size(32) == 36


def test_a_cached_test_crop_is_the_test_transforms_pixels_at_every_size():
    """The cache stores Resize(stored) + CenterCrop(stored); testing crops its centre again.
    That must be the test transform's one crop (Resize(stored) + CenterCrop(size)) at any
    --image-size: with an odd half-margin (146 for 128) some images came out a pixel off."""
    from torchvision import transforms as T
    generator = torch.Generator().manual_seed(0)
    images = [TF.to_pil_image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator))
              for h, w in ((211, 300), (300, 211), (257, 258))]
    for size in (*range(64, 140), 160, 192, 224, 256):
        stored = stored_size(size)
        assert (stored - size) % 4 == 0 and abs(stored - size * 256 / 224) <= 2
        for image in images:
            test = T.Compose([T.Resize(stored), T.CenterCrop(size), T.PILToTensor()])(image)
            cached = T.Compose([T.Resize(stored), T.CenterCrop(stored), T.PILToTensor()])(image)
            assert torch.equal(centre_crop(cached[None], size)[0], test), (size, image.size)


def test_the_same_file_names_with_other_pixels_build_a_new_cache(tmp_path, capsys):
    """Data processed again in place (or another set under the same names) is not the data
    the cache holds: the files' fingerprint is in the cache's name."""
    data = food101(tmp_path)
    first = cache(tmp_path, data.train)
    for path, _ in sample_list(data.train):
        Image.open(path).convert("RGB").point(lambda v: 255 - v).save(path, format="JPEG")
    capsys.readouterr()
    again = cache(tmp_path, data.train)
    assert "built" in capsys.readouterr().out
    assert not torch.equal(first.images, again.images)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_a_full_disk_during_the_build_is_an_os_error_not_a_crash(tmp_path):
    """A cache folder with no room (a 64 KiB tmpfs, mounted in a user namespace): the build
    raises ENOSPC, which dd-train turns into one line, and leaves nothing behind. (A sparse
    memory-mapped file once took the process down with SIGBUS, no message.)"""
    data = food101(tmp_path, image_size=64)
    room = tmp_path / "small"
    room.mkdir()
    build = ("import errno, os, sys; from pathlib import Path; from dd_mpi.decoded import build_cache\n"
             f"samples = {sample_list(data.train)!r}\n"
             "try:\n"
             "    build_cache(Path(sys.argv[1]) / 'c', samples, 64, 0)\n"
             "except OSError as error:\n"
             "    print('no space' if error.errno == errno.ENOSPC else error, sorted(os.listdir(sys.argv[1])))\n")
    script = f'mount -t tmpfs -o size=64k tmpfs "$1" && echo mounted && exec "{sys.executable}" -c "$2" "$1"'
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(room),
                             build], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    if "mounted" not in result.stdout:
        pytest.skip(f"cannot mount a small tmpfs here (needs user namespaces): {result.stderr.strip()[:200]}")
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "no space []", result


def test_a_build_that_fails_leaves_no_cache_behind(tmp_path):
    data = food101(tmp_path)
    path, _ = sample_list(data.train)[4]
    with open(path, "r+b") as f:
        f.truncate(40)  # a truncated JPEG: decoding it fails midway through the build
    with pytest.raises(UsageError) as caught:
        cache(tmp_path, data.train)
    assert os.path.basename(path) in str(caught.value) and "\n" not in str(caught.value)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written cache, no temporaries


def test_a_killed_builds_temporaries_on_this_host_are_removed_by_the_next_build(tmp_path, capsys):
    data = food101(tmp_path)
    cache(tmp_path, data.train)
    stem = str(next((tmp_path / "cache").glob("*.json"))).removesuffix(".json")
    for path in (tmp_path / "cache").iterdir():
        path.unlink()
    finished = subprocess.Popen(["true"])
    finished.wait()  # a PID that was a writer and is gone: what SIGKILL leaves behind
    running = subprocess.Popen(["sleep", "60"])  # another job building right now
    host = socket.gethostname()
    killed = [f"{stem}.{part}.tmp-{host}-{finished.pid}" for part in ("images.npy", "labels.npy")]
    # ... and another cache's of the dataset (images changed since: no build of it comes again)
    killed.append(str(tmp_path / "cache" / f"food101-train-32px-0123456789abcdef.images.npy.tmp-{host}-{finished.pid}"))
    kept = [f"{stem}.images.npy.tmp-{host}-{running.pid}", f"{stem}.images.npy.tmp-other-node-{finished.pid}",
            str(tmp_path / "cache" / f"notes.txt.tmp-{host}-{finished.pid}")]  # no cache's: someone else's file
    try:
        for name in killed + kept:
            Path(name).write_bytes(b"half a cache")
        capsys.readouterr()
        cache(tmp_path, data.train)
        assert all(not os.path.exists(name) for name in killed)
        assert all(os.path.exists(name) for name in kept)
        out = capsys.readouterr().out
        assert all(f"removed {name}, left by a killed build on {host}" in out for name in killed), out
    finally:
        running.kill()
        running.wait()


def test_an_unwritable_cache_dir_is_one_line(tmp_path):
    data = food101(tmp_path)
    (tmp_path / "cache").write_text("a file, not a folder")
    with pytest.raises(UsageError) as caught:
        cache(tmp_path, data.train)
    assert str(caught.value).startswith(f"--cache-dir {tmp_path / 'cache'}: cannot write")


@pytest.mark.parametrize("part", ["images.npy", "labels.npy"])
def test_an_emptied_cache_file_is_one_line(tmp_path, part):
    """numpy says EOFError for an empty .npy: it was a traceback on every rank, where a
    truncated or garbage file gave the line that says to delete the cache."""
    data = food101(tmp_path)
    cache(tmp_path, data.train)
    (emptied,) = (tmp_path / "cache").glob(f"*.{part}")
    emptied.write_bytes(b"")
    with pytest.raises(UsageError, match=r"rank 0 cannot read the cache .*\(EOFError: .*\): delete those files"):
        cache(tmp_path, data.train)


def test_cache_dir_is_refused_for_data_held_in_memory():
    with pytest.raises(UsageError, match="--cache-dir is for image files"):
        parse_config(["--dataset", "cifar10", "--data-dir", "x", "--cache-dir", "c"])
    assert parse_config(["--dataset", "food101", "--data-dir", "x", "--cache-dir", "c"]).cache_dir == "c"
