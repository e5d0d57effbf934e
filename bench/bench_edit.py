"""Editing benchmarks, each printed as a side-by-side ratio measured in one run.

1. ``vstar``: batched v* (all requests of a batch together) vs one request at a time, at batch
   sizes 1, 10, 50 on smollm2-135m (CounterFact records, the same hparams and step count: early
   stopping is disabled so both do the same number of steps).
2. ``solve``: per-batch cost of the factored solve (Cholesky of λC0 once, then O(d_k²·B) per
   batch) vs a direct d_k×d_k solve per batch, at d_k = 1536, 6400, 16384, random SPD statistics.
3. ``methods``: whole edits (statistics cached) per method on smollm2-135m: edits/s.

    python bench/bench_edit.py vstar --sizes 1,10,50 --steps 5
    python bench/bench_edit.py solve --dks 1536,6400,16384 --batch 10
    python bench/bench_edit.py methods --n 50
"""

from __future__ import annotations

import argparse
import json
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


def bench_methods(n: int, corpus: str) -> None:
    from fastmemit import Editor, load_model
    from fastmemit.methods import get_method

    model, tok = load_model("smollm2-135m")
    reqs = _requests(n)
    print(f"whole edit of {n} CounterFact facts on smollm2-135m (statistics cached after a warm-up)")
    print(f"{'method':>10} {'seconds':>8} {'edits/s':>8}  phases")
    for method in ("EMMET", "MEMIT", "AlphaEdit", "ROME"):
        over = {"layers": [8], "clamp_norm_factor": 4.0} if method == "ROME" else {}
        hp = get_method(method).hparams_cls.from_dict({**SMOL_HP, **over})
        ed = Editor(model, tok, method, hp, corpus=corpus, show_progress=False)
        ed.prepare_stats()  # warm the statistics cache: this measures the edit itself
        todo = reqs if method != "ROME" else reqs[: max(1, n // 10)]
        t0 = time.perf_counter()
        res = ed.edit(todo)
        dt = time.perf_counter() - t0
        res.restore()
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items())
        print(f"{method:>10} {dt:>8.1f} {len(todo) / dt:>8.2f}  {phases}  ({len(todo)} edits)", flush=True)


def main() -> None:
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
    args = ap.parse_args()
    if args.what == "vstar":
        bench_vstar([int(x) for x in args.sizes.split(",")], args.steps)
    elif args.what == "solve":
        bench_solve([int(x) for x in args.dks.split(",")], args.batch, args.d, args.batches)
    else:
        bench_methods(args.n, args.corpus)


if __name__ == "__main__":
    main()
