"""The memory-mapped cache of large image files (``--cache-dir``), on Food-101's real layout:
what it stores, that training and testing read the right pixels from it, that it is reused
and rebuilt when it should be, and that a failed build leaves nothing behind."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
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
            f"{stem}.images.npy.tmp-{host}-2-{finished.pid}",  # host X-2's (this glob matches it): alive there
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


def test_a_cache_dir_that_is_a_file_is_one_line_before_the_build(tmp_path, capsys):
    """It said 'cannot write the cache (File exists)' after 'cache: decoding ... into FILE/...'."""
    data = food101(tmp_path)
    (tmp_path / "cache").write_text("a file, not a folder")
    with pytest.raises(UsageError) as caught:
        cache(tmp_path, data.train)
    assert str(caught.value) == (f"--cache-dir {tmp_path / 'cache'} names a file, not a folder: give a folder "
                                 "(it is made if missing)")
    assert "decoding" not in capsys.readouterr().out
    cfg = RunConfig(dataset="food101", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache" / "sub"))
    with pytest.raises(UsageError, match=f"runs through the file {tmp_path / 'cache'}, not a folder"):
        cached_split(data.train, split_name="train", size=28, cfg=cfg, comm=Comm([0], 0, None, CPU), workers=0)


def test_an_unset_variable_in_cache_dir_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """os.path.expandvars leaves an unset $NAME as it is: the cache went into a folder named
    '$NOPE_UNSET', silently."""
    data = food101(tmp_path)
    monkeypatch.delenv("NOPE_UNSET", raising=False)
    monkeypatch.setenv("DD_TEST_SET", "set")
    capsys.readouterr()
    for flag in (f"{tmp_path}/$NOPE_UNSET/dd-cache", f"{tmp_path}/${{NOPE_UNSET}}-$DD_TEST_SET"):
        cfg = RunConfig(dataset="food101", data_dir=str(tmp_path / "data"), cache_dir=flag)
        with pytest.raises(UsageError) as caught:
            cached_split(data.train, split_name="train", size=28, cfg=cfg, comm=Comm([0], 0, None, CPU), workers=0)
        assert str(caught.value) == (f"--cache-dir {flag}: $NOPE_UNSET is not set on rank 0 ({socket.gethostname()}): "
                                     "export it or give another folder")
    assert sorted(os.listdir(tmp_path)) == ["data"] and capsys.readouterr().out == ""
    cfg = RunConfig(dataset="food101", data_dir=str(tmp_path / "data"), cache_dir=f"{tmp_path}/${{DD_TEST_SET}}")
    cached_split(data.train, split_name="train", size=28, cfg=cfg, comm=Comm([0], 0, None, CPU), workers=0)
    assert len(list((tmp_path / "set").glob("*.images.npy"))) == 1


@pytest.mark.parametrize("flag, folder, problem", [
    ("$DD_SET/c", "/set/c", None), ("${DD_SET}/c", "/set/c", None), ("${DD_SET:-/f}/c", "/set/c", None),
    ("${DD_UNSET:-/f}/c", "/f/c", None), ("${DD_EMPTY:-/f}/c", "/f/c", None), ("${DD_UNSET-/f}/c", "/f/c", None),
    ("/a$/c", "/a$/c", None), ("${DD_UNSET:-$DD_SET/d}/c", "/set/d/c", None),
    ("${DD_UNSET:-${DD_SET}}/c", None, "${DD_UNSET:-${DD_SET} is a shell form dd-train does not expand"),
    ("${DD_UNSET:-$DD_NONE}/c", None, "$DD_NONE is not set on rank 3"),
    ("$DD_UNSET/c", None, "$DD_UNSET is not set on rank 3 (HOST): export it or give another folder"),
    ("$DD_EMPTY/c", None, "$DD_EMPTY is empty on rank 3 (HOST): give a value to it or give another folder"),
    ("${DD_EMPTY-/f}/c", None, "$DD_EMPTY is empty on rank 3 (HOST): give a value to it or give another folder"),
    ("$DD_UNSET/$DD_NONE", None, "$DD_UNSET, $DD_NONE are not set on rank 3 (HOST): export them or give another"),
    ("${DD_SET:+x}/c", None, "${DD_SET:+x} is a shell form dd-train does not expand: give $NAME, ${NAME} or "
                             "${NAME:-default}")])
def test_cache_dir_variables_expand_as_the_shell_would_or_are_one_line(flag, folder, problem):
    """'${TMPDIR:-/scratch}/c' was refused as an unset variable named 'TMPDIR:-/scratch'; an
    empty $TMPDIR put the cache under /."""
    from dd_mpi.decoded import expand_cache_dir
    got, why = expand_cache_dir(flag, 3, {"DD_SET": "/set", "DD_EMPTY": ""})
    if problem is None:
        assert (got, why) == (folder, None)
    else:
        assert why.startswith(f"--cache-dir {flag}: {problem.replace('HOST', socket.gethostname())}"), why


def test_a_missing_image_with_cache_dir_says_what_to_restore(tmp_path):
    """It was 'DIR: PATH: No such file or directory', where the loaders say what to do."""
    data = food101(tmp_path)
    path = sample_list(data.train)[0][0]
    os.unlink(path)
    with pytest.raises(UsageError, match=rf"^--data-dir {tmp_path / 'data'}: image {path} is missing: restore it, "
                                         r"or leave it out of the dataset's lists \(Food-101: meta/train.json"):
        cache(tmp_path, data.train)
    os.symlink(tmp_path / "gone.jpg", path)
    with pytest.raises(UsageError, match=f"image {path} is a broken symbolic link to {tmp_path / 'gone.jpg'}: "
                                         "restore its target, or leave it out"):
        cache(tmp_path, data.train)


def test_small_images_that_cannot_fit_in_memory_are_one_line():
    """torch.empty of a terabyte for --image-size 100000 was a traceback on every rank."""
    from dd_mpi.decoded import check_in_memory_fits
    from dd_mpi.rendezvous import node_memory
    comm = Comm([0], 0, None, CPU)
    check_in_memory_fits(1000, 32, comm)
    side = math.isqrt(node_memory() // 3 // 96) + 1  # 96 images of this side take more than the node has
    with pytest.raises(UsageError, match=rf"^--image-size {side}: the 96 small images, decoded in memory at "
                                         rf"{side} px, take [\d,.]+ GiB on every rank, and {socket.gethostname()}'s "
                                         r"memory gives its rank [\d,.]+ GiB: give a smaller --image-size, or cap "
                                         r"--train-samples$"):
        check_in_memory_fits(96, side, comm)


def _cut_labels(images, labels, index):
    return images, labels[:len(labels) // 2], index


def _cut_images(images, labels, index):
    return images[:-1], labels, index


def _cut_all(images, labels, index):  # whole in itself, but not the split's samples
    return images[:-1], labels[:-1], {**index, "samples": index["samples"] - 1}


def _other_size(images, labels, index):
    return images[:, :, :-4, :-4], labels, {**index, "stored_px": index["stored_px"] - 4}


def _index_of_nothing(images, labels, index):  # valid JSON, no index (a hand edit)
    return images, labels, []


def _other_label(images, labels, index):  # a label past the classes was an IndexError in the loss
    labels = labels.copy()
    labels[-1] = 99
    return images, labels, index


@pytest.mark.parametrize("damage, named", [(_index_of_nothing, ".json holds no cache index"),
                                           (_cut_labels, "labels.npy"), (_cut_images, "images.npy"),
                                           (_cut_all, ".json says 5 samples, the split has 6"),
                                           (_other_size, ".json says 28 px, not 32"),
                                           (_other_label, "labels.npy holds other labels than the split's")])
def test_a_cache_whose_files_disagree_is_one_line(tmp_path, damage, named):
    """A labels file cut to half its images was read as it came: half the test set scored, silently."""
    data = food101(tmp_path)
    cache(tmp_path, data.test)
    (images_path,) = (tmp_path / "cache").glob("*.images.npy")
    stem = str(images_path).removesuffix(".images.npy")
    index = json.loads(Path(f"{stem}.json").read_text())
    images, labels, index = damage(np.load(images_path), np.load(f"{stem}.labels.npy"), index)
    np.save(images_path, np.ascontiguousarray(images))
    np.save(f"{stem}.labels.npy", labels)
    Path(f"{stem}.json").write_text(json.dumps(index))
    with pytest.raises(UsageError) as caught:
        cache(tmp_path, data.test)
    message = str(caught.value)
    assert message.startswith(f"--cache-dir {tmp_path / 'cache'}: rank 0 cannot read the cache "), message
    assert "\n" not in message
    assert named in message and message.endswith("delete those files to have it rebuilt"), message


STOPPED_BUILD = """\
import sys, time
from pathlib import Path
import dd_mpi.decoded as decoded
decoded.DECODE_BATCH = 1
decode = decoded._Decoded.__getitem__
def stuck(self, i):  # the build is under way, its temporaries written: the stop comes now
    if i == 1:
        Path(sys.argv[2]).write_text("decoding")
        time.sleep(600)
    return decode(self, i)
decoded._Decoded.__getitem__ = stuck
decoded.build_cache(Path(sys.argv[1]) / "c", SAMPLES, 28, 0)
"""


@pytest.mark.timing
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_build_stopped_by_a_signal_leaves_no_temporaries(tmp_path, signum):
    """At start-up a stop signal ends the rank outright; its build's *.tmp-HOST-PID files stayed
    (a requeue onto another node never removed them). It still ends by the signal."""
    data = food101(tmp_path)
    folder, marker = tmp_path / "cache", tmp_path / "decoding"
    folder.mkdir()
    script = STOPPED_BUILD.replace("SAMPLES", repr(sample_list(data.train)))
    build = subprocess.Popen([sys.executable, "-c", script, str(folder), str(marker)],
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists() and any(".tmp-" in name for name in os.listdir(folder)), os.listdir(folder)
        build.send_signal(signum)
        assert build.wait(timeout=60) == -signum
    finally:
        build.kill()
        build.wait()
    assert os.listdir(folder) == []


# ------------------------------------------------------- a build on several ranks: the others wait

RANKS = """\
import datetime, os, sys, time
rank, world, root, run = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
node_local = bool(os.environ.get("DD_TEST_NODE_LOCAL"))
if node_local and rank > 0:  # each rank past 0 plays a node of its own, with its own folder
    import socket
    socket.gethostname = lambda: f"node-{rank}"
os.environ["DD_TEST_NODE"] = str(rank) if node_local else "shared"
import torch
import torch.distributed as dist
import dd_mpi.decoded as decoded
from dd_mpi.comm import Comm
from dd_mpi.config import RunConfig
from dd_mpi.datasets import load_dataset
from dd_mpi.errors import UsageError, peer_lost

decoded.DECODE_BATCH = 1  # a heartbeat may come after every image ...
decoded.PROGRESS_LOG_SECONDS = 1.0
decode = decoded._Decoded.__getitem__
def slowly(self, i):  # ... each image takes DD_TEST_SLOW s: the build outlasts --io-timeout
    if os.environ.get("DD_TEST_HANG") == f"{rank}:{i}":
        open(os.path.join(root, "hanging"), "w").close()
        time.sleep(600)
    if os.environ.get("DD_TEST_FAIL") == f"{rank}:{i}":
        raise UsageError(f"injected failure at image {i} on rank {rank}")
    time.sleep(float(os.environ.get("DD_TEST_SLOW", "0")))
    return decode(self, i)
decoded._Decoded.__getitem__ = slowly

data = load_dataset("food101", os.path.join(root, "data"), download=False, image_size=28, train_samples=None,
                    test_samples=None, verify_once=lambda check: check())
io_timeout = float(os.environ["DD_TEST_IO"])
dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{run}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=300))
dist.barrier()
everyone, cpu = list(range(world)), torch.device("cpu")
patient = Comm(everyone, rank, dist.new_group(everyone, timeout=datetime.timedelta(seconds=io_timeout)), cpu)
comm = Comm(everyone, rank, dist.group.WORLD, cpu, None, patient)
cfg = RunConfig(dataset="food101", data_dir=os.path.join(root, "data"),
                cache_dir=os.path.join(root, "cache-$DD_TEST_NODE"), io_timeout=io_timeout)
try:
    if os.environ.get("DD_TEST_IN_MEMORY"):
        memory = decoded.decode_in_memory(data.train, 32, comm, 0)
        print(f"rank {rank} memory {int(memory.images.sum())} {memory.labels.tolist()}", flush=True)
    for split in ("train", "test"):
        cached = decoded.cached_split(getattr(data, split), split_name=split, size=28, cfg=cfg, comm=comm, workers=0)
        print(f"rank {rank} {split} {int(cached.images.sum())} {cached.labels.tolist()}", flush=True)
except UsageError as error:
    print(f"rank {rank} UsageError: {error}", flush=True)
    os._exit(2)
except Exception as error:
    if not peer_lost(error):
        raise
    print(f"rank {rank} lost contact; rank 0 hung by then: {os.path.exists(os.path.join(root, 'hanging'))}", flush=True)
    os._exit(1)
dist.barrier()  # (then no teardown: gloo's, as one rank leaves first, sometimes aborted the other)
os._exit(0)
"""


def run_ranks(tmp_path, run: str, world: int, env: dict, hung: int | None = None) -> list[tuple[int, str]]:
    """(exit code, output) of ``world`` ranks running RANKS; a ``hung`` rank is killed once the others ended."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONUNBUFFERED": "1", **env}
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(tmp_path), run], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    outputs = [None] * world
    try:
        for rank in [r for r in range(world) if r != hung] + ([hung] if hung is not None else []):
            if rank == hung:
                ranks[rank].kill()
            outputs[rank] = ranks[rank].communicate(timeout=300)[0]
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    return [(process.returncode, output) for process, output in zip(ranks, outputs)]


IO_TIMEOUT = 1.5  # s, the waits' bound; an image takes SLOW_IMAGE, the gap between heartbeats about that
SLOW_IMAGE = "0.25"


@pytest.mark.slow
@pytest.mark.timing
def test_a_build_longer_than_io_timeout_finishes_on_two_ranks_and_is_reused(tmp_path):
    """Rank 0 decodes for 3 x --io-timeout (into memory, then into the cache) while rank 1 waits:
    the wait was one collective bounded by --io-timeout, and the job ended 'lost contact' mid-build,
    every time (an ImageNet-sized folder outlasts the default 30 min)."""
    write_food101(tmp_path / "data", per_class=6, test_per_class=1)  # 18 train images: 4.5 s
    env = {"DD_TEST_IO": str(IO_TIMEOUT), "DD_TEST_SLOW": SLOW_IMAGE, "DD_TEST_IN_MEMORY": "1"}
    (code0, out0), (code1, out1) = run_ranks(tmp_path, "first", 2, env)
    assert code0 == code1 == 0, out0 + out1
    assert "cache: train 18 images at 32 px built" in out0 and "% decoded (" in out0, out0
    assert [line.split(" ", 2)[2] for line in out0.splitlines() if line.startswith("rank 0 ")] == \
           [line.split(" ", 2)[2] for line in out1.splitlines() if line.startswith("rank 1 ")], out0 + out1
    (code0, out0), (code1, out1) = run_ranks(tmp_path, "second", 2, {"DD_TEST_IO": str(IO_TIMEOUT)})
    assert code0 == code1 == 0, out0 + out1
    assert out0.count("px reused") == 2 and "decoding" not in out0, out0


@pytest.mark.slow
@pytest.mark.timing
def test_a_builder_that_hangs_is_still_noticed_within_io_timeout(tmp_path):
    """The heartbeat comes from the decoding loop, not a thread: rank 0 stuck on an image after
    3 s of progress (2 x --io-timeout) stops beating, and rank 1 ends within --io-timeout of that."""
    write_food101(tmp_path / "data", per_class=6, test_per_class=1)
    env = {"DD_TEST_IO": str(IO_TIMEOUT), "DD_TEST_SLOW": SLOW_IMAGE, "DD_TEST_HANG": "0:12"}
    (_, out0), (code1, out1) = run_ranks(tmp_path, "hang", 2, env, hung=0)
    assert code1 == 1 and "rank 1 lost contact; rank 0 hung by then: True" in out1, out0 + out1


@pytest.mark.slow
@pytest.mark.timing
def test_node_local_builders_fail_together_with_one_line_and_leave_nothing(tmp_path):
    """Node-local folders: rank 0 builds its node's copy (past --io-timeout), then ranks 1 and 2
    (two other nodes) build theirs at once; rank 2's fails midway. Every rank raises its one line
    (rank 1 stops at its next heartbeat, not at the end of its build) and no temporaries stay."""
    write_food101(tmp_path / "data", per_class=4, test_per_class=1)  # 12 train images: 3 s
    env = {"DD_TEST_IO": str(IO_TIMEOUT), "DD_TEST_SLOW": SLOW_IMAGE, "DD_TEST_NODE_LOCAL": "1", "DD_TEST_FAIL": "2:6"}
    results = run_ranks(tmp_path, "fail", 3, env)
    everything = "".join(output for _, output in results)
    for rank, (code, output) in enumerate(results):
        assert code == 2 and f"rank {rank} UsageError: injected failure at image 6 on rank 2" in output, everything
    assert len(list((tmp_path / "cache-0").glob("food101-train-*.images.npy"))) == 1
    assert os.listdir(tmp_path / "cache-1") == os.listdir(tmp_path / "cache-2") == [], everything


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


def test_a_cache_dir_under_a_folder_this_user_cannot_enter_is_one_line(tmp_path, monkeypatch):
    """Path.exists() raises PermissionError (EACCES) for a path under a folder without x
    permission: that rank left with a traceback before the ranks compared their folders."""
    from dd_mpi.decoded import _folder_problem
    locked = tmp_path / "locked"
    exists = Path.exists

    def denied(self, *args, **kwargs):
        if str(self).startswith(str(locked) + os.sep):
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", denied)
    flag = str(locked / "cache")
    assert _folder_problem(flag, flag, 0) == (f"--cache-dir {flag}: cannot reach {locked / 'cache'} (Permission "
                                              f"denied) on rank 0 ({socket.gethostname()}): give a folder this "
                                              "user can write")
