"""Per-case scores of two folders of reference runs (bench/reference_runs.sh): every metric value of
every case (pre, post, final) and the summaries equal. Per-prompt NLLs are compared under both the
current key names (target_new_prob/target_true_prob) and the older ones (target_new/target_true)."""
import json
import sys
from pathlib import Path

A, B = Path(sys.argv[1]), Path(sys.argv[2])
KEYS = ("es", "em", "ps", "pm", "ns", "nm", "rewrite_acc", "paraphrase_acc", "neighborhood_acc", "ngram_entropy", "reference_score")
def jl(p):
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else None
def probs(rec):
    out = {}
    for k, v in rec.items():
        if k.endswith("_prompts_probs"):
            out[k] = [(e.get("target_new_prob", e.get("target_new")), e.get("target_true_prob", e.get("target_true"))) for e in v]
    return out
def scores(rec):
    parts = {p: rec[p] for p in ("pre", "post") if p in rec} or {"": rec}
    return {p: ({k: r.get(k) for k in KEYS}, probs(r)) for p, r in parts.items()}
ok = True
for run in sorted(p.name for p in A.iterdir()):
    for f in ("pre.jsonl", "cases.jsonl", "final.jsonl"):
        la, lb = jl(A / run / f), jl(B / run / f)
        if la is None and lb is None:
            continue
        same = la is not None and lb is not None and len(la) == len(lb) and all(
            x.get("case_id") == y.get("case_id") and scores(x) == scores(y) for x, y in zip(la, lb))
        print(f"{run}/{f}: {len(la or [])} cases, {'scores identical' if same else 'DIFFERENT'}")
        ok &= same
    sa, sb = (json.loads((d / run / "summary.json").read_text()) for d in (A, B))
    for part in ("pre", "post", "final"):
        if part in sa or part in sb:
            same = sa.get(part) == sb.get(part)
            print(f"{run}/summary {part}: {'identical' if same else 'DIFFERENT ' + str((sa.get(part), sb.get(part)))}")
            ok &= same
print("ALL IDENTICAL" if ok else "DIFFERENCES")
sys.exit(0 if ok else 1)
