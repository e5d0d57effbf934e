"""`fastmemit downstream`: few-shot GLUE-style checks (generation and/or log-likelihood ranking)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastmemit.cli.common import add_model_arguments, load_cli_model, positive_int

NAME = "downstream"
HELP = "few-shot downstream checks (sst2, mrpc, cola, rte, mmlu, sentiment_analysis, nli, dialogue)"


def _data_file(spec: str) -> tuple[str, str]:
    task, sep, path = spec.partition("=")
    if not sep or not task.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=PATH, got {spec!r}")
    return task.strip(), path.strip()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma list, e.g. sst2,mmlu,rte (alias: sst = sst2)")
    p.add_argument("--number_of_few_shots", "--number-of-few-shots", dest="number_of_few_shots", default=None,
                   help="comma list, one shot count (0-10) per task, e.g. 3,3,3 (default: 0 for all)")
    p.add_argument("--number_of_tests", "--number-of-tests", dest="number_of_tests", type=int, default=None,
                   help="test items per task: the first N after the 10-record shot pool (default: all)")
    p.add_argument("--mode", choices=("both", "generate", "loglik"), default="both",
                   help="generate = greedy answer + parsing; loglik = rank the options (default: both)")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None,
                   help="folder of <task>.jsonl (default: $FASTMEMIT_DOWNSTREAM_DATA or the checkout's shared data)")
    p.add_argument("--data-file", dest="data_files", type=_data_file, action="append", default=[],
                   metavar="TASK=PATH", help="read one task from this file instead (repeatable)")
    p.add_argument("--deltas", default=None, help="apply saved edit deltas to the model first (fastmemit.apply_deltas)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=8)
    p.add_argument("--max-length", dest="max_length", type=positive_int, default=None,
                   help="context window in tokens (default: from the model config)")
    p.add_argument("--no-shot-cache", dest="shot_cache", action="store_false",
                   help="run every prompt in full instead of reusing the shots' KV cache (same numbers, slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", default=None, help="also write the results (JSON) to this file, atomically")


def run(args: argparse.Namespace) -> int:
    from fastmemit.downstream import DownstreamError, evaluate_tasks, parse_task_flags, results_to_records
    from fastmemit.utils import check_writable, write_json_atomic

    flags = parse_task_flags(args.tasks, args.number_of_few_shots, args.number_of_tests)  # fail before loading
    if args.out:
        check_writable(args.out, "--out")
    if args.deltas and not Path(args.deltas).is_file():
        raise DownstreamError(f"--deltas {args.deltas!r} does not exist")
    t0 = time.perf_counter()
    model, tok = load_cli_model(args)
    if args.deltas:
        import fastmemit

        apply_deltas = getattr(fastmemit, "apply_deltas", None)
        if apply_deltas is None:
            raise DownstreamError("--deltas needs fastmemit.apply_deltas, which this installation does not provide yet")
        apply_deltas(model, args.deltas)
    t_load = time.perf_counter() - t0
    results = evaluate_tasks(
        model, tok, tasks=flags.tasks, n_shots=flags.n_shots, n_tests=flags.n_tests, mode=args.mode,
        data_dir=args.data_dir, seed=args.seed, batch_size=args.batch_size,
        data_files=dict(args.data_files) or None, max_length=args.max_length, share_prefix=args.shot_cache,
    )
    wall = time.perf_counter() - t0
    report = {
        "model": args.model, "deltas": args.deltas, "tasks": flags.tasks, "number_of_few_shots": flags.n_shots,
        "number_of_tests": flags.n_tests, "mode": args.mode, "seconds_load": t_load, "seconds_total": wall,
        "results": results,
    }
    if args.out:
        write_json_atomic(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'task':<19} {'mode':<9} {'accuracy':>8} {'invalid':>8} {'F1':>7} {'MCC':>7} {'n':>5} {'shots':>5} {'sec':>7}")
    for r in results_to_records(results):
        print(f"{r['task']:<19} {r['mode']:<9} {r['accuracy']:>8.3f} {r['invalid']:>8.3f} {r['f1']:>7.3f} "
              f"{r['mcc']:>7.3f} {r['n']:>5} {r['n_shots']:>5} {r['seconds']:>7.1f}")
    print(f"wall time {wall:.1f}s (model load {t_load:.1f}s)", file=sys.stderr)
    return 0
