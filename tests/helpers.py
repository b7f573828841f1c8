"""Running dd-train as users do: as real processes under real launchers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dd_mpi

BIN = Path(sys.executable).parent
TINY = ["--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "--width", "1",
        "--subnet-epochs", "1", "--finetune-epochs", "1", "--baseline-epochs", "1",
        "--train-samples", "256", "--test-samples", "128", "--batch-size", "32"]
REPORT_KEYS = {"sub_nets", "transfer", "transfer_T", "random_T", "timing", "world_size", "groups",
               "backend", "config"}


LAUNCHER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "PMI_", "PMIX_", "OMPI_", "HOROVOD_")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def python_path(first: Path) -> str:
    """``first`` ahead of any PYTHONPATH already set, so a test's sitecustomize is found and
    a checkout put on PYTHONPATH (another tree sharing this venv) is still the one imported."""
    return os.pathsep.join(p for p in (str(first), os.environ.get("PYTHONPATH")) if p)


def launcher_free_env(**extra: str) -> dict:
    """This environment without any enclosing launcher's or job's variables (they would change
    rank discovery), our venv first on PATH, unbuffered output; then ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_VARIABLES}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


def launcher_command(launcher: str, nproc: int) -> list[str]:
    if launcher == "local":
        return [sys.executable, "-m", "dd_mpi", "--nproc", str(nproc)]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc),
                "-m", "dd_mpi"]
    if launcher == "mpiexec":
        mpiexec = BIN / "mpiexec"
        if not mpiexec.exists():
            pytest.skip("pip's MPICH (mpiexec) is not installed: pip install 'dd_mpi[mpi]'")
        return [str(mpiexec), "-n", str(nproc), sys.executable, "-m", "dd_mpi"]
    raise ValueError(launcher)


def run_dd(args: list[str], *, launcher: str = "local", nproc: int = 4, timeout: float = 600,
           env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    cmd = launcher_command(launcher, nproc) + list(args)
    full_env = launcher_free_env(**(env or {}))
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    result.seconds = time.monotonic() - start
    return result


def read_report(out: Path) -> dict:
    return json.loads((Path(out) / "report.json").read_text())


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"


def have(tool: str) -> bool:
    return shutil.which(tool) is not None or (BIN / tool).exists()


def fake_run(tmp: Path, name: str = "run", *, top5: bool = False, world: int = 2, subnets: int = 2) -> Path:
    """A run directory as dd-train writes it, with round numbers to check against."""
    out = tmp / name
    out.mkdir(parents=True)
    five = (lambda v: {"top5": v}) if top5 else (lambda v: {})
    report = {
        "sub_nets": [{"index": 0, "ranks": [0], "top1": 40.0, **five(70.0), "loss": 1.5, "seconds": 10.0},
                     {"index": 1, "ranks": [1], "top1": 44.0, **five(72.0), "loss": 1.4, "seconds": 12.0}],
        "transfer": {"top1": 50.0, **five(80.0), "loss": 1.2, "seconds": 1.0},
        "transfer_T": {"top1": 60.0, **five(85.0), "loss": 1.0, "seconds": 8.0},
        "random_T": {"top1": 55.0, **five(82.0), "loss": 1.1, "seconds": 30.0},
        "timing": {"subnets": 12.0, "compose": 1.0, "finetune": 8.0, "transfer_eval": 0.5, "dd_total": 21.0,
                   "baseline_total": 30.0},
        "speedup": 30.0 / 21.0, "world_size": world, "groups": [[0], [1]], "backend": "torch",
        "device": "cpu", "launcher": "local", "checksums": None,
        "config": {"subnets": subnets, "arch": "resnet20", "width": 1.0, "dataset": "synthetic",
                   "train_samples": 256, "batch_size": 32, "subnet_data": "full",
                   "subnet_epochs": 2, "finetune_epochs": 2, "baseline_epochs": 3},
    }
    def row(phase, group, epoch, top1, ips, seconds, elapsed):
        return {"phase": phase, "group": group, "epoch": epoch, "test_top1": top1, "images_per_s": ips,
                "seconds": seconds, "elapsed": elapsed}
    rows = [row("subnet", 0, 1, 30.0, 100.0, 5.0, 5.0), row("subnet", 1, 1, 34.0, 90.0, 6.0, 6.0),
            row("subnet", 0, 2, 40.0, 100.0, 5.0, 10.0), row("subnet", 1, 2, 44.0, 90.0, 6.0, 12.0),
            row("finetune", None, 1, 56.0, 60.0, 4.0, 4.0), row("finetune", None, 2, 60.0, 60.0, 4.0, 8.0),
            row("baseline", None, 1, 35.0, 50.0, 10.0, 10.0), row("baseline", None, 2, 50.0, 50.0, 10.0, 20.0),
            row("baseline", None, 3, 55.0, 50.0, 10.0, 30.0)]
    (out / "report.json").write_text(json.dumps(report))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def check_run_report(out, *, world_size: int, subnets: int, strategy: str = "both", backend: str = "torch",
                     launcher: str | None = None, fresh: bool = True) -> dict:
    """What every run's report.json and metrics.jsonl hold, on ``world_size`` ranks in ``subnets``
    groups of one sub-net each, under ``backend`` (and ``launcher``, where given). ``fresh``: one
    epoch per phase, each recorded once; a run resumed, or with a group rerun, keeps the earlier
    rows, so its metrics are checked by its own test."""
    report = read_report(out)
    assert REPORT_KEYS <= set(report), f"missing keys: {REPORT_KEYS - set(report)}"
    assert report["world_size"] == world_size and report["backend"] == backend
    assert launcher is None or report["launcher"] == launcher, report["launcher"]
    assert report["software"]["torch"] == torch.__version__ and report["software"]["dd_mpi"] == dd_mpi.__version__
    assert bool(report["software"].get("horovod")) == (backend == "horovod")  # its version, where it ran
    assert len(report["ranks"]) == world_size and all(place["processor"] for place in report["ranks"])
    assert report["threads"] >= 1 and report["workers"] >= 0  # as resolved: the flags leave them to the machine
    size = world_size // subnets
    assert report["groups"] == [list(range(k * size, (k + 1) * size)) for k in range(subnets)]
    assert [s["index"] for s in report["sub_nets"]] == list(range(subnets))
    assert [s["ranks"] for s in report["sub_nets"]] == report["groups"]
    baseline = strategy == "both"
    for net in [*report["sub_nets"], report["transfer"], report["transfer_T"], *[report["random_T"]] * baseline]:
        assert 0 <= net["top1"] <= 100 and net["seconds"] >= 0
    t = report["timing"]
    assert t["dd_total"] > 0 and t["dd_total"] == pytest.approx(t["subnets"] + t["compose"] + t["finetune"])
    if baseline:
        assert t["baseline_total"] == report["random_T"]["seconds"]
    # per-rank digests: replicas inside a group agree, groups differ (no cross-group traffic)
    digests = report["checksums"]["subnets"]
    assert len(digests) == world_size
    for ranks in report["groups"]:
        assert len({digests[r] for r in ranks}) == 1, f"group {ranks} replicas differ"
    assert len({digests[ranks[0]] for ranks in report["groups"]}) == subnets
    assert len(report["checksums"]["global"]) == 64  # every rank held rank 0's composed net (else the run fails)
    if not fresh:
        return report
    # metrics.jsonl: one line per epoch per group and phase, consistent with the report
    rows = read_metrics(out)
    for k, sub in enumerate(report["sub_nets"]):
        mine = [r for r in rows if r["phase"] == "subnet" and r["group"] == k]
        assert [r["epoch"] for r in mine] == [1] and mine[0]["test_top1"] == pytest.approx(sub["top1"])
    finetune = [r for r in rows if r["phase"] == "finetune"]
    assert [r["epoch"] for r in finetune] == [1] and finetune[0]["test_top1"] == pytest.approx(report["transfer_T"]["top1"])
    assert {"loss", "top1", "images_per_s", "seconds"} <= set(finetune[0])
    assert [r["epoch"] for r in rows if r["phase"] == "baseline"] == [1] * baseline
    return report
