"""EMMET: equality-constrained batched editing, min λ‖ŴK0 − WK0‖² s.t. ŴK_E = V_E.

Δ = R (Kᵀ C⁻¹ K + emmet_lambda·I)⁻¹ Kᵀ C⁻¹ with C = λC0 + update_norm_lambda·I. emmet_lambda
regularizes the B×B system (0 gives exact memorization); update_norm_lambda is FastMEMIT's ε·I
that keeps C well conditioned when it comes from few keys. The seed adds the ridge only for B > 1
(``emmet_ridge_one_edit`` false, the default of research-code files): one request is then exactly
ROME's rank-one closed form.
"""

from __future__ import annotations

import torch

from fastmemit.errors import EditError
from fastmemit.methods.base import LayerState, RidgeSystemMethod, register_method
from fastmemit.methods.hparams import EditHparams

EMMETHparams = EditHparams  # EMMET's fields (emmet_lambda, update_norm_lambda) are shared ones


class EMMET(RidgeSystemMethod):
    name = "EMMET"
    hparams_cls = EditHparams

    def ridge(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> float:
        assert state.factor is not None
        if K.shape[1] > state.factor.dim:
            raise EditError(
                f"EMMET cannot satisfy {K.shape[1]} equality constraints with d_k = {state.factor.dim}: "
                "the batch must not exceed the key dimension"
            )
        return hp.emmet_lambda if K.shape[1] > 1 or hp.emmet_ridge_one_edit else 0.0


register_method(EMMET())
