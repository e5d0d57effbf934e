"""EMMET: equality-constrained batched editing, min λ‖ŴK0 − WK0‖² s.t. ŴK_E = V_E.

Δ = R (Kᵀ C⁻¹ K + emmet_lambda·I)⁻¹ Kᵀ C⁻¹ with C = λC0 + update_norm_lambda·I. emmet_lambda
regularizes the B×B system (0 gives exact memorization); update_norm_lambda is FastMEMIT's ε·I
that keeps C well conditioned when it comes from few keys.
"""

from __future__ import annotations

import torch

from fastmemit.errors import EditError
from fastmemit.linalg import ridge_system_delta
from fastmemit.methods.base import EditMethod, LayerState, register_method
from fastmemit.methods.hparams import EditHparams

EMMETHparams = EditHparams  # EMMET's fields (emmet_lambda, update_norm_lambda) are shared ones


class EMMET(EditMethod):
    name = "EMMET"
    hparams_cls = EditHparams

    def layer_delta(self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor,
                    W: torch.Tensor | None = None) -> torch.Tensor:
        assert state.factor is not None
        if K.shape[1] > state.factor.dim:
            raise EditError(
                f"EMMET cannot satisfy {K.shape[1]} equality constraints with d_k = {state.factor.dim}: "
                "the batch must not exceed the key dimension"
            )
        return ridge_system_delta(R, K, state.factor, mu=hp.emmet_lambda)  # (d, d_k)


register_method(EMMET())
