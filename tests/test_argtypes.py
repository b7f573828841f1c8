"""dd_mpi.argtypes: the shared argparse types, and dd-report, dd-inspect and dd-scaling
answering a bad flag or value with one line naming it, exit 2 (no usage block first), and
every tool's --version."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import version

import pytest

import dd_mpi
from dd_mpi import cli, inspection, reporting, scaling
from dd_mpi.argtypes import OneLineParser, distinct_list, int_list, percent, positive


def test_types_refuse_with_messages_naming_the_value():
    assert positive(int)("3") == 3 and positive(float, or_zero=True)("0") == 0.0
    assert int_list("2,1,2") == [2, 1] and distinct_list(str, ("a", "b"))("b,a") == ["b", "a"]
    assert percent("100") == 100.0
    for parse, text, says in ((positive(int), "0", "'0': expected a number above 0"),
                              (positive(float, or_zero=True), "-1", "'-1': expected a number of 0 or more"),
                              (positive(float), "nan", "'nan': expected a number above 0"),
                              (int_list, "1,x", "'1,x': expected a comma-separated list of integers"),
                              (distinct_list(int), "1,1", "'1,1': 1 given twice: give each value once"),
                              (distinct_list(str, ("a",)), "b", "'b': 'b' is not one of a"),
                              (percent, "nan", "'nan': expected a percentage from 0 to 100")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{says}$"):
            parse(text)


def test_the_parser_and_its_subparsers_say_one_line(capsys):
    parser = OneLineParser(prog="tool")
    parser.add_subparsers(dest="cmd").add_parser("sub").add_argument("--n", type=positive(int))
    for argv, says in ((["--bogus"], "tool: error: unrecognized arguments: --bogus"),
                       (["sub", "--n", "0"], "tool sub: error: argument --n: '0': expected a number above 0")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2 and capsys.readouterr().err == says + "\n"


@pytest.mark.parametrize("main, argv, says", [
    (reporting.main, ["RUN", "--bogus"], "dd-report: error: unrecognized arguments: --bogus"),
    (reporting.main, ["RUN", "--out"], "dd-report: error: argument --out: expected one argument"),
    (inspection.main, ["--bogus"], "dd-inspect: error: unrecognized arguments: --bogus"),
    (inspection.main, ["--subnets", "x"], "dd-inspect: error: argument --subnets: invalid int value: 'x'"),
    (scaling.main, ["--collect", "RUN", "--bogus"], "dd-scaling: error: unrecognized arguments: --bogus"),
    (scaling.main, ["--local", "--nprocs", "0"], "dd-scaling: error: argument --nprocs: '0': expected positive "
                                                 "integers"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v) if isinstance(v, list) else v.__module__)
def test_a_bad_flag_or_value_is_one_line_naming_it(tmp_path, capsys, main, argv, says):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path) if arg == "RUN" else arg for arg in argv])
    assert exit_.value.code == 2 and capsys.readouterr().err == says + "\n"


@pytest.mark.parametrize("main, prog", [(cli.main, "dd-train"), (reporting.main, "dd-report"),
                                        (inspection.main, "dd-inspect"), (scaling.main, "dd-scaling")],
                         ids=lambda v: v if isinstance(v, str) else v.__module__)
def test_every_tool_says_its_version_and_torch_s(capsys, main, prog):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    torch, python = version("torch"), platform.python_version()
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"{prog} {dd_mpi.__version__} (torch {torch}, Python {python})\n"
