"""`fastmemit stats`: covariance statistics of the edited matrices' keys, cached on disk."""

from __future__ import annotations

import argparse
import json
import sys

from fastmemit.cli.common import (
    STATS_DEVICE_HELP,
    add_model_arguments,
    key_count,
    load_cli_model,
    parse_layers,
    positive_float,
    positive_int,
    seq_len,
)
from fastmemit.stats.distributed import session

NAME = "stats"
HELP = ("compute (or load from cache) E[k kᵀ] of the edited layers' keys over a corpus; under "
        "torchrun --nproc_per_node N the corpus is split over the ranks")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--layers", type=parse_layers, required=True, help="layers, e.g. 3-7 or 3,5,8")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--dynamic-multiplier", "--dynamic_multiplier", type=positive_float, dest="dynamic_multiplier",
                       help="FastMEMIT: use ceil(multiplier × d_k) keys (default 10 when no count is given)")
    count.add_argument("--n-tokens", "--n_tokens", type=key_count, dest="n_tokens",
                       help="classic MEMIT: an explicit number of keys (tokens); -1 or all: the whole corpus")
    p.add_argument("--corpus", default=None,
                   help="a .jsonl/.json/.txt file, a folder of text files, 'gensim-wiki' (default, offline) or 'hf:wikimedia/wikipedia:20231101.en'")
    p.add_argument("--cache-dir", default=None, help="statistics cache folder (default: $FASTMEMIT_CACHE/stats)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=seq_len, default=256, help="tokens per row; longer documents are cut in pieces")
    p.add_argument("--seed", type=int, default=0, help="corpus shuffling seed")
    p.add_argument("--stats-device", "--stats_device", dest="stats_device", default=None, help=STATS_DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object per layer")


def run(args: argparse.Namespace) -> int:
    from fastmemit.stats import compute_layer_stats
    from fastmemit.utils import check_writable

    if args.cache_dir is not None and not args.no_cache:
        check_writable(args.cache_dir, "--cache-dir", kind="dir")
    dm = args.dynamic_multiplier
    if dm is None and args.n_tokens is None:
        dm = 10.0
    with session(args.device) as shard:  # under torchrun: every rank runs this, its share of the corpus
        model, tok = load_cli_model(args, shard)
        try:
            stats = compute_layer_stats(
                model, tok, args.layers, args.corpus, n_keys=args.n_tokens, dynamic_multiplier=dm,
                batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                cache=not args.no_cache, cache_dir=args.cache_dir, stats_device=args.stats_device,
            )
        except ValueError as e:  # bad settings for this model (layer range, counts, sizes): a usage error
            print(f"fastmemit {NAME}: error: {e}", file=sys.stderr)
            return 2
        if shard is not None and shard.rank != 0:
            return 0  # rank 0 reports
    rows = [s.summary() for s in stats.values()]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{'layer':>5} {'count':>8} {'trace':>10} {'min eig':>10} {'max eig':>10} {'cond':>10} {'sec':>7}  cache")
        for r in rows:
            print(f"{r['layer']:>5} {r['count']:>8} {r['trace']:>10.4g} {r['min_eig']:>10.3g} {r['max_eig']:>10.3g} "
                  f"{r['condition']:>10.3g} {r['seconds']:>7.2f}  {'hit' if r['cache_hit'] else 'computed'}")
    return 0
