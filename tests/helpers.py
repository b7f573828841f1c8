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
