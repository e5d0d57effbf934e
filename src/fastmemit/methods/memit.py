"""MEMIT: batched least squares, min λ‖ŴK0 − WK0‖² + ‖ŴK_E − V_E‖², spread over several layers.

Δ = R Kᵀ (λC0 + K Kᵀ)⁻¹, computed as R (I + Kᵀ C⁻¹ K)⁻¹ (C⁻¹K)ᵀ through C's Cholesky factor
(Woodbury): O(d_k²·B) per batch instead of O(d_k³).
"""

from __future__ import annotations

import torch

from fastmemit.linalg import ridge_system_delta
from fastmemit.methods.base import EditMethod, LayerState, register_method
from fastmemit.methods.hparams import EditHparams


class MEMIT(EditMethod):
    name = "MEMIT"
    hparams_cls = EditHparams

    def layer_delta(self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor,
                    W: torch.Tensor | None = None) -> torch.Tensor:
        assert state.factor is not None
        return ridge_system_delta(R, K, state.factor, mu=1.0)  # (d, d_k)


register_method(MEMIT())
