"""The editing API: ``edit(model, tok, requests, method=...)`` and the stateful :class:`Editor`.

Flow of one batch (methods differ only in what they declare and in ``layer_delta``):
  1. validate everything (requests, layers, hparams) and tokenize the prompts once, before touching
     the model; statistics and factors from the :class:`~fastmemit.stats.provider.PreservedStats`
     provider, only what the method reads;
  2. z* at the last edited layer (batched v*, :mod:`fastmemit.keys_values`: δ added at the block
     output, z* = h + δ, or at the edited matrix's output, m* = m + δ; a :class:`TargetCache` may
     already hold it);
  3. for each edited layer in order: keys K at that layer and the current output h at the last
     layer on the model as edited so far; residual R = (z* − h) / (layers remaining), mapped into
     the edited matrix's output space through the norm after the MLP where the family has one
     (:func:`layer_residual`, docs/postnorm.md); Δ from the method (which also sees the current
     weight W); optionally PRUNE's restraint of the accumulated edit (``prune_log_base``); apply; the
     method commits its memory;
  4. return an :class:`EditResult` holding the deltas, able to restore the exact old weights.
The Editor orchestrates only: no knowledge of a particular method lives here.

Weights are only ever set to ``original + Δ_total`` (Δ accumulated in float64, cast once), so
``apply_deltas`` on an identical model reproduces the edited weights bit for bit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fastmemit.diagnostics import BatchDiagnostics, KeyFactors
from fastmemit.errors import ConfigurationError, DeltaMismatchError, EditError
from fastmemit.hparams_registry import builtin_hparams, load_hparams
from fastmemit.keys_values import (
    LayerReads,
    PromptRow,
    TargetResult,
    context_templates,
    optimize_targets,
    read_layer,
    rewrite_rows,
    value_site,
)
from fastmemit.layer_memory import LayerMemory
from fastmemit.linalg import restrained_update
from fastmemit.lm import model_context, target_ids
from fastmemit.methods import EditHparams, EditMethod, LayerState, get_method
from fastmemit.models.arch import as_math, check_layers, get_arch, mlp_down_weight, num_layers
from fastmemit.models.devices import check_resident
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.postnorm import PostNorm
from fastmemit.requests import EditRequest
from fastmemit.stats.provider import PreservedStats
from fastmemit.utils import atomic_path, logger

FORMAT_VERSION = "1"


@dataclass
class EditResult:
    """Deltas of one edit, in the stored orientation of each weight, and how to undo them."""

    deltas: dict[str, torch.Tensor]  # param name -> ΔW (weight's shape and dtype)
    method: str
    hparams: dict[str, Any]
    requests: list[EditRequest]
    fingerprint: str  # of the model before the edit
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _model: nn.Module | None = field(default=None, repr=False)
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def restore(self) -> None:
        """Put back the exact weights the model had before this edit (undo later edits first)."""
        if self._model is None or not self._originals:
            raise EditError("this EditResult holds no original weights to restore (loaded from a file?)")
        write_weights(self._model, self._originals)

    def apply(self) -> None:
        """Write the edit again after :meth:`restore` (W = W_before + Δ, bit-identical to the edit)."""
        if self._model is None or not self._originals:
            raise EditError("this EditResult holds no original weights to apply its deltas to (loaded from a file?)")
        write_weights(self._model, self._originals, self.deltas)

    def save(self, path: str | Path) -> Path:
        """Write the deltas as safetensors with metadata (method, hparams, requests, fingerprint)."""
        meta = {
            "format": "fastmemit-deltas",
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "hparams": json.dumps(self.hparams),
            "requests": json.dumps([r.to_dict() for r in self.requests]),
            "fingerprint": self.fingerprint,
        }
        p = Path(path)
        with atomic_path(p) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.deltas.items()}, str(tmp), metadata=meta)
        return p


def write_weights(
    model: nn.Module, base: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor] | None = None
) -> None:
    """The one place fastmemit writes weights: W = base + Δ (Δ absent: W = base), summed in the wider of
    the two dtypes and cast once to the weight's dtype on its device. A Δ in the weight's dtype is the
    saved-deltas form (edit and ``apply_deltas`` agree bit for bit); a float64 Δ = W − base, exact in
    float64, reproduces W exactly (checkpoints). Names are parameter names, stored orientation."""
    params = dict(model.named_parameters())
    missing = sorted(set(base) - set(params))
    if missing:
        raise EditError(f"the model has no parameter(s) {missing}")
    with torch.no_grad():
        for name, w0 in base.items():
            p = params[name]
            if p.device.type == "meta":
                raise EditError(f"parameter {name} is offloaded (meta device): fastmemit writes resident weights only")
            d = None if deltas is None else deltas.get(name)
            if d is None:
                new = w0
            else:
                dt = torch.promote_types(w0.dtype, d.dtype)
                new = w0.to(dt) + d.to(device=w0.device, dtype=dt)
            p.copy_(new.to(device=p.device, dtype=p.dtype))


def _moved(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device``: the same dict when all are there already, else a new one."""
    if all(t.device == device for t in tensors.values()):
        return tensors
    return {k: t.to(device) for k, t in tensors.items()}


def _weight_params(model: nn.Module, layers: Sequence[int]) -> dict[int, tuple[str, nn.Parameter]]:
    return {layer: mlp_down_weight(model, layer) for layer in layers}


# z (d,), δ (d,) float64, final NLL, steps, m (d,) float64 or None (value site 'block')
TargetValue = tuple[torch.Tensor, torch.Tensor, float, int, "torch.Tensor | None"]


class TargetCache:
    """z* of edit requests, kept for Editors that edit the same weights with the same v* settings.

    Runs that compare statistics or solvers on the same batches of a batched run (every batch
    starts from the unedited model) optimize each z* once. The key of a request is
    ``(state, prompt, subject, target_new)`` where ``state`` is everything else z* depends on:
    ``(model fingerprint, templates, last edited layer, fact_token, v_num_grad_steps, v_lr,
    v_weight_decay, clamp_norm_factor, kl_factor, v_early_stop, v_early_stop_nll, v_max_rows, value site,
    v_compute_dtype)``
    (micro-batching changes z* in the last bits). A value is
    ``(z (d,), δ (d,) float64, final NLL, steps, m (d,) or None)``. ``store``: a dict to keep the entries
    in (callers that share a dict share the cache); a new one by default.
    """

    def __init__(self, store: dict[Any, TargetValue] | None = None) -> None:
        self.store: dict[Any, TargetValue] = {} if store is None else store

    def __len__(self) -> int:
        return len(self.store)

    @staticmethod
    def keys(model: nn.Module, requests: Sequence[EditRequest], templates: Sequence[str], layer: int,
             hp: EditHparams, site: str = "block") -> list[tuple[Any, ...]]:
        """The cache key of each request (see the class docstring); ``site``: the resolved value site."""
        state = (model_fingerprint(model), tuple(templates), layer, hp.fact_token, hp.v_num_grad_steps, hp.v_lr,
                 hp.v_weight_decay, hp.clamp_norm_factor, hp.kl_factor, hp.v_early_stop, hp.v_early_stop_nll,
                 hp.v_max_rows, site, hp.v_compute_dtype)
        return [(state, r.prompt, r.subject, r.target_new) for r in requests]

    def targets(self, model: nn.Module, requests: Sequence[EditRequest], templates: Sequence[str], layer: int,
                hp: EditHparams, optimize: Callable[[list[EditRequest]], TargetResult],
                site: str = "block") -> TargetResult:
        """z* of every request: cached ones looked up, the others optimized together by ``optimize``
        and kept. ``seconds`` is the optimization's time (0 when every request was cached)."""
        keys = self.keys(model, requests, templates, layer, hp, site)
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        seconds = 0.0
        if todo:
            t = optimize([requests[i] for i in todo])
            seconds = t.seconds
            for j, i in enumerate(todo):
                m = None if t.m is None else t.m[j].clone()
                self.store[keys[i]] = (t.z[j].clone(), t.delta[j].clone(), t.nll[j], t.steps[j], m)
        got = [self.store[k] for k in keys]
        ms = [g[4] for g in got]
        return TargetResult(z=torch.stack([g[0] for g in got]), delta=torch.stack([g[1] for g in got]),  # (B, d)
                            nll=[g[2] for g in got], steps=[g[3] for g in got], seconds=seconds,
                            m=None if any(m is None for m in ms) else torch.stack(ms))  # (B, d)


def batch_targets(model: nn.Module, tok: Any, reqs: list[EditRequest], templates: list[str], last: int,
                  hp: EditHparams, *, cache: TargetCache | None, site: str, show_progress: bool) -> TargetResult:
    """z* (B, d) of the requests at layer ``last``: from ``cache`` where possible, the rest optimized together."""

    def optimize(todo: list[EditRequest]) -> TargetResult:
        return optimize_targets(model, tok, todo, templates, last, hp, show_progress=show_progress, site=site)

    if cache is None:
        return optimize(reqs)
    return cache.targets(model, reqs, templates, last, hp, optimize, site)


@dataclass
class _Batch:
    """One ``Editor.edit`` call in progress: the weights it started from and the Δ summed so far."""

    params: dict[int, tuple[str, nn.Parameter]]  # layer -> edited weight
    timings: dict[str, float]
    originals: dict[str, torch.Tensor] = field(init=False)  # param name -> weight before the call
    totals: dict[int, torch.Tensor] = field(init=False)  # layer -> Σ Δ, float64, stored orientation
    info: dict[str, Any] = field(default_factory=lambda: {"v_nll": [], "v_steps": []})
    diag: BatchDiagnostics | None = None  # Editor(diagnostics=True): fed at every solve

    def __post_init__(self) -> None:
        self.originals = {name: p.detach().clone() for name, p in self.params.values()}
        self.totals = {layer: torch.zeros_like(p, dtype=torch.float64) for layer, (_, p) in self.params.items()}

    def add(self, model: nn.Module, layer: int, delta: torch.Tensor, fan_in_fan_out: bool) -> None:
        """W = W_before + Σ Δ for ``layer`` with one more Δ (d, d_k) float64 math orientation."""
        name, p = self.params[layer]
        d = delta.to(self.totals[layer].device)  # from the solve's device (the CPU) to the weight's
        self.totals[layer] += d.T if fan_in_fan_out else d  # stored orientation
        write_weights(model, {name: self.originals[name]}, {name: self.totals[layer].to(p.dtype)})

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: self.totals[layer].to(p.dtype) for layer, (name, p) in self.params.items()}

    def add_targets(self, t: TargetResult) -> None:
        """v*'s time, final NLLs and steps for a group of requests."""
        self.timings["v"] += t.seconds
        self.info["v_nll"] += t.nll
        self.info["v_steps"] += t.steps

    def finish_diagnostics(self, states: Mapping[int, LayerState], fan_in_fan_out: bool) -> None:
        """With diagnostics on: the per-layer rows (``info["diagnostics"]``) and their time, once every layer is written."""
        if self.diag is None:
            return
        self.info["diagnostics"] = self.diag.finish(
            {layer: (self.originals[name], p.detach()) for layer, (name, p) in self.params.items()},
            states, fan_in_fan_out)
        self.timings["diagnostics"] = self.diag.seconds


class Editor:
    """Edits one model, batch after batch, keeping statistics, factors and method state.

    ``Editor(model, tok, "EMMET", hparams).edit(requests)`` applies the edit and returns an
    :class:`EditResult`. The Editor orchestrates: statistics and factors come from its
    :class:`~fastmemit.stats.provider.PreservedStats` (computed once per layer, cached on disk,
    unless ``hparams.recompute_stats`` asks for them on the edited model before every batch, or, with
    ``'layer'``, for every layer after the batch's earlier layers are written, as the seed's ``dynamic``
    does; never when the method does not read them), z* from ``optimize_targets`` (through ``target_cache``,
    a :class:`TargetCache` or a plain dict used as its storage), Δ from the method. Each layer's
    :class:`LayerState` (statistics, factor, method memory, and ``w0``, the weight when the Editor is
    created) is kept across batches by its :class:`~fastmemit.layer_memory.LayerMemory` (``memory``).

    Devices (docs/scale.md): ``stats_device`` is where the statistics accumulate and where they,
    the factors and the method's memory are kept (default: accumulated on each layer's device, kept
    on the CPU); ``solve_device`` is where each layer's factorization and solve run (default: the
    statistics' device), one layer's matrices at a time. Δ is written on the weight's own device.

    ``diagnostics``: every :class:`EditResult` gets ``info["diagnostics"]``, one row per edited layer
    (weight distances, objective terms, max kᵀC⁻¹k: :mod:`fastmemit.diagnostics`), and
    ``timings["diagnostics"]``.
    """

    def __init__(
        self,
        model: nn.Module,
        tok: Any,
        method: str = "EMMET",
        hparams: EditHparams | Mapping[str, Any] | str | Path | None = None,
        *,
        corpus: str | Path | None = None,
        stats_cache_dir: str | Path | None = None,
        seed: int = 0,
        show_progress: bool = True,
        use_cache: bool = True,
        target_cache: TargetCache | dict[Any, TargetValue] | None = None,
        stats_device: str | torch.device | None = None,
        solve_device: str | torch.device | None = None,
        diagnostics: bool = False,
    ) -> None:
        self.model, self.tok = model, tok
        self.method: EditMethod = get_method(method)
        self.hp = resolve_hparams(self.method, hparams, model)
        _check_edit_layers(model, self.hp, self.method)
        self.arch = get_arch(model)
        # where v* adds δ (checked here, before any statistics pass)
        self.value_site = value_site(model, None if self.hp.v_site == "auto" else self.hp.v_site, self.method.value_site)
        self.seed, self.show_progress, self.use_cache = seed, show_progress, use_cache
        hp = self.hp
        self.stats = PreservedStats(
            model, tok, hp, corpus=corpus, seed=seed, cache_dir=stats_cache_dir, use_cache=use_cache,
            show_progress=show_progress, stats_device=stats_device, compute_device=solve_device)
        # devices (docs/scale.md): statistics, factors and method memory stay on the storage device; each
        # layer's solve runs on the solve device, which holds one layer's matrices at a time
        self.solve_device = self.stats.compute_device
        self._templates: list[str] | None = None
        weights = _weight_params(model, hp.layers)
        check_resident(model, [name for name, _ in weights.values()], what="editing")
        # W0 of each edited layer (math orientation, weight's dtype and device): before any edit of this Editor
        w0 = {layer: as_math(p.detach(), self.arch.fan_in_fan_out).clone() for layer, (_, p) in weights.items()}
        self.memory = LayerMemory(self.method, hp, self.stats, w0)  # statistics, factors, method memory per layer
        self.target_cache = TargetCache(target_cache) if isinstance(target_cache, dict) else target_cache
        self.diagnostics = diagnostics
        self._key_factors = KeyFactors(lambda mom2: self.method.preserved_matrix(self.hp, mom2))

    @property
    def stats_seconds(self) -> float:
        """Time spent in statistics and factors by this Editor."""
        return self.stats.seconds

    # --- lazily built pieces --------------------------------------------------------------
    def templates(self) -> list[str]:
        if self._templates is None:
            self._templates = context_templates(self.model, self.tok, self.hp.context_template_length_params,
                                                seed=self.seed, use_cache=self.use_cache)
        return self._templates

    def prepare_stats(self, force: bool = False, layers: Sequence[int] | None = None) -> None:
        """Statistics and factors of the edited layers (``layers``; ``force``: recomputed): :meth:`LayerMemory.prepare`."""
        self.memory.prepare(force, layers)

    @property
    def states(self) -> dict[int, LayerState]:
        """The :class:`LayerState` of each edited layer prepared so far (kept by :class:`LayerMemory`)."""
        return self.memory.states

    # --- the method's memory across batches (checkpoints) ---------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's memory of earlier batches, ``{"<layer>/<name>": tensor}`` on the CPU."""
        return self.memory.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (statistics of the edited layers are prepared first if needed)."""
        self.memory.load_state_dict(state)

    # --- the edit --------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest | Mapping[str, Any]]) -> EditResult:
        reqs = _batch_requests(self.method, self.hp, requests)
        params = _weight_params(self.model, self.hp.layers)
        if self.method.fits_weights:
            return _fit(self.model, self.tok, self.method, self.hp, reqs, params)
        templates = self.templates()
        rows = rewrite_rows(self.tok, reqs, templates, self.hp.fact_token)  # the one tokenization; fails early
        _check_context(self.model, self.tok, reqs, rows)
        fingerprint = model_fingerprint(self.model)
        t_stats = self.stats.seconds
        self.memory.before_batch()
        batch = _Batch(params, {"stats": self.stats.seconds - t_stats, "v": 0.0, "solve": 0.0},
                       diag=BatchDiagnostics(self._key_factors) if self.diagnostics else None)
        memory = self.memory.snapshot()  # the method's memory before the batch
        try:
            for group, group_rows in _request_groups(self.method, reqs, rows, len(templates)):
                self._edit_group(group, group_rows, templates, batch)
            batch.finish_diagnostics(self.states, self.arch.fan_in_fan_out)
        except BaseException:
            write_weights(self.model, batch.originals)
            self.memory.rollback(memory)  # e.g. AlphaEdit's keys of a batch that was never applied
            raise
        return EditResult(batch.deltas(), self.method.name, self.hp.to_dict(), reqs, fingerprint, batch.timings,
                          batch.info, self.model, batch.originals)

    def _edit_group(self, reqs: list[EditRequest], rows: list[PromptRow], templates: list[str], batch: _Batch) -> None:
        """z* for the group, then for each layer in order: K, R, Δ from the method, applied."""
        layers = list(self.hp.layers)
        last = layers[-1]
        t = batch_targets(self.model, self.tok, reqs, templates, last, self.hp, cache=self.target_cache,
                          site=self.value_site, show_progress=self.show_progress)
        batch.add_targets(t)
        t0, t_stats = time.perf_counter(), self.stats.seconds
        diag_s = batch.diag.seconds if batch.diag is not None else 0.0
        for i, layer in enumerate(layers):
            self.memory.before_layer(layer)  # the seed's dynamic: C0 of the model with this batch's earlier layers written
            reads = read_layer(self.model, rows, len(reqs), len(templates), layer, last)  # K (d_k, B), H, M (B, d)
            R = layer_residual(self.model, layer, t, reads, len(layers) - i).to(self.solve_device)  # (d, B)
            K = reads.K.to(self.solve_device)
            W = as_math(batch.params[layer][1].detach(), self.arch.fan_in_fan_out)  # (d, d_k) current weight
            W = W.to(device=K.device, dtype=torch.float64, copy=True)  # the method's own copy
            state = self.states[layer]
            delta = self.method.layer_delta(self.hp, state, K, R, W)  # (d, d_k) float64, math orientation
            if not torch.isfinite(delta).all():
                raise EditError(f"{self.method.name} produced a non-finite update at layer {layer}")
            if self.hp.prune_log_base:  # PRUNE, a projection after any closed-form solve
                delta = _restrained(state, W, delta, self.hp.prune_log_base)
            if batch.diag is not None:
                batch.diag.observe(state, K, R, W, delta, t.z)
            batch.add(self.model, layer, delta, self.arch.fan_in_fan_out)
            self.method.commit(self.hp, state, K)
            state.extra = _moved(state.extra, self.stats.storage_device)  # memory back beside the statistics
        stats = self.stats.seconds - t_stats
        diag_s = batch.diag.seconds - diag_s if batch.diag is not None else 0.0
        batch.timings["stats"] += stats
        batch.timings["solve"] += time.perf_counter() - t0 - stats - diag_s


def _restrained(state: LayerState, W: torch.Tensor, delta: torch.Tensor, base: float) -> torch.Tensor:
    """Δ' (d, d_k) float64: PRUNE's restraint of the accumulated edit W + Δ − W0 with cap σ_max(W0), the
    unedited layer's largest singular value (derived from W0: computed once per layer, kept in ``state.extra``)."""
    W0 = state.w0.to(device=W.device, dtype=torch.float64)  # (d, d_k)
    if "w0_sigma_max" not in state.extra:
        state.extra = {**state.extra, "w0_sigma_max": torch.linalg.matrix_norm(W0, ord=2)}  # () float64
    return restrained_update(W, W0, delta, float(state.extra["w0_sigma_max"]), base)


def _batch_requests(method: EditMethod, hp: EditHparams,
                    requests: Sequence[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
    """The requests of one edit call, each checked, and their number checked against the method."""
    reqs = [EditRequest.from_any(r) for r in requests]
    if not reqs:
        raise EditError("no edit requests given")
    method.validate(hp, len(reqs))
    return reqs


def _check_edit_layers(model: nn.Module, hp: EditHparams, method: EditMethod) -> None:
    """The hparams' layers fit the model and an edit there can work (EditError naming the field)."""
    try:
        check_layers(model, hp.layers)
    except ConfigurationError as e:  # an hparams problem: say which field
        raise EditError(f"hparams.layers: {e}") from None
    n = num_layers(model)
    if hp.v_loss_layer not in (-1, n - 1) and not method.fits_weights:
        raise EditError(
            f"hparams.v_loss_layer = {hp.v_loss_layer}: the research code reads the v* loss from that layer "
            f"through the final norm; fastmemit reads the model's own logits, which is the same only for the last "
            f"layer ({n - 1}, what every published file sets) or -1"
        )
    if max(hp.layers) == n - 1 and hp.fact_token != "last" and not method.fits_weights:
        raise EditError(
            f"hparams.layers ends at the model's final layer ({max(hp.layers)}): a change at the subject "
            "token there cannot reach the later target tokens; edit earlier layers"
        )


def _fit(model: nn.Module, tok: Any, method: EditMethod, hp: EditHparams, reqs: list[EditRequest],
         params: dict[int, tuple[str, nn.Parameter]]) -> EditResult:
    """A method that fits its weights itself (``fits_weights``): its Δ per layer, written as every Δ is."""
    fingerprint = model_fingerprint(model)
    batch = _Batch(params, {"stats": 0.0, "v": 0.0, "solve": 0.0})
    t0 = time.perf_counter()
    try:
        fit = method.fit_deltas(hp, model, tok, reqs, {k: n for k, (n, _) in params.items()})
        for layer, delta in fit.deltas.items():
            if not torch.isfinite(delta).all():
                raise EditError(f"{method.name} produced a non-finite update at layer {layer}")
            batch.add(model, layer, delta, fan_in_fan_out=False)  # Δ in the weight's stored orientation
    except BaseException:
        write_weights(model, batch.originals)
        raise
    batch.timings["solve"] = time.perf_counter() - t0
    return EditResult(batch.deltas(), method.name, hp.to_dict(), reqs, fingerprint, batch.timings,
                      fit.info, model, batch.originals)


def _request_groups(method: EditMethod, reqs: list[EditRequest], rows: list[PromptRow],
                    n_templates: int) -> list[tuple[list[EditRequest], list[PromptRow]]]:
    """The batch as the method edits it: whole, or one request at a time (rows are request-major)."""
    if not method.one_request_at_a_time:
        return [(reqs, rows)]
    return [([r], [replace(row, request=0) for row in rows[b * n_templates:(b + 1) * n_templates]])
            for b, r in enumerate(reqs)]


def layer_residual(model: nn.Module, layer: int, t: TargetResult, reads: LayerReads, remaining: int) -> torch.Tensor:
    """R (d, B) float64: what the edited matrix of ``layer`` should add to its output for each request.

    The block-space share of the gap is s = (z* − H) / remaining (H: the last edited layer's block output
    now). Without a norm after the MLP the matrix's output adds to the block output as it is: R = s.
    With one (N, docs/postnorm.md), at the matrix's current output M: for an earlier layer the damped
    pseudo-inverse of N's Jacobian at M (tangent, radial part removed), R = J⁺ s; for the last layer
    (remaining = 1) the preimage x of N(M) + s by Gauss–Newton from the optimized m*, R = x − M (a
    single-layer edit gets m* − M exactly).
    """
    norm = PostNorm.of(model, layer)
    if norm is None:
        return (t.z.to(reads.H.device) - reads.H).T / remaining  # (d, B): this layer's share of the residual
    M = reads.M  # (B, d)
    norm.check(model, M)
    share = (t.z.to(M.device) - reads.H) / remaining  # (B, d) block space
    if remaining > 1:
        return norm.tangent_solve(M, share).T  # (d, B)
    if t.m is None:
        raise EditError("a family with a norm after the MLP needs v* at the edited matrix's output (m*)")
    x = norm.preimage(norm(M) + share, start=t.m.to(M.device))  # (B, d)
    return (x - M).T  # (d, B)


def _check_context(model: nn.Module, tok: Any, reqs: Sequence[EditRequest], rows: Sequence[PromptRow]) -> None:
    """Every template-prefixed prompt with its target fits the model's context (models that do not
    raise on longer inputs would otherwise edit on garbage positions)."""
    limit = model_context(model, tok)
    if limit is None:
        return
    for row in rows:
        r = reqs[row.request]
        n = len(row.ids) + len(target_ids(tok, row.text, r.target_new, row.ids)[1])
        if n > limit:
            raise EditError(f"edit request {r.prompt[:60]!r}: prompt and target take {n} tokens with a context "
                            f"template, more than the model's context of {limit}")


def resolve_hparams(method: EditMethod, hparams: EditHparams | Mapping[str, Any] | str | Path | None, model: nn.Module | None = None) -> EditHparams:
    """Hparams object from an instance, a dict, a built-in name or a JSON path (:func:`load_hparams`), or None
    (the built-in for the model)."""
    cls = method.hparams_cls
    if hparams is None:
        return builtin_hparams(method.name, model)
    if isinstance(hparams, EditHparams):
        if not isinstance(hparams, cls):
            raise EditError(f"{method.name} needs {cls.__name__}, got {type(hparams).__name__}")
        return hparams
    if isinstance(hparams, Mapping):
        return cls.from_dict(dict(hparams))
    return load_hparams(hparams, method.name)


def edit(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    method: str = "EMMET",
    hparams: EditHparams | Mapping[str, Any] | str | Path | None = None,
    **editor_kwargs: Any,
) -> EditResult:
    """Edit ``model`` in place so it states the new facts; returns the deltas (``.restore()`` undoes)."""
    return Editor(model, tok, method, hparams, **editor_kwargs).edit(requests)


def load_deltas(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a deltas file written by :meth:`EditResult.save` (nothing applied).

    Everything is checked here, before any caller writes a weight: the file, its format, the tensors
    (floating point, finite) and the metadata (method, hparams object, requests)."""
    p = Path(path)
    if not p.is_file():
        raise DeltaMismatchError(f"deltas file {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise DeltaMismatchError(f"{str(p)!r} is not a readable safetensors file ({e})") from e
    if meta.get("format") != "fastmemit-deltas":
        raise DeltaMismatchError(f"{str(p)!r} is not a fastmemit deltas file")
    for name, d in tensors.items():
        if not d.is_floating_point() or not torch.isfinite(d).all():
            raise DeltaMismatchError(f"{str(p)!r}: delta for {name!r} is not a finite floating-point tensor")
    _delta_metadata(meta, p)
    return tensors, meta


def _delta_metadata(meta: Mapping[str, str], path: Path) -> tuple[str, dict[str, Any], list[EditRequest]]:
    """(method, hparams, requests) of a deltas file's metadata; DeltaMismatchError naming what is malformed."""
    try:
        hparams = json.loads(meta.get("hparams", "{}"))
        raw = json.loads(meta.get("requests", "[]"))
    except json.JSONDecodeError as e:
        raise DeltaMismatchError(f"{str(path)!r}: metadata is not valid JSON ({e.msg})") from None
    if not isinstance(hparams, dict) or not isinstance(raw, list):
        raise DeltaMismatchError(f"{str(path)!r}: metadata 'hparams' must be an object and 'requests' a list")
    try:
        reqs = [EditRequest.from_any(r) for r in raw]
    except EditError as e:
        raise DeltaMismatchError(f"{str(path)!r}: metadata holds a malformed request ({e})") from None
    return str(meta.get("method", "?")), hparams, reqs


def apply_deltas(model: nn.Module, path: str | Path, *, check_fingerprint: bool = True) -> EditResult:
    """Re-apply saved deltas (W ← W + Δ); refuses a model other than the one they were made on.

    The whole file is read and checked before the first weight is written."""
    tensors, meta = load_deltas(path)
    method, hparams, reqs = _delta_metadata(meta, Path(path))
    fp = model_fingerprint(model)
    if check_fingerprint and meta.get("fingerprint") != fp:
        raise DeltaMismatchError(
            f"deltas in {str(path)!r} were made on model {meta.get('fingerprint')} but this model is {fp}; "
            "pass check_fingerprint=False to apply them anyway"
        )
    params = dict(model.named_parameters())
    for name, d in tensors.items():
        if name not in params:
            raise DeltaMismatchError(f"deltas name parameter {name!r}, which this model does not have")
        if params[name].shape != d.shape:
            raise DeltaMismatchError(f"delta for {name!r} has shape {tuple(d.shape)}, weight has {tuple(params[name].shape)}")
    originals = {name: params[name].detach().clone() for name in tensors}
    try:
        write_weights(model, originals, tensors)
    except BaseException:
        write_weights(model, originals)
        raise
    logger.info("applied %d deltas from %s", len(tensors), path)
    return EditResult(dict(tensors), method, hparams, reqs, fp, _model=model, _originals=originals)
