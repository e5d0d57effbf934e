"""AlphaEdit: project the update onto the null space of the preserved keys.

P = U0 U0ᵀ, U0 the eigenvectors of E[k kᵀ] (un-weighted) with eigenvalue below
``nullspace_threshold``. Δ = R K_Eᵀ P (K_p K_pᵀ P + K_E K_Eᵀ P + α I)⁻¹, where K_p are the keys of
earlier batches of a sequential run (kept per layer) and α = ``L2``. Because Δ = X P-like terms,
Δ K0 ≈ 0 for preserved keys. The d_k×d_k system changes with every batch (K_p grows), so it is
solved directly in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # "Kp": keys of earlier batches (checkpointed, kept across recomputed statistics); "P": the projector,
    # derived from the statistics, built on first use and rebuilt when they are recomputed
    carried_state = frozenset({"Kp"})

    def needs_mom2(self, hp: EditHparams) -> bool:
        return True  # the projector comes from E[k kᵀ] whatever mom2_adjustment says

    def _projector(self, hp: AlphaEditHparams, state: LayerState, device: torch.device) -> torch.Tensor:
        """P on ``device`` (the solve's). Built there on first use (the O(d_k³) eigh) and stored beside
        E[k kᵀ] (its storage device, e.g. the CPU), so an accelerator holds one layer's P at a time."""
        assert state.mom2 is not None
        if "P" not in state.extra:
            P = null_space_projector(state.mom2.to(device), hp.nullspace_threshold)  # (d_k, d_k)
            if float(torch.trace(P)) < 0.5:
                raise EditError(
                    f"AlphaEdit: no eigenvalue of layer {state.layer}'s E[k kᵀ] is below nullspace_threshold="
                    f"{hp.nullspace_threshold}: the null space is empty; raise the threshold"
                )
            state.extra["P"] = P.to(state.mom2.device)
            return P
        return state.extra["P"].to(device)

    def layer_delta(
        self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor, W: torch.Tensor
    ) -> torch.Tensor:
        assert isinstance(hp, AlphaEditHparams)
        P = self._projector(hp, state, K.device)  # (d_k, d_k)
        K, R = K.to(F64), R.to(F64)
        M = K @ K.T  # (d_k, d_k)
        if "Kp" in state.extra:
            Kp = state.extra["Kp"].to(K.device)  # (d_k, n_prev), stored beside E[k kᵀ]
            M = M + Kp @ Kp.T
        A = M @ P  # (d_k, d_k)
        del M  # at most P, M and A (then P, A and the solve's copy of A) on the solve device
        A.diagonal().add_(hp.L2)  # A = M P + α I, in place
        # Δ A = R Kᵀ P  ⇔  Aᵀ Δᵀ = P K Rᵀ  (P symmetric)
        delta_t = torch.linalg.solve(A.T, P @ K @ R.T)  # (d_k, d)
        return delta_t.T  # (d, d_k)

    def commit(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> None:
        prev = state.extra.get("Kp")
        K = K.to(dtype=F64, device=prev.device if prev is not None else _storage(state, K))  # (d_k, B)
        state.extra["Kp"] = K if prev is None else torch.cat([prev, K], dim=1)  # (d_k, n_prev + B)


def _storage(state: LayerState, K: torch.Tensor) -> torch.device:
    """Where a layer's AlphaEdit memory is kept: beside its E[k kᵀ] (else beside K)."""
    return state.mom2.device if state.mom2 is not None else K.device


register_method(AlphaEdit())
