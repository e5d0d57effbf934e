"""Hyperparameter sweep on the offline default model smollm2-135m, for its built-in hparams.

Reuses :mod:`fastmemit.tune` (its causal trace, its trial runner, its resumable trial log). Case
sets, all from ``counterfact-train.json`` and disjoint: the first ``--cases`` records are the
tuning cases every grid point is edited into and scored on (batched mode: the model is restored
after each batch); the next ``--held-aside`` records are only used for the choice; the 200 after
them give the causal trace's facts. FastMEMIT statistics (dynamic_multiplier 10) over the enwiki
sample. In order, for each edit window (the built-in's first, then the trace's pick, then the
others of ``--windows``):

- EMMET: λ (mom2_update_weight) over ``--lambdas`` with μ (emmet_lambda) 0.1; then μ over ``--mus``
  with λ fixed at the window's best — μ swept apart from λ;
- MEMIT: λ over ``--memit-lambdas``;
- the held-aside cases: the window's best EMMET and best MEMIT configuration (and, once, the
  built-ins), so that a sweep stopped early still has validated rows.

The choice per method is the best held-aside Score (ties: the held-aside mean of the magnitudes EM, PM,
NM, then the tuning Score). z* is shared between
the methods and grid points, and kept in ``--targets`` (in the user cache) across restarts. Every finished trial is in
the logs (one per method); running the same command again continues where it stopped.

    OMP_NUM_THREADS=1 python bench/sweep_smollm2.py --cases 200 --held-aside 100
    python bench/sweep_smollm2.py --report      # the tables of docs/hparams-sweep.md from the logs

Two processes can share the work on two cores: a second one sweeps other windows into its own files
(``--windows 3-7 --no-trace --no-builtin-held --out <prefix2> --targets <file2>``), and
``--merge-from <prefix2>`` adds its trials to the main logs afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fastmemit import load_model
from fastmemit.cli.common import parse_layers
from fastmemit.eval.datasets import load_counterfact
from fastmemit.eval.metrics import evaluate_counterfact_cases, summarize
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.tune import TrialResult, TrialRunner, causal_trace, config_key, config_of, trace_facts
from fastmemit.utils import cache_dir, read_json, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
METHODS = ("EMMET", "MEMIT")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200, help="tuning cases (the first N records)")
    ap.add_argument("--held-aside", type=int, default=100, help="held-aside cases for the choice (the next N)")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--windows", default="4-8,1-5,7-11", help="edit windows besides the trace's pick (first: the built-in's)")
    ap.add_argument("--no-trace", action="store_true", help="do not add the causal trace's window")
    ap.add_argument("--lambdas", default="1e2,1e3,1e4,1e5", help="EMMET λ grid (μ 0.1)")
    ap.add_argument("--mus", default="0,0.01,1", help="EMMET μ grid at the window's best λ (besides 0.1)")
    ap.add_argument("--memit-lambdas", default="1e1,1e2,1e3,1e4", help="MEMIT λ grid")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sweep_smollm2_200",
                    help="prefix of the result files: <out>-EMMET.json, <out>-MEMIT.json (trial logs), <out>-trace.json")
    ap.add_argument("--targets", type=Path, default=cache_dir() / "sweep_smollm2_200-targets.pt",
                    help="z* kept across restarts (a cache, outside the repository)")
    ap.add_argument("--stats-cache", type=Path, default=cache_dir() / "sweep-stats",
                    help="statistics and factor cache (one factor file per λ and layer: delete it after the sweep)")
    ap.add_argument("--no-builtin-held", action="store_true",
                    help="do not score the built-ins on the held-aside cases (a second process sweeping other windows)")
    ap.add_argument("--merge-from", type=Path, default=None,
                    help="add the trials of another --out prefix's logs (same cases and settings) to --out's, and exit")
    ap.add_argument("--report", action="store_true", help="print the markdown tables from the logs and exit")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.report:
        print(report(args.out))
        return
    if args.merge_from is not None:
        merge_logs(args.out, args.merge_from)
        return
    model, tok = load_model("smollm2-135m")
    cases = load_counterfact(args.data / "counterfact-train.json", dataset_size_limit=args.cases + args.held_aside + 200)
    tune_cases, held = cases[: args.cases], cases[args.cases : args.cases + args.held_aside]
    corpus = str(args.data / "enwiki-sample.jsonl")
    windows = [parse_layers(w) for w in args.windows.split(",")]
    if not args.no_trace:
        windows.insert(1, trace_window(model, tok, cases[args.cases + args.held_aside :], args.out))
    windows = list({json.dumps(w): w for w in windows}.values())
    targets = _SavedTargets(args.targets)
    runners = {}
    for m in METHODS:
        start = builtin_hparams(m, "smollm2-135m")
        context = {"model": model_fingerprint(model), "method": m, "start": _fixed(start.to_dict()), "batch_size": args.batch,
                   "corpus": "enwiki-sample.jsonl", "seed": 0, "tune_cases": [c.case_id for c in tune_cases],
                   "held_cases": [c.case_id for c in held]}
        runners[m] = TrialRunner(model, tok, m, start, {"tune": tune_cases, "held": held}, batch_size=args.batch,
                                 corpus=corpus, stats_cache_dir=args.stats_cache, log=f"{args.out}-{m}.json", context=context)
        runners[m].targets = targets  # z* shared by the methods, saved across restarts
    unedited_path = Path(f"{args.out}-unedited.json")
    if not unedited_path.is_file():
        write_json_atomic(unedited_path, {name: summarize(evaluate_counterfact_cases(model, tok, part, generation=False))
                                          for name, part in (("tune", tune_cases), ("held", held))})

    def run(m: str, config: dict[str, Any], cases_name: str, stage: str) -> TrialResult:
        t = runners[m].run(config, cases_name, stage)
        targets.save()
        print(json.dumps({"method": m, "cases": cases_name, **config, "score": t.scores.get("score"),
                          "seconds": round(t.seconds), "status": t.status}), flush=True)
        return t

    for i, window in enumerate(windows):
        best = sweep_window(run, runners, window, args)
        for m in METHODS:
            run(m, best[m].config, "held", "held-aside")
            if i == 0 and not args.no_builtin_held:
                run(m, config_of(runners[m].base), "held", "held-aside (built-in)")


class _SavedTargets(dict):
    """The z* cache, saved (atomically) every ``every`` new entries and after each trial: a sweep
    killed in the middle of its first trial's z* (an hour and more for 200 cases) keeps them.
    The file is this script's own (written by it, read back by it)."""

    def __init__(self, path: Path, every: int = 10) -> None:
        super().__init__(torch.load(path, weights_only=False) if path.is_file() else {})
        self.path, self.every, self.unsaved = path, every, 0

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.unsaved += 1
        if self.unsaved >= self.every:
            self.save()

    def save(self) -> None:
        if not self.unsaved:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(self), tmp)
            os.replace(tmp, self.path)
            self.unsaved = 0
        tmp.unlink(missing_ok=True)


def _fixed(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("layers", "mom2_update_weight", "emmet_lambda", "dynamic_multiplier",
                                                     "clamp_norm_factor", "v_lr")}


def trace_window(model: Any, tok: Any, pool: list[Any], out: Path) -> list[int]:
    """The causal trace's edit window (5 layers), recorded in ``<out>-trace.json``."""
    path = Path(f"{out}-trace.json")
    if path.is_file():
        return read_json(path, "trace", ValueError)["layers"]
    trace = causal_trace(model, tok, trace_facts(model, tok, pool, 8), window=5, samples=2)
    write_json_atomic(path, trace.to_dict())
    return trace.layers()


def sweep_window(run: Any, runners: dict[str, TrialRunner], window: list[int], args: argparse.Namespace) -> dict[str, TrialResult]:
    """EMMET's λ grid, then its μ grid at the best λ, then MEMIT's λ grid, on one window; the best of each."""
    best: dict[str, TrialResult] = {}
    for m, lambdas in (("EMMET", args.lambdas), ("MEMIT", args.memit_lambdas)):
        base = {**config_of(runners[m].base), "layers": window}
        trials = [run(m, {**base, "mom2_update_weight": float(lam)}, "tune", "λ") for lam in lambdas.split(",")]
        if m == "EMMET":
            top = max((t for t in trials if t.status == "done"), key=lambda t: t.key)
            trials += [run(m, {**top.config, "emmet_lambda": float(mu)}, "tune", "μ") for mu in args.mus.split(",")]
        best[m] = max((t for t in trials if t.status == "done"), key=lambda t: t.key)
    return best


def merge_logs(out: Path, other: Path) -> None:
    """Add the trials of ``<other>-{EMMET,MEMIT}.json`` to ``<out>-…``: two processes that swept different
    windows on the same cases (their contexts must be equal); a trial both hold is kept from ``out``."""
    merged = {}
    for m in METHODS:  # every context checked before anything is written
        src, dst = Path(f"{other}-{m}.json"), Path(f"{out}-{m}.json")
        if not src.is_file():
            continue
        theirs = read_json(src, "sweep log", ValueError)
        ours = read_json(dst, "sweep log", ValueError) if dst.is_file() else {**theirs, "trials": []}
        if ours["context"] != theirs["context"]:
            raise SystemExit(f"{src} and {dst} come from different sweeps (their contexts differ): nothing merged")
        have = {(t["cases"], config_key(t["config"])) for t in ours["trials"]}
        merged[m] = (src, dst, ours, [t for t in theirs["trials"] if (t["cases"], config_key(t["config"])) not in have])
    for m, (src, dst, ours, new) in merged.items():
        write_json_atomic(dst, {**ours, "trials": ours["trials"] + new})
        print(f"{m}: {len(new)} trials from {src} added to {dst}")


# ----------------------------------------------------------------------------- report


def report(out: Path) -> str:
    """Markdown tables: every tuning trial, then the held-aside trials and each method's choice."""
    unedited = read_json(Path(f"{out}-unedited.json"), "unedited scores", ValueError)
    logs = {m: read_json(Path(f"{out}-{m}.json"), "sweep log", ValueError) for m in METHODS if Path(f"{out}-{m}.json").is_file()}
    head = ("| method | layers | λ | μ | ES | PS | NS | Score | EM | PM | NM | s |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def row(m: str, t: dict[str, Any]) -> str:
        c, s = t["config"], t["scores"]
        mu = f"{c['emmet_lambda']:g}" if m == "EMMET" else "-"
        cells = [f"{s[k]:.1f}" if k in s else "-" for k in ("es", "ps", "ns", "score", "em", "pm", "nm")]
        return f"| {m} | {c['layers'][0]}-{c['layers'][-1]} | {c['mom2_update_weight']:g} | {mu} | " + " | ".join(cells) + f" | {t['seconds']:.0f} |"

    parts = []
    for name, title in (("tune", "tuning cases"), ("held", "held-aside cases")):
        u = unedited[name]
        lines = [f"**{title}** ({u['n_cases']}); unedited: ES {u['es']:.1f}, PS {u['ps']:.1f}, NS {u['ns']:.1f}, "
                 f"Score {u['score']:.1f}", "", head]
        for m, log in logs.items():
            done = [t for t in log["trials"] if t["cases"] == name and t["status"] == "done"]
            lines += [row(m, t) for t in sorted(done, key=lambda t: (t["config"]["layers"], t["config"]["mom2_update_weight"],
                                                                   t["config"]["emmet_lambda"]))]
        parts.append("\n".join(lines))
    for m, log in logs.items():
        held = [t for t in log["trials"] if t["cases"] == "held" and t["status"] == "done"]
        if held:
            tuned = {config_key(t["config"]): t for t in log["trials"] if t["cases"] == "tune" and t["status"] == "done"}
            pick = max(held, key=lambda t: (*TrialResult(**t).key,  # held-aside Score, then its mean EM/PM/NM
                                            tuned.get(config_key(t["config"]), {"scores": {"score": -1}})["scores"]["score"]))
            parts.append(f"{m} choice on the held-aside cases: {row(m, pick)}")
            builtin = config_key(config_of(builtin_hparams(m, "smollm2-135m")))
            base = next((t for t in held if config_key(t["config"]) == builtin), None)
            if base is not None:
                d_score = pick["scores"]["score"] - base["scores"]["score"]
                d_mag = TrialResult(**pick).key[1] - TrialResult(**base).key[1]
                parts.append(f"{m} choice − built-in on the held-aside cases: Score {d_score:+.1f}, mean of EM/PM/NM {d_mag:+.2f}")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
