"""Per-batch diagnostics of an edit: how far the edited matrices have moved, the objective's two terms
after the batch, and how far the batch's keys lie outside the preserved statistics.

The quantities Gupta, Rao & Anumanchipalli ("Model Editing at Scale leads to Gradual and Catastrophic
Forgetting", arXiv 2401.07453) track over a sequential run, as the seed code
(scalable-model-editing/efficient-model-editing, ``calculate_distances`` in ``emmet_main.py`` /
``memit_main.py``, enabled by ``calculate_objective_value``) computes them, plus the norm diagnostics of
``../shared/SPEC.md`` §9. Per edited layer, after the batch (W0 = the weight when the Editor was created,
``LayerState.w0``; W_b = the weight before this batch; W = after it; Δ = W − W_b; C0 = E[k kᵀ]; z* the
batch's targets at the last edited layer; K, R the batch's keys and residual shares at this layer):

- ``delta_norm`` ‖Δ‖_F, ``original_weights_norm`` ‖W_b‖_F, ``new_weights_norm`` ‖W‖_F (the seed's names);
- ``w0_norm`` ‖W0‖_F, ``distance_w0`` ‖W − W0‖_F, ``relative_distance_w0`` ‖W − W0‖_F / ‖W0‖_F;
- ``preservation_rms`` = sqrt(tr(Δ C0 Δᵀ)) = sqrt(E‖Δ k‖²) over the preserved keys: the root mean square of
  the change of the layer's output on them (the seed's ``preservation_distance`` is the plain mean of ‖Δ k‖
  over the keys it sampled for C0; it keeps them, fastmemit keeps only Σ k kᵀ, and the RMS is what the
  preservation term λ‖Δ K0‖² measures); ``preservation_rms_w0`` the same for W − W0 (cumulative);
- ``new_edit_distance`` / ``old_edit_distance``: mean over the batch of ‖W k − z*‖ after / before the
  layer's update, exactly as the seed (it compares the layer's MLP output with the target hidden state z*
  at the last edited layer, so these are large and only their change is meaningful);
- ``unmet_fraction`` ‖Δ K − R‖_F / ‖R‖_F: the share of this layer's residual target the update leaves
  unmet (0 for an exact equality-constrained solve; fastmemit's own memorization measure);
- ``max_kCk`` max over the batch's keys of kᵀ C⁻¹ k, C the method's preserved matrix (its Cholesky
  factor ``state.factor``); a method without a factor (AlphaEdit) gets C = λ C0 + ε I built from its
  statistics as the base method defines it (``EditMethod.preserved_matrix``), factored once per
  statistics. ENCORE's C is its fixed λC0 + (ε + λ_n) I; the earlier batches' Σ K_p K_pᵀ it adds per batch
  is not included.

Cost per layer and batch: O(d·d_k·B) for the key terms, O(d·d_k²) for the two preservation terms
(two (d × d_k)·(d_k × d_k) float64 products), nothing for the distances. Float64 throughout: W − W0
of float32 weights is exact there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fastmemit.linalg import FactoredCov
from fastmemit.methods import LayerState
from fastmemit.models.arch import as_math

F64 = torch.float64

LAYER_KEYS = ("delta_norm", "original_weights_norm", "new_weights_norm", "w0_norm", "distance_w0",
              "relative_distance_w0", "preservation_rms", "preservation_rms_w0", "new_edit_distance",
              "old_edit_distance", "unmet_fraction", "max_kCk")


class KeyFactors:
    """The factor of C for kᵀC⁻¹k of each layer: ``state.factor`` when the method has one, else one built
    from the layer's statistics by ``build(mom2) -> C`` and kept while those statistics are the same."""

    def __init__(self, build: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.build = build
        self._built: dict[int, tuple[torch.Tensor, FactoredCov]] = {}

    def __call__(self, state: LayerState) -> FactoredCov | None:
        if state.factor is not None:
            return state.factor
        if state.mom2 is None:
            return None
        hit = self._built.get(state.layer)
        if hit is None or hit[0] is not state.mom2:  # statistics recomputed: build again
            C = self.build(state.mom2)  # (d_k, d_k) float64
            hit = (state.mom2, FactoredCov(C, name=f"layer {state.layer} preserved matrix (diagnostics)"))
            self._built[state.layer] = hit
        return hit[1]


@dataclass
class _Keys:
    """The key terms of one layer, summed over the groups of a batch (ROME edits one request a group)."""

    new_dist: list[float] = field(default_factory=list)
    old_dist: list[float] = field(default_factory=list)
    unmet_sq: float = 0.0
    target_sq: float = 0.0
    max_kck: float | None = None


class BatchDiagnostics:
    """Accumulates one ``Editor.edit`` call's diagnostics: :meth:`observe` at each solve, :meth:`finish`
    once the batch is written. ``seconds``: the time spent here."""

    def __init__(self, factors: KeyFactors) -> None:
        self.factors = factors
        self.keys: dict[int, _Keys] = {}
        self.seconds = 0.0

    def observe(self, state: LayerState, K: torch.Tensor, R: torch.Tensor, W: torch.Tensor, delta: torch.Tensor,
                z: torch.Tensor) -> None:
        """One solve at ``state.layer``: keys K (d_k, B), residual shares R (d, B), weight W (d, d_k) before
        and Δ (d, d_k) of this solve (math orientation), targets z* (B, d)."""
        t0 = time.perf_counter()
        acc = self.keys.setdefault(state.layer, _Keys())
        with torch.no_grad():
            K64 = K.to(device=W.device, dtype=F64)  # (d_k, B)
            WK = W.to(F64) @ K64  # (d, B)
            DK = delta.to(device=W.device, dtype=F64) @ K64  # (d, B)
            Z = z.to(device=W.device, dtype=F64).T  # (d, B)
            acc.old_dist += torch.linalg.vector_norm(WK - Z, dim=0).tolist()
            acc.new_dist += torch.linalg.vector_norm(WK + DK - Z, dim=0).tolist()
            R64 = R.to(device=W.device, dtype=F64)  # (d, B)
            acc.unmet_sq += float(torch.sum((DK - R64) ** 2))
            acc.target_sq += float(torch.sum(R64 ** 2))
            F = self.factors(state)
            if F is not None:
                Kf = K64.to(F.L.device)  # (d_k, B)
                kck = float(torch.max(torch.sum(Kf * F.solve(Kf), dim=0)))  # max_b k_bᵀ C⁻¹ k_b
                acc.max_kck = kck if acc.max_kck is None else max(acc.max_kck, kck)
        self.seconds += time.perf_counter() - t0

    def finish(self, weights: Mapping[int, tuple[torch.Tensor, torch.Tensor]], states: Mapping[int, LayerState],
               fan_in_fan_out: bool) -> list[dict[str, Any]]:
        """Per layer (in order), the diagnostics of the batch: ``weights`` = {layer: (W_b, W)} in stored
        orientation (before the batch, now). A row's values are floats, None where a term has no data."""
        t0 = time.perf_counter()
        rows = []
        with torch.no_grad():
            for layer, (before, after) in weights.items():
                rows.append(self._layer(layer, as_math(before, fan_in_fan_out), as_math(after, fan_in_fan_out),
                                        states[layer]))
        self.seconds += time.perf_counter() - t0
        return rows

    def _layer(self, layer: int, before: torch.Tensor, after: torch.Tensor, state: LayerState) -> dict[str, Any]:
        W = after.to(F64)  # (d, d_k)
        D = W - before.to(device=W.device, dtype=F64)  # Δ of the batch: (d, d_k)
        w0 = state.w0 if state.w0 is not None else before
        W0 = w0.to(device=W.device, dtype=F64)  # (d, d_k)
        E = W - W0  # (d, d_k), exact
        w0_norm, dist = float(torch.linalg.matrix_norm(W0)), float(torch.linalg.matrix_norm(E))
        acc = self.keys.get(layer, _Keys())
        row: dict[str, Any] = {
            "layer": layer,
            "delta_norm": float(torch.linalg.matrix_norm(D)),
            "original_weights_norm": float(torch.linalg.matrix_norm(before.to(F64))),
            "new_weights_norm": float(torch.linalg.matrix_norm(W)),
            "w0_norm": w0_norm, "distance_w0": dist, "relative_distance_w0": dist / w0_norm if w0_norm else None,
            "preservation_rms": preservation_rms(D, state.mom2), "preservation_rms_w0": preservation_rms(E, state.mom2),
            "new_edit_distance": _mean(acc.new_dist), "old_edit_distance": _mean(acc.old_dist),
            "unmet_fraction": (acc.unmet_sq / acc.target_sq) ** 0.5 if acc.target_sq > 0 else None,
            "max_kCk": acc.max_kck,
        }
        return row


def preservation_rms(D: torch.Tensor, mom2: torch.Tensor | None) -> float | None:
    """sqrt(tr(D C0 Dᵀ)) = sqrt(E_k ‖D k‖²) for D (d, d_k) and C0 = E[k kᵀ] (d_k, d_k); None without C0."""
    if mom2 is None:
        return None
    C0 = mom2.to(F64)
    D = D.to(device=C0.device, dtype=F64)
    q = float(torch.sum((D @ C0) * D))  # tr(D C0 Dᵀ): (d, d_k) ⊙ (d, d_k) summed
    return max(q, 0.0) ** 0.5


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
