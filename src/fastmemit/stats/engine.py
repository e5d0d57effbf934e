"""The covariance engine: E[k kᵀ] of the edited matrices' inputs over a text corpus.

One pass serves every requested layer: the model runs only up to the deepest missing layer (the
forward pass is stopped at that layer's key), every layer's key is hooked in the same pass,
padding is dropped, Σ k kᵀ and the count accumulate in float64, and the stream stops at exactly
the requested number of keys: ``ceil(dynamic_multiplier × d_k)`` (FastMEMIT) or an explicit count
(classic MEMIT). Results are cached on disk (see :mod:`fastmemit.stats.cache`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmemit.errors import CorpusError, StatisticsError
from fastmemit.hooks import Trace
from fastmemit.lm import pad_right
from fastmemit.models.arch import check_layers, get_arch, key_dim
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.stats.cache import entry_lock, entry_path, load_entry, save_entry, stats_dir
from fastmemit.stats.corpus import Corpus, corpus_from_spec, shuffled
from fastmemit.utils import logger, progress

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class LayerStats:
    """Second moment of the keys of one layer's edited matrix."""

    layer: int
    site: str  # dotted module name of the edited matrix
    sum_kk: torch.Tensor  # (d_k, d_k), Σ k kᵀ in float64
    count: int  # number of keys summed
    seconds: float = 0.0  # time spent computing it (0 on a cache hit... plus load time)
    cache_hit: bool = False
    path: Path | None = None
    key: dict[str, Any] = field(default_factory=dict)

    @property
    def mom2(self) -> torch.Tensor:
        """E[k kᵀ] = Σ k kᵀ / n, (d_k, d_k) float64: the C0 of the methods (before λ)."""
        return self.sum_kk / self.count

    def summary(self) -> dict[str, Any]:
        """Count, trace and the eigenvalue range of E[k kᵀ] (float64) for reports."""
        eig = torch.linalg.eigvalsh(self.mom2)  # (d_k,) ascending
        lo, hi = float(eig[0]), float(eig[-1])
        return {
            "layer": self.layer,
            "site": self.site,
            "count": self.count,
            "d_k": int(self.sum_kk.shape[0]),
            "trace": float(torch.trace(self.mom2)),
            "min_eig": lo,
            "max_eig": hi,
            "condition": hi / lo if lo > 0 else float("inf"),
            "seconds": round(self.seconds, 3),
            "cache_hit": self.cache_hit,
        }


ALL_KEYS = -1  # n_keys value meaning "every token of the corpus" (classic full statistics)


def resolve_count(d_k: int, n_keys: int | None = None, dynamic_multiplier: float | None = None) -> int:
    """Number of keys to sum: explicit ``n_keys``, ``ceil(dynamic_multiplier × d_k)``, or ALL_KEYS."""
    if (n_keys is None) == (dynamic_multiplier is None):
        raise ValueError("give exactly one of n_keys and dynamic_multiplier")
    if n_keys == ALL_KEYS:
        return ALL_KEYS
    if n_keys is not None:
        if int(n_keys) <= 0:
            raise ValueError(f"n_keys must be positive, got {n_keys}")
        return int(n_keys)
    assert dynamic_multiplier is not None
    if not (dynamic_multiplier > 0 and math.isfinite(dynamic_multiplier)):
        raise ValueError(f"dynamic_multiplier must be a positive number, got {dynamic_multiplier}")
    if dynamic_multiplier < 1:
        logger.warning("dynamic_multiplier %.3g < 1: fewer keys than d_k, E[k kᵀ] will be singular", dynamic_multiplier)
    return math.ceil(dynamic_multiplier * d_k)


def token_chunks(tok: Any, docs: Iterator[str], seq_len: int, docs_per_call: int = 32) -> Iterator[list[int]]:
    """Token id lists of at most ``seq_len``: each document tokenized whole, then cut in pieces.

    Documents are tokenized in groups of 1, 2, 4, ... up to ``docs_per_call``: a small count needs
    only the first document or two, and Wikipedia articles are thousands of tokens each.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    batch: list[str] = []
    group = 1

    def flush() -> Iterator[list[int]]:
        enc = tok(batch, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        for ids in enc:
            for s in range(0, len(ids), seq_len):
                piece = ids[s : s + seq_len]
                if len(piece) > 1 or s == 0:
                    yield piece
        batch.clear()

    for d in docs:
        if d and d.strip():
            batch.append(d)
        if len(batch) >= group:
            yield from flush()
            group = min(2 * group, docs_per_call)
    if batch:
        yield from flush()


def padded_batches(chunks: Iterator[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) pairs, right padded (:func:`fastmemit.lm.pad_right`): (B, T) long each."""
    rows: list[list[int]] = []

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, _ = pad_right(rows, pad_id)  # positions: the model's own (columns), as before
        rows.clear()
        return ids, mask

    for c in chunks:
        rows.append(c)
        if len(rows) == batch_size:
            yield make()
    if rows:
        yield make()


def stats_key(model_fp: str, site: str, corpus_id: str, count: int | str, seq_len: int, seed: int | None,
              model_dtype: torch.dtype, acc_dtype: torch.dtype) -> dict[str, Any]:
    return {
        "model": model_fp,
        "site": site,
        "corpus": corpus_id,
        "count": count,
        "seq_len": seq_len,
        "seed": seed,
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "dtype": str(acc_dtype).removeprefix("torch."),
    }


def compute_layer_stats(
    model: nn.Module,
    tok: Any,
    layers: Sequence[int],
    corpus: str | Path | Corpus | None = None,
    *,
    n_keys: int | None = None,
    dynamic_multiplier: float | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    seed: int | None = 0,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    accumulate_dtype: str = "float64",
    show_progress: bool = True,
) -> dict[int, LayerStats]:
    """E[k kᵀ] for the edited matrix of each layer in ``layers``, from one pass over ``corpus``.

    Exactly one of ``n_keys`` / ``dynamic_multiplier`` sets the count; ``n_keys=ALL_KEYS`` (-1)
    streams the whole corpus (its cache entry is keyed "all"). Layers found in the cache
    are loaded; the others are computed together in one truncated forward stream.
    """
    if accumulate_dtype not in _DTYPES:
        raise ValueError(f"accumulate_dtype must be one of {list(_DTYPES)}, got {accumulate_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    acc_dtype = _DTYPES[accumulate_dtype]
    layers = check_layers(model, list(layers))
    arch = get_arch(model)
    d_k = key_dim(model, layers[0])
    count = resolve_count(d_k, n_keys, dynamic_multiplier)
    source = corpus_from_spec(corpus)
    param = next(model.parameters())
    fp = model_fingerprint(model)
    root = stats_dir(cache_dir)

    keys = {layer: stats_key(fp, arch.site("mlp_down", layer), source.identity,
                             "all" if count == ALL_KEYS else count, seq_len, seed, param.dtype, acc_dtype)
            for layer in layers}
    result = _cache_hits(root, keys) if cache else {}
    missing = [layer for layer in layers if layer not in result]
    if missing:
        with contextlib.ExitStack() as locks:
            if cache:  # another process computing the same entries: wait for it, then read them
                for layer in missing:
                    locks.enter_context(entry_lock(entry_path(root, keys[layer])))
                result.update(_cache_hits(root, {layer: keys[layer] for layer in missing}))
                missing = [layer for layer in layers if layer not in result]
            if missing:
                computed = _stream_stats(model, tok, missing, source, count, batch_size, seq_len, seed, acc_dtype,
                                         show_progress)
                for layer, st in computed.items():
                    st.key = keys[layer]
                    if cache:
                        st.path = entry_path(root, keys[layer])
                        save_entry(st.path, {"sum_kk": st.sum_kk}, keys[layer], {"count": st.count})
                    result[layer] = st
    return {layer: result[layer] for layer in layers}


def _cache_hits(root: Path, keys: dict[int, dict[str, Any]]) -> dict[int, LayerStats]:
    """The layers whose statistics are in the disk cache, loaded."""
    hits = {}
    for layer, key in keys.items():
        t0 = time.perf_counter()
        path = entry_path(root, key)
        hit = load_entry(path, key)
        if hit is not None:
            tensors, extra = hit
            hits[layer] = LayerStats(layer, key["site"], tensors["sum_kk"], int(extra["count"]),
                                     time.perf_counter() - t0, True, path, key)
    return hits


def _block_edges(d_k: int, width: int = 384, max_blocks: int = 8) -> list[int]:
    """Boundaries of the column blocks of Σ k kᵀ: blocks of about ``width`` (at least one, at most 8)."""
    b = max(1, min(max_blocks, d_k // width))
    return [round(i * d_k / b) for i in range(b + 1)]


def _add_upper_kTk(acc: torch.Tensor, k: torch.Tensor, edges: list[int]) -> None:
    """acc += kᵀ k on the blocks on and above the diagonal only; :func:`_mirror_upper` fills the rest.

    Σ k kᵀ is symmetric, and its float64 products are the engine's largest cost after the forward
    pass: with b blocks this does (b+1)/2b of a full ``addmm`` (5/8 for b = 4), with the same
    float64 products and sums, so the result is as exact as the full product.
    """
    for a0, a1 in zip(edges[:-1], edges[1:]):
        acc[a0:a1, a0:].addmm_(k[:, a0:a1].T, k[:, a0:])  # (w, d_k - a0) += (w, n) @ (n, d_k - a0)


def _mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``acc``'s (d_k, d_k)."""
    return torch.triu(acc) + torch.triu(acc, 1).T


@torch.no_grad()
def _stream_stats(
    model: nn.Module,
    tok: Any,
    layers: list[int],
    source: Corpus,
    count: int,
    batch_size: int,
    seq_len: int,
    seed: int | None,
    acc_dtype: torch.dtype,
    show_progress: bool,
) -> dict[int, LayerStats]:
    arch = get_arch(model)
    device = next(model.parameters()).device
    names = [arch.site("mlp_down", layer) for layer in layers]  # ascending: the last is the deepest
    d_k = key_dim(model, layers[0])
    sums = {layer: torch.zeros(d_k, d_k, dtype=acc_dtype, device=device) for layer in layers}
    edges = _block_edges(d_k)
    seen = 0
    tokens_run = 0
    t0 = time.perf_counter()
    read_all = count == ALL_KEYS
    if read_all:
        count = sys.maxsize
    docs = shuffled(iter(source), seed)
    batches = padded_batches(token_chunks(tok, docs, seq_len), batch_size, tok.pad_token_id)
    bar = progress(total=None if read_all else count, desc=f"stats layers {layers}", unit="key", disable=None if show_progress else True)
    was_training = model.training
    model.eval()
    try:
        for ids, mask in batches:
            need = count - seen
            with Trace(model, names, retain_input=True, retain_output=False, stop=True) as tr:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            keep = mask.to(device).reshape(-1).bool()  # (B*T,)
            tokens_run += int(keep.sum())
            for layer, name in zip(layers, names):
                k = tr.inputs[name].reshape(-1, d_k)[keep][:need].to(acc_dtype)  # (n, d_k)
                _add_upper_kTk(sums[layer], k, edges)  # Σ k kᵀ += Kᵀ K, upper block triangle
            got = min(need, int(keep.sum()))
            seen += got
            bar.update(got)
            if seen >= count:
                break
    finally:
        bar.close()
        model.train(was_training)
    if seen == 0:
        raise CorpusError(f"corpus {source.identity!r} yielded no tokens")
    if seen < count and not read_all:
        raise CorpusError(
            f"corpus {source.identity!r} has only {seen} keys (tokens) but {count} were requested; "
            "use a larger corpus or a smaller count / dynamic_multiplier"
        )
    seconds = time.perf_counter() - t0
    logger.info("stats for layers %s: %d keys in %.1fs (%.0f tokens/s)", layers, seen, seconds, tokens_run / max(seconds, 1e-9))
    out = {}
    for layer, name in zip(layers, names):
        s = _mirror_upper(sums[layer]).to(device="cpu", dtype=torch.float64)  # (d_k, d_k), exactly symmetric
        if not torch.isfinite(s).all():
            raise StatisticsError(f"statistics of {name} contain NaN or inf: the model produced non-finite keys")
        out[layer] = LayerStats(layer, name, s, seen, seconds, False)
    return out
