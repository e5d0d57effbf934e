"""The FastMEMIT experiment on the offline default model: full statistics vs dynamic_multiplier.

EMMET and MEMIT on smollm2-135m with C0 from (a) every token of ../shared/data/enwiki-sample.jsonl
("full") and (b) ceil(dm × d_k) keys for dm in 1, 2, 5, 10. For each: ES/PS/NS/Score over
``--cases`` CounterFact edits in batches of ``--batch``, batched mode (model restored after each
batch) and, with ``--modes batched,sequential``, sequential mode (edits accumulate); the statistics' time and
number of keys. Writes a JSON table, a Markdown table and a PNG plot.

    python bench/fastmemit_experiment.py --cases 200 --batch 10 --modes batched,sequential \
        --out bench/results/fastmemit_experiment

z* (v*) depends neither on the statistics nor on the solver when every batch starts from the same
weights, so in batched mode it is optimized once per batch and shared by all configurations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastmemit import load_model
from fastmemit.editing import Editor
from fastmemit.eval.datasets import load_counterfact
from fastmemit.eval.metrics import evaluate_counterfact_cases, summarize
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.stats import compute_layer_stats
from fastmemit.utils import atomic_path, write_json_atomic

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def run_config(model, tok, method, hp, cases, batch, corpus, sequential, target_cache):
    editor = Editor(model, tok, method, hp, corpus=corpus, show_progress=False,
                    target_cache=None if sequential else target_cache)
    t0 = time.perf_counter()
    editor.prepare_stats()
    stats_s = time.perf_counter() - t0
    post, results = [], []
    t1 = time.perf_counter()
    for s in range(0, len(cases), batch):
        part = cases[s : s + batch]
        res = editor.edit([c.requested_rewrite for c in part])
        post += evaluate_counterfact_cases(model, tok, part, generation=False)
        results.append(res)
        if not sequential:
            res.restore()
    edit_s = time.perf_counter() - t1
    if sequential:
        final = evaluate_counterfact_cases(model, tok, cases, generation=False)
        for res in reversed(results):
            res.restore()
    else:
        final = None
    return stats_s, edit_s, summarize(post), (summarize(final) if final is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--multipliers", default="1,2,5,10")
    ap.add_argument("--methods", default="EMMET,MEMIT")
    ap.add_argument("--no-full", action="store_true", help="skip the full-corpus statistics (dm settings only)")
    ap.add_argument("--modes", default="batched", help="batched, sequential or batched,sequential")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="bench/results/fastmemit_experiment")
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    data = Path(args.data)
    corpus = str(data / "enwiki-sample.jsonl")
    cases = load_counterfact(data / "counterfact-train.json", dataset_size_limit=args.cases)
    out = Path(args.out)
    rows: list[dict] = []
    pre = summarize(evaluate_counterfact_cases(model, tok, cases, generation=False))
    rows.append({"method": "unedited", "stats": "-", **{k: pre.get(k) for k in ("es", "ps", "ns", "score")}})
    print(json.dumps(rows[-1]), flush=True)

    target_cache: dict = {}
    modes = args.modes.split(",")
    for method in args.methods.split(","):
        base = builtin_hparams(method, model)
        # every token of the sample: the engine stops at the corpus end when n_keys is "all"
        settings: list[tuple[str, dict]] = []
        n_full = 0
        if not args.no_full:
            full_keys = compute_layer_stats(model, tok, base.layers, corpus, n_keys=-1, show_progress=False)
            n_full = next(iter(full_keys.values())).count
            settings.append(("full", {"dynamic": False, "mom2_n_samples": -1}))
        settings += [(f"dm={m}", {"dynamic": True, "dynamic_multiplier": float(m)}) for m in args.multipliers.split(",")]
        for label, over in settings:
            hp = base.replace(**over)
            for mode in modes:
                stats_s, edit_s, post, final = run_config(model, tok, method, hp, cases, args.batch, corpus,
                                                          mode == "sequential", target_cache)
                n_keys = n_full if label == "full" else int(-(-float(over["dynamic_multiplier"]) * 1536 // 1))
                row = {"method": method, "stats": label, "mode": mode, "n_keys": n_keys,
                       "stats_seconds": round(stats_s, 1), "edit_seconds": round(edit_s, 1),
                       **{k: post.get(k) for k in ("es", "ps", "ns", "score")}}
                if final is not None:
                    row["final"] = {k: final.get(k) for k in ("es", "ps", "ns", "score")}
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_json_atomic(out.with_suffix(".json"), rows)
    write_table(rows, out.with_suffix(".md"))
    plot(rows, out.with_suffix(".png"))


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| method | statistics | mode | keys | stats s | edit s | ES | PS | NS | Score |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    def f(r: dict, k: str) -> str:
        return f"{r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "-"

    for r in rows:
        lines.append(f"| {r['method']} | {r['stats']} | {r.get('mode', '-')} | {r.get('n_keys', '-')} | "
                     f"{r.get('stats_seconds', '-')} | {r.get('edit_seconds', '-')} | {f(r, 'es')} | {f(r, 'ps')} | {f(r, 'ns')} | {f(r, 'score')} |")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["method"], r["mode"]) for r in rows if r.get("mode")})
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, metric in zip(axes, ("es", "ps", "ns", "score")):
        for method, mode in groups:
            pts = sorted((r for r in rows if r["method"] == method and r.get("mode") == mode), key=lambda r: r["n_keys"])
            xs = [r["n_keys"] for r in pts]
            ax.plot(xs, [r[metric] for r in pts], marker="o" if method == groups[0][0] else "x",
                    ls="-" if method == groups[0][0] else ":", label=f"{method} {mode}")
        base = next((r for r in rows if r["method"] == "unedited"), None)
        if base is not None and base.get(metric) is not None:
            ax.axhline(base[metric], ls="--", color="gray", label="unedited")
        ax.set_xscale("log")
        ax.set_xlabel("keys in C0 (log)")
        ax.set_title(metric.upper())
    axes[0].legend(fontsize=7)
    fig.suptitle("smollm2-135m: edit quality vs number of keys for C0 (FastMEMIT)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
