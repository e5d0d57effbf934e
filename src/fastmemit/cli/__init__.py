"""Command-line interface: ``fastmemit <command> ...`` (also ``python -m fastmemit``).

Each command lives in its own module exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; :data:`COMMANDS` lists them. The CLI is a thin layer over the public API.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fastmemit.cli.common import OneLineParser
from fastmemit.errors import FastMemitError

COMMANDS = [
    "fastmemit.cli.stats_cmd",
    "fastmemit.cli.edit_cmd",
    "fastmemit.cli.downstream_cmd",
    "fastmemit.cli.evaluate_cmd",
    "fastmemit.cli.plot_cmd",
    "fastmemit.cli.summarize_cmd",
    "fastmemit.cli.tune_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fastmemit",
        description="Closed-form knowledge editing (ROME, MEMIT, EMMET, AlphaEdit) with FastMEMIT statistics.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for modname in COMMANDS:
        mod = importlib.import_module(modname)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        return int(args._run(args) or 0)
    except FastMemitError as e:
        print(f"fastmemit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastmemit {args.command}: interrupted", file=sys.stderr)
        return 130
