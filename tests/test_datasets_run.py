"""4-rank runs on each real on-disk format, through torchvision's real loaders."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest

import datagen
from helpers import REPORT_KEYS, explain, python_path, read_report, run_dd

pytestmark = pytest.mark.slow

TINY = ["--device", "cpu", "--arch", "resnet20", "--width", "1", "--subnets", "2", "--strategy", "both",
        "--subnet-epochs", "1", "--finetune-epochs", "1", "--baseline-epochs", "1", "--batch-size", "8",
        "--workers", "1"]


def md5_patch_env(tmp_path, cls_name: str, md5s: dict) -> dict:
    """A sitecustomize that points torchvision's md5 table at our tiny files, in every rank:
    the real md5 check still runs (on rank 0), against sums of the files we wrote."""
    (tmp_path / "md5s.json").write_text(json.dumps(md5s))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import json, sys, torchvision.datasets as d\n"
        f"sys.path.insert(0, {str(datagen.__file__.rsplit('/', 1)[0])!r})\n"
        "import datagen\n"
        f"datagen.patch_md5_table(d.{cls_name}, json.load(open({str(tmp_path / 'md5s.json')!r})))\n")
    return {"PYTHONPATH": python_path(tmp_path / "site")}


def check(out, num_classes_over_10: bool) -> dict:
    report = read_report(out)
    assert REPORT_KEYS <= set(report) and report["world_size"] == 4
    for net in [*report["sub_nets"], report["transfer"], report["transfer_T"], report["random_T"]]:
        assert 0 <= net["top1"] <= 100
        assert ("top5" in net) == num_classes_over_10
    return report


def test_cifar10_four_ranks(tmp_path):
    md5s = datagen.write_cifar10(tmp_path / "data", n_train=60, n_test=24)
    result = run_dd([*TINY, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "run")], env=md5_patch_env(tmp_path, "CIFAR10", md5s))
    assert result.returncode == 0, explain(result)
    assert check(tmp_path / "run", False)["config"]["dataset"] == "cifar10"


def test_cifar100_four_ranks_reports_top5(tmp_path):
    md5s = datagen.write_cifar100(tmp_path / "data", n_train=200, n_test=100)
    result = run_dd([*TINY, "--dataset", "cifar100", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "run")], env=md5_patch_env(tmp_path, "CIFAR100", md5s))
    assert result.returncode == 0, explain(result)
    check(tmp_path / "run", True)
    assert "top-5" in (tmp_path / "run" / "report.md").read_text()


def test_cifar10_with_the_real_md5_table_is_refused_on_every_rank(tmp_path):
    """Without the patch our files do not match the real sums: one clear line, exit 2."""
    datagen.write_cifar10(tmp_path / "data", n_train=20, n_test=10)
    result = run_dd([*TINY, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "run")], timeout=180)
    assert result.returncode == 2, explain(result)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "cifar-10-batches-py" in errors[0]
    assert not (tmp_path / "run" / "config.json").exists()


def test_food101_four_ranks_reports_top5(tmp_path):
    classes = tuple(f"dish_{c:02d}" for c in range(12))
    datagen.write_food101(tmp_path / "data", classes=classes, per_class=4, test_per_class=2)
    result = run_dd([*TINY, "--dataset", "food101", "--data-dir", str(tmp_path / "data"), "--image-size", "32",
                     "--out", str(tmp_path / "run")])
    assert result.returncode == 0, explain(result)
    check(tmp_path / "run", True)


def test_food101_through_a_cache_built_once_by_rank_0(tmp_path):
    """--cache-dir: the first job builds the cache (rank 0) and trains from it on 4 ranks; the
    next job reuses it; a job where one rank cannot read it stops every rank with one line."""
    classes = tuple(f"dish_{c:02d}" for c in range(12))
    datagen.write_food101(tmp_path / "data", classes=classes, per_class=4, test_per_class=2)
    flags = [*TINY, "--dataset", "food101", "--data-dir", str(tmp_path / "data"), "--image-size", "28",
             "--cache-dir", str(tmp_path / "cache")]
    first = run_dd([*flags, "--out", str(tmp_path / "run1")])
    assert first.returncode == 0, explain(first)
    assert first.stdout.count("images at 32 px built") == 2, explain(first)  # train and test
    check(tmp_path / "run1", True)
    assert len(list((tmp_path / "cache").glob("food101-*.images.npy"))) == 2
    second = run_dd([*flags, "--out", str(tmp_path / "run2")])
    assert second.returncode == 0 and second.stdout.count("px reused") == 2, explain(second)
    unseen = rank_patch_env(tmp_path, "2", "import dd_mpi.decoded as c\n"
                                           "def missing(stem, size):\n"
                                           "    raise FileNotFoundError(f'{stem} not on this node')\n"
                                           "c.open_cache = missing")
    third = run_dd([*flags, "--out", str(tmp_path / "run3")], env=unseen, timeout=180)
    assert third.returncode == 2, explain(third)
    errors = [line for line in third.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "rank 2 cannot read the cache food101-" in errors[0], explain(third)
    assert not (tmp_path / "run3" / "config.json").exists()


def test_a_node_local_cache_is_built_once_per_node(tmp_path):
    """--cache-dir '$TMPDIR'-like (expanded on each rank): ranks 2 and 3 play a second node
    whose folder rank 0's build does not reach; that node's first rank builds its own copy."""
    datagen.write_food101(tmp_path / "data", per_class=4, test_per_class=2)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os, socket\n"
        "os.environ['DD_TEST_NODE'] = 'b' if os.environ.get('RANK') in ('2', '3') else 'a'\n"
        "if os.environ['DD_TEST_NODE'] == 'b':\n"
        "    socket.gethostname = lambda: 'node-b'\n")
    result = run_dd([*TINY, "--dataset", "food101", "--data-dir", str(tmp_path / "data"), "--image-size", "28",
                     "--cache-dir", str(tmp_path / "local-$DD_TEST_NODE"), "--out", str(tmp_path / "run")],
                    env={"PYTHONPATH": python_path(tmp_path / "site")})
    assert result.returncode == 0, explain(result)
    for node in ("a", "b"):
        assert len(list((tmp_path / f"local-{node}").glob("food101-*.images.npy"))) == 2, explain(result)
    builds = re.findall(r"^cache: decoding \d+ (train|test) images into .*/local-(a|b)/.* on (\S+) ", result.stdout, re.M)
    assert sorted(builds) == [("test", "a", socket.gethostname()), ("test", "b", "node-b"),
                              ("train", "a", socket.gethostname()), ("train", "b", "node-b")], explain(result)


def test_imagefolder_four_ranks(tmp_path):
    """As a user runs it: no --workers (the default comes from the rank's CPUs)."""
    datagen.write_imagefolder(tmp_path / "data", per_class=8, val_per_class=4, size=24)
    default_workers = TINY[:TINY.index("--workers")]
    result = run_dd([*default_workers, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "run")])
    assert result.returncode == 0, explain(result)
    report = check(tmp_path / "run", False)
    assert report["config"]["image_size"] is None  # chosen from the images (small: 32)


def test_missing_data_dir_is_one_line(tmp_path):
    result = run_dd([*TINY, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing"),
                     "--out", str(tmp_path / "run")], timeout=180)
    assert result.returncode == 2, explain(result)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--download" in errors[0]


def test_help_lists_the_presets():
    result = subprocess.run([sys.executable, "-m", "dd_mpi", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for preset in ("cifar10-resnet32", "cifar10-resnet56", "cifar10-resnet110", "cifar100-resnet32",
                   "cifar100-resnet56", "cifar100-resnet110", "food101-resnet50", "food101-resnet101",
                   "food101-resnet50-n8", "food101-resnet101-n8"):
        assert preset in result.stdout


def rank_patch_env(tmp_path, rank: str, patch: str) -> dict:
    """A sitecustomize that changes what one rank reads (as another copy of the data on its
    node would): ``patch`` runs in that rank only, with torchvision's datasets as ``d`` and
    dd_mpi's ImageFolder (whose classes leave tools' folders out) as ``ImageFolder``."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get('RANK') == {rank!r}:\n"
        "    import torchvision.datasets as d\n"
        "    from dd_mpi.formats import _ImageFolder as ImageFolder\n"
        + "".join(f"    {line}\n" for line in patch.splitlines()))
    return {"PYTHONPATH": python_path(tmp_path / "site")}


@pytest.mark.parametrize("patch, message", [
    # rank 3 lacks a class in both splits: its own checks pass, the comparison does not
    ("find = ImageFolder.find_classes\n"
     "def fewer(self, directory):\n"
     "    classes, _ = find(self, directory)\n"
     "    classes = classes[:-1]\n"
     "    return classes, {c: i for i, c in enumerate(classes)}\n"
     "ImageFolder.find_classes = fewer",
     "rank 3 reads other data than rank 0 (class 'dog' on one and not the other"),
    # rank 3's own parse fails: its error, named, from rank 0 and with every rank stopping
    ("def broken(self, directory):\n"
     "    raise FileNotFoundError(f'no class folders in {directory}')\n"
     "ImageFolder.find_classes = broken",
     "rank 3: "),
    # ... with what torchvision raises for a dataset it cannot find (Food-101, CIFAR), or a
    # truncated pickle or a malformed JSON would: not an OSError
    ("def missing(self, directory):\n"
     "    raise RuntimeError('Dataset not found. You can use download=True to download it')\n"
     "ImageFolder.find_classes = missing",
     "rank 3: --data-dir ")])
def test_a_rank_that_reads_other_data_stops_every_rank_with_one_line(tmp_path, patch, message):
    datagen.write_imagefolder(tmp_path / "data", classes=("cat", "dog"), per_class=4, val_per_class=2, size=24)
    result = run_dd([*TINY, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "run")], env=rank_patch_env(tmp_path, "3", patch), timeout=180)
    assert result.returncode == 2, explain(result)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], explain(result)
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "config.json").exists()


def unreadable_imagefolder(tmp_path):
    root = datagen.write_imagefolder(tmp_path / "data", classes=("cat", "dog"), per_class=4, val_per_class=2, size=24)
    broken = sorted((root / "train" / "dog").iterdir())[-1]  # not the first image: found when loaded
    broken.write_bytes(b"not an image")
    return root, broken


@pytest.mark.timing
def test_an_unreadable_image_ends_the_four_rank_job_naming_the_file(tmp_path):
    root, broken = unreadable_imagefolder(tmp_path)
    result = run_dd([*TINY, "--dataset", "imagefolder", "--data-dir", str(root), "--out", str(tmp_path / "run")],
                    timeout=180)
    assert result.returncode != 0, explain(result)
    # each rank that loads it says so (one per group in phase 1, as each group sees all data)
    named = [line for line in result.stderr.splitlines() if f"cannot read image {broken}" in line]
    assert 1 <= len(named) <= 4 and len(set(named)) == 1, explain(result)
    assert named[0].startswith("dd-train: error: "), explain(result)
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "report.json").exists()


def test_an_unreadable_image_ends_a_one_rank_job(tmp_path):
    """One rank, no launcher to end it: after saying which image it could not read, the rank
    once waited at exit, forever (SIGTERM too), for the decoding worker that had raised it."""
    root, broken = unreadable_imagefolder(tmp_path)
    result = run_dd([*TINY, "--dataset", "imagefolder", "--data-dir", str(root), "--out", str(tmp_path / "run")],
                    nproc=1, timeout=120)  # a few seconds; before: killed at the timeout
    assert result.returncode == 2, explain(result)
    assert result.stderr.count(f"cannot read image {broken}") == 1, explain(result)
