"""The preserved-key statistics and Cholesky factors an edit needs, from one provider object.

The methods of the preservation–memorization family (SPEC §2) reach the preserved keys through
C = weight · M + ε·I, where M is E[k kᵀ] of the edited matrix's input over a corpus, or the
identity when the statistics are switched off (``mom2_adjustment`` false). :class:`PreservedMatrix`
names everything C depends on besides the statistics themselves; :class:`PreservedStats` computes
(or loads) the statistics of every requested layer in one corpus pass, checks them, and builds the
factor of C, cached on disk beside the statistics under a key that is complete: the statistics'
own key plus :meth:`PreservedMatrix.cache_key`. No corpus pass runs when nothing reads E[k kᵀ].
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmemit.errors import StatisticsError
from fastmemit.linalg import FactoredCov
from fastmemit.models.arch import key_dim
from fastmemit.models.loading import resolve_device
from fastmemit.stats.cache import entry_path, load_entry, save_entry, stats_dir
from fastmemit.stats.corpus import Corpus
from fastmemit.stats.engine import LayerStats, compute_layer_stats

F64 = torch.float64


@dataclass(frozen=True)
class PreservedMatrix:
    """C = weight · E[k kᵀ] + eps · I (``from_stats``) or C = weight · I + eps · I, float64 (d_k, d_k)."""

    from_stats: bool  # M = E[k kᵀ] of the statistics; False: M = I (no statistics needed)
    weight: float  # λ (mom2_update_weight); 1.0 where a method's formula is invariant to it (ROME)
    eps: float = 0.0  # ε (update_norm_lambda), FastMEMIT's ridge for statistics from few keys

    def build(self, mom2: torch.Tensor | None, d_k: int, device: torch.device | str | None = None) -> torch.Tensor:
        """C from E[k kᵀ] (d_k, d_k) float64 (on its device), or from nothing when ``from_stats`` is
        false (on ``device``, the CPU by default: where the statistics would live)."""
        if self.from_stats:
            if mom2 is None:
                raise StatisticsError("this preserved matrix needs E[k kᵀ] but no statistics were given")
            eye = torch.eye(mom2.shape[0], dtype=F64, device=mom2.device)  # (d_k, d_k)
            C = self.weight * mom2.to(F64)  # (d_k, d_k)
        else:
            eye = torch.eye(d_k, dtype=F64, device=device)  # (d_k, d_k)
            C = self.weight * eye
        return C + self.eps * eye if self.eps else C

    def cache_key(self) -> dict[str, Any]:
        """The part of the factor's cache key beyond the statistics' key (format of fastmemit 0.1)."""
        return {"adjust": self.from_stats, "lambda": self.weight, "eps": self.eps}


@dataclass
class LayerPreserved:
    """What :meth:`PreservedStats.layers` hands out for one layer."""

    layer: int
    mom2: torch.Tensor | None  # (d_k, d_k) float64 E[k kᵀ]; None when it was not asked for
    factor: FactoredCov | None  # Cholesky factor of C; None when no matrix was asked for
    stats: LayerStats | None = None  # count, cache hit, timing (None without a statistics pass)


class PreservedStats:
    """Statistics and factors of a model's edited layers: one corpus pass, finiteness checked, cached.

    What the pass reads comes from the edit's hparams ``hp``: the count (``dynamic_multiplier`` × d_k when
    ``hp.dynamic``, else ``mom2_n_samples``; ``ALL_KEYS`` for the whole corpus, as in
    :func:`compute_layer_stats`), the corpus (``hp.stats_corpus`` unless ``corpus``), the batch size and
    the sequence length. ``seconds`` accumulates the time spent in statistics and factors.

    Devices: ``stats_device`` is where the statistics accumulate and where they and the factors are
    kept (:attr:`storage_device`; None: accumulated on each layer's own device, kept on the CPU);
    ``compute_device`` is where a factor is computed before it is stored (default: the storage
    device), e.g. a GPU for the O(d_k³) Cholesky of statistics kept on the CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        tok: Any,
        hp: Any,
        *,
        corpus: str | Path | Corpus | None = None,
        seed: int | None = 0,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        show_progress: bool = True,
        stats_device: str | torch.device | None = None,
        compute_device: str | torch.device | None = None,
    ) -> None:
        self.model, self.tok = model, tok
        self.corpus = corpus if corpus is not None else hp.stats_corpus
        self.count = {"dynamic_multiplier": hp.dynamic_multiplier} if hp.dynamic else {"n_keys": hp.mom2_n_samples}
        self.batch_size, self.seq_len, self.seed = hp.stats_batch_size, hp.stats_seq_len, seed
        self.cache_dir, self.use_cache, self.show_progress = cache_dir, use_cache, show_progress
        self.stats_device = None if stats_device is None else resolve_device(stats_device)
        self.storage_device = self.stats_device if self.stats_device is not None else torch.device("cpu")
        self.compute_device = self.storage_device if compute_device is None else resolve_device(compute_device)
        self.seconds = 0.0

    def layers(
        self, layers: Sequence[int], *, mom2: bool, matrix: PreservedMatrix | None, recompute: bool = False
    ) -> dict[int, LayerPreserved]:
        """E[k kᵀ] (when ``mom2`` or the matrix needs it) and the factor of ``matrix`` for each layer.

        ``recompute``: statistics of the model as it is now, neither read from nor written to the
        disk cache (statistics of an edited model are not worth keeping), and factors uncached too.
        """
        t0 = time.perf_counter()
        need_stats = mom2 or (matrix is not None and matrix.from_stats)
        stats = self.statistics(layers, cache=self.use_cache and not recompute) if need_stats else {}
        out = {}
        for layer in layers:
            st = stats.get(layer)
            mom2 = st.mom2 if st is not None else None  # (d_k, d_k) float64 on the storage device, computed once
            factor = None if matrix is None else self._factor(matrix, st, mom2, layer,
                                                             cached=self.use_cache and not recompute)
            out[layer] = LayerPreserved(layer, mom2, factor, st)
        self.seconds += time.perf_counter() - t0
        return out

    def statistics(self, layers: Sequence[int], *, cache: bool) -> dict[int, LayerStats]:
        """E[k kᵀ] of every layer in one pass (or from the disk cache), refused when not finite."""
        stats = compute_layer_stats(
            self.model, self.tok, list(layers), self.corpus, batch_size=self.batch_size, seq_len=self.seq_len,
            seed=self.seed, cache=cache, cache_dir=self.cache_dir, show_progress=self.show_progress,
            stats_device=self.stats_device, **self.count,
        )
        bad = [layer for layer, st in stats.items() if not torch.isfinite(st.sum_kk).all()]
        if bad:  # checked for every method: AlphaEdit's eigh reads one triangle and would miss a NaN
            raise StatisticsError(f"layer {', '.join(map(str, bad))} statistics contain NaN or inf")
        return stats

    def _factor(self, matrix: PreservedMatrix, st: LayerStats | None, mom2: torch.Tensor | None, layer: int, *,
                cached: bool) -> FactoredCov:
        """Cholesky factor of C, from the disk cache when the statistics came from it (or were saved to it).

        Only C built from cached statistics is cached: its key is the statistics' key plus the
        matrix's. C without statistics is never cached (nothing in its key would name the model).
        """
        name = f"layer {layer} statistics"
        C = matrix.build(mom2, key_dim(self.model, layer), self.storage_device)  # (d_k, d_k) float64
        if not (cached and matrix.from_stats and st is not None and st.key):
            return self._factored(C, name)
        key = {**st.key, "factor": matrix.cache_key()}
        path = entry_path(stats_dir(self.cache_dir), key, kind="chol")
        hit = load_entry(path, key)
        if hit is not None:
            return FactoredCov(C, name=name, factor=hit[0]["L"])
        F = self._factored(C, name)
        save_entry(path, {"L": F.L}, key)
        return F

    def _factored(self, C: torch.Tensor, name: str) -> FactoredCov:
        """The factor of C (d_k, d_k), computed on the compute device and kept beside C on the storage device."""
        if self.compute_device == C.device:
            return FactoredCov(C, name=name)
        L = FactoredCov(C.to(self.compute_device), name=name).L  # (d_k, d_k) lower, on the compute device
        return FactoredCov(C, name=name, factor=L)  # L moved to C's device
