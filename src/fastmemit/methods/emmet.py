"""EMMET: equality-constrained batched editing, min λ‖ŴK0 − WK0‖² s.t. ŴK_E = V_E.

Δ = R (Kᵀ C⁻¹ K + emmet_lambda·I)⁻¹ Kᵀ C⁻¹ with C = λC0 + update_norm_lambda·I. emmet_lambda
regularizes the B×B system (0 gives exact memorization); update_norm_lambda is FastMEMIT's ε·I
that keeps C well conditioned when it comes from few keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastmemit.errors import EditError
from fastmemit.linalg import ridge_system_delta
from fastmemit.methods.base import EditMethod, LayerState, register_method
from fastmemit.methods.hparams import EditHparams, _help


@dataclass
class EMMETHparams(EditHparams):
    emmet_lambda: float = _help("ridge μ on the B×B system (0: exact equality constraints)", 0.1)
    update_norm_lambda: float = _help("ε added to λC0 as ε·I", 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.emmet_lambda < 0 or self.update_norm_lambda < 0:
            raise EditError("hparams.emmet_lambda and update_norm_lambda must be non-negative")


class EMMET(EditMethod):
    name = "EMMET"
    hparams_cls = EMMETHparams

    def preserved_matrix(self, hp: EditHparams, mom2: torch.Tensor) -> torch.Tensor:
        assert isinstance(hp, EMMETHparams)
        C = super().preserved_matrix(hp, mom2)  # (d_k, d_k)
        if hp.update_norm_lambda:
            C = C + hp.update_norm_lambda * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        return C

    def factor_key(self, hp: EditHparams) -> dict[str, Any]:
        assert isinstance(hp, EMMETHparams)
        return {**super().factor_key(hp), "eps": hp.update_norm_lambda}

    def validate(self, hp: EditHparams, n_requests: int) -> None:
        super().validate(hp, n_requests)

    def layer_delta(self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        assert isinstance(hp, EMMETHparams) and state.factor is not None
        if K.shape[1] > state.factor.dim:
            raise EditError(
                f"EMMET cannot satisfy {K.shape[1]} equality constraints with d_k = {state.factor.dim}: "
                "the batch must not exceed the key dimension"
            )
        return ridge_system_delta(R, K, state.factor, mu=hp.emmet_lambda)  # (d, d_k)


register_method(EMMET())
