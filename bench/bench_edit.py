"""Editing benchmarks, each printed as a side-by-side ratio measured in one run.

1. ``vstar``: batched v* (all requests of a batch together) vs one request at a time, at batch
   sizes 1, 10, 50 on smollm2-135m (CounterFact records, the same hparams and step count: early
   stopping is disabled so both do the same number of steps).
2. ``solve``: per-batch cost of the factored solve (Cholesky of λC0 once, then O(d_k²·B) per
   batch) vs a direct d_k×d_k solve per batch, at d_k = 1536, 6400, 16384, random SPD statistics.
3. ``methods``: whole edits (statistics cached) per method on smollm2-135m: edits/s.
4. ``vmem``: v*'s peak memory and time at batch sizes 10, 100, 500, all rows in one forward
   (``v_max_rows`` 0) vs micro-batches with accumulated gradients (``v_max_rows`` R; prefix caches held
   up to each ``v_prefix_cache_mb`` of ``--prefix-mb``), each setting
   in a fresh process (peak RSS, VmHWM, beyond the RSS after loading the model); the deltas of the
   two settings are compared (micro-batching is exact).
5. ``vstop``: v* early stopping by the NLL rule vs ENCORE's most-probable early stopping (MPES) on the
   same CounterFact requests: v* seconds, steps, and ES/PS/NS/Score of the edited model (batched
   edits from the unedited weights, EMMET with the built-in smollm2 hparams).
6. ``vdtype``: the same comparison for v*'s compute dtype (``v_compute_dtype``: the model's float32
   vs bfloat16 autocast).

    python bench/bench_edit.py vstar --sizes 1,10,50 --steps 5
    python bench/bench_edit.py solve --dks 1536,6400,16384 --batch 10
    python bench/bench_edit.py methods --n 50
    python bench/bench_edit.py vmem --sizes 10,100,500 --max-rows 70 --prefix-mb 0,512 --steps 2
    python bench/bench_edit.py vstop --n 200 --batch 10
    python bench/bench_edit.py vdtype --n 200 --batch 10
    python bench/bench_edit.py methods --n 50 --methods EMMET --v-dtypes model,bfloat16
    python bench/bench_edit.py methods --n 50 --methods EMMET --v-max-rows 0,70
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SMOL_HP = {
    "layers": [4, 5, 6, 7, 8],
    "v_num_grad_steps": 20,
    "dynamic": True,
    "dynamic_multiplier": 10,
    "mom2_update_weight": 10000,
    "context_template_length_params": [[10, 5]],
}


def _requests(n: int) -> list[dict]:
    cf = json.loads((DATA / "counterfact-train.json").read_text())[:n]
    return [{"prompt": c["prompt"], "subject": c["subject"], "target_new": c["target_new"],
             "target_true": c["ground_truth"]} for c in cf]


def bench_vstar(sizes: list[int], steps: int) -> None:
    from fastmemit import EditRequest, load_model
    from fastmemit.keys_values import context_templates, optimize_targets
    from fastmemit.methods import EditHparams

    model, tok = load_model("smollm2-135m")
    hp = EditHparams.from_dict({**SMOL_HP, "v_num_grad_steps": steps, "v_early_stop_nll": 0.0})
    templates = context_templates(model, tok, hp.context_template_length_params)
    last = hp.layers[-1]
    print(f"v* on smollm2-135m, {len(templates)} templates, {steps} steps each (no early stop), torch threads {torch.get_num_threads()}")
    print(f"{'batch':>6} {'batched s':>10} {'one-at-a-time s':>16} {'speed-up':>9}")
    for n in sizes:
        reqs = [EditRequest.from_any(r) for r in _requests(n)]
        t0 = time.perf_counter()
        optimize_targets(model, tok, reqs, templates, last, hp, show_progress=False)
        batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in reqs:
            optimize_targets(model, tok, [r], templates, last, hp, show_progress=False)
        single = time.perf_counter() - t0
        print(f"{n:>6} {batched:>10.2f} {single:>16.2f} {single / batched:>8.2f}x", flush=True)


def bench_solve(dks: list[int], batch: int, d: int, batches: int) -> None:
    from fastmemit.linalg import FactoredCov, direct_emmet_delta, direct_memit_delta, ridge_system_delta

    print(f"solve per batch of B={batch}, d={d}, float64, torch threads {torch.get_num_threads()}")
    print(f"{'d_k':>6} {'factor once s':>14} {'factored/batch s':>17} {'direct/batch s':>15} {'speed-up':>9} {'max rel diff':>13}")
    g = torch.Generator().manual_seed(0)
    for dk in dks:
        K0 = torch.randn(dk, 2 * dk, generator=g, dtype=torch.float64)
        C = 1e4 * (K0 @ K0.T) / (2 * dk)  # λ·E[k kᵀ], (d_k, d_k)
        del K0
        t0 = time.perf_counter()
        F = FactoredCov(C)
        t_factor = time.perf_counter() - t0
        Ks = [torch.randn(dk, batch, generator=g, dtype=torch.float64) for _ in range(batches)]
        Rs = [torch.randn(d, batch, generator=g, dtype=torch.float64) for _ in range(batches)]
        t0 = time.perf_counter()
        fac = [ridge_system_delta(R, K, F, 1.0) for K, R in zip(Ks, Rs)]
        t_fac = (time.perf_counter() - t0) / batches
        t0 = time.perf_counter()
        direct = direct_memit_delta(Rs[0], Ks[0], C)
        t_dir = time.perf_counter() - t0
        diff = float((fac[0] - direct).norm() / direct.norm())
        e_fac = ridge_system_delta(Rs[0], Ks[0], F, 0.1)
        e_dir = direct_emmet_delta(Rs[0], Ks[0], C, 0.1)
        diff = max(diff, float((e_fac - e_dir).norm() / e_dir.norm()))
        print(f"{dk:>6} {t_factor:>14.3f} {t_fac:>17.4f} {t_dir:>15.3f} {t_dir / t_fac:>8.0f}x {diff:>13.2e}", flush=True)
        del C, F


def bench_methods(n: int, corpus: str, methods: list[str], dtypes: list[str | None], max_rows: list[int]) -> None:
    from fastmemit import Editor, load_model
    from fastmemit.methods import get_method

    model, tok = load_model("smollm2-135m")
    reqs = _requests(n)
    print(f"whole edit of {n} CounterFact facts in one batch on smollm2-135m (statistics cached after a warm-up)")
    print(f"{'method':>10} {'v dtype':>9} {'max rows':>8} {'seconds':>8} {'edits/s':>8}  phases")
    for method in methods:
        for dtype, rows in [(d, r) for d in dtypes for r in max_rows]:
            over = {"layers": [8], "clamp_norm_factor": 4.0} if method == "ROME" else {}
            hp = get_method(method).hparams_cls.from_dict({**SMOL_HP, **over, "v_compute_dtype": dtype,
                                                           "v_max_rows": rows})
            ed = Editor(model, tok, method, hp, corpus=corpus, show_progress=False)
            ed.prepare_stats()  # warm the statistics cache: this measures the edit itself
            todo = reqs if method != "ROME" else reqs[: max(1, n // 10)]
            t0 = time.perf_counter()
            res = ed.edit(todo)
            dt = time.perf_counter() - t0
            res.restore()
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items())
            print(f"{method:>10} {dtype or 'model':>9} {rows:>8} {dt:>8.1f} {len(todo) / dt:>8.2f}  {phases}  ({len(todo)} edits)",
                  flush=True)


def vmem_one(n: int, max_rows: int, steps: int, prefix_mb: float) -> None:
    """One v* run in this process; prints a JSON line (the parent runs each setting in a fresh process)."""
    from fastmemit import EditRequest, load_model
    from fastmemit.keys_values import context_templates, optimize_targets
    from fastmemit.methods import EditHparams
    from real_size import _rss_peak_mib, peak  # bench/ is on sys.path when this file runs as a script

    model, tok = load_model("smollm2-135m")
    hp = EditHparams.from_dict({**SMOL_HP, "v_num_grad_steps": steps, "v_early_stop_nll": 0.0, "v_max_rows": max_rows,
                                "v_prefix_cache_mb": prefix_mb})
    templates = context_templates(model, tok, hp.context_template_length_params)
    reqs = [EditRequest.from_any(r) for r in _requests(n)]
    base = _rss_peak_mib()[1]
    with peak(torch.device("cpu")) as mem:  # peak RSS beyond the RSS when the block starts
        t0 = time.perf_counter()
        res = optimize_targets(model, tok, reqs, templates, hp.layers[-1], hp, show_progress=False)
        dt = time.perf_counter() - t0
    print(json.dumps({"n": n, "max_rows": max_rows, "prefix_mb": prefix_mb, "rows": n * (len(templates) + 1), "seconds": dt,
                      "peak_mib": mem["gib"] * 1024, "rss_after_load_mib": base,
                      "delta_sum": float(res.delta.abs().sum()), "delta_max": float(res.delta.abs().max())}))


def bench_vmem(sizes: list[int], max_rows: int, prefix_mbs: list[float], steps: int, full_max: int,
               out: str | None) -> None:
    print(f"v* on smollm2-135m, {steps} steps (no early stop), each setting in a fresh process; "
          f"peak = VmHWM − RSS after loading the model")
    print(f"{'batch':>6} {'v_max_rows':>10} {'prefix MiB':>10} {'rows':>6} {'seconds':>8} {'s/fact/step':>11} "
          f"{'peak MiB':>9}  same δ")
    rows: list[dict] = []
    for n in sizes:
        ref = None
        for r, mb in ([(0, 0.0)] if n <= full_max else []) + [(max_rows, mb) for mb in prefix_mbs]:
            cmd = [sys.executable, __file__, "_vmem_one", str(n), str(r), str(steps), str(mb)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row = json.loads(line)
            rows.append(row)
            same = "" if ref is None else (
                "yes" if abs(row["delta_sum"] - ref["delta_sum"]) <= 1e-5 * ref["delta_sum"] else
                f"no ({row['delta_sum']:.6g} vs {ref['delta_sum']:.6g})")
            ref = ref or row
            print(f"{n:>6} {r:>10} {mb if r else '':>10} {row['rows']:>6} {row['seconds']:>8.1f} {row['seconds'] / n / steps:>11.3f} "
                  f"{row['peak_mib']:>9.0f}  {same}", flush=True)
        if n > full_max:
            print(f"{n:>6} {0:>10}  (all rows at once not run above --full-max {full_max})")
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


def compare_v(settings: dict[str, dict], n: int, batch: int, corpus: str, out: str | None) -> None:
    """Batched EMMET edits (built-in smollm2 hparams) of the same cases under each v* setting (hparams
    overrides), each batch from the unedited weights: v* seconds, mean Adam steps, ES/PS/NS/Score."""
    from fastmemit import Editor, load_model
    from fastmemit.eval.datasets import load_counterfact
    from fastmemit.eval.metrics import evaluate_counterfact_cases, summarize
    from fastmemit.hparams_registry import builtin_hparams

    model, tok = load_model("smollm2-135m")
    cases = load_counterfact(str(DATA / "counterfact-train.json"))[:n]
    builtin = builtin_hparams("EMMET", model)
    rows = []
    for label, over in settings.items():
        hp = builtin.replace(**over)
        ed = Editor(model, tok, "EMMET", hp, corpus=corpus, show_progress=False)
        ed.prepare_stats()
        recs, v_s, steps, t0 = [], 0.0, [], time.perf_counter()
        for i in range(0, n, batch):
            part = cases[i:i + batch]
            res = ed.edit([c.requested_rewrite for c in part])
            v_s += res.timings.get("v", 0.0)
            steps += list(res.info.get("v_steps", []))
            recs += evaluate_counterfact_cases(model, tok, part, generation=False)
            res.restore()
        total = time.perf_counter() - t0
        s = summarize(recs)
        row = {"setting": label, **over, "n": n, "batch": batch, "v_seconds": v_s, "total_seconds": total,
               "mean_steps": sum(steps) / len(steps) if steps else None,
               **{k: s.get(k) for k in ("es", "ps", "ns", "score")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_vmem_one":
        vmem_one(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vstar")
    v.add_argument("--sizes", default="1,10,50")
    v.add_argument("--steps", type=int, default=5)
    s = sub.add_parser("solve")
    s.add_argument("--dks", default="1536,6400,16384")
    s.add_argument("--batch", type=int, default=10)
    s.add_argument("--d", type=int, default=1024)
    s.add_argument("--batches", type=int, default=5)
    m = sub.add_parser("methods")
    m.add_argument("--n", type=int, default=50)
    m.add_argument("--corpus", default=str(DATA / "enwiki-sample.jsonl"))
    m.add_argument("--methods", default="EMMET,MEMIT,AlphaEdit,ROME")
    m.add_argument("--v-dtypes", default="model", help="comma list of v_compute_dtype values ('model': none)")
    m.add_argument("--v-max-rows", default="70", help="comma list of v_max_rows values (0: one micro-batch)")
    vm = sub.add_parser("vmem")
    vm.add_argument("--sizes", default="10,100,500")
    vm.add_argument("--max-rows", type=int, default=70, help="v_max_rows of the micro-batched settings")
    vm.add_argument("--prefix-mb", default="0,512", help="v_prefix_cache_mb values of the micro-batched settings")
    vm.add_argument("--steps", type=int, default=2)
    vm.add_argument("--full-max", type=int, default=100, help="largest batch also run with all rows at once")
    vm.add_argument("--out", default=None, help="JSON file of the rows")
    vs = sub.add_parser("vstop")
    vs.add_argument("--n", type=int, default=200)
    vs.add_argument("--batch", type=int, default=10)
    vs.add_argument("--corpus", default=str(DATA / "enwiki-sample.jsonl"))
    vs.add_argument("--out", default=None, help="JSON file of the rows")
    vd = sub.add_parser("vdtype")
    vd.add_argument("--n", type=int, default=200)
    vd.add_argument("--batch", type=int, default=10)
    vd.add_argument("--dtypes", default="model,bfloat16", help="v_compute_dtype values ('model': none)")
    vd.add_argument("--corpus", default=str(DATA / "enwiki-sample.jsonl"))
    vd.add_argument("--out", default=None, help="JSON file of the rows")
    args = ap.parse_args()
    if args.what == "vstar":
        bench_vstar([int(x) for x in args.sizes.split(",")], args.steps)
    elif args.what == "solve":
        bench_solve([int(x) for x in args.dks.split(",")], args.batch, args.d, args.batches)
    elif args.what == "vmem":
        bench_vmem([int(x) for x in args.sizes.split(",")], args.max_rows, [float(x) for x in args.prefix_mb.split(",")],
                   args.steps, args.full_max, args.out)
    elif args.what == "vstop":
        compare_v({rule: {"v_early_stop": rule} for rule in ("nll", "mpes")}, args.n, args.batch, args.corpus, args.out)
    elif args.what == "vdtype":
        compare_v({d: {"v_compute_dtype": None if d == "model" else d} for d in args.dtypes.split(",")},
                  args.n, args.batch, args.corpus, args.out)
    else:
        bench_methods(args.n, args.corpus, args.methods.split(","),
                      [None if d == "model" else d for d in args.v_dtypes.split(",")],
                      [int(r) for r in args.v_max_rows.split(",")])


if __name__ == "__main__":
    main()
