"""`fastmemit plot`: metrics against the number of edits for one run, or several runs side by side."""

from __future__ import annotations

import argparse

from fastmemit.eval.plots import plot_run, plot_runs

NAME = "plot"
HELP = "plot run folders: metrics vs number of edits (one run) or runs overlaid side by side (several); PNG + CSV"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by `fastmemit evaluate`")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/plots/metrics.png for one run, "
                                               "runs-compare.png for several); the CSV goes beside it")


def run(args: argparse.Namespace) -> int:
    if len(args.runs) == 1:
        paths = plot_run(args.runs[0], args.out)
    else:
        paths = plot_runs(args.runs, args.out or "runs-compare.png")
    for key, path in paths.items():
        print(f"{key:<24} {path}")
    return 0
