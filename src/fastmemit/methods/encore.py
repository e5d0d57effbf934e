"""ENCORE's norm-constrained editing (Gupta et al. 2025, arXiv 2502.01636): MEMIT plus λ_n‖Ŵ − W_a‖².

min_Δ λ‖Δ K0‖² + ‖(W+Δ) K_E − V_E‖² + λ_n‖W + Δ − W_a‖² [+ ‖Δ K_p‖² over earlier batches' keys], so
Δ = (R Kᵀ + λ_n (W_a − W)) (C + K Kᵀ)⁻¹ with C = λC0 (+ε I) + λ_n I [+ Σ K_p K_pᵀ], solved through C's
Cholesky factor (linalg.norm_constrained_delta). The anchor W_a is the weight before the batch in the
released code (the pull term vanishes, λ_n I only regularizes C) or, as an option, the unedited W0.
MPES, ENCORE's other half, is a v* stopping rule and lives with v*. Equations and defaults with their
sources: docs/lifelong.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastmemit.errors import EditError
from fastmemit.linalg import FactoredCov, norm_constrained_delta
from fastmemit.methods.base import EditMethod, LayerState, register_method
from fastmemit.methods.hparams import EditHparams, _help
from fastmemit.stats.provider import PreservedMatrix

F64 = torch.float64
ANCHORS = ("previous", "original")


@dataclass
class ENCOREHparams(EditHparams):
    norm_constraint: float = _help("λ_n: weight of the Frobenius-norm penalty λ_n‖Ŵ − W_a‖² (0: MEMIT)", 10.0)
    norm_anchor: str = _help(
        "W_a: 'previous' = the weight before the batch (ENCORE's released code; penalizes ‖Δ‖), "
        "'original' = the unedited weight W0 (pulls every batch back towards it)", "previous")
    add_prev_edits: bool = _help(
        "also keep the outputs on all earlier batches' keys, Σ K_p K_pᵀ added to C (ENCORE's code; costs a "
        "d_k×d_k state and one O(d_k³) Cholesky a layer a batch)", True)
    equality_constraint: bool = _help(
        "EMMET form: memorize the batch exactly up to the ridge emmet_lambda instead of MEMIT's least squares", False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.norm_constraint >= 0:
            raise EditError(f"hparams.norm_constraint must be non-negative, got {self.norm_constraint}")
        if self.norm_anchor not in ANCHORS:
            raise EditError(f"hparams.norm_anchor must be one of {', '.join(ANCHORS)}, got {self.norm_anchor!r}")


class ENCORE(EditMethod):
    name = "ENCORE"
    hparams_cls = ENCOREHparams
    carried_state = frozenset({"KKp"})  # Σ K_p K_pᵀ of earlier batches (add_prev_edits)

    def preserved(self, hp: EditHparams) -> PreservedMatrix:
        """C = λ·E[k kᵀ] + (ε + λ_n)·I: fixed for the layer, factored once (λ_n I is the penalty's share)."""
        assert isinstance(hp, ENCOREHparams)
        base = super().preserved(hp)
        return replace(base, eps=base.eps + hp.norm_constraint)

    def layer_delta(self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor,
                    W: torch.Tensor) -> torch.Tensor:
        assert isinstance(hp, ENCOREHparams) and state.factor is not None
        F = state.factor
        if hp.add_prev_edits and "KKp" in state.extra:  # C + Σ K_p K_pᵀ changes every batch: factor it anew
            F = FactoredCov(F.C + state.extra["KKp"], name=f"layer {state.layer} statistics + earlier edits' keys")
        if hp.equality_constraint and K.shape[1] > F.dim:
            raise EditError(f"ENCORE (equality form) cannot satisfy {K.shape[1]} constraints with d_k = {F.dim}")
        mu = hp.emmet_lambda if hp.equality_constraint else 1.0
        return norm_constrained_delta(R, K, F, mu, self._pull(hp, state, W))  # (d, d_k)

    def _pull(self, hp: ENCOREHparams, state: LayerState, W: torch.Tensor | None) -> torch.Tensor | None:
        """P = λ_n (W0 − W), (d, d_k) float64, for the 'original' anchor; None when it vanishes."""
        if hp.norm_anchor == "previous" or not hp.norm_constraint:
            return None
        if W is None or state.w0 is None:
            raise EditError(f"ENCORE with norm_anchor='original' needs the current and the unedited weight of layer "
                            f"{state.layer}")
        W0 = state.w0.to(device=W.device, dtype=F64)  # (d, d_k)
        return hp.norm_constraint * (W0 - W.to(F64))  # (d, d_k)

    def commit(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> None:
        assert isinstance(hp, ENCOREHparams)
        if not hp.add_prev_edits:
            return
        K = K.to(F64)
        kk = K @ K.T  # (d_k, d_k)
        prev = state.extra.get("KKp")
        state.extra["KKp"] = kk if prev is None else prev + kk


register_method(ENCORE())
