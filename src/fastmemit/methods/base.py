"""The method interface and registry.

A method turns, for one layer, the preserved-key statistics and a batch's keys K (d_k, B) and
residuals R (d, B) into a delta Δ (d, d_k) in math orientation (W k = v). Everything around it
(k*, v*, spreading over layers, applying, undo) is shared code in :mod:`fastmemit.editing`, so the
CLI and evaluation never branch on method names: they look methods up here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fastmemit.errors import EditError
from fastmemit.linalg import FactoredCov
from fastmemit.methods.hparams import EditHparams


@dataclass
class LayerState:
    """What a method keeps for one layer across batches (statistics, factors, earlier keys)."""

    layer: int
    mom2: torch.Tensor  # (d_k, d_k) float64, E[k kᵀ]
    factor: FactoredCov | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    w0: torch.Tensor | None = None  # (d, d_k) weight before the Editor's first edit, math orientation, weight dtype


class EditMethod:
    name: ClassVar[str]
    hparams_cls: ClassVar[type[EditHparams]] = EditHparams
    single_layer: ClassVar[bool] = False  # ROME edits exactly one layer
    needs_factor: ClassVar[bool] = True  # whether layer_delta uses a Cholesky factor of C
    # LayerState.extra entries that carry memory across batches (saved in checkpoints, kept when the
    # statistics are recomputed); other extra entries are derived from the statistics and rebuilt
    carried_state: ClassVar[frozenset[str]] = frozenset()

    def validate(self, hp: EditHparams, n_requests: int) -> None:
        if self.single_layer and len(hp.layers) != 1:
            raise EditError(f"{self.name} edits exactly one layer; hparams.layers = {hp.layers}")

    def preserved_matrix(self, hp: EditHparams, mom2: torch.Tensor) -> torch.Tensor:
        """C = λ·E[k kᵀ] + ε·I (E[k kᵀ] → I when mom2_adjustment is off), float64 (d_k, d_k)."""
        eye = torch.eye(mom2.shape[0], dtype=torch.float64, device=mom2.device)
        if not hp.mom2_adjustment or hp.identity_cov:
            C = hp.mom2_update_weight * eye if self.name != "ROME" else eye
        else:
            C = hp.mom2_update_weight * mom2.to(torch.float64)
        return C + hp.update_norm_lambda * eye if hp.update_norm_lambda else C

    def factor_key(self, hp: EditHparams) -> dict[str, Any]:
        """The hparams the factor of C depends on (part of its cache key)."""
        return {"adjust": hp.mom2_adjustment and not hp.identity_cov, "lambda": hp.mom2_update_weight,
                "eps": hp.update_norm_lambda}

    def layer_delta(self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor,
                    W: torch.Tensor | None = None) -> torch.Tensor:
        """Δ (d, d_k) from keys K (d_k, B), residuals R (d, B) and the current weight W (d, d_k) float64."""
        raise NotImplementedError

    def commit(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> None:
        """Called after a batch's delta is applied (sequential memory; nothing by default)."""


METHODS: dict[str, EditMethod] = {}


def register_method(method: EditMethod) -> EditMethod:
    METHODS[method.name.upper()] = method
    return method


def get_method(name: str) -> EditMethod:
    from fastmemit import methods as _m  # noqa: F401  (registers the built-in methods)

    key = str(name).upper()
    if key not in METHODS:
        raise EditError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[key]
