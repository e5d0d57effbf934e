"""The editing API: ``edit(model, tok, requests, method=...)`` and the stateful :class:`Editor`.

Flow of one batch (methods differ only in ``layer_delta``):
  1. validate everything (requests, layers, hparams) before touching the model;
  2. z* = h + δ at the last edited layer (batched v*, :mod:`fastmemit.keys_values`);
  3. for each edited layer in order: keys K at that layer and the current output h at the last
     layer on the model as edited so far; residual R = (z* − h) / (layers remaining); Δ from the
     method; apply;
  4. return an :class:`EditResult` holding the deltas, able to restore the exact old weights.

Weights are only ever set to ``original + Δ_total`` (Δ accumulated in float64, cast once), so
``apply_deltas`` on an identical model reproduces the edited weights bit for bit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmemit.errors import DeltaMismatchError, EditError, FastMemitError, StatisticsError
from fastmemit.keys_values import context_templates, keys_and_outputs, optimize_targets, rewrite_rows
from fastmemit.linalg import FactoredCov
from fastmemit.methods import EditHparams, EditMethod, LayerState, get_method
from fastmemit.models.arch import as_math, check_layers, get_arch, mlp_down_weight, num_layers
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.requests import EditRequest
from fastmemit.stats.cache import entry_path, load_entry, save_entry, stats_dir
from fastmemit.stats.engine import compute_layer_stats
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
        from safetensors.torch import save_file

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


class Editor:
    """Edits one model, batch after batch, keeping statistics, factors and method state.

    ``Editor(model, tok, "EMMET", hparams).edit(requests)`` applies the edit and returns an
    :class:`EditResult`. Statistics are computed once per layer (cached on disk) unless
    ``hparams.recompute_stats`` asks for them on the edited model before every batch.
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
        target_cache: dict[Any, tuple[torch.Tensor, float, int]] | None = None,
    ) -> None:
        self.model, self.tok = model, tok
        self.method: EditMethod = get_method(method)
        self.hp = resolve_hparams(self.method, hparams, model)
        try:
            check_layers(model, self.hp.layers)
        except FastMemitError:
            raise
        except ValueError as e:  # a FastMemitError, so that the CLI reports it instead of a traceback
            raise EditError(f"hparams.layers: {e}") from None
        if max(self.hp.layers) == num_layers(model) - 1 and self.hp.fact_token != "last":
            raise EditError(
                f"hparams.layers ends at the model's final layer ({max(self.hp.layers)}): a change at the subject "
                "token there cannot reach the later target tokens; edit earlier layers"
            )
        self.arch = get_arch(model)
        self.corpus = corpus if corpus is not None else self.hp.stats_corpus
        self.stats_cache_dir = stats_cache_dir
        self.seed = seed
        self.show_progress = show_progress
        self.use_cache = use_cache
        self.states: dict[int, LayerState] = {}
        self._templates: list[str] | None = None
        self.stats_seconds = 0.0
        # z* per request depends only on the model's weights, the request, the templates and the v*
        # hparams: runs that compare statistics or solvers on the same batches can share this dict
        self.target_cache = target_cache

    # --- lazily built pieces --------------------------------------------------------------
    def templates(self) -> list[str]:
        if self._templates is None:
            self._templates = context_templates(self.model, self.tok, self.hp.context_template_length_params,
                                                seed=self.seed, use_cache=self.use_cache)
        return self._templates

    def _count_kwargs(self) -> dict[str, Any]:
        if self.hp.dynamic:
            return {"dynamic_multiplier": self.hp.dynamic_multiplier}
        return {"n_keys": self.hp.mom2_n_samples}

    def prepare_stats(self, force: bool = False) -> None:
        """Compute (or load) the statistics of every edited layer in one pass, and their factors."""
        layers = [layer for layer in self.hp.layers if force or layer not in self.states]
        if not layers:
            return
        t0 = time.perf_counter()
        cache = self.use_cache and not force  # recomputed stats of an edited model are not worth caching
        stats = compute_layer_stats(
            self.model, self.tok, layers, self.corpus, batch_size=self.hp.stats_batch_size,
            seq_len=self.hp.stats_seq_len, seed=self.seed, cache=cache, cache_dir=self.stats_cache_dir,
            show_progress=self.show_progress, **self._count_kwargs(),
        )
        bad = [layer for layer, st in stats.items() if not torch.isfinite(st.sum_kk).all()]
        if bad:  # checked for every method: AlphaEdit's eigh reads one triangle and would miss a NaN
            raise StatisticsError(f"layer {', '.join(map(str, bad))} statistics contain NaN or inf")
        for layer, st in stats.items():
            old = self.states.get(layer)
            w0 = old.w0 if old is not None else self._math_weight(layer).clone()  # kept across recomputed stats
            state = LayerState(layer, st.mom2, w0=w0)
            if old is not None:  # the method's memory of earlier batches survives recomputed statistics
                state.extra.update({k: v for k, v in old.extra.items() if k in self.method.carried_state})
            if self.method.needs_factor:
                state.factor = self._factor(st.mom2, st.key if cache else None, f"layer {layer} statistics")
            self.states[layer] = state
        self.stats_seconds += time.perf_counter() - t0

    def _math_weight(self, layer: int) -> torch.Tensor:
        """The edited weight of ``layer`` as it is now, math orientation (d, d_k), weight dtype (a view)."""
        return as_math(mlp_down_weight(self.model, layer)[1].detach(), self.arch.fan_in_fan_out)

    def _factor(self, mom2: torch.Tensor, stats_key: dict[str, Any] | None, name: str) -> FactoredCov:
        """Cholesky factor of the method's C, cached beside the statistics when they are cached."""
        C = self.method.preserved_matrix(self.hp, mom2)  # (d_k, d_k) float64
        if stats_key is None:
            return FactoredCov(C, name=name)
        key = {**stats_key, "factor": self.method.factor_key(self.hp)}
        path = entry_path(stats_dir(self.stats_cache_dir), key, kind="chol")
        hit = load_entry(path, key)
        if hit is not None:
            return FactoredCov(C, name=name, factor=hit[0]["L"])
        F = FactoredCov(C, name=name)
        save_entry(path, {"L": F.L}, key)
        return F

    # --- the method's memory across batches (checkpoints) ---------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's memory of earlier batches, ``{"<layer>/<name>": tensor}`` on the CPU."""
        return {f"{layer}/{k}": v.detach().cpu().contiguous() for layer, st in self.states.items()
                for k, v in st.extra.items() if k in self.method.carried_state}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (statistics of the edited layers are prepared first if needed)."""
        parsed = []
        for key, v in state.items():
            layer, _, name = key.partition("/")
            if not layer.isdigit() or int(layer) not in self.hp.layers or name not in self.method.carried_state:
                raise EditError(f"{self.method.name} state has an entry {key!r} that this editor does not keep")
            parsed.append((int(layer), name, v))
        if parsed and not self.states:
            self.prepare_stats()
        device = next(self.model.parameters()).device
        for layer, name, v in parsed:
            self.states[layer].extra[name] = v.to(device)

    # --- the edit --------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest | Mapping[str, Any]]) -> EditResult:
        reqs = [EditRequest.from_any(r) for r in requests]
        if not reqs:
            raise EditError("no edit requests given")
        self.method.validate(self.hp, len(reqs))
        layers = list(self.hp.layers)
        params = _weight_params(self.model, layers)
        templates = self.templates()
        rewrite_rows(self.tok, reqs, templates, self.hp.fact_token)  # fact tokens resolvable: fail early
        fingerprint = model_fingerprint(self.model)
        t_stats = self.stats_seconds
        self.prepare_stats(force=self.hp.recompute_stats and bool(self.states))
        timings = {"stats": self.stats_seconds - t_stats, "v": 0.0, "solve": 0.0}

        originals = {name: p.detach().clone() for name, p in params.values()}
        totals = {layer: torch.zeros_like(params[layer][1], dtype=torch.float64) for layer in layers}  # stored shape
        info: dict[str, Any] = {"v_nll": [], "v_steps": []}
        groups = [[r] for r in reqs] if getattr(self.method, "one_request_at_a_time", False) else [reqs]
        extras = {layer: dict(st.extra) for layer, st in self.states.items()}  # method memory before the batch
        try:
            for group in groups:
                self._edit_group(group, layers, params, originals, totals, templates, timings, info)
        except BaseException:
            write_weights(self.model, originals)
            for layer, extra in extras.items():  # e.g. AlphaEdit's keys of a batch that was never applied
                self.states[layer].extra = extra
            raise
        deltas = {params[layer][0]: totals[layer].to(params[layer][1].dtype) for layer in layers}
        return EditResult(deltas, self.method.name, self.hp.to_dict(), reqs, fingerprint, timings, info,
                          self.model, originals)

    def _edit_group(self, reqs: list[EditRequest], layers: list[int], params: dict[int, tuple[str, nn.Parameter]],
                    originals: dict[str, torch.Tensor], totals: dict[int, torch.Tensor], templates: list[str],
                    timings: dict[str, float], info: dict[str, Any]) -> None:
        last = layers[-1]
        z, nll, steps, seconds = self._targets(reqs, templates, last)
        timings["v"] += seconds
        info["v_nll"] += nll
        info["v_steps"] += steps
        t0 = time.perf_counter()
        rows = rewrite_rows(self.tok, reqs, templates, self.hp.fact_token)
        for i, layer in enumerate(layers):
            K, H = keys_and_outputs(self.model, rows, len(reqs), len(templates), layer, last)  # (d_k, B), (B, d)
            R = (z - H).T / (len(layers) - i)  # (d, B): this layer's share of the residual
            state = self.states[layer]
            W = self._math_weight(layer).to(torch.float64)  # (d, d_k) current weight
            delta = self.method.layer_delta(self.hp, state, K, R, W)  # (d, d_k) float64, math orientation
            if not torch.isfinite(delta).all():
                raise EditError(f"{self.method.name} produced a non-finite update at layer {layer}")
            name, p = params[layer]
            totals[layer] += delta.T if self.arch.fan_in_fan_out else delta  # stored orientation
            write_weights(self.model, {name: originals[name]}, {name: totals[layer].to(p.dtype)})
            self.method.commit(self.hp, state, K)
        timings["solve"] += time.perf_counter() - t0


    def _targets(self, reqs: list[EditRequest], templates: list[str], last: int) -> tuple[torch.Tensor, list[float], list[int], float]:
        """z* (B, d) for the requests, from ``target_cache`` where possible, the rest optimized together."""
        if self.target_cache is None:
            t = optimize_targets(self.model, self.tok, reqs, templates, last, self.hp, show_progress=self.show_progress)
            return t.z, t.nll, t.steps, t.seconds
        hp = self.hp
        base = (model_fingerprint(self.model), tuple(templates), last, hp.fact_token, hp.v_num_grad_steps, hp.v_lr,
                hp.v_weight_decay, hp.clamp_norm_factor, hp.kl_factor, hp.v_early_stop_nll)
        keys = [(base, r.prompt, r.subject, r.target_new) for r in reqs]
        todo = [i for i, k in enumerate(keys) if k not in self.target_cache]
        seconds = 0.0
        if todo:
            t = optimize_targets(self.model, self.tok, [reqs[i] for i in todo], templates, last, hp,
                                 show_progress=self.show_progress)
            seconds = t.seconds
            for j, i in enumerate(todo):
                self.target_cache[keys[i]] = (t.z[j].clone(), t.nll[j], t.steps[j])
        got = [self.target_cache[k] for k in keys]
        return torch.stack([g[0] for g in got]), [g[1] for g in got], [g[2] for g in got], seconds


def resolve_hparams(method: EditMethod, hparams: EditHparams | Mapping[str, Any] | str | Path | None, model: nn.Module | None = None) -> EditHparams:
    """Hparams object from an instance, a dict, a JSON path, a built-in name, or None (model default)."""
    from fastmemit.hparams_registry import builtin_hparams

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
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

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
