"""The method interface and registry.

A method turns, for one layer, the preserved-key statistics and a batch's keys K (d_k, B) and
residuals R (d, B) into a delta Δ (d, d_k) in math orientation (W k = v). Everything around it
(k*, v*, spreading over layers, applying, undo) is shared code in :mod:`fastmemit.editing`, so the
CLI and evaluation never branch on method names: they look methods up here, and what differs
between methods is declared on the method (the ClassVars and hooks of :class:`EditMethod`).

A method object is stateless (one instance serves every Editor); what it keeps for a layer across
batches lives in that layer's :class:`LayerState`, read and written only by the method's hooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fastmemit.errors import EditError
from fastmemit.linalg import FactoredCov, ridge_system_delta
from fastmemit.methods.hparams import EditHparams
from fastmemit.requests import EditRequest
from fastmemit.stats.provider import PreservedMatrix


@dataclass
class LayerState:
    """What the Editor keeps for one edited layer across batches.

    ``mom2`` and ``factor`` come from the statistics provider (replaced when statistics are
    recomputed); ``extra`` is the method's own memory (see :meth:`EditMethod.state_dict`);
    ``w0`` is the weight the layer had when the Editor was created, before its first edit.
    Methods replace ``extra`` entries, never change their tensors in place: the Editor rolls a
    failed batch back by keeping the dict it had before.
    """

    layer: int
    mom2: torch.Tensor | None  # (d_k, d_k) float64 E[k kᵀ]; None when the method does not read it
    factor: FactoredCov | None = None  # Cholesky factor of the method's C (needs_factor)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    w0: torch.Tensor | None = None  # (d, d_k) math orientation, the weight's dtype and device


@dataclass
class FitResult:
    """What a method that fits its weights itself (:attr:`EditMethod.fits_weights`) returns for a batch."""

    deltas: dict[int, torch.Tensor]  # layer -> Δ = W_fitted − W_before, the weight's stored orientation, float64
    info: dict[str, Any] = field(default_factory=dict)  # per-batch diagnostics, kept in EditResult.info


class EditMethod:
    """Base class of the methods: override :meth:`layer_delta` (or, with ``fits_weights``, :meth:`fit_deltas`),
    declare the rest."""

    name: ClassVar[str]
    hparams_cls: ClassVar[type[EditHparams]] = EditHparams
    single_layer: ClassVar[bool] = False  # edits exactly one layer (ROME)
    # the requests of a batch are edited one after another, each on the model the previous one left
    # (v* and the solve per request), instead of all together (ROME)
    one_request_at_a_time: ClassVar[bool] = False
    needs_factor: ClassVar[bool] = True  # layer_delta reads state.factor, the Cholesky factor of C
    # with the statistics off (mom2_adjustment false), C = λI (True) or I (False: a method whose Δ does not
    # depend on λ then, ROME); with them on, C = λ E[k kᵀ] either way
    weighted_identity: ClassVar[bool] = True
    # where v* adds δ when hparams.v_site is 'auto': 'block' (the last edited layer's output, MEMIT) or
    # 'matrix' (the edited matrix's output, ROME); families with a norm after the MLP always use 'matrix'
    value_site: ClassVar[str] = "block"
    # LayerState.extra entries that carry memory across batches (checkpointed by state_dict, kept when the
    # statistics are recomputed); other extra entries are derived from the statistics and rebuilt
    carried_state: ClassVar[frozenset[str]] = frozenset()
    # fits the edited weights itself (gradient steps, FT) instead of z* and a closed-form layer_delta: the Editor
    # calls fit_deltas and writes the deltas it returns; no statistics, context templates or z*
    fits_weights: ClassVar[bool] = False

    def validate(self, hp: EditHparams, n_requests: int) -> None:
        if self.single_layer and len(hp.layers) != 1:
            raise EditError(f"{self.name} edits exactly one layer; hparams.layers = {hp.layers}")
        if self.fits_weights and hp.prune_log_base:
            raise EditError(f"hparams.prune_log_base: {self.name} fits its weights by gradient steps; PRUNE's "
                            "restraint applies after the closed-form methods' solves (set it to 0)")

    # --- what the method needs from the statistics ------------------------------------------------
    def preserved(self, hp: EditHparams) -> PreservedMatrix:
        """The C that ``state.factor`` factors: λ·E[k kᵀ] + ε·I (E[k kᵀ] → I when mom2_adjustment is off)."""
        from_stats = hp.mom2_adjustment and not hp.identity_cov
        weight = hp.mom2_update_weight if from_stats or self.weighted_identity else 1.0
        return PreservedMatrix(from_stats, weight, hp.update_norm_lambda)

    def preserved_matrix(self, hp: EditHparams, mom2: torch.Tensor) -> torch.Tensor:
        """C of :meth:`preserved` from E[k kᵀ] (d_k, d_k): float64 (d_k, d_k)."""
        return self.preserved(hp).build(mom2, mom2.shape[0])

    def needs_mom2(self, hp: EditHparams) -> bool:
        """Whether this edit reads E[k kᵀ] at all (False: no statistics pass over the corpus)."""
        return self.needs_factor and self.preserved(hp).from_stats

    # --- the solve ---------------------------------------------------------------------------------
    def layer_delta(
        self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor, W: torch.Tensor
    ) -> torch.Tensor:
        """Δ (d, d_k) float64 for keys K (d_k, B) and residuals R (d, B), given the current weight W.

        K, R and W are float64 on the device of the solve (the statistics'); W is in math
        orientation (d, d_k), the layer's weight before this Δ (``state.w0``: before the first edit).
        """
        raise NotImplementedError

    def fit_deltas(self, hp: EditHparams, model: nn.Module, tok: Any, requests: Sequence[EditRequest],
                   params: Mapping[int, str]) -> FitResult:
        """``fits_weights`` methods: Δ per layer for the parameters ``params`` (layer -> parameter name), fitted
        on ``model`` as it is. The model's parameters must be left exactly as they were (the Editor writes Δ
        through :func:`fastmemit.editing.write_weights`, so that undo and saved deltas work as for every method)."""
        raise NotImplementedError

    def commit(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> None:
        """Called after a batch's delta is applied (sequential memory; nothing by default)."""

    # --- the method's memory across batches --------------------------------------------------------
    def state_dict(self, state: LayerState) -> dict[str, torch.Tensor]:
        """The memory of earlier batches kept for ``state``'s layer (the :attr:`carried_state` entries)."""
        return {k: v for k, v in state.extra.items() if k in self.carried_state}

    def load_state_dict(self, state: LayerState, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put back what :meth:`state_dict` returned; an entry this method does not keep is an error."""
        unknown = sorted(set(tensors) - self.carried_state)
        if unknown:
            raise EditError(f"{self.name} state of layer {state.layer} has entries {unknown} that {self.name} does not keep")
        state.extra.update(tensors)

    def carry_over(self, old: LayerState, new: LayerState) -> None:
        """Statistics were recomputed: ``new`` replaces ``old``; keep the memory, drop what is derived."""
        new.extra.update(self.state_dict(old))


class RidgeSystemMethod(EditMethod):
    """A method of the family's one closed form, Δ = R (Kᵀ C⁻¹ K + μI)⁻¹ (C⁻¹K)ᵀ
    (:func:`~fastmemit.linalg.ridge_system_delta`, through the factor of C): declare μ in :meth:`ridge`."""

    def ridge(self, hp: EditHparams, state: LayerState, K: torch.Tensor) -> float:
        """μ for keys K (d_k, B) at ``state``'s layer."""
        raise NotImplementedError

    def layer_delta(
        self, hp: EditHparams, state: LayerState, K: torch.Tensor, R: torch.Tensor, W: torch.Tensor
    ) -> torch.Tensor:
        assert state.factor is not None
        return ridge_system_delta(R, K, state.factor, mu=self.ridge(hp, state, K))  # (d, d_k)


_REGISTRY: dict[str, EditMethod] = {}
# methods of the research code that fastmemit refuses by name, with the reason
_REFUSED = {"MEND": "MEND edits through a hypernetwork trained for each model (the research code loads MEND's "
                    "trained editor weights), which fastmemit neither trains nor loads"}


def register_method(method: EditMethod, *, replace: bool = False) -> EditMethod:
    """Make ``method`` available by its name (any case); a name taken by another method is refused
    unless ``replace`` is true. Returns the method (usable as ``register_method(MyMethod())``)."""
    if not isinstance(method, EditMethod):
        raise EditError(f"register_method takes an EditMethod instance, got {type(method).__name__}")
    key = method.name.upper()
    old = _REGISTRY.get(key)
    if old is not None and not replace:
        raise EditError(f"a method named {old.name!r} is already registered ({type(old).__qualname__}); "
                        "choose another name or pass replace=True")
    _REGISTRY[key] = method
    return method


def get_method(name: str) -> EditMethod:
    """The method registered as ``name`` (any case). Importing this module runs the package's
    ``__init__`` first, which registers the built-in methods, so they are always found."""
    key = str(name).upper()
    if key not in _REGISTRY and key in _REFUSED:
        raise EditError(f"method {name!r} is not supported: {_REFUSED[key]}; available: {', '.join(available_methods())}")
    if key not in _REGISTRY:
        raise EditError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[key]


def available_methods() -> list[str]:
    """Names of the registered methods (built-in and added), as they spell themselves, sorted."""
    return sorted((m.name for m in _REGISTRY.values()), key=str.upper)
