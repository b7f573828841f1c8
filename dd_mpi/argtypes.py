"""argparse types and a parser whose bad input is one line.

Shared by dd-report, dd-inspect, dd-scaling and the benchmark scripts: a bad flag or value
is ``PROG: error: MESSAGE``, exit 2, the message naming the flag (``--help`` shows them all).
``add_version`` gives the tools and dd-train their ``--version``.
"""

from __future__ import annotations

import argparse
import math

from .errors import EXIT_USAGE


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: this package's and torch's (read from its metadata: importing torch would
    cost a command that only reports seconds), what a cluster user quotes with a figure."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__
    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    parser.add_argument("--version", action="version", help="print the versions and exit",
                        version=f"%(prog)s {__version__} (torch {torch}, Python {platform.python_version()})")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose bad input is one line, ``PROG: error: MESSAGE``, exit 2 (not the usage
    block first: the message names the flag, --help shows them all). Its subparsers, if any,
    are of this class too (argparse's default ``parser_class``)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive(kind, *, or_zero: bool = False):
    """An argparse type: a finite number above 0 (or 0 too): a time, a rate, a count."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not or_zero):
            bound = "of 0 or more" if or_zero else "above 0"
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number {bound}")
        return value
    parse.__name__ = kind.__name__  # (argparse names the type in its messages)
    return parse


def int_list(text: str) -> list[int]:
    """An argparse type: comma- (or space-) separated positive integers, a repeat dropped."""
    try:
        values = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return list(dict.fromkeys(values))  # a value given twice is one run, not two


def distinct_list(kind=int, choices: tuple | None = None):
    """An argparse type: a comma-separated list of ``kind`` values (of ``choices``), each once:
    a value given twice would be a second run into the first one's directory."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {kind.__name__} "
                                             "values") from None
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: {bad[0]!r} is not one of {', '.join(map(str, choices))}")
        twice = [v for v in dict.fromkeys(values) if values.count(v) > 1]
        if twice:
            raise argparse.ArgumentTypeError(f"{text!r}: {twice[0]!r} given twice: give each value once")
        return values
    parse.__name__ = "list"  # (argparse names the type in its messages)
    return parse


def percent(text: str) -> float:
    """An argparse type: a percentage, 0 to 100."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not 0 <= value <= 100:  # (nan too)
        raise argparse.ArgumentTypeError(f"{text!r}: expected a percentage from 0 to 100")
    return value
