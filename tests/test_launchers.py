"""Each launch/*.sh as documented: its one launcher line, 4 ranks, a tiny run on CPU.

    .venv/bin/python -m pytest -q tests/test_launchers.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import BIN, check_run_report, launcher_free_env, run_dd

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("slurm/*.sh"), *REPO.glob(".ci/*.sh"), *REPO.glob("benchmarks/*.sh"),
                  REPO / ".ci" / "run"])
TIMEOUT = 600  # seconds: 2 shared cores, other suites may run beside us


def launcher_env() -> dict:
    """No enclosing launcher's variables (they would change rank discovery); our venv first."""
    return launcher_free_env()


def have_horovod() -> bool:
    code = "import horovod.torch"
    return subprocess.run([str(BIN / "python"), "-c", code], capture_output=True).returncode == 0


def slurm_answers() -> bool:
    if shutil.which("srun") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout
        # a line per node state: one node still busy with an earlier test's job is not a dead cluster
        return bool(set(states.split()) & {"idle", "mix", "alloc"})
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("script", [
    "local.sh",
    "torchrun.sh",
    pytest.param("mpirun.sh", marks=pytest.mark.mpi),
    pytest.param("srun.sh", marks=pytest.mark.slurm),
    pytest.param("horovodrun.sh", marks=pytest.mark.horovod),
])
def test_launch_script_runs_the_tiny_default(tmp_path, script):
    if script == "mpirun.sh" and not (BIN / "mpiexec").exists():
        pytest.skip("pip's MPICH (mpiexec) is not installed: pip install 'dd_mpi[mpi]'")
    if script == "srun.sh" and not slurm_answers():
        pytest.skip("no Slurm controller answers: run `bash .ci/slurm_up.sh`")
    if script == "horovodrun.sh" and not have_horovod():
        pytest.skip("Horovod not built: run launch/build_horovod.sh")
    out = tmp_path / "out"
    command, env = ["bash", str(REPO / "launch" / script)], launcher_env()
    if script == "srun.sh":
        # as its header documents (salloc -n 4 bash launch/srun.sh), on the first test node,
        # seen through that node's slurm.conf copy: srun's pmi2 finds the step's sockets under
        # srun's own SlurmdSpoolDir, and the two test slurmds on one host have one each
        # (slurm/NOTES.md). One slurmd per host needs neither.
        command = ["salloc", "--quiet", "-w", "dd-n1", "-n", "4", *command]
        env["SLURM_CONF"] = "/etc/slurm/slurmd-dd-n1.conf"
    # run from elsewhere than the repository: relative --out lands in the caller's directory
    result = subprocess.run([*command, "--out", "out", "--train-samples", "256", "--test-samples", "128"],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    # the whole pipeline's report, N = 2 (test_pipeline runs N = 4 and the baseline)
    launcher = {"local.sh": "local", "torchrun.sh": "torchrun", "mpirun.sh": "mpi", "srun.sh": "mpi",  # (--mpi=pmi2)
                "horovodrun.sh": "horovod"}[script]
    report = check_run_report(out, world_size=4, subnets=2, strategy="dd", launcher=launcher,
                              backend="horovod" if script == "horovodrun.sh" else "torch")
    assert report["config"]["dataset"] == "synthetic" and report["config"]["train_samples"] == 256
    assert ("mpi" in report["software"]) == (launcher == "mpi")  # the MPI library, where one is loaded


@pytest.mark.parametrize("script", ["local.sh", "torchrun.sh", pytest.param("horovodrun.sh", marks=pytest.mark.horovod)])
@pytest.mark.parametrize("flags, says", [
    (["--subnets", "0"], "--subnets 0 is invalid: use 1 or more sub-networks"),
    # the layout on the script's 4 ranks (--print-config alone passed it)
    (["--subnets", "4", "--groups", "3"], "--groups 3"),
])
def test_a_bad_flag_given_to_a_launch_script_is_one_line(tmp_path, script, flags, says):
    """torchrun (and horovodrun) stop every rank when one exits: each rank said the line, then
    came the launcher's traceback, and exit 1. The scripts check the flags once first."""
    if script == "horovodrun.sh" and not have_horovod():
        pytest.skip("Horovod not built: run launch/build_horovod.sh")
    result = subprocess.run(["bash", str(REPO / "launch" / script), *flags, "--out", "out"], cwd=tmp_path,
                            env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dd-train: error: {says}"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("mpiexec", marks=pytest.mark.mpi)])
def test_help_under_a_launcher_is_printed_once(launcher):
    """argparse printed --help on every rank."""
    result = run_dd(["--help"], launcher=launcher, nproc=2, timeout=TIMEOUT)
    assert result.returncode == 0 and result.stdout.count("usage: dd-train") == 1, result.stdout[-3000:]


@pytest.mark.parametrize("script, missing", [("local.sh", "dd-train"), ("torchrun.sh", "torchrun")])
def test_a_launch_script_without_its_tools_says_how_to_install_them(tmp_path, script, missing):
    """Outside the repository (no .venv beside it) and with nothing installed on PATH, the
    scripts said "exec: torchrun: not found", and no fix."""
    for name in (script, "common.sh"):  # the script sources common.sh from beside itself
        shutil.copy(REPO / "launch" / name, tmp_path / name)
    tools = tmp_path / "bin"
    tools.mkdir()
    if missing != "dd-train":  # dd-train is there, the launcher is not
        (tools / "dd-train").write_text("#!/bin/sh\nexit 0\n")
        (tools / "dd-train").chmod(0o755)
    result = subprocess.run(["bash", str(tmp_path / script)], cwd=tmp_path, capture_output=True, text=True,
                            env={**launcher_env(), "PATH": f"{tools}{os.pathsep}/usr/bin{os.pathsep}/bin"},
                            timeout=TIMEOUT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"error: {missing} is not on PATH: pip install -e ." in result.stderr, result.stderr


def test_a_preset_given_to_a_launch_script_replaces_its_tiny_default(tmp_path):
    """Flags given beat a preset's values wherever they stand, so the script's tiny default
    (resnet20, 2 sub-nets, synthetic) would have overridden the preset asked for."""
    env = {**launcher_free_env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run = lambda *args: subprocess.run(["bash", str(REPO / "launch" / "local.sh"), *args, "--print-config"],  # noqa: E731
                                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    preset, tiny = run("--preset", "cifar10-resnet32"), run()
    assert preset.returncode == 0 and tiny.returncode == 0, preset.stderr + tiny.stderr
    assert {"arch: resnet32", "subnets: 4", "dataset: cifar10"} <= set(preset.stdout.splitlines()), preset.stdout
    assert {"arch: resnet20", "subnets: 2", "dataset: synthetic"} <= set(tiny.stdout.splitlines()), tiny.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_is_clean(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    # -x with the repository as cwd: follows `source` into slurm/common.sh
    result = subprocess.run(["shellcheck", "-x", str(script.relative_to(REPO))], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


USER_SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("slurm/*.sh")])


@pytest.mark.parametrize("script", USER_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_arrays_that_may_be_empty_expand_under_set_u_on_bash_before_4_4(script):
    """Bash 4.3 and older (RHEL/CentOS 7 login and compute nodes) abort on "${a[@]}" of an
    empty array under `set -u` ("unbound variable"); 4.4 stopped doing so (bash's CHANGES),
    so no bash this suite runs on can show it. An array that may be empty (assigned `()` or
    `("$@")`) is therefore expanded as ${a[@]+"${a[@]}"}. Joins with [*] come after a check
    that the array is not empty."""
    text = script.read_text()
    maybe_empty = set(re.findall(r'(?:^|[\s;])(?:local\s+)?(\w+)=\((?:"\$@")?\)', text, re.M))
    unguarded = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                 for name in sorted(maybe_empty)
                 for m in re.finditer(r'(?<!\+)"\$\{' + name + r'\[@\]\}"', text)]
    assert not unguarded, f"write ${{a[@]+\"${{a[@]}}\"}} for an array that may be empty: {unguarded}"


def test_ci_runs_the_readme_test_command_verbatim():
    """The README opens with exactly two set-up commands (the demo, the tests), and CI's last
    command is the second one, so what CI checks is what a user is told to run."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    commands = [line for line in block if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    assert "dd-train --nproc" in commands[0] and "pytest" in commands[1]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == commands[1]
