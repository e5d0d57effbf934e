"""`fastmemit tune`: edit layers from a causal trace and a budgeted sweep of λ, μ, the statistics'
multiplier and the v* settings on CounterFact cases; writes an hparams JSON that --hparams reads."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fastmemit.cli.common import add_model_arguments, parse_layers, positive_float, positive_int
from fastmemit.errors import ConfigurationError
from fastmemit.utils import cache_dir, check_writable

NAME = "tune"
HELP = "find edit layers (causal trace) and hparams (budgeted sweep) for a model; writes an hparams JSON"

DATA_NAME = "counterfact-train.json"
CORPUS_NAME = "enwiki-sample.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--method", default="EMMET", help="editing method to tune (default EMMET)")
    p.add_argument("--budget-minutes", type=positive_float, default=60.0,
                   help="wall-clock budget of the whole command, loading included (default 60)")
    p.add_argument("--out", type=Path, default=None,
                   help="hparams JSON to write (default: hparams-<METHOD>-<model>.json in the current folder)")
    p.add_argument("--hparams", default=None, help="start from these hparams (default: the built-in, else the automatic default)")
    p.add_argument("--data", type=Path, default=None,
                   help=f"CounterFact file to tune on (default: {DATA_NAME} in $FASTMEMIT_SHARED_DATA or ../shared/data)")
    p.add_argument("--corpus", default=None,
                   help=f"statistics corpus (default: {CORPUS_NAME} beside --data when present, else the library default)")
    p.add_argument("--cases", type=positive_int, default=20, help="tuning cases: the first N of the file (default 20)")
    p.add_argument("--held-aside", type=positive_int, default=50,
                   help="held-aside cases for the final choice: the next N (default 50)")
    p.add_argument("--trace-facts", type=positive_int, default=8, help="known facts for the causal trace (default 8)")
    p.add_argument("--batch", type=positive_int, default=10, help="cases edited together in a trial (default 10)")
    p.add_argument("--layers", type=parse_layers, default=None, help="fixed edit layers, e.g. 4-8 (no causal trace)")
    p.add_argument("--stats-cache", default=None,
                   help="statistics cache folder to use and keep (default: a temporary one, removed at the end)")
    p.add_argument("--log", type=Path, default=None,
                   help="trial log: trials already in it are read back, so an interrupted tune resumes")
    p.add_argument("--seed", type=int, default=0)


def default_data() -> Path:
    """The CounterFact training file: in $FASTMEMIT_SHARED_DATA, else ../shared/data from the current folder."""
    env = os.environ.get("FASTMEMIT_SHARED_DATA")
    for folder in ([Path(env).expanduser()] if env else []) + [Path.cwd().parent / "shared" / "data"]:
        if (folder / DATA_NAME).is_file():
            return folder / DATA_NAME
    raise ConfigurationError(f"no {DATA_NAME} found in $FASTMEMIT_SHARED_DATA or ../shared/data: give --data FILE "
                             "(CounterFact records, original or simplified form)")


def _default_out(method: str, model: str) -> Path:
    name = Path(model.rstrip("/")).name or "model"
    return Path(f"hparams-{method}-{name}.json")


def run(args: argparse.Namespace) -> int:
    from fastmemit.editing import resolve_hparams
    from fastmemit.eval.datasets import load_counterfact
    from fastmemit.hparams_registry import builtin_name
    from fastmemit.methods import get_method
    from fastmemit.models import load_model
    from fastmemit.tune import Budget, TuneSettings, tune

    budget = Budget(args.budget_minutes * 60.0, start=time.monotonic())
    method = get_method(args.method)
    data = args.data or default_data()
    out = args.out or _default_out(method.name, args.model)
    check_writable(out, "--out")
    if args.log is not None:
        check_writable(args.log, "--log")
    corpus = args.corpus or (str(data.parent / CORPUS_NAME) if (data.parent / CORPUS_NAME).is_file() else None)
    settings = TuneSettings(budget_s=budget.seconds, n_tune=args.cases, n_held=args.held_aside, n_trace=args.trace_facts,
                            batch_size=args.batch, layers=args.layers, seed=args.seed)
    cases = load_counterfact(data, dataset_size_limit=args.cases + args.held_aside + 200)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    start = resolve_hparams(method, args.hparams, model)
    builtin = builtin_name(method.name, model)
    source = (f"file {args.hparams}" if args.hparams else
              f"built-in {method.name}/{builtin}" if builtin else "automatic defaults")
    stats = args.stats_cache or tempfile.mkdtemp(prefix="tune-stats-", dir=_tmp_root())
    try:
        result = tune(model, tok, method.name, cases, settings, start=start, start_source=source, corpus=corpus,
                      stats_cache_dir=stats, log=args.log, budget=budget, data_file=str(data),
                      command=" ".join(shlex.quote(a) for a in ["fastmemit", *sys.argv[1:]]))
    finally:
        if args.stats_cache is None:
            shutil.rmtree(stats, ignore_errors=True)
    result.save(out)
    print(report(result.provenance))
    print(f"\nwrote {out} (use it with --hparams {out}); {result.provenance['budget']['used']:.0f} s "
          f"of {budget.seconds:.0f} s")
    return 0


def _tmp_root() -> str:
    root = cache_dir() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


# ----------------------------------------------------------------------------- the table

_COLUMNS = ("layers", "mom2_update_weight", "emmet_lambda", "dynamic_multiplier", "clamp_norm_factor", "v_lr")
_HEAD = ("layers", "λ", "μ", "dm", "clamp", "v_lr")


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return f"{v[0]}-{v[-1]}" if len(v) > 1 and v == list(range(v[0], v[-1] + 1)) else ",".join(map(str, v))
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _row(stage: str, config: dict[str, Any], scores: dict[str, Any], seconds: Any, mark: str = "") -> list[str]:
    s = [f"{scores[k]:.1f}" if isinstance(scores.get(k), (int, float)) else "-" for k in ("es", "ps", "ns", "score")]
    return [mark + stage, *(_fmt(config[k]) if config else "-" for k in _COLUMNS), *s,
            f"{seconds:.0f}" if isinstance(seconds, (int, float)) else "-"]


def report(prov: dict[str, Any]) -> str:
    """The trials (tuning cases), the validation (held-aside cases) and the choice as text tables."""
    head = ["stage", *_HEAD, "ES", "PS", "NS", "Score", "s"]
    chosen = prov["chosen"]
    lines = [f"{prov['method']} on {prov['model']['name']} (start: {prov['start']})"]
    trace = prov.get("trace")
    if trace:
        lines.append(f"causal trace over {len(trace['facts'])} facts ({trace['n_known']} known): "
                     f"edit window {_fmt(trace['layers'])} (MLP restoration effect {max(trace['mlp']):.3f})")
    for title, part, rows in (("tuning cases", "tune", prov["trials"]), ("held-aside cases", "held", prov["validation"])):
        table = [_row("unedited", {}, prov["unedited"][part], None)]
        mark_here = part == "held" or not prov["validation"]  # the choice is marked where it was made
        table += [_row(t["stage"] + (" (aborted)" if t["status"] != "done" else ""), t["config"], t["scores"], t["seconds"],
                       "* " if mark_here and t["config"] == chosen else "") for t in rows]
        lines += ["", f"{title} ({prov['unedited'][part].get('n_cases', 0)}):", _table(head, table)]
    if prov["skipped"]:
        counts = Counter((s["stage"], s["reason"]) for s in prov["skipped"])  # in order of first appearance
        lines.append("\nskipped: " + "; ".join(f"{stage}{f' ×{n}' if n > 1 else ''} ({reason})"
                                               for (stage, reason), n in counts.items()))
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [head, *rows])
