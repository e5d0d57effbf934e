"""ROME: rank-one equality-constrained edit of one fact at one layer.

Δ = (v* − W k*) (C0⁻¹ k*)ᵀ / (k*ᵀ C0⁻¹ k*): EMMET with B = 1 and no ridge (λ cancels). Batches
of several requests are applied one request after another (each a rank-one update on the model
as left by the previous one), as the ROME paper does for multiple edits. v* is optimized at the
edited matrix's output (the MLP output), its clamp and weight decay relative to that output's norm,
as in the research code's ``compute_v`` (``v_site = "block"`` gives the block-output reference
fastmemit used before; the δ is the same perturbation there, only the regularizers' scale differs). With the statistics off
(mom2_adjustment false) ROME's C is I (+ ε·I), not λI as for the batched methods: any multiple of I
gives the same Δ in exact arithmetic, and I keeps fastmemit's earlier numbers bit for bit.
"""

from __future__ import annotations

import torch

from fastmemit.methods.base import LayerState, RidgeSystemMethod, register_method
from fastmemit.methods.hparams import EditHparams


class ROME(RidgeSystemMethod):
    name = "ROME"
    hparams_cls = EditHparams
    single_layer = True
    one_request_at_a_time = True
    weighted_identity = False
    value_site = "matrix"

    def ridge(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> float:
        return 0.0  # rank one for B = 1


register_method(ROME())
