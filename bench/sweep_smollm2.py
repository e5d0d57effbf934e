"""Hyperparameter sweep on the offline default model (smollm2-135m) for the built-in hparams.

Published hparams are for 1.5B–7B models; this sweeps the edited layers and λ (mom2_update_weight)
for EMMET and MEMIT (AlphaEdit: its null-space threshold; ROME: its single layer) on the first
``--cases`` CounterFact records of ../shared/data/counterfact-train.json, batched mode (the model
is restored after each batch), FastMEMIT statistics (dynamic_multiplier 10 over the enwiki
sample). z* does not depend on λ or the solver, so it is optimized once per (layer window, batch)
and shared through the Editor's target cache.

    python bench/sweep_smollm2.py --cases 20 --out bench/results/sweep_smollm2.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from fastmemit import load_model
from fastmemit.editing import Editor
from fastmemit.eval.datasets import load_counterfact
from fastmemit.eval.loop import edit_batches
from fastmemit.eval.metrics import evaluate_counterfact_cases, summarize
from fastmemit.methods import get_method
from fastmemit.utils import write_json_atomic

BASE = {
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "clamp_norm_factor": 0.75,
    "kl_factor": 0.0625,
    "v_weight_decay": 0.5,
    "dynamic": True,
    "dynamic_multiplier": 10,
    "emmet_lambda": 0.1,
    "context_template_length_params": [[10, 5]],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    ap.add_argument("--last-layers", default="5,8,11")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--lambdas", default="1e2,1e3,1e4,1e5")
    ap.add_argument("--methods", default="EMMET,MEMIT,AlphaEdit")
    ap.add_argument("--out", default="bench/results/sweep_smollm2.json")
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    data = Path(args.data)
    cases = load_counterfact(data / "counterfact-train.json", dataset_size_limit=args.cases)
    corpus = str(data / "enwiki-sample.jsonl")
    pre = evaluate_counterfact_cases(model, tok, cases, generation=False)
    results: list[dict] = [{"config": "unedited", **summarize(pre)}]
    print("unedited", json.dumps(results[0]))
    batches = [cases[s : s + args.batch] for s in range(0, len(cases), args.batch)]
    target_cache: dict = {}
    for last in [int(x) for x in args.last_layers.split(",")]:
        layers = list(range(max(0, last - args.window + 1), last + 1))
        grid: list[tuple[str, dict]] = []
        for lam in [float(x) for x in args.lambdas.split(",")]:
            for m in args.methods.split(","):
                if m in ("EMMET", "MEMIT"):
                    grid.append((m, {"layers": layers, "mom2_update_weight": lam}))
        if "AlphaEdit" in args.methods:
            for thr in (1e-2, 2e-2, 5e-2):
                grid.append(("AlphaEdit", {"layers": layers, "nullspace_threshold": thr, "L2": 10.0}))
        if "ROME" in args.methods:
            grid.append(("ROME", {"layers": [last], "clamp_norm_factor": 4.0}))
        for method, over in grid:
            hp = get_method(method).hparams_cls.from_dict({**BASE, **over})
            editor = Editor(model, tok, method, hp, corpus=corpus, show_progress=False, target_cache=target_cache)
            t0 = time.perf_counter()
            post = []
            records = edit_batches(editor, batches,
                                   lambda part: evaluate_counterfact_cases(model, tok, part, generation=False),
                                   request=lambda c: c.requested_rewrite, sequential=False)
            with contextlib.closing(records):  # each batch restored after it is scored
                for rec in records:
                    post += rec.post
            row = {"method": method, **over, "seconds": round(time.perf_counter() - t0, 1), **summarize(post)}
            results.append(row)
            print(json.dumps(row), flush=True)
            write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
