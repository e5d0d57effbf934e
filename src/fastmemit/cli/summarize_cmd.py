"""`fastmemit summarize`: a table comparing run folders (from their summary.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fastmemit.eval.config import renamed
from fastmemit.eval.plots import PlotError, read_run_json
from fastmemit.eval.summary import CF_METRICS, LABELS, ZSRE_METRICS

NAME = "summarize"
HELP = "print a table comparing run folders (method, cases, metrics pre→post, statistics, times)"

CF = tuple((LABELS[k], k) for k in CF_METRICS)
ZSRE = tuple((LABELS[k], k) for k in ZSRE_METRICS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by `fastmemit evaluate`")
    p.add_argument("--json", action="store_true", help="print one JSON object per run (its summary) as a list")


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    d = Path(run_dir)
    if not (d / "config.json").is_file():
        raise PlotError(f"{d} is not a run folder (no config.json)")
    cfg = read_run_json(d / "config.json")
    s = read_run_json(d / "summary.json") if (d / "summary.json").is_file() else {}
    return {"run_dir": str(d), "config": cfg, "summary": s}


def _stats_label(st: dict[str, Any]) -> str:
    if not st:
        return "-"
    base = f"dm{st.get('dynamic_multiplier'):g}" if st.get("dynamic") else f"n{st.get('mom2_n_samples')}"
    base += f" λ{st.get('mom2_update_weight'):g}"
    if st.get("update_norm_lambda"):
        base += f" ε{st['update_norm_lambda']:g}"
    return base + (" recompute" if st.get("recompute_stats") else "")


def _pp(s: dict[str, Any], key: str) -> str:
    pre, post = s.get("pre", {}).get(key), s.get("post", {}).get(key)
    final = s.get("final", {}).get(key)
    if post is None:
        return "-"
    out = f"{pre:.1f}→{post:.1f}" if pre is not None else f"{post:.1f}"
    return out + (f" ({final:.1f})" if final is not None else "")


def table(rows: list[dict[str, Any]]) -> str:
    zsre = any("efficacy" in r["summary"].get("post", {}) for r in rows)
    cf = any("es" in r["summary"].get("post", {}) for r in rows) or not zsre
    metrics = (CF if cf else ()) + (ZSRE if zsre else ())
    header = ["run", "method", "mode", "n", *[m for m, _ in metrics], "stats", "stats s", "v* s", "solve s", "eval s",
              "edits/s", "status"]
    lines = []
    for r in rows:
        s, cfg = r["summary"], r["config"]
        run = renamed(cfg.get("run", {}))  # folders written before the rename use the research code's names
        t = s.get("time_seconds", {})
        eps = s.get("edits_per_second")
        status = "no summary" if not s else ("partial" if s.get("partial") else "done")
        lines.append([
            Path(r["run_dir"]).name, cfg.get("method", "?"),
            f"{'seq' if run.get('sequential', True) else 'batch'}×{run.get('edits_per_batch')}",
            f"{s.get('n_cases', 0)}/{cfg.get('n_cases', '?')}",
            *[_pp(s, k) for _, k in metrics], _stats_label(s.get("stats", {})),
            *[f"{t[k]:.1f}" if k in t else "-" for k in ("stats", "v", "solve", "eval")],
            f"{eps:.2f}" if eps else "-", status,
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*row) for row in lines]
    out.append("metrics ×100: pre→post (final model, sequential runs); times summed over the run's batches")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    rows = [load_summary(d) for d in args.runs]
    if args.json:
        print(json.dumps([{"run_dir": r["run_dir"], **r["summary"]} for r in rows], indent=2))
        return 0
    print(table(rows))
    return 0
