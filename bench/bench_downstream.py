"""Time one downstream check: every task, N tests, k shots; batched vs one item at a time.

For each task and each scoring path (generate, loglik) the same prompts are scored twice — in
batches of ``--batch-size`` (left padding, one forward per batch) and with ``batch_size=1`` (an
unbatched loop, otherwise the same code, shots' KV cache included) — and the predictions are
checked to agree. The "both" column is what ``evaluate_tasks(mode="both")`` costs: one shared
prefill feeds generation and the single-token options' log-likelihoods. ``--compare-prefix``
adds "both" without the shots' KV cache; ``--naive`` adds the research code's loop (per item: one
``generate`` call, then one full forward per option over the whole vocabulary at every position).

    python3 bench/bench_downstream.py                       # 8 tasks × 50 tests × 3 shots, smollm2-135m
    python3 bench/bench_downstream.py --tasks sst2,mmlu --n-tests 20 --json

Numbers depend on the machine and on what else runs on it; the script prints torch's thread
count and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

os.environ.setdefault("FASTMEMIT_PROGRESS", "0")


def naive_loop(model: Any, tok: Any, prompts: list[str], options: tuple[str, ...], gen_len: int) -> float:
    """The research code's per-item loop (greedy generate + one full forward per option); seconds."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]], device=device)
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                           do_sample=False, pad_token_id=tok.pad_token_id)
            for o in options:
                full = torch.tensor([tok(p + o)["input_ids"]], device=device)
                torch.log_softmax(model(input_ids=full).logits, dim=-1)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,mrpc,cola,rte,mmlu,sentiment_analysis,nli,dialogue")
    ap.add_argument("--n-tests", type=int, default=50)
    ap.add_argument("--shots", type=int, default=3, help="shots for every task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--naive", action="store_true", help="also time the research code's per-item loop")
    ap.add_argument("--compare-prefix", action="store_true",
                    help="also time mode both without the shared few-shot KV cache")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--json-out", default=None, help="also write the rows as JSON to this file")
    args = ap.parse_args()

    from fastmemit import load_model
    from fastmemit.downstream import get_task, load_task_data, parse_task_flags
    from fastmemit.downstream.scoring import context_length, fit_prompts, score_prompts

    flags = parse_task_flags(args.tasks, ",".join([str(args.shots)] * len(args.tasks.split(","))), args.n_tests)
    model, tok = load_model(args.model)
    window = context_length(model, tok)
    load = os.getloadavg()
    print(f"# {args.model}, {len(flags.tasks)} tasks × {args.n_tests} tests × {args.shots} shots, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", file=sys.stderr)
    rows = []
    for name in flags.tasks:
        task = get_task(name)
        data = load_task_data(task, args.data_dir)
        tests = data.tests[: args.n_tests]
        shot_texts = [task.shot(r) for r in data.shots(args.shots)]
        fitted = fit_prompts(tok, shot_texts, [task.test(r) for r in tests], window - 8)
        prompts = [f.text for f in fitted]
        prefix = "".join(shot_texts) or None
        n_tokens = sum(f.n_tokens for f in fitted)

        def timed(prompts: list[str] = prompts, task: Any = task, prefix: str | None = prefix,
                  **kw: Any) -> tuple[float, Any]:
            kw.setdefault("shared_prefix", prefix)
            t0 = time.perf_counter()
            out = score_prompts(model, tok, prompts, task.options, task.parse, gen_len=task.gen_len, **kw)
            return time.perf_counter() - t0, out

        row: dict[str, Any] = {"task": name, "tests": len(prompts), "prompt_tokens": n_tokens}
        for path in ("generate", "loglik"):
            only = {"generate": path == "generate", "loglik": path == "loglik"}
            tb, ob = timed(batch_size=args.batch_size, **only)
            t1, o1 = timed(batch_size=1, **only)
            preds_b = ob.generate_predictions if path == "generate" else ob.loglik_predictions
            preds_1 = o1.generate_predictions if path == "generate" else o1.loglik_predictions
            row[f"{path}_batched_s"], row[f"{path}_unbatched_s"] = tb, t1
            row[f"{path}_ratio"] = t1 / tb
            row[f"{path}_same_predictions"] = preds_b == preds_1
        row["both_batched_s"], _ = timed(batch_size=args.batch_size)
        if args.compare_prefix:
            row["both_nocache_s"], _ = timed(batch_size=args.batch_size, shared_prefix=None)
        if args.naive:
            row["naive_s"] = naive_loop(model, tok, prompts, task.options, task.gen_len)
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr)

    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "torch_threads": torch.get_num_threads(), "load_average": load,
                       "rows": rows}, f, indent=1)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = (f"{'task':<19} {'tok/item':>8} {'gen b':>7} {'gen 1':>7} {'×':>5} {'ll b':>7} {'ll 1':>7} {'×':>5} "
            f"{'both b':>7}" + (f" {'no-cache':>8} {'×':>5}" if args.compare_prefix else "")
            + (f" {'naive':>7} {'×':>5}" if args.naive else "") + "  same")
    print(head)
    def line(label: str, per_item: str, t: dict[str, float]) -> str:
        """One table row from the times ``t`` (a task's, or the totals); ratios are unbatched / batched."""
        out = (f"{label:<19} {per_item:>8} {t['generate_batched_s']:>7.1f} {t['generate_unbatched_s']:>7.1f} "
               f"{t['generate_unbatched_s'] / t['generate_batched_s']:>5.2f} {t['loglik_batched_s']:>7.1f} "
               f"{t['loglik_unbatched_s']:>7.1f} {t['loglik_unbatched_s'] / t['loglik_batched_s']:>5.2f} "
               f"{t['both_batched_s']:>7.1f}")
        if args.compare_prefix:
            out += f" {t['both_nocache_s']:>8.1f} {t['both_nocache_s'] / t['both_batched_s']:>5.2f}"
        if args.naive:
            out += f" {t['naive_s']:>7.1f} {t['naive_s'] / t['both_batched_s']:>5.2f}"
        return out

    tot: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k.endswith("_s"):
                tot[k] = tot.get(k, 0.0) + v
        same = "yes" if r["generate_same_predictions"] and r["loglik_same_predictions"] else "NO"
        print(line(r["task"], f"{r['prompt_tokens'] / r['tests']:.0f}", r) + f"  {same}")
    print(line("total", "", tot))
    print("seconds; b = batched, 1 = one item at a time, × = unbatched/batched (or no-cache|naive / both b); "
          "'both b' = one downstream check as evaluate_tasks runs it (mode both, shared prefill, shots' KV cache)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
