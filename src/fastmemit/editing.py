"""The editing API: ``edit(model, tok, requests, method=...)`` and the stateful :class:`Editor`.

Flow of one batch (methods differ only in what they declare and in ``layer_delta``):
  1. validate everything (requests, layers, hparams) and tokenize the prompts once, before touching
     the model; statistics and factors from the :class:`~fastmemit.stats.provider.PreservedStats`
     provider, only what the method reads;
  2. z* = h + δ at the last edited layer (batched v*, :mod:`fastmemit.keys_values`; a
     :class:`TargetCache` may already hold it);
  3. for each edited layer in order: keys K at that layer and the current output h at the last
     layer on the model as edited so far; residual R = (z* − h) / (layers remaining); Δ from the
     method (which also sees the current weight W); apply; the method commits its memory;
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
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.keys_values import (
    PromptRow,
    TargetResult,
    context_templates,
    keys_and_outputs,
    optimize_targets,
    rewrite_rows,
)
from fastmemit.methods import EditHparams, EditMethod, LayerState, get_method
from fastmemit.models.arch import as_math, check_layers, get_arch, mlp_down_weight, num_layers
from fastmemit.models.fingerprint import model_fingerprint
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
            d = None if deltas is None else deltas.get(name)
            if d is None:
                new = w0
            else:
                dt = torch.promote_types(w0.dtype, d.dtype)
                new = w0.to(dt) + d.to(device=w0.device, dtype=dt)
            p.copy_(new.to(device=p.device, dtype=p.dtype))


def _weight_params(model: nn.Module, layers: Sequence[int]) -> dict[int, tuple[str, nn.Parameter]]:
    return {layer: mlp_down_weight(model, layer) for layer in layers}


TargetValue = tuple[torch.Tensor, torch.Tensor, float, int]  # z (d,), δ (d,) float64, final NLL, steps


class TargetCache:
    """z* of edit requests, kept for Editors that edit the same weights with the same v* settings.

    Runs that compare statistics or solvers on the same batches of a batched run (every batch
    starts from the unedited model) optimize each z* once. The key of a request is
    ``(state, prompt, subject, target_new)`` where ``state`` is everything else z* depends on:
    ``(model fingerprint, templates, last edited layer, fact_token, v_num_grad_steps, v_lr,
    v_weight_decay, clamp_norm_factor, kl_factor, v_early_stop_nll)``. A value is
    ``(z (d,), δ (d,) float64, final NLL, steps)``. ``store``: a dict to keep the entries in (callers that
    share a dict share the cache); a new one by default.
    """

    def __init__(self, store: dict[Any, TargetValue] | None = None) -> None:
        self.store: dict[Any, TargetValue] = {} if store is None else store

    def __len__(self) -> int:
        return len(self.store)

    @staticmethod
    def keys(model: nn.Module, requests: Sequence[EditRequest], templates: Sequence[str], layer: int,
             hp: EditHparams) -> list[tuple[Any, ...]]:
        """The cache key of each request (see the class docstring)."""
        state = (model_fingerprint(model), tuple(templates), layer, hp.fact_token, hp.v_num_grad_steps, hp.v_lr,
                 hp.v_weight_decay, hp.clamp_norm_factor, hp.kl_factor, hp.v_early_stop_nll)
        return [(state, r.prompt, r.subject, r.target_new) for r in requests]

    def targets(self, model: nn.Module, requests: Sequence[EditRequest], templates: Sequence[str], layer: int,
                hp: EditHparams, optimize: Callable[[list[EditRequest]], TargetResult]) -> TargetResult:
        """z* of every request: cached ones looked up, the others optimized together by ``optimize``
        and kept. ``seconds`` is the optimization's time (0 when every request was cached)."""
        keys = self.keys(model, requests, templates, layer, hp)
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        seconds = 0.0
        if todo:
            t = optimize([requests[i] for i in todo])
            seconds = t.seconds
            for j, i in enumerate(todo):
                self.store[keys[i]] = (t.z[j].clone(), t.delta[j].clone(), t.nll[j], t.steps[j])
        got = [self.store[k] for k in keys]
        return TargetResult(z=torch.stack([g[0] for g in got]), delta=torch.stack([g[1] for g in got]),  # (B, d)
                            nll=[g[2] for g in got], steps=[g[3] for g in got], seconds=seconds)


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


class Editor:
    """Edits one model, batch after batch, keeping statistics, factors and method state.

    ``Editor(model, tok, "EMMET", hparams).edit(requests)`` applies the edit and returns an
    :class:`EditResult`. The Editor orchestrates: statistics and factors come from its
    :class:`~fastmemit.stats.provider.PreservedStats` (computed once per layer, cached on disk,
    unless ``hparams.recompute_stats`` asks for them on the edited model before every batch; never
    when the method does not read them), z* from ``optimize_targets`` (through ``target_cache``,
    a :class:`TargetCache` or a plain dict used as its storage), Δ from the method. The weights
    of the edited layers when the Editor is created are kept as each :class:`LayerState`'s ``w0``.
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
        diagnostics: bool = False,
    ) -> None:
        self.model, self.tok = model, tok
        self.method: EditMethod = get_method(method)
        self.hp = resolve_hparams(self.method, hparams, model)
        self._check_layers()
        self.arch = get_arch(model)
        self.seed, self.show_progress, self.use_cache = seed, show_progress, use_cache
        hp = self.hp
        count = {"dynamic_multiplier": hp.dynamic_multiplier} if hp.dynamic else {"n_keys": hp.mom2_n_samples}
        self.stats = PreservedStats(
            model, tok, corpus=corpus if corpus is not None else hp.stats_corpus, batch_size=hp.stats_batch_size,
            seq_len=hp.stats_seq_len, seed=seed, cache_dir=stats_cache_dir, use_cache=use_cache,
            show_progress=show_progress, **count,
        )
        self.states: dict[int, LayerState] = {}
        self._templates: list[str] | None = None
        # W0 of each edited layer (math orientation, weight's dtype and device): before any edit of this Editor
        self.w0 = {layer: as_math(p.detach(), self.arch.fan_in_fan_out).clone()
                   for layer, (_, p) in _weight_params(model, hp.layers).items()}
        self.target_cache = TargetCache(target_cache) if isinstance(target_cache, dict) else target_cache
        self.diagnostics = diagnostics
        self._key_factors = KeyFactors(lambda mom2: self.method.preserved_matrix(self.hp, mom2))

    def _check_layers(self) -> None:
        try:
            check_layers(self.model, self.hp.layers)
        except ConfigurationError as e:  # an hparams problem: say which field
            raise EditError(f"hparams.layers: {e}") from None
        if max(self.hp.layers) == num_layers(self.model) - 1 and self.hp.fact_token != "last":
            raise EditError(
                f"hparams.layers ends at the model's final layer ({max(self.hp.layers)}): a change at the subject "
                "token there cannot reach the later target tokens; edit earlier layers"
            )

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

    def prepare_stats(self, force: bool = False) -> None:
        """Statistics (one pass over every edited layer that lacks them) and factors, as the method needs.

        ``force``: recompute them on the model as it is now; the method carries its memory over.
        """
        layers = [layer for layer in self.hp.layers if force or layer not in self.states]
        if not layers:
            return
        matrix = self.method.preserved(self.hp) if self.method.needs_factor else None
        got = self.stats.layers(layers, mom2=self.method.needs_mom2(self.hp), matrix=matrix, recompute=force)
        for layer in layers:
            state = LayerState(layer, got[layer].mom2, got[layer].factor, w0=self.w0[layer])
            old = self.states.get(layer)
            if old is not None:  # the method's memory of earlier batches survives recomputed statistics
                self.method.carry_over(old, state)
            self.states[layer] = state

    # --- the method's memory across batches (checkpoints) ---------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's memory of earlier batches, ``{"<layer>/<name>": tensor}`` on the CPU."""
        return {f"{layer}/{k}": v.detach().cpu().contiguous() for layer, st in self.states.items()
                for k, v in self.method.state_dict(st).items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (statistics of the edited layers are prepared first if needed)."""
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in state.items():
            layer, _, name = key.partition("/")
            if not layer.isdigit() or int(layer) not in self.hp.layers or name not in self.method.carried_state:
                raise EditError(f"{self.method.name} state has an entry {key!r} that this editor does not keep")
            per_layer.setdefault(int(layer), {})[name] = v
        if per_layer and not self.states:
            self.prepare_stats()
        for layer, tensors in per_layer.items():  # on the CPU, beside the keys and statistics the solve uses
            self.method.load_state_dict(self.states[layer], {k: v.cpu() for k, v in tensors.items()})

    # --- the edit --------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest | Mapping[str, Any]]) -> EditResult:
        reqs = [EditRequest.from_any(r) for r in requests]
        if not reqs:
            raise EditError("no edit requests given")
        self.method.validate(self.hp, len(reqs))
        params = _weight_params(self.model, self.hp.layers)
        templates = self.templates()
        rows = rewrite_rows(self.tok, reqs, templates, self.hp.fact_token)  # the one tokenization; fails early
        fingerprint = model_fingerprint(self.model)
        t_stats = self.stats.seconds
        self.prepare_stats(force=self.hp.recompute_stats and bool(self.states) and self.method.needs_mom2(self.hp))
        batch = _Batch(params, {"stats": self.stats.seconds - t_stats, "v": 0.0, "solve": 0.0},
                       diag=BatchDiagnostics(self._key_factors) if self.diagnostics else None)
        memory = {layer: dict(st.extra) for layer, st in self.states.items()}  # method memory before the batch
        try:
            for group, group_rows in self._groups(reqs, rows, len(templates)):
                self._edit_group(group, group_rows, templates, batch)
            if batch.diag is not None:
                batch.info["diagnostics"] = batch.diag.finish(
                    {layer: (batch.originals[name], p.detach()) for layer, (name, p) in params.items()},
                    self.states, self.arch.fan_in_fan_out)
                batch.timings["diagnostics"] = batch.diag.seconds
        except BaseException:
            write_weights(self.model, batch.originals)
            for layer, extra in memory.items():  # e.g. AlphaEdit's keys of a batch that was never applied
                self.states[layer].extra = extra
            raise
        return EditResult(batch.deltas(), self.method.name, self.hp.to_dict(), reqs, fingerprint, batch.timings,
                          batch.info, self.model, batch.originals)

    def _groups(self, reqs: list[EditRequest], rows: list[PromptRow],
                n_templates: int) -> list[tuple[list[EditRequest], list[PromptRow]]]:
        """The batch as the method edits it: whole, or one request at a time (rows are request-major)."""
        if not self.method.one_request_at_a_time:
            return [(reqs, rows)]
        return [([r], [replace(row, request=0) for row in rows[b * n_templates:(b + 1) * n_templates]])
                for b, r in enumerate(reqs)]

    def _edit_group(self, reqs: list[EditRequest], rows: list[PromptRow], templates: list[str], batch: _Batch) -> None:
        """z* for the group, then for each layer in order: K, R, Δ from the method, applied."""
        layers = list(self.hp.layers)
        last = layers[-1]
        t = self._targets(reqs, templates, last)
        batch.timings["v"] += t.seconds
        batch.info["v_nll"] += t.nll
        batch.info["v_steps"] += t.steps
        t0, diag_s = time.perf_counter(), batch.diag.seconds if batch.diag is not None else 0.0
        for i, layer in enumerate(layers):
            K, H = keys_and_outputs(self.model, rows, len(reqs), len(templates), layer, last)  # (d_k, B), (B, d)
            R = (t.z.to(H.device) - H).T / (len(layers) - i)  # (d, B): this layer's share of the residual
            W = as_math(batch.params[layer][1].detach(), self.arch.fan_in_fan_out)  # (d, d_k) current weight
            W = W.to(device=K.device, dtype=torch.float64, copy=True)  # the method's own copy
            state = self.states[layer]
            delta = self.method.layer_delta(self.hp, state, K, R, W)  # (d, d_k) float64, math orientation
            if not torch.isfinite(delta).all():
                raise EditError(f"{self.method.name} produced a non-finite update at layer {layer}")
            if batch.diag is not None:
                batch.diag.observe(state, K, R, W, delta, t.z)
            batch.add(self.model, layer, delta, self.arch.fan_in_fan_out)
            self.method.commit(self.hp, state, K)
        diag_s = batch.diag.seconds - diag_s if batch.diag is not None else 0.0
        batch.timings["solve"] += time.perf_counter() - t0 - diag_s

    def _targets(self, reqs: list[EditRequest], templates: list[str], last: int) -> TargetResult:
        """z* (B, d) of the requests: from ``target_cache`` where possible, the rest optimized together."""

        def optimize(todo: list[EditRequest]) -> TargetResult:
            return optimize_targets(self.model, self.tok, todo, templates, last, self.hp,
                                    show_progress=self.show_progress)

        if self.target_cache is None:
            return optimize(reqs)
        return self.target_cache.targets(self.model, reqs, templates, last, self.hp, optimize)


def resolve_hparams(method: EditMethod, hparams: EditHparams | Mapping[str, Any] | str | Path | None, model: nn.Module | None = None) -> EditHparams:
    """Hparams object from an instance, a dict, a JSON path, a built-in name, or None (model default)."""
    cls = method.hparams_cls
    if hparams is None:
        return builtin_hparams(method.name, model)
    if isinstance(hparams, EditHparams):
        if not isinstance(hparams, cls):
            raise EditError(f"{method.name} needs {cls.__name__}, got {type(hparams).__name__}")
        return hparams
    if isinstance(hparams, Mapping):
        return cls.from_dict(dict(hparams))
    p = Path(hparams)
    if p.suffix == ".json" or p.exists():
        return cls.from_json(p)
    return builtin_hparams(method.name, str(hparams))


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
    """The tensors and metadata of a deltas file written by :meth:`EditResult.save` (nothing applied)."""
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
    return tensors, meta


def apply_deltas(model: nn.Module, path: str | Path, *, check_fingerprint: bool = True) -> EditResult:
    """Re-apply saved deltas (W ← W + Δ); refuses a model other than the one they were made on."""
    tensors, meta = load_deltas(path)
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
        if not torch.isfinite(d).all():
            raise DeltaMismatchError(f"delta for {name!r} contains NaN or inf")
    originals = {name: params[name].detach().clone() for name in tensors}
    write_weights(model, originals, tensors)
    reqs = [EditRequest.from_any(r) for r in json.loads(meta.get("requests", "[]"))]
    logger.info("applied %d deltas from %s", len(tensors), path)
    return EditResult(dict(tensors), meta.get("method", "?"), json.loads(meta.get("hparams", "{}")), reqs, fp,
                      _model=model, _originals=originals)
