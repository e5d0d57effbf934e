"""The FastMEMIT experiment on the offline default model: full statistics vs dynamic_multiplier.

EMMET and MEMIT on smollm2-135m with C0 from (a) every token of ../shared/data/enwiki-sample.jsonl
("full") and (b) ceil(dm × d_k) keys for dm in 1, 2, 5, 10. For each: ES/PS/NS/Score over
``--cases`` CounterFact edits in batches of ``--batch``, batched mode (model restored after each
batch) and, with ``--modes batched,sequential``, sequential mode (edits accumulate, then all cases
are scored again on the final model); the statistics' time and number of keys. Writes a JSON table,
a Markdown table and a PNG plot.

    python bench/fastmemit_experiment.py --cases 200 --batch 10 --modes batched,sequential --jobs 2 \
        --out bench/results/fastmemit_experiment

Statistics are computed once per setting in the main process before any edit, each timed as a
computation (a cache hit is recomputed without the cache), with torch's default threads on an
otherwise idle process; the edit runs then load them from the cache. ``--jobs N`` runs the
configurations in N worker processes of one thread each; ``--resume`` keeps the rows already written.

z* (v*) depends neither on the statistics nor on the solver when every batch starts from the same
weights, so in batched mode it is optimized once per batch and shared by all configurations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from fastmemit import load_model
from fastmemit.editing import Editor
from fastmemit.errors import FastMemitError
from fastmemit.eval.datasets import load_counterfact
from fastmemit.eval.loop import edit_batches
from fastmemit.eval.metrics import evaluate_counterfact_cases, summarize
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.stats import compute_layer_stats
from fastmemit.utils import atomic_path, write_json_atomic

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class ConfigFailed(Exception):
    """A configuration stopped with the library's error at batch ``batch`` (the model is restored)."""

    def __init__(self, batch: int, error: Exception):
        super().__init__(f"batch {batch}: {error}")
        self.batch, self.error = batch, error


def run_config(model, tok, method, hp, cases, batch, corpus, sequential, target_cache):
    editor = Editor(model, tok, method, hp, corpus=corpus, show_progress=False,
                    target_cache=None if sequential else target_cache)
    editor.prepare_stats()  # a cache hit: main() computed (and timed) every setting's statistics
    batches = [cases[s : s + batch] for s in range(0, len(cases), batch)]
    post, results = [], []
    t1 = time.perf_counter()
    records = edit_batches(editor, batches, lambda part: evaluate_counterfact_cases(model, tok, part, generation=False),
                           request=lambda c: c.requested_rewrite, sequential=sequential)
    try:
        with contextlib.closing(records):
            for rec in records:
                post += rec.post
                results.append(rec.result)
    except FastMemitError as e:  # e.g. a sequential run whose weights blew up: restore, report
        if sequential:
            for done in reversed(results):
                done.restore()
        raise ConfigFailed(len(results) + 1, e) from e
    edit_s = time.perf_counter() - t1
    if sequential:
        final = evaluate_counterfact_cases(model, tok, cases, generation=False)
        for res in reversed(results):
            res.restore()
    else:
        final = None
    return edit_s, summarize(post), (summarize(final) if final is not None else None)


def settings_for(args) -> list[tuple[str, dict]]:
    """(label, hparams overrides) of every statistics setting, full first."""
    out: list[tuple[str, dict]] = [] if args.no_full else [("full", {"dynamic": False, "mom2_n_samples": -1})]
    out += [(f"dm={m}", {"dynamic": True, "dynamic_multiplier": float(m)}) for m in args.multipliers.split(",")]
    return out


def time_stats(model, tok, hp, corpus) -> tuple[int, float]:
    """(keys per layer, seconds) of computing the statistics of ``hp``'s layers in one pass, cache aside.

    A cache hit is timed again without the cache, so the time is always a computation's; a miss fills
    the cache for the workers.
    """
    count = {"dynamic_multiplier": hp.dynamic_multiplier} if hp.dynamic else {"n_keys": hp.mom2_n_samples}
    kwargs = dict(batch_size=hp.stats_batch_size, seq_len=hp.stats_seq_len, seed=0, show_progress=False, **count)
    st = compute_layer_stats(model, tok, hp.layers, corpus, **kwargs)
    first = next(iter(st.values()))
    if first.cache_hit:
        first = next(iter(compute_layer_stats(model, tok, hp.layers, corpus, cache=False, **kwargs).values()))
    return first.count, first.seconds


def worker(task: dict) -> list[dict]:
    """Run one group of configurations in a fresh process (spawned by ``--jobs``) or in this one."""
    import torch

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    model, tok = load_model("smollm2-135m")
    cases = load_counterfact(Path(task["data"]) / "counterfact-train.json", dataset_size_limit=task["cases"])
    target_cache: dict = {}
    rows = []
    for method, label, over in task["configs"]:
        hp = builtin_hparams(method, model).replace(**over)
        seq = task["mode"] == "sequential"
        try:
            edit_s, post, final = run_config(model, tok, method, hp, cases, task["batch"], task["corpus"], seq,
                                             target_cache)
        except ConfigFailed as e:
            row = {"method": method, "stats": label, "mode": task["mode"], "failed_batch": e.batch,
                   "error": f"{type(e.error).__name__}: {e.error}"}
        else:
            row = {"method": method, "stats": label, "mode": task["mode"], "edit_seconds": round(edit_s, 1),
                   **{k: post.get(k) for k in ("es", "ps", "ns", "score")}}
            if final is not None:
                row["final"] = {k: final.get(k) for k in ("es", "ps", "ns", "score")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--multipliers", default="1,2,5,10")
    ap.add_argument("--methods", default="EMMET,MEMIT")
    ap.add_argument("--no-full", action="store_true", help="skip the full-corpus statistics (dm settings only)")
    ap.add_argument("--modes", default="batched", help="batched, sequential or batched,sequential")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes (one torch thread each when > 1); batched runs of all methods share "
                         "one worker (and their z*), each sequential (method, statistics) run is a task of its own")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in OUT.json and run only the rest")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="bench/results/fastmemit_experiment")
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    data = Path(args.data)
    corpus = str(data / "enwiki-sample.jsonl")
    cases = load_counterfact(data / "counterfact-train.json", dataset_size_limit=args.cases)
    out = Path(args.out)
    methods = args.methods.split(",")
    settings = settings_for(args)
    old = json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").exists() else []
    done = {(r["method"], r["stats"], r.get("mode")) for r in old if r["method"] != "unedited"}

    rows: list[dict] = [r for r in old if r["method"] == "unedited"]
    if not rows:
        pre = summarize(evaluate_counterfact_cases(model, tok, cases, generation=False))
        rows.append({"method": "unedited", "stats": "-", **{k: pre.get(k) for k in ("es", "ps", "ns", "score")}})
        print(json.dumps(rows[-1]), flush=True)
    # statistics: computed once per setting here (the layers are the same for every method), timed
    base = builtin_hparams(methods[0], model)
    if any(builtin_hparams(m, model).layers != base.layers for m in methods):
        raise SystemExit("the methods' built-in hparams edit different layers; run them one at a time")
    stats: dict[str, tuple[int, float]] = {}
    modes = args.modes.split(",")
    for label, over in settings:
        known = next((r for r in old if r["stats"] == label and "stats_seconds" in r), None)
        if known is not None and all((m, label, mode) in done for m in methods for mode in modes):
            stats[label] = (known["n_keys"], known["stats_seconds"])  # nothing left to run: keep its timing
            continue
        stats[label] = time_stats(model, tok, base.replace(**over), corpus)
        print(json.dumps({"stats": label, "n_keys": stats[label][0], "seconds": round(stats[label][1], 1)}), flush=True)
    del model

    tasks = []
    threads = 1 if args.jobs > 1 else None
    common = {"data": str(data), "cases": args.cases, "batch": args.batch, "corpus": corpus, "threads": threads}
    for mode in modes:
        todo = [(m, label, over) for m in methods for label, over in settings if (m, label, mode) not in done]
        if not todo:
            continue
        if mode == "batched":  # one worker: every configuration reuses the z* of the first
            tasks.append({**common, "mode": mode, "configs": todo})
        else:
            tasks += [{**common, "mode": mode, "configs": [c]} for c in todo]
    tasks.sort(key=lambda t: -len(t["configs"]) if t["mode"] == "batched" else 0)  # the long one first

    results = [r for r in old if r["method"] != "unedited"]

    def finish(new: list[dict]) -> None:
        results.extend(new)
        write_json_atomic(out.with_suffix(".json"), rows + order(results, methods, settings, stats))

    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        crashed = []
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(worker, t): t for t in tasks}
            for fut in as_completed(futures):
                try:
                    finish(fut.result())
                except Exception as e:  # keep the other tasks' rows; --resume reruns this one
                    crashed.append(futures[fut]["configs"])
                    print(f"task {futures[fut]['mode']} {futures[fut]['configs']} crashed: {e!r}", flush=True)
        if crashed:
            raise SystemExit(f"{len(crashed)} task(s) crashed (rows of the others are in {out.with_suffix('.json')})")
    else:
        for t in tasks:
            finish(worker(t))
    final_rows = rows + order(results, methods, settings, stats)
    write_json_atomic(out.with_suffix(".json"), final_rows)
    write_table(final_rows, out.with_suffix(".md"))
    plot(final_rows, out.with_suffix(".png"))


def order(results: list[dict], methods: list[str], settings: list[tuple[str, dict]], stats: dict) -> list[dict]:
    """Rows sorted by method, statistics setting, mode, with each setting's keys and statistics time."""
    labels = [label for label, _ in settings]
    rank = {"batched": 0, "sequential": 1}
    out = []
    for r in results:
        if r["stats"] in stats:
            r = {**r, "n_keys": stats[r["stats"]][0], "stats_seconds": round(stats[r["stats"]][1], 1)}
        out.append(r)
    return sorted(out, key=lambda r: (methods.index(r["method"]) if r["method"] in methods else 99,
                                      labels.index(r["stats"]) if r["stats"] in labels else 99,
                                      rank.get(r["mode"], 9)))


def write_table(rows: list[dict], path: Path) -> None:
    """Markdown table; sequential rows add the scores of all cases on the final model."""
    lines = ["| method | statistics | mode | keys | stats s | edit s | ES | PS | NS | Score | final ES/PS/NS/Score |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    def f(r: dict | None, k: str) -> str:
        return f"{r[k]:.1f}" if r is not None and isinstance(r.get(k), (int, float)) else "-"

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['stats']} | {r['mode']} | {r.get('n_keys', '-')} | "
                         f"{r.get('stats_seconds', '-')} | failed at batch {r['failed_batch']} | - | - | - | - | {r['error']} |")
            continue
        fin = r.get("final")
        final = "/".join(f(fin, k) for k in ("es", "ps", "ns", "score")) if fin else "-"
        lines.append(f"| {r['method']} | {r['stats']} | {r.get('mode', '-')} | {r.get('n_keys', '-')} | "
                     f"{r.get('stats_seconds', '-')} | {r.get('edit_seconds', '-')} | {f(r, 'es')} | {f(r, 'ps')} | "
                     f"{f(r, 'ns')} | {f(r, 'score')} | {final} |")
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
            pts = sorted((r for r in rows if r["method"] == method and r.get("mode") == mode and not r.get("error")),
                         key=lambda r: r["n_keys"])
            xs = [r["n_keys"] for r in pts]
            first = method == groups[0][0]
            ax.plot(xs, [r[metric] for r in pts], marker="o" if first else "x", ls="-" if first else ":",
                    label=f"{method} {mode}")
            if mode == "sequential" and all(r.get("final") for r in pts):  # all cases on the final model
                ax.plot(xs, [r["final"][metric] for r in pts], marker="s" if first else "+", ls="--" if first else "-.",
                        label=f"{method} sequential, final model")
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
