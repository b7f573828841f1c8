"""dd-inspect as a user runs it: table, JSON contract, --verify exit code.

Most cases call its ``main`` in this process (a Python per case paid ~3 s of imports, a minute
and a half of CI in all); the bad split and the broken compose run it as a process."""

import contextlib
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

from dd_mpi import inspection

from helpers import python_path


def run(*args):
    """``dd-inspect ARGS``: its exit code and what it printed on each stream."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = inspection.main(list(args))
        except SystemExit as ended:  # (argparse's refusals)
            code = ended.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_table_shows_counts_and_ratio():
    result = run("--arch", "resnet32", "--width", "4", "--subnets", "4")
    assert result.returncode == 0, result.stderr
    assert "7,386,186" in result.stdout and "464,154" in result.stdout
    assert "15.91x" in result.stdout


def test_json_verify_contract():
    result = run("--arch", "resnet32", "--width", "4", "--subnets", "4", "--verify", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["global_params"] == 7_386_186
    assert info["subnet_params"] == [464_154] * 4
    assert len(info["subnet_flops"]) == 4 and info["global_flops"] > 15 * info["subnet_flops"][0]
    assert info["max_abs_err_eval"] <= 1e-5 and info["max_abs_err_train"] <= 1e-5


def test_default_width_is_the_papers_standard_net():
    """The paper's global nets are the standard ResNets (issue: its random_T matches He et
    al.'s standard ResNet32, and its 0.47 M is a standard ResNet32 with option B); resnet50
    is torchvision's."""
    cifar = json.loads(run("--arch", "resnet32", "--subnets", "4", "--json").stdout)
    assert cifar["global_params"] == 464_154 and cifar["width"] == 1.0  # option A by default
    bottleneck = json.loads(run("--arch", "resnet50", "--subnets", "8", "--num-classes", "1000", "--json").stdout)
    assert bottleneck["global_params"] == 25_557_032  # torchvision's resnet50


def test_the_paper_preset_is_resnet32_of_047M_split_into_4_of_a_sixteenth():
    info = json.loads(run("--preset", "cifar10-resnet32", "--json").stdout)
    assert info["global_params"] == 466_906 and info["subnet_params"] == [29_854] * 4
    assert info["shortcut"] == "B" and info["subnets"] == 4
    wide = json.loads(run("--preset", "cifar10-resnet32-w4", "--json").stdout)
    assert wide["global_params"] == 7_386_186 and wide["subnet_params"] == [464_154] * 4
    food = json.loads(run("--preset", "food101-resnet50-n8", "--json").stdout)
    assert food["num_classes"] == 101 and food["subnets"] == 8
    bad = run("--preset", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--preset 'nope' is unknown" in bad.stderr


def test_bad_split_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "dd_mpi.inspection", "--arch", "resnet32", "--width", "4",
                             "--subnets", "3"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--subnets 3" in result.stderr


def test_bad_numbers_are_one_line_and_exit_2():
    """Each was a traceback (NaN and inf widths, a negative size, a seed torch cannot take) or,
    for --image-size 0, the default size in its place."""
    for flags, says in ((["--width", "nan"], "--width nan is invalid"), (["--width", "inf"], "--width inf is invalid"),
                        (["--image-size", "-5"], "--image-size -5 is invalid"),
                        (["--image-size", "0"], "--image-size 0 is invalid"),
                        (["--verify", "--seed", str(2 ** 64 - 1)], f"--seed {2 ** 64 - 1} is out of range"),
                        (["--verify", "--seed", "-1"], "--seed -1 is out of range"),
                        # a RuntimeError traceback, and a build that never ended
                        (["--width", "1e9", "--subnets", "2"], "--subnets 2 (each sub-net at width 5e+08, "
                                                                "--width 1e+09 / 2): width 5e+08 makes resnet32 too "
                                                                "large to build (Storage size calculation overflowed"),
                        (["--arch", "resnet6000002"], "--arch resnet6000002 is deeper than dd_mpi builds")):
        result = run(*flags)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (flags, result.stderr[-2000:])
        assert result.stderr.startswith(f"dd-inspect: error: {says}"), result.stderr


def test_verify_fails_when_not_exact(tmp_path):
    """--verify's exit code is real: a sitecustomize that breaks compose makes it exit 1."""
    (tmp_path / "sitecustomize.py").write_text(
        "import dd_mpi.decompose as d\n"
        "real = d.compose\n"
        "def broken(states, spec, **kw):\n"
        "    out = real(states, spec, **kw)\n"
        "    out['fc.bias'] = out['fc.bias'] + 1.0\n"
        "    return out\n"
        "d.compose = broken\n"
        "import dd_mpi.inspection as i\n"
        "i.compose = broken\n")
    env = {**os.environ, "PYTHONPATH": python_path(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "dd_mpi.inspection", "--arch", "resnet20", "--width", "2",
                             "--subnets", "2", "--verify"], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "NOT exact" in result.stderr
