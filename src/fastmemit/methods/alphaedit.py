"""AlphaEdit: project the update onto the null space of the preserved keys.

P = U0 U0ᵀ, U0 the eigenvectors of E[k kᵀ] (un-weighted) with eigenvalue below
``nullspace_threshold``. Δ = R K_Eᵀ P (K_p K_pᵀ P + K_E K_Eᵀ P + α I)⁻¹, where K_p are the keys of
earlier batches of a sequential run (kept per layer) and α = ``L2``. Because Δ = X P-like terms,
Δ K0 ≈ 0 for preserved keys. The d_k×d_k system changes with every batch (K_p grows), so it is
solved directly in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastmemit.errors import EditError
from fastmemit.methods.base import EditMethod, LayerState, register_method
from fastmemit.methods.hparams import EditHparams, _help

F64 = torch.float64


@dataclass
class AlphaEditHparams(EditHparams):
    nullspace_threshold: float = _help("eigenvalues of E[k kᵀ] below this span the null space", 2e-2)
    L2: float = _help("α: ridge added to the projected system", 10.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_threshold <= 0 or self.L2 < 0:
            raise EditError("hparams.nullspace_threshold must be positive and L2 non-negative")


def null_space_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U0 U0ᵀ over eigenvectors of E[k kᵀ] with eigenvalue < threshold: (d_k, d_k) float64."""
    evals, evecs = torch.linalg.eigh(mom2.to(F64))  # (d_k,), (d_k, d_k)
    U0 = evecs[:, evals < threshold]  # (d_k, r)
    return U0 @ U0.T


class AlphaEdit(EditMethod):
    name = "AlphaEdit"
    hparams_cls = AlphaEditHparams
    needs_factor = False
    carried_state = frozenset({"Kp"})  # keys of earlier batches; "P" is derived from the statistics

    def factor_key(self, hp: EditHparams) -> dict[str, Any]:
        assert isinstance(hp, AlphaEditHparams)
        return {"threshold": hp.nullspace_threshold}

    def _projector(self, hp: AlphaEditHparams, state: LayerState) -> torch.Tensor:
        if "P" not in state.extra:
            state.extra["P"] = null_space_projector(state.mom2, hp.nullspace_threshold)
            if float(torch.trace(state.extra["P"])) < 0.5:
                raise EditError(
                    f"AlphaEdit: no eigenvalue of layer {state.layer}'s E[k kᵀ] is below nullspace_threshold="
                    f"{hp.nullspace_threshold}: the null space is empty; raise the threshold"
                )
        return state.extra["P"]

    def layer_delta(self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor,
                    W: torch.Tensor | None = None) -> torch.Tensor:
        assert isinstance(hp, AlphaEditHparams)
        P = self._projector(hp, state)  # (d_k, d_k)
        K, R = K.to(F64), R.to(F64)
        d_k = K.shape[0]
        M = K @ K.T  # (d_k, d_k)
        if "Kp" in state.extra:
            Kp = state.extra["Kp"]  # (d_k, n_prev)
            M = M + Kp @ Kp.T
        A = M @ P + hp.L2 * torch.eye(d_k, dtype=F64, device=K.device)  # (d_k, d_k)
        # Δ A = R Kᵀ P  ⇔  Aᵀ Δᵀ = P K Rᵀ  (P symmetric)
        delta_t = torch.linalg.solve(A.T, P @ K @ R.T)  # (d_k, d)
        return delta_t.T  # (d, d_k)

    def commit(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> None:
        prev = state.extra.get("Kp")
        K = K.to(F64)
        state.extra["Kp"] = K if prev is None else torch.cat([prev, K], dim=1)  # (d_k, n_prev + B)


register_method(AlphaEdit())
