"""MEMIT: batched least squares, min λ‖ŴK0 − WK0‖² + ‖ŴK_E − V_E‖², spread over several layers.

Δ = R Kᵀ (λC0 + K Kᵀ)⁻¹, computed as R (I + Kᵀ C⁻¹ K)⁻¹ (C⁻¹K)ᵀ through C's Cholesky factor
(Woodbury): O(d_k²·B) per batch instead of O(d_k³).
"""

from __future__ import annotations

import torch

from fastmemit.methods.base import LayerState, RidgeSystemMethod, register_method
from fastmemit.methods.hparams import EditHparams


class MEMIT(RidgeSystemMethod):
    name = "MEMIT"
    hparams_cls = EditHparams

    def ridge(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> float:
        return 1.0  # R (I + Kᵀ C⁻¹ K)⁻¹ (C⁻¹K)ᵀ = R Kᵀ (C + K Kᵀ)⁻¹


register_method(MEMIT())
