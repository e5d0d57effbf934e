"""The covariance engine: E[k kᵀ] of the edited matrices' inputs over a text corpus.

One pass serves every requested layer: the model runs only up to the deepest missing layer (the
forward pass is stopped at that layer's key), every layer's key is hooked in the same pass,
padding is dropped, Σ k kᵀ and the count accumulate in float64, and the stream stops at exactly
the requested number of keys: ``ceil(dynamic_multiplier × d_k)`` (FastMEMIT) or an explicit count
(classic MEMIT). Results are cached on disk (see :mod:`fastmemit.stats.cache`).

Devices: input ids go to the input embedding's device; each layer's keys are read on the device of
the module that produced them (device-mapped models spread layers over devices), and Σ k kᵀ
accumulates there, or on ``stats_device`` when one is given (``"cpu"`` bounds accelerator memory to
the model and one batch). Results live on ``stats_device``, or on the CPU by default.
Under ``torch.distributed`` the batches are split by rank and the sums all-reduced
(:mod:`fastmemit.stats.distributed`); the result equals one process's to float64 rounding.
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
from fastmemit.models.arch import check_layers, get_arch, get_module, key_dim
from fastmemit.models.devices import execution_device, input_device
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.models.loading import resolve_device
from fastmemit.stats import distributed as dist_stats
from fastmemit.stats.cache import entry_lock, entry_path, load_entry, save_entry, stats_dir
from fastmemit.stats.corpus import Corpus, corpus_from_spec, shuffled
from fastmemit.stats.distributed import Shard
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
    stats_device: str | torch.device | None = None,
    distributed: bool | None = None,
) -> dict[int, LayerStats]:
    """E[k kᵀ] for the edited matrix of each layer in ``layers``, from one pass over ``corpus``.

    Exactly one of ``n_keys`` / ``dynamic_multiplier`` sets the count; ``n_keys=ALL_KEYS`` (-1)
    streams the whole corpus (its cache entry is keyed "all"). Layers found in the cache
    are loaded; the others are computed together in one truncated forward stream.

    ``stats_device``: where Σ k kᵀ accumulates and the results live (default: each layer's own
    device while accumulating, the CPU for the results). ``distributed``: split the pass over the
    ranks of the initialized process group (None: whenever one with more than one rank is
    initialized; every rank must call with the same arguments, see :mod:`fastmemit.stats.distributed`).
    """
    if accumulate_dtype not in _DTYPES:
        raise ValueError(f"accumulate_dtype must be one of {list(_DTYPES)}, got {accumulate_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    acc_dtype = _DTYPES[accumulate_dtype]
    fp = model_fingerprint(model)
    keep_on_cpu = stats_device is not None and str(stats_device).startswith("cpu")
    call = dict(layers=list(layers), corpus=corpus, n_keys=n_keys, dynamic_multiplier=dynamic_multiplier,
                batch_size=batch_size, seq_len=seq_len, seed=seed, cache=cache, accumulate_dtype=accumulate_dtype,
                stats_device="cpu" if keep_on_cpu else None)  # what serving ranks are asked to run
    shard = _shard_for(fp, call, distributed)
    try:  # every rank of a shard learns whether every rank could prepare the pass, so none waits alone
        layers = check_layers(model, list(layers))
        arch = get_arch(model)
        d_k = key_dim(model, layers[0])
        count = resolve_count(d_k, n_keys, dynamic_multiplier)
        source = corpus_from_spec(corpus)
        acc_device = None if stats_device is None else resolve_device(stats_device)
    except Exception:
        if shard is not None:
            shard.all_true(False)
        raise
    if shard is not None and not shard.all_true(True):
        raise StatisticsError("another rank could not prepare this statistics pass (its error is in its log)")
    param = next(model.parameters())
    root = stats_dir(cache_dir)
    storage = acc_device if acc_device is not None else torch.device("cpu")

    keys = {layer: stats_key(fp, arch.site("mlp_down", layer), source.identity,
                             "all" if count == ALL_KEYS else count, seq_len, seed, param.dtype, acc_dtype)
            for layer in layers}

    def stream(todo: list[int]) -> dict[int, LayerStats]:
        return _stream_stats(model, tok, todo, source, count, batch_size, seq_len, seed, acc_dtype, show_progress,
                             acc_device=acc_device, storage=storage, shard=shard)

    if shard is not None:
        return _sharded(shard, layers, keys, root, cache, stream, d_k, storage)
    result = _cache_hits(root, keys, storage) if cache else {}
    missing = [layer for layer in layers if layer not in result]
    if missing:
        with contextlib.ExitStack() as locks:
            if cache:  # another process computing the same entries: wait for it, then read them
                for layer in missing:
                    locks.enter_context(entry_lock(entry_path(root, keys[layer])))
                result.update(_cache_hits(root, {layer: keys[layer] for layer in missing}, storage))
                missing = [layer for layer in layers if layer not in result]
            if missing:
                result.update(_keep(stream(missing), keys, root, cache, write=True))
    return {layer: result[layer] for layer in layers}


def _shard_for(fp: str, call: dict[str, Any], distributed: bool | None) -> Shard | None:
    """The shard to compute with: rank 0 leading serving ranks, or every rank calling (SPMD), or None."""
    if distributed is False:
        return None
    led = dist_stats.announce(fp, call)  # rank 0 of `fastmemit edit/evaluate` under torchrun
    if led is not None:
        return led
    return dist_stats.current_shard(required=distributed is True)


def _keep(computed: dict[int, LayerStats], keys: dict[int, dict[str, Any]], root: Path, cache: bool,
          *, write: bool) -> dict[int, LayerStats]:
    """Computed statistics with their cache keys, written to the cache when ``cache`` and ``write``."""
    for layer, st in computed.items():
        st.key = keys[layer]
        if cache:
            st.path = entry_path(root, keys[layer])
            if write:
                save_entry(st.path, {"sum_kk": st.sum_kk}, keys[layer], {"count": st.count})
    return computed


def _sharded(shard: Shard, layers: list[int], keys: dict[int, dict[str, Any]], root: Path, cache: bool,
             stream: Any, d_k: int, storage: torch.device) -> dict[int, LayerStats]:
    """compute_layer_stats on every rank of ``shard``: rank 0 reads the cache and decides what is
    computed, every rank computes its share of the missing layers (all-reduced), rank 0 writes the
    cache while the others wait, and rank 0's cache hits are sent to the others (no shared disk needed)."""
    same = shard.broadcast_object(keys) == keys
    if not shard.all_true(same):
        raise StatisticsError("the ranks disagree on the statistics to compute (model fingerprint, corpus, count or "
                              "settings differ): every rank must load the same model and corpus")
    with contextlib.ExitStack() as locks:
        hits: dict[int, LayerStats] = {}
        if shard.rank == 0 and cache:
            hits = _cache_hits(root, keys, storage)
            for layer in [x for x in layers if x not in hits]:
                locks.enter_context(entry_lock(entry_path(root, keys[layer])))
            hits.update(_cache_hits(root, {x: keys[x] for x in layers if x not in hits}, storage))
        missing: list[int] = shard.broadcast_object([x for x in layers if x not in hits])
        result = _keep(stream(missing), keys, root, cache, write=shard.rank == 0) if missing else {}
        for layer in layers:
            if layer not in missing:
                result[layer] = _broadcast_hit(shard, hits.get(layer), layer, keys[layer], d_k, storage)
        shard.barrier()  # the cache entries are on disk before any rank goes on
    return {layer: result[layer] for layer in layers}


def _broadcast_hit(shard: Shard, hit: LayerStats | None, layer: int, key: dict[str, Any], d_k: int,
                   storage: torch.device) -> LayerStats:
    """Rank 0's cache hit on every rank."""
    count, path = shard.broadcast_object((hit.count, hit.path) if hit is not None else None)
    s = hit.sum_kk if hit is not None else torch.zeros(d_k, d_k, dtype=torch.float64, device=storage)  # (d_k, d_k)
    shard.broadcast_(s)
    return LayerStats(layer, key["site"], s, count, hit.seconds if hit is not None else 0.0, True, path, key)


def _cache_hits(root: Path, keys: dict[int, dict[str, Any]], storage: torch.device) -> dict[int, LayerStats]:
    """The layers whose statistics are in the disk cache, loaded onto ``storage``."""
    hits = {}
    for layer, key in keys.items():
        t0 = time.perf_counter()
        path = entry_path(root, key)
        hit = load_entry(path, key)
        if hit is not None:
            tensors, extra = hit
            hits[layer] = LayerStats(layer, key["site"], tensors["sum_kk"].to(storage), int(extra["count"]),
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


def _mirror_upper_(acc: torch.Tensor) -> torch.Tensor:
    """Make ``acc`` (d_k, d_k) the symmetric matrix whose upper triangle it holds, in place (one
    (d_k, d_k) temporary); the same values as ``triu(acc) + triu(acc, 1).T``."""
    acc.triu_()
    return acc.add_(acc.triu(1).T)


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
    *,
    acc_device: torch.device | None = None,
    storage: torch.device | None = None,
    shard: Shard | None = None,
) -> dict[int, LayerStats]:
    """One pass over the corpus for ``layers``: Σ k kᵀ of exactly ``count`` keys each, on ``storage`` (CPU).

    ``acc_device``: where the sums accumulate (None: each layer's key device). ``shard``: run only
    this rank's batches and all-reduce (every rank still reads every batch, to count keys)."""
    arch = get_arch(model)
    device = input_device(model)
    names = [arch.site("mlp_down", layer) for layer in layers]  # ascending: the last is the deepest
    d_k = key_dim(model, layers[0])
    sums: dict[int, torch.Tensor] = {}  # layer -> (d_k, d_k) upper block triangle, allocated at its first keys
    edges = _block_edges(d_k)
    seen = tokens_run = took = checksum = 0
    t0 = time.perf_counter()
    read_all = count == ALL_KEYS
    if read_all:
        count = sys.maxsize
    docs = shuffled(iter(source), seed)
    batches = padded_batches(token_chunks(tok, docs, seq_len), batch_size, tok.pad_token_id)
    quiet = not show_progress or (shard is not None and shard.rank != 0)
    bar = progress(total=None if read_all else count, desc=f"stats layers {layers}", unit="key", disable=True if quiet else None)
    was_training = model.training
    model.eval()
    try:
        for i, (ids, mask) in enumerate(batches):
            need = count - seen
            got = min(need, int(mask.sum()))  # keys this batch gives: its first `need` real tokens
            if shard is None or shard.owns(i):
                with Trace(model, names, retain_input=True, retain_output=False, stop=True) as tr:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                tokens_run += int(mask.sum())
                for layer, name in zip(layers, names):
                    keys = tr.inputs[name]  # (B, T, d_k) on the device of this layer's module
                    keep = mask.to(keys.device).reshape(-1).bool()  # (B*T,)
                    acc = sums.get(layer)
                    if acc is None:
                        acc = sums[layer] = torch.zeros(d_k, d_k, dtype=acc_dtype,
                                                            device=acc_device if acc_device is not None else keys.device)
                    k = keys.reshape(-1, d_k)[keep][:need].to(device=acc.device, dtype=acc_dtype)  # (n, d_k)
                    _add_upper_kTk(acc, k, edges)  # Σ k kᵀ += Kᵀ K, upper block triangle
                took += got
            if shard is not None:
                checksum = dist_stats.stream_checksum(checksum, ids, mask)
            seen += got
            bar.update(got)
            if seen >= count:
                break
    finally:
        bar.close()
        model.train(was_training)
    if shard is not None:
        tokens_run = _reduce_share(model, shard, sums, layers, names, d_k, acc_dtype, acc_device, seen, took,
                                   checksum, tokens_run)
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
        acc = sums.pop(layer)  # freed layer by layer: one accumulator fewer before the next is finished
        s = _mirror_upper_(acc).to(device=storage or torch.device("cpu"), dtype=torch.float64)  # (d_k, d_k), symmetric
        del acc
        if not torch.isfinite(s).all():
            raise StatisticsError(f"statistics of {name} contain NaN or inf: the model produced non-finite keys")
        out[layer] = LayerStats(layer, name, s, seen, seconds, False)
    return out


def _reduce_share(model: nn.Module, shard: Shard, sums: dict[int, torch.Tensor], layers: list[int], names: list[str],
                  d_k: int, acc_dtype: torch.dtype, acc_device: torch.device | None, seen: int, took: int,
                  checksum: int, tokens_run: int) -> int:
    """All-reduce this rank's share: check that every rank read the same stream and that the shares add up
    to ``seen``, then Σ k kᵀ in place (float64 on every rank). Returns the tokens run by all ranks."""
    if not shard.agree([seen, checksum]):
        raise CorpusError("the ranks read different token streams (corpus, tokenizer, seq_len or seed differ): "
                          "every rank must read the same corpus")
    shares = shard.all_reduce_(torch.tensor([took, tokens_run], dtype=torch.int64, device=shard.comm_device))
    if int(shares[0]) != seen:
        raise StatisticsError(f"the ranks summed {int(shares[0])} keys between them, not {seen}")
    for layer, name in zip(layers, names):
        if layer not in sums:  # no batch of this rank: its share is zero
            dev = acc_device if acc_device is not None else execution_device(get_module(model, name))
            sums[layer] = torch.zeros(d_k, d_k, dtype=acc_dtype, device=dev)
        shard.all_reduce_(sums[layer])
    return int(shares[1])
