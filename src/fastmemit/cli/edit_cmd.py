"""`fastmemit edit`: write new facts into a model and show before/after predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fastmemit.cli.common import (
    add_memory_arguments,
    add_model_arguments,
    load_cli_model,
    parse_layers,
    parse_set_overrides,
    positive_int,
)
from fastmemit.errors import EditError
from fastmemit.stats.distributed import session
from fastmemit.stats.service import lead_or_serve
from fastmemit.utils import check_writable, read_json

NAME = "edit"
HELP = "edit facts into a model (ROME, MEMIT, EMMET, AlphaEdit, ENCORE, FT) and show before/after predictions"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_memory_arguments(p)
    p.add_argument("--method", "--alg_name", dest="method", default="EMMET", help="ROME, MEMIT, EMMET, AlphaEdit, ENCORE or FT (default EMMET)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--request", action="append", help='JSON request, e.g. \'{"prompt": "The mother tongue of {} is", '
                     '"subject": "Danielle Darrieux", "target_new": "English"}\' (repeatable)')
    src.add_argument("--requests", type=Path, help="JSON file with a list of requests (also CounterFact records)")
    p.add_argument("--hparams", "--hparams_fname", dest="hparams", default=None,
                   help="built-in name, also the seed's file names (gpt2-xl.json, EleutherAI_gpt-j-6B.json, ...), "
                        "or a JSON file (default: the built-in for this model)")
    p.add_argument("--layers", type=parse_layers, default=None, help="override hparams.layers, e.g. 4-8")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override one hparams field, e.g. --set mom2_update_weight=1e4 (repeatable)")
    p.add_argument("--corpus", default=None, help="statistics corpus (default: hparams.stats_corpus or gensim-wiki)")
    p.add_argument("--cache-dir", default=None, help="statistics cache folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-deltas", type=Path, default=None, help="write the deltas (safetensors) here")
    p.add_argument("--generate", nargs="*", default=None, metavar="PROMPT",
                   help="also print greedy generations for these prompts (default: each request's prompt)")
    p.add_argument("--max-new-tokens", type=positive_int, default=20)
    p.add_argument("--top", type=positive_int, default=5, help="top tokens shown before/after (default 5)")
    p.add_argument("--json", action="store_true", help="print a JSON report instead of text")


def _load_requests(args: argparse.Namespace) -> list[Any]:
    from fastmemit.requests import EditRequest

    if args.requests is not None:
        data = read_json(args.requests, "requests file", EditError)
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise EditError(f"requests file {str(args.requests)!r}: expected a list of requests")
    else:
        data = []
        for i, s in enumerate(args.request):
            try:
                data.append(json.loads(s))
            except json.JSONDecodeError as e:
                raise EditError(f"--request #{i + 1}: invalid JSON ({e.msg})") from None
    return [EditRequest.from_any(d) for d in data]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = parse_set_overrides(args.set)
    if args.layers is not None:
        out["layers"] = args.layers
    return out


def run(args: argparse.Namespace) -> int:
    from fastmemit.methods import get_method

    requests = _load_requests(args)
    method = get_method(args.method)
    if args.save_deltas is not None:  # checked before the edit is computed
        check_writable(args.save_deltas, "--save-deltas")
    if args.cache_dir is not None:
        check_writable(args.cache_dir, "--cache-dir", kind="dir")
    # under torchrun: rank 0 edits, the other ranks serve its statistics passes (docs/scale.md)
    with session(args.device) as shard:
        model, tok = load_cli_model(args, shard)
        return lead_or_serve(model, tok, shard, lambda: _edit(args, method, requests, model, tok))


def _edit(args: argparse.Namespace, method: Any, requests: list[Any], model: Any, tok: Any) -> int:
    from fastmemit.editing import Editor, resolve_hparams
    from fastmemit.probe import generate, top_tokens

    hp = resolve_hparams(method, args.hparams, model)
    overrides = _overrides(args)
    if overrides:
        hp = hp.replace(**overrides)
    prompts = [r.text for r in requests]
    gen_prompts = prompts if args.generate is None or not args.generate else args.generate
    before = {"top": top_tokens(model, tok, prompts, args.top), "gen": generate(model, tok, gen_prompts, args.max_new_tokens)}
    editor = Editor(model, tok, method.name, hp, corpus=args.corpus, stats_cache_dir=args.cache_dir, seed=args.seed,
                    stats_device=args.stats_device, solve_device=args.solve_device)
    result = editor.edit(requests)
    after = {"top": top_tokens(model, tok, prompts, args.top), "gen": generate(model, tok, gen_prompts, args.max_new_tokens)}
    if args.save_deltas is not None:
        result.save(args.save_deltas)
    report = {
        "method": method.name,
        "layers": hp.layers,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "requests": [
            {**r.to_dict(), "before": b, "after": a} for r, b, a in zip(requests, before["top"], after["top"])
        ],
        "generations": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(gen_prompts, before["gen"], after["gen"])],
        "deltas": str(args.save_deltas) if args.save_deltas else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{method.name} on layers {hp.layers}: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    for r in report["requests"]:
        print(f"\n{r['prompt'].replace('{}', r['subject'])!r} -> {r['target_new']!r}")
        print("  before: " + "  ".join(f"{t!r} {p:.3f}" for t, p in r["before"]))
        print("  after:  " + "  ".join(f"{t!r} {p:.3f}" for t, p in r["after"]))
    for g in report["generations"]:
        print(f"\n{g['prompt']!r}\n  before: {g['before']!r}\n  after:  {g['after']!r}")
    if args.save_deltas:
        print(f"\ndeltas saved to {args.save_deltas}")
    return 0
