"""Lifelong editing on smollm2-135m: thousands of sequential CounterFact edits per method, resumable.

Each configuration is a ``fastmemit evaluate`` run folder ``OUT/<name>`` (sequential, edits accumulate):
per-batch post scores and diagnostics, downstream checks (sst2, rte, mmlu; 3 shots, 50 tests) before the
first edit and every K batches, a retention check every K batches (ES/PS/NS of every case edited so far
on the model as it is then), the final scoring of all cases. Re-running the same command continues every
unfinished run where it stopped (a run can span sessions); finished ones are only reported.

Configurations (``--list``), in the order they run:

    <METHOD>-<edits>-b<batch>        METHOD in ENCORE, EMMET, AlphaEdit, MEMIT (built-in smollm2-135m
                                     hparams, FastMEMIT statistics with dynamic_multiplier 10),
                                     edits 1000 / 3000, batch 10 / 100 (AlphaEdit's protocol: 100)
    EMMET-full-1000-b10              EMMET with full statistics (every token of the statistics corpus)
    ENCORE-ln<N>-1000-b10            ENCORE with norm_constraint (λ_n) N in 1, 100, 1000 (built-in: 10)
    ENCORE-orig-1000-b10             ENCORE with norm_anchor 'original' (W0; built-in: 'previous')

Data: ``--data`` (../shared/data/counterfact-train.json) records from ``--start`` (5000) on, written once
to ``OUT/data/`` as the slice every run reads: records 5000–7999 (case ids in the file), of which the
1,000-edit runs take the first 1,000. The project tuned on the file's first records (hparams sweep: 20,
FastMEMIT experiment: 200, tests: ≤ 100), never past index 1,000.

    OMP_NUM_THREADS=2 python bench/lifelong.py --out /work/runs/lifelong          # run / continue all
    python bench/lifelong.py --out /work/runs/lifelong --only 'ENCORE-1000-b10,EMMET-1000-b10'
    python bench/lifelong.py --out /tmp/smoke --max-edits 20 --only 'EMMET-1000-b10'  # a short smoke run
    python bench/lifelong.py --out /work/runs/lifelong --report                    # table and plot only
    python bench/lifelong.py --out /work/runs/encore-sweep --start 1000 --max-edits 200 --tasks '' \
        --only 'ENCORE*-1000-b10,AlphaEdit-1000-b10' --set v_compute_dtype=bfloat16    # a short λ_n sweep

``--set FIELD=JSON`` overrides an hparams field in every selected configuration (a run folder refuses
to continue with other settings: give such runs their own ``--out``).

Writes the table (also printed), the rows and one retention plot of all configurations to
``--results`` (bench/results/lifelong.{md,json,png}) after every configuration.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmemit.cli.common import parse_set_overrides
from fastmemit.errors import ConfigurationError
from fastmemit.eval import RunConfig, run_evaluation
from fastmemit.eval.plots import plot_lifelong
from fastmemit.models import load_model
from fastmemit.utils import atomic_path, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
METHODS = ("ENCORE", "EMMET", "AlphaEdit", "MEMIT")
FULL_STATS = {"dynamic": False, "mom2_n_samples": -1}  # every token of the statistics corpus


@dataclass(frozen=True)
class Config:
    name: str
    method: str
    edits: int
    batch: int
    overrides: dict[str, Any] = field(default_factory=dict)
    sweep: bool = False  # a λ_n / anchor variant: left out of the report until it has a run folder


def all_configs() -> list[Config]:
    """Every configuration, in run order: the 1,000-edit batch-10 runs first."""
    out = [Config(f"{m}-1000-b10", m, 1000, 10) for m in METHODS]
    out.append(Config("EMMET-full-1000-b10", "EMMET", 1000, 10, dict(FULL_STATS)))
    out += [Config(f"{m}-1000-b100", m, 1000, 100) for m in METHODS]
    out += [Config(f"{m}-3000-b100", m, 3000, 100) for m in METHODS]
    out += [Config(f"{m}-3000-b10", m, 3000, 10) for m in METHODS]
    # ENCORE's λ_n (norm_constraint, built-in 10) and anchor, for short sweeps (--max-edits)
    out += [Config(f"ENCORE-ln{n}-1000-b10", "ENCORE", 1000, 10, {"norm_constraint": n}, sweep=True)
            for n in (1, 100, 1000)]
    out.append(Config("ENCORE-orig-1000-b10", "ENCORE", 1000, 10, {"norm_anchor": "original"}, sweep=True))
    return out


def select(configs: list[Config], only: str | None) -> list[Config]:
    """The configurations named by ``only`` (comma list of names or shell patterns), in run order."""
    if not only:
        return configs
    pats = [p.strip() for p in only.split(",") if p.strip()]
    picked = [c for c in configs if any(fnmatch.fnmatchcase(c.name, p) for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(c.name, p) for c in configs)]
    if unknown:
        raise SystemExit(f"--only: no configuration matches {unknown}; see --list")
    return picked


def data_slice(src: Path, start: int, count: int, out: Path) -> Path:
    """``out/data/<stem>-<start>-<end>.json``: records [start, start + count) of ``src``, written once."""
    records = json.loads(src.read_text())
    part = records[start:start + count]
    if len(part) < count:
        raise SystemExit(f"{src} has {len(records)} records: fewer than {start} + {count}")
    path = out / "data" / f"{src.stem}-{start}-{start + count}.json"
    if not path.is_file() or json.loads(path.read_text()) != part:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(part))
    return path


def steps(every_edits: int, batch: int) -> int:
    """K batches between checks for a check about every ``every_edits`` edits."""
    return max(1, round(every_edits / batch))


def run_config(c: Config, args: argparse.Namespace, data: Path) -> RunConfig:
    edits = min(c.edits, args.max_edits) if args.max_edits else c.edits
    every = args.check_every or c.edits // 4  # four checks a run by default: 250 / 750 edits
    k_ds, k_ret = steps(every, c.batch), steps(args.retention_every or every, c.batch)
    return RunConfig(
        method=c.method, model=args.model, hparams=args.hparams, hparams_overrides={**c.overrides, **args.set},
        dataset="cf",
        data=str(data), dataset_size_limit=edits, edits_per_batch=c.batch, sequential=True, corpus=args.corpus,
        stats_cache_dir=args.stats_cache_dir, do_downstream_eval=bool(args.tasks), downstream_eval_steps=k_ds,
        downstream_tasks=args.tasks or "sst2", number_of_few_shots=",".join([str(args.shots)] * len(args.tasks.split(",")))
        if args.tasks else None, number_of_tests=args.n_tests, downstream_data_dir=args.downstream_data_dir,
        retention_eval_steps=k_ret, stop_on_collapse=args.stop_on_collapse, show_progress=False,
        plots=not args.no_run_plots,
    ).normalized()


def run_dir(c: Config, args: argparse.Namespace) -> Path:
    """``OUT/<name>``; ``OUT/<name>-max<N>`` for a run capped by --max-edits (it reads another slice)."""
    return Path(args.out) / (f"{c.name}-max{args.max_edits}" if args.max_edits else c.name)


def command(cfg: RunConfig, out: Path) -> list[str]:
    """The ``fastmemit evaluate`` command that runs (or continues) the same run folder."""
    cmd = ["fastmemit", "evaluate", "--method", cfg.method, "--model", cfg.model, "--data", str(cfg.data),
           "--dataset_size_limit", str(cfg.dataset_size_limit), "--edits_per_batch", str(cfg.edits_per_batch),
           "--retention_eval_steps", str(cfg.retention_eval_steps)]
    if cfg.hparams:
        cmd += ["--hparams", cfg.hparams]
    for k, v in cfg.hparams_overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    if cfg.do_downstream_eval:
        cmd += ["--do_downstream_eval", "--downstream_tasks", cfg.downstream_tasks, "--number_of_few_shots",
                str(cfg.number_of_few_shots), "--number_of_tests", str(cfg.number_of_tests),
                "--downstream_eval_steps", str(cfg.downstream_eval_steps)]
    if cfg.stop_on_collapse:
        cmd += ["--stop_on_collapse"]
    return [*cmd, "--out", str(out)]


# ----------------------------------------------------------------------------- the report


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for x in path.read_text().splitlines():
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            break
    return out


def _downstream(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracy over the (task, mode) rows of the baseline and of the last check; the last invalid rate."""
    def mean(rows: list[dict[str, Any]], key: str, mode: str | None = None) -> float | None:
        vals = [r[key] for r in rows if mode is None or r["mode"] == mode]
        return sum(vals) / len(vals) if vals else None

    if not checks:
        return {}
    base, last = checks[0], checks[-1]
    def per_task(check: dict[str, Any]) -> dict[str, float]:
        return {f"{r['task']}/{r['mode']}": r["accuracy"] for r in check["records"]}

    return {"baseline_acc": mean(base["records"], "accuracy"), "last_acc": mean(last["records"], "accuracy"),
            "last_edits": last["edits_so_far"], "last_invalid": mean(last["records"], "invalid", "generate"),
            "baseline_per_task": per_task(base), "last_per_task": per_task(last)}


def report_row(c: Config, d: Path) -> dict[str, Any]:
    """What a run folder holds so far: status, scores at edit time and on all edits so far, downstream, drift."""
    s = _read(d / "summary.json") or {}
    cfg = _read(d / "config.json") or {}
    row: dict[str, Any] = {"config": c.name, "method": c.method, "edits_planned": cfg.get("n_cases", c.edits),
                           "batch": c.batch, "run_dir": str(d), "edits_done": s.get("n_cases", 0)}
    if not s:
        row["status"] = "not started"
        return row
    st = s.get("stopped")
    row["status"] = (f"stopped at {st['edits_so_far']} ({st['rule']}), kept {st['healthy_edits']}" if st else
                     "partial" if s.get("partial") else "done")
    row["stopped"] = st
    row["pre"] = {k: s.get("pre", {}).get(k) for k in ("es", "ps", "ns", "score")}
    row["post"] = {k: s.get("post", {}).get(k) for k in ("es", "ps", "ns", "score")}
    ret = _lines(d / "retention.jsonl")
    if s.get("final") and not s.get("partial"):
        row["all_so_far"] = {"edits": s["n_cases"], "source": "final", **{k: s["final"].get(k) for k in ("es", "ps", "ns", "score")},
                             "ns_unedited": s.get("pre_all", {}).get("ns")}
    elif ret:
        m = ret[-1]["means"]
        row["all_so_far"] = {"edits": ret[-1]["edits_so_far"], "source": "retention",
                             **{k: m.get(k) for k in ("es", "ps", "ns", "score")}}
    row["downstream"] = _downstream(_lines(d / "downstream.jsonl"))
    mx = (s.get("diagnostics") or {}).get("max", {})
    row["max_rel_distance"] = max((v.get("relative_distance_w0", 0.0) for v in mx.values()), default=None)
    row["edits_per_second"] = s.get("edits_per_second")
    row["time_seconds"] = s.get("time_seconds", {}).get("total")
    return row


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _per_task(ds: dict[str, Any]) -> str:
    """'sst2 0.70→0.64, rte …': each task's generate-mode accuracy at the baseline and the last check."""
    base, last = ds.get("baseline_per_task") or {}, ds.get("last_per_task") or {}
    cells = [f"{k.split('/')[0]} {_f(base.get(k), '{:.2f}')}→{v:.2f}" for k, v in last.items() if k.endswith("/generate")]
    return ", ".join(cells) or "-"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| config | status | edits | post ES / PS / NS (at edit) | all edits so far ES / PS / NS / Score (at n) | "
            "NS unedited (same cases) | downstream acc base → last (at n) | per task (generate), base → last | invalid | "
            "max ‖W−W0‖/‖W0‖ | edits/s | hours |")
    lines = [head, "| " + " | ".join(["---"] * 12) + " |"]
    for r in rows:
        post, a, ds = r.get("post") or {}, r.get("all_so_far") or {}, r.get("downstream") or {}
        lines.append(" | ".join([
            f"| {r['config']}", r["status"], f"{r['edits_done']}/{r['edits_planned']}",
            " / ".join(_f(post.get(k), "{:.0f}") for k in ("es", "ps", "ns")),
            (" / ".join(_f(a.get(k), "{:.1f}") for k in ("es", "ps", "ns", "score")) + f" ({a.get('edits')}"
             + (", final)" if a.get("source") == "final" else ")")) if a else "-",
            _f(a.get("ns_unedited") if a.get("ns_unedited") is not None else (r.get("pre") or {}).get("ns")),
            f"{_f(ds.get('baseline_acc'), '{:.3f}')} → {_f(ds.get('last_acc'), '{:.3f}')} ({ds.get('last_edits')})"
            if ds else "-",
            _per_task(ds),
            _f(ds.get("last_invalid"), "{:.2f}"), _f(r.get("max_rel_distance"), "{:.3f}"),
            _f(r.get("edits_per_second"), "{:.2f}"), _f((r.get("time_seconds") or 0) / 3600, "{:.2f}"),
        ]) + " |")
    return "\n".join(lines)


def write_results(configs: list[Config], args: argparse.Namespace, plot: bool = True) -> list[dict[str, Any]]:
    rows = [report_row(c, run_dir(c, args)) for c in configs]
    rows = [r for r, c in zip(rows, configs) if not (c.sweep and r["status"] == "not started")]
    text = table(rows)
    print(text, flush=True)
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Lifelong editing on {args.model}\n\nRun root `{args.out}`; data: records {args.start} on of "
              f"`{Path(args.data).name}`; downstream {args.tasks or 'off'} ({args.shots} shots, {args.n_tests} tests) and "
              f"retention every {args.check_every or 'quarter of the run'}{' edits' if args.check_every else ''}. 'post' = each batch's cases right after their edit "
              "(running mean); 'all edits so far' = every case edited so far on the model at n edits (the final "
              "scoring for finished runs, else the last retention check). Written by `bench/lifelong.py`.\n\n")
    with atomic_path(res.with_suffix(".md")) as tmp:
        tmp.write_text(header + text + "\n")
    write_json_atomic(res.with_suffix(".json"), rows)
    started = [(r["config"], Path(r["run_dir"])) for r in rows if r["status"] != "not started"
               and (Path(r["run_dir"]) / "cases.jsonl").is_file()]
    if started and plot:
        try:
            plot_lifelong([d for _, d in started], res.with_suffix(".png"), labels=[n for n, _ in started])
        except Exception as e:  # a plot must not stop the runs
            print(f"plot not written: {e}", flush=True)
    return rows


# ----------------------------------------------------------------------------- running


def run_one(c: Config, args: argparse.Namespace, data: Path) -> bool:
    """Run or continue configuration ``c``; False when it had finished earlier (nothing run)."""
    cfg, out = run_config(c, args, data), run_dir(c, args)
    s = _read(out / "summary.json")
    if s and not s.get("partial"):
        print(f"[{c.name}] finished earlier: {out}", flush=True)
        return False
    cmd = command(cfg, out)
    print(f"[{c.name}] {'continuing' if (out / 'config.json').is_file() else 'starting'}: {shlex.join(cmd)}", flush=True)
    model, tok = load_model(cfg.model)
    t0 = time.perf_counter()

    def on_event(event: str, batch: int) -> None:
        if event == "batch_written" and (batch + 1) % args.print_every == 0:
            print(f"[{c.name}] batch {batch + 1} written ({time.perf_counter() - t0:.0f} s)", flush=True)

    # the pre-edit scores are the same in every configuration (same cases, same unedited model): reuse
    siblings = [d for d in Path(args.out).iterdir() if d.is_dir() and d != out and (d / "pre.jsonl").is_file()]
    res = run_evaluation(cfg, out, model=model, tok=tok, on_event=on_event, command=cmd, reuse_pre_from=siblings)
    st = res.summary.get("stopped")
    print(f"[{c.name}] {'stopped: ' + st['reason'] if st else 'done'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/lifelong", help="run root: one run folder per configuration")
    ap.add_argument("--only", help="comma list of configuration names or shell patterns (see --list)")
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    ap.add_argument("--max-edits", type=int, default=None, help="cap every run at N edits (smoke runs; own folders)")
    ap.add_argument("--report", action="store_true", help="only write the table and plot of what the runs hold")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "lifelong"))
    ap.add_argument("--data", default=str(DATA / "counterfact-train.json"))
    ap.add_argument("--start", type=int, default=5000, help="first record of --data used")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hparams", default=None, help="one hparams file for every method (default: the built-ins)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override one hparams field in every configuration (repeatable)")
    ap.add_argument("--corpus", default=None, help="statistics corpus (default: the hparams' / the library's)")
    ap.add_argument("--stats-cache-dir", default=None)
    ap.add_argument("--tasks", default="sst2,rte,mmlu", help="downstream tasks ('' for none)")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--n-tests", type=int, default=50)
    ap.add_argument("--downstream-data-dir", default=None)
    ap.add_argument("--check-every", type=int, default=None,
                    help="downstream check about every N edits (default: a quarter of the run's edits: 250 / 750)")
    ap.add_argument("--retention-every", type=int, default=None, help="retention check about every N edits "
                                                                        "(default: as --check-every)")
    ap.add_argument("--stop-on-collapse", action="store_true", help="stop a run when a collapse rule fires "
                                                                    "(the evaluate defaults; docs/lifelong.md)")
    ap.add_argument("--print-every", type=int, default=10, help="a progress line every N batches")
    ap.add_argument("--no-run-plots", action="store_true", help="no plots in the run folders (the summary plot stays)")
    ap.add_argument("--no-plot", action="store_true", help="no summary plot (results .png)")
    args = ap.parse_args(argv)
    try:
        args.set = parse_set_overrides(args.set)
    except ConfigurationError as e:
        raise SystemExit(str(e)) from None
    os.environ.setdefault("FASTMEMIT_PROGRESS", "0")  # a log file, not a terminal: progress lines instead
    configs = select(all_configs(), args.only)
    if args.list:
        for c in configs:
            print(f"{c.name:24s} {c.method:10s} {c.edits:5d} edits, batch {c.batch:3d} {c.overrides or ''}")
        return 0
    ran = False
    if not args.report:
        # one slice for every configuration (a run folder's identity holds its data file)
        count = max(c.edits for c in all_configs())
        data = data_slice(Path(args.data), args.start, min(count, args.max_edits) if args.max_edits else count,
                          Path(args.out))
        for c in configs:
            if run_one(c, args, data):  # the table and plot after every configuration that ran
                write_results(configs, args, plot=not args.no_plot)
                ran = True
    if not ran:
        write_results(configs, args, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
