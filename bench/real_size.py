"""Real sizes: statistics, solves and v* at the widths of gpt2-xl, gpt-j-6b, llama-2-7b and llama-3-8b.

Models are built from the real configs (written below: no download) with random weights: speed does
not depend on weight values. Where memory demands it the depth is cut (``--depth``, and any model
whose weights would not fit in ``--memory-fraction`` of the free memory); the output says which
blocks were built. Tokens come from a word-level stand-in tokenizer over synthetic text (ids spread
over the real vocabulary): the cost per token does not depend on which ids they are.

Measured, per model: statistics tokens/s (the engine, float64 Σ k kᵀ for the layers given by
``--stats-layers``) against a bare forward pass over the same batches; v* seconds per fact (all facts
optimized together, ``--v-steps`` steps, never stopping early). Per d_k (6400, 11008, 14336, 16384, with
the d of the model that has it): one batch of ``--solve-batch`` edits solved through the Cholesky
factor (what fastmemit does, O(d_k²·B)) and directly (O(d_k³), the research code), and the one-off
factorization; direct solves and factorizations above ``--direct-max-dk`` are extrapolated by d_k³
from the largest measured one (marked ≈). Peak memory of each phase, over what was allocated
before it, is measured (CPU: the process's peak RSS, reset per phase; GPU: torch's peak allocation)
and printed beside the formula of docs/scale.md.

    OMP_NUM_THREADS=2 python bench/real_size.py                     # CPU: 2 blocks per model, small counts
    python bench/real_size.py --device cuda --dtype bfloat16 --depth 0 --stats-keys 32768 --direct-max-dk 16384
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers as tf

from fastmemit.hooks import Trace
from fastmemit.keys_values import optimize_targets
from fastmemit.linalg import FactoredCov, direct_memit_delta, ridge_system_delta
from fastmemit.methods import EditHparams
from fastmemit.models import get_arch, input_device, key_dim
from fastmemit.requests import EditRequest
from fastmemit.stats import compute_layer_stats
from fastmemit.stats.corpus import shuffled
from fastmemit.stats.engine import padded_batches, token_chunks

F64 = torch.float64
GIB = 1 << 30

# The real configs (from each model's config.json on the hub), as transformers config classes.
CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "gpt2-xl": (tf.GPT2Config, dict(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25,
                                    n_inner=None, activation_function="gelu_new")),  # d_k = 4·1600 = 6400
    "gpt-j-6b": (tf.GPTJConfig, dict(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
                                     rotary_dim=64, n_inner=None, activation_function="gelu_new",
                                     tie_word_embeddings=False)),  # d_k = 16384
    "llama-2-7b": (tf.LlamaConfig, dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                        max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama-3-8b": (tf.LlamaConfig, dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)),
}
DEPTH_KEY = {"gpt2-xl": "n_layer", "gpt-j-6b": "n_layer", "llama-2-7b": "num_hidden_layers",
             "llama-3-8b": "num_hidden_layers"}
SOLVE_SIZES = {6400: 1600, 11008: 4096, 14336: 4096, 16384: 4096}  # d_k -> d of the model that has it
WORDS = ("the of and in to was is for on as by with he at from his an were are which this also be has or had first "
         "one their its new after who they have her she two been other when there all during into school time may "
         "years more most only over city some world would where later up such used many can state about national "
         "out known university united then made river music album film war team season").split()


# ----------------------------------------------------------------------------- stand-ins for data


class WordTokenizer:
    """Word-level stand-in for a tokenizer: one id per whitespace-separated word (crc32 over the
    vocabulary, 0 reserved for padding), character offsets, no special tokens."""

    is_fast = True
    pad_token_id = eos_token_id = 0
    all_special_ids = [0]

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def _one(self, text: str, offsets: bool, special: bool) -> dict[str, list[Any]]:
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        out: dict[str, list[Any]] = {"input_ids": [1 + zlib.crc32(text[s:e].encode()) % (self.vocab_size - 1)
                                                   for s, e in spans]}
        if offsets:
            out["offset_mapping"] = spans
        if special:
            out["special_tokens_mask"] = [0] * len(spans)
        return out

    def __call__(self, text: str | list[str], return_offsets_mapping: bool = False,
                 return_special_tokens_mask: bool = False, **_: Any) -> dict[str, Any]:
        if isinstance(text, str):
            return self._one(text, return_offsets_mapping, return_special_tokens_mask)
        rows = [self._one(t, return_offsets_mapping, return_special_tokens_mask) for t in text]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {"input_ids": []}


class SyntheticCorpus:
    """Seeded documents of 50-400 common words (a statistics corpus needs only text)."""

    identity = "synthetic-words:0"

    def __iter__(self) -> Iterator[str]:
        rng = random.Random(0)
        while True:
            yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_mib() -> tuple[float, float]:
    status = open("/proc/self/status").read()
    return (int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024,
            int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024)


@contextmanager
def peak(device: torch.device) -> Iterator[dict[str, float]]:
    """``{"gib": ...}`` after the block: its peak memory beyond what was in use when it started."""
    out: dict[str, float] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["gib"] = (torch.cuda.max_memory_allocated(device) - start) / GIB
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        _, start = _rss_peak_mib()
    except OSError:
        start = float("nan")
    yield out
    out["gib"] = (_rss_peak_mib()[0] - start) / 1024


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def build(name: str, depth: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The model with the real config, ``depth`` blocks (0: all), random weights, in eval mode."""
    cls, kw = CONFIGS[name]
    full = kw[DEPTH_KEY[name]]
    n = full if depth <= 0 else min(depth, full)
    config = cls(**{**kw, DEPTH_KEY[name]: n})
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), full


def param_bytes(name: str, depth: int, dtype: torch.dtype) -> float:
    """Weights of the model with ``depth`` blocks (0: all), from the config (no model built)."""
    cls, kw = CONFIGS[name]
    with torch.device("meta"):
        m = tf.AutoModelForCausalLM.from_config(cls(**{**kw, DEPTH_KEY[name]: depth or kw[DEPTH_KEY[name]]}))
    return sum(p.numel() for p in m.parameters()) * torch.finfo(dtype).bits / 8


def free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    meminfo = open("/proc/meminfo").read()
    return int(re.search(r"MemAvailable:\s+(\d+)", meminfo).group(1)) * 1024.0


# ----------------------------------------------------------------------------- the measurements


@torch.no_grad()
def bare_forward(model: torch.nn.Module, deepest: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    dev = input_device(model)
    for ids, mask in batches:
        with Trace(model, [deepest], retain_input=False, retain_output=False, stop=True):
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)


def measure_stats(model: torch.nn.Module, tok: WordTokenizer, layers: list[int], args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    """Engine tokens/s and peak, bare forward tokens/s over the same batches."""
    arch, d_k = get_arch(model), key_dim(model, layers[0])
    n = args.stats_keys
    batches, seen = [], 0
    for ids, mask in padded_batches(token_chunks(tok, shuffled(iter(SyntheticCorpus()), 0), args.seq_len),
                                    args.batch_size, 0):
        batches.append((ids, mask))
        seen += int(mask.sum())
        if seen >= n:
            break
    deepest = arch.site("mlp_down", layers[-1])
    bare_forward(model, deepest, batches[:1])  # warm-up
    stats_device = args.stats_device or None
    with peak(device) as pk:
        t_engine, stats = timed(lambda: compute_layer_stats(
            model, tok, layers, SyntheticCorpus(), n_keys=n, batch_size=args.batch_size, seq_len=args.seq_len, seed=0,
            cache=False, show_progress=False, stats_device=stats_device), device)
    assert all(st.count == n for st in stats.values())
    del stats
    t_bare, _ = timed(lambda: bare_forward(model, deepest, batches), device)
    rows = batches[0][0].shape[0]
    s = torch.finfo(next(model.parameters()).dtype).bits / 8
    L = len(layers)
    # accumulators + the mirror's temporary + keys held for one batch (model dtype) and their float64 copy
    formula = ((L + 1) * 8 * d_k**2 + rows * args.seq_len * d_k * (L * s + 8)) / GIB
    if stats_device == "cpu" and device.type == "cuda":
        formula = rows * args.seq_len * d_k * (L * s + 8) / GIB  # the accumulators live on the CPU
    return {"keys": n, "layers": layers, "engine_tok_s": n / t_engine, "bare_tok_s": n / t_bare,
            "engine_over_bare": t_bare / t_engine, "stats_peak_gib": pk["gib"], "stats_formula_gib": formula}


def measure_vstar(model: torch.nn.Module, tok: WordTokenizer, layer: int, args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    """v* seconds per fact: ``--v-facts`` facts together, two templates, ``--v-steps`` steps (no early stop)."""
    subjects = ["Alice Smith", "Danielle Darrieux", "Toko Yasuda", "Paris Hilton", "Jean Valjean", "Ada Lovelace"]
    reqs = [EditRequest(prompt="{} works in the field of", subject=subjects[i % len(subjects)] + f" {i}",
                        target_new="theoretical physics") for i in range(args.v_facts)]
    hp = EditHparams.from_dict(dict(layers=[layer], v_num_grad_steps=args.v_steps, v_early_stop_nll=0.0))
    templates = ["{}", "The history of the city was known. {}"]
    with peak(device) as pk:
        seconds, res = timed(lambda: optimize_targets(model, tok, reqs, templates, layer, hp, show_progress=False),
                             device)
    assert all(s == args.v_steps for s in res.steps)
    return {"v_s_per_fact": seconds / args.v_facts, "v_steps": args.v_steps, "v_facts": args.v_facts,
            "v_peak_gib": pk["gib"]}


def _spd_like(d_k: int, device: torch.device, g: torch.Generator) -> torch.Tensor:
    """A well-conditioned symmetric matrix built in O(d_k²): I + a small symmetric perturbation."""
    C = torch.rand(d_k, d_k, dtype=F64, generator=g).to(device).mul_(0.5 / d_k)  # (d_k, d_k)
    C.add_(C.T.clone()).diagonal().add_(1.0)
    return C


def _factored(K: torch.Tensor, R: torch.Tensor, g: torch.Generator, device: torch.device) -> dict[str, float]:
    """Seconds and peak of fastmemit's solve of one batch through a given factor."""
    d_k = K.shape[0]
    L = torch.rand(d_k, d_k, dtype=F64, generator=g).to(device).mul_(1e-3 / d_k).tril_()  # (d_k, d_k)
    L.diagonal().add_(1.0)  # a valid factor: triangular solves cost the same whatever its values
    F = FactoredCov(L, factor=L)  # C is not read by the solve (it shares L's memory here)
    ridge_system_delta(R[:, :2], K[:, :2], F, 1.0)  # warm-up
    with peak(device) as pk:
        seconds, _ = timed(lambda: ridge_system_delta(R, K, F, 1.0), device)
    return {"factored_s": seconds, "factored_peak_gib": pk["gib"]}


def measure_solve(d_k: int, d: int, args: argparse.Namespace, device: torch.device, direct: bool) -> dict[str, Any]:
    """One batch of B edits: factored (given the factor) and, when ``direct``, direct; and the factorization."""
    B = args.solve_batch
    g = torch.Generator().manual_seed(0)
    K = torch.randn(d_k, B, dtype=F64, generator=g).to(device)  # (d_k, B)
    R = torch.randn(d, B, dtype=F64, generator=g).to(device)  # (d, B)
    out: dict[str, Any] = {"d_k": d_k, "d": d, "B": B, **_factored(K, R, g, device)}
    # cholesky_solve's column-major copy of L, freed before Δ and its transpose exist; Y, G
    out["factored_formula_gib"] = 8 * (max(d_k**2, 2 * d * d_k) + 2 * d_k * B + 3 * B * B) / GIB
    gc.collect()
    if direct:
        C = _spd_like(d_k, device, g)
        with peak(device) as pk:
            out["direct_s"], _ = timed(lambda: direct_memit_delta(R, K, C), device)
        out["direct_peak_gib"] = pk["gib"]
        with peak(device) as pk2:
            out["factor_s"], _ = timed(lambda: FactoredCov(C), device)
        out["factor_peak_gib"] = pk2["gib"]
        del C
    out["direct_formula_gib"] = (2 * 8 * d_k**2 + 2 * 8 * d * d_k) / GIB  # A = C + K Kᵀ and LU's copy of it; Δ
    out["factor_formula_gib"] = 8 * d_k**2 / GIB  # L
    return out


# ----------------------------------------------------------------------------- the run


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    depth = args.depth
    budget = args.memory_fraction * free_bytes(device)
    full_bytes = param_bytes(name, 0, dtype)
    if depth == 0 and full_bytes > budget:  # cut to what fits, with a margin for statistics and activations
        per_block = (full_bytes - param_bytes(name, 1, dtype)) / (CONFIGS[name][1][DEPTH_KEY[name]] - 1)
        depth = max(2, int((budget - (param_bytes(name, 1, dtype) - per_block)) // per_block))
    t0 = time.perf_counter()
    model, full = build(name, depth, dtype, device)
    built = len(model.get_submodule(get_arch(model).layers))
    row: dict[str, Any] = {"model": name, "blocks": built, "full_blocks": full, "d": model.config.hidden_size
                           if hasattr(model.config, "hidden_size") else model.config.n_embd,
                           "d_k": key_dim(model, 0), "weights_gib": sum(p.numel() * p.element_size()
                                                                         for p in model.parameters()) / GIB,
                           "build_s": time.perf_counter() - t0}
    tok = WordTokenizer(model.config.vocab_size)
    layers = [x for x in args.stats_layers if x < built] or [0]
    row.update(measure_stats(model, tok, layers, args, device))
    row.update(measure_vstar(model, tok, max(0, min(layers[-1], built - 2)), args, device))  # a block after it
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def solve_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for d_k in args.solve_dk:
        rows.append(measure_solve(d_k, SOLVE_SIZES.get(d_k, 4096), args, device, direct=d_k <= args.direct_max_dk))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    measured = [r for r in rows if "direct_s" in r]
    if measured:  # extrapolate O(d_k³) from the largest measured size
        ref = max(measured, key=lambda r: r["d_k"])
        for r in rows:
            if "direct_s" not in r:
                scale = (r["d_k"] / ref["d_k"]) ** 3
                r["direct_s_est"], r["factor_s_est"] = ref["direct_s"] * scale, ref["factor_s"] * scale
    return rows


def fmt_table(models: list[dict[str, Any]], solves: list[dict[str, Any]], args: argparse.Namespace,
              device: torch.device, dtype: torch.dtype) -> str:
    lines = [f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, model dtype {str(dtype).removeprefix('torch.')}, "
             f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus",
             f"statistics: {args.stats_keys} keys, batches of {args.batch_size} × {args.seq_len} tokens, "
             f"stats_device {args.stats_device or 'default'}; v*: {args.v_facts} facts × 2 templates, {args.v_steps} steps",
             "", "| model | blocks built / full | d | d_k | weights GiB | stats layers | stats tokens/s | bare forward tokens/s "
             "| engine / bare | stats peak GiB (formula) | v* s per fact | v* peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in models:
        cut = "" if r["blocks"] == r["full_blocks"] else " (cut)"
        lines.append(f"| {r['model']} | {r['blocks']} / {r['full_blocks']}{cut} | {r['d']} | {r['d_k']} | {r['weights_gib']:.1f} "
                     f"| {','.join(map(str, r['layers']))} | {r['engine_tok_s']:.0f} | {r['bare_tok_s']:.0f} "
                     f"| {r['engine_over_bare']:.2f} | {r['stats_peak_gib']:.2f} ({r['stats_formula_gib']:.2f}) "
                     f"| {r['v_s_per_fact']:.2f} | {r['v_peak_gib']:.2f} |")
    lines += ["", f"solves of one batch of {args.solve_batch} edits, float64 (≈: extrapolated by d_k³ from the largest "
              "measured direct solve)", "",
              "| d_k | d | factored solve s | direct solve s | direct / factored | factorization (once per layer) s "
              "| factored peak GiB (formula) | direct peak GiB (formula) |", "|---|---|---|---|---|---|---|---|"]
    for r in solves:
        mark = "" if "direct_s" in r else "≈ "
        direct, factor = r.get("direct_s", r.get("direct_s_est")), r.get("factor_s", r.get("factor_s_est"))
        if direct is None or factor is None:
            cols = "– | – | –"
        else:
            cols = f"{mark}{direct:.1f} | {mark}{direct / r['factored_s']:.0f} | {mark}{factor:.1f}"
        dpk = f"{r['direct_peak_gib']:.2f}" if "direct_peak_gib" in r else "–"
        lines.append(f"| {r['d_k']} | {r['d']} | {r['factored_s']:.3f} | {cols} | {r['factored_peak_gib']:.3f} "
                     f"({r['factored_formula_gib']:.3f}) | {dpk} ({r['direct_formula_gib']:.2f}) |")
    return "\n".join(lines)


def parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--models", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--depth", type=int, default=2, help="blocks built per model (0: all, cut only to fit memory)")
    p.add_argument("--memory-fraction", type=float, default=0.6, help="weights may use this share of free memory")
    p.add_argument("--stats-layers", type=parse_ints, default=[0, 1], help="layers of the statistics pass")
    p.add_argument("--stats-keys", type=int, default=256)
    p.add_argument("--stats-device", default=None, help="fastmemit's stats_device (default: each layer's device)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--v-facts", type=int, default=2)
    p.add_argument("--v-steps", type=int, default=3)
    p.add_argument("--solve-dk", type=parse_ints, default=list(SOLVE_SIZES))
    p.add_argument("--solve-batch", type=int, default=100, help="edits per batch B")
    p.add_argument("--direct-max-dk", type=int, default=6400, help="largest d_k solved directly (larger: ≈ d_k³)")
    p.add_argument("--skip-models", action="store_true", help="only the solves")
    p.add_argument("--skip-solves", action="store_true", help="only the models")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    os.environ.setdefault("FASTMEMIT_PROGRESS", "0")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    models = [] if args.skip_models else [run_model(m.strip(), args, device, dtype) for m in args.models.split(",")]
    solves = [] if args.skip_solves else solve_rows(args, device)
    print(fmt_table(models, solves, args, device, dtype))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; command: python {' '.join(sys.argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": models, "solves": solves, "load_average": os.getloadavg(), "argv": sys.argv}, f,
                      indent=1, default=str)
    return 0 if all(math.isfinite(r["engine_tok_s"]) for r in models) else 1


if __name__ == "__main__":
    raise SystemExit(main())
