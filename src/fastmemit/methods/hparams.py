"""Typed hyperparameters, loadable from the research code's JSON files as they are.

Algorithm hyperparameters only: where modules live is the architecture table's business, so the
research files' module templates (``rewrite_module_tmp`` ...) are accepted and checked against the
table, never used to find modules. Unknown fields and wrongly typed values are errors that name
the field; fields starting with ``_`` (comments, provenance) are ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastmemit.errors import EditError
from fastmemit.utils import read_json

T = TypeVar("T", bound="EditHparams")


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class EditHparams:
    """Fields shared by every method of the preservation–memorization family."""

    layers: list[int] = _help("edited layers (the last is where v*/z* is optimized)", factory=lambda: [5])
    layer_selection: str = _help("research-code field; only 'all' is meaningful", "all")
    fact_token: str = _help("key token: subject_last | subject_first | last (research names accepted)", "subject_last")
    v_num_grad_steps: int = _help("Adam steps of the v*/z* optimization", 25)
    v_lr: float = _help("Adam learning rate of v*/z*", 0.5)
    v_loss_layer: int = _help("research-code field: layer the loss is read at (we read the model's logits)", -1)
    v_weight_decay: float = _help("weight of ‖δ‖²/‖h‖² in the v* loss", 0.5)
    clamp_norm_factor: float = _help("‖δ‖ ≤ clamp_norm_factor · ‖h‖ after every step", 0.75)
    kl_factor: float = _help("weight of the KL term on the essence prompt", 0.0625)
    v_early_stop_nll: float = _help("stop optimizing a request once its target NLL is below this", 5e-2)
    v_early_stop: str = _help(
        "v* early stopping: 'nll' (once the request's mean target NLL < v_early_stop_nll) | 'loss' (the research "
        "code's rule: once the request's total v* loss, NLL + KL + weight decay, < v_early_stop_nll; the seed "
        "hard-codes 5e-2) | 'mpes' (ENCORE's most-probable early stopping, arXiv 2502.01636: once every target "
        "token is the argmax under every context template)", "nll")
    v_site: str = _help(
        "where v* adds δ, and the value the clamp and weight decay are relative to: 'block' (the last edited "
        "layer's block output, MEMIT's choice) | 'matrix' (the edited matrix's output, ROME's choice) | 'auto' "
        "(the method's own choice). Families with a norm after the MLP (Gemma 2/3) always use 'matrix'", "auto")
    v_max_rows: int = _help(
        "prompts per v* micro-batch (gradients accumulated, same result): bounds v*'s memory; a micro-batch "
        "holds at least one request's prompts (templates + 1); 0: all requests at once", 0)
    mom2_adjustment: bool = _help("use C0 (False: identity, i.e. plain least squares)", True)
    mom2_update_weight: float = _help("λ: weight of the preserved keys' second moment", 15000.0)
    mom2_dataset: str = _help("research-code name of the statistics corpus ('wikipedia' → our default corpus)", "wikipedia")
    update_norm_lambda: float = _help("ε added to λC0 as ε·I (FastMEMIT's fix for C0 from few keys)", 0.0)
    emmet_lambda: float = _help("EMMET: ridge μ on the B×B system (0: exact equality constraints); unused elsewhere", 0.1)
    mom2_n_samples: int = _help("classic MEMIT count: number of keys (tokens) for C0 when dynamic is false; -1: the whole corpus", 100000)
    mom2_dtype: str = _help("research-code field; our statistics always accumulate in float64", "float32")
    dynamic: bool = _help("FastMEMIT: C0 from dynamic_multiplier × d_k keys instead of mom2_n_samples", False)
    dynamic_multiplier: float = _help("FastMEMIT multiplier of d_k", 10.0)
    recompute_stats: bool = _help("recompute C0 on the edited model before each batch (the seed's dynamic path)", False)
    context_template_length_params: list[list[int]] = _help(
        "[[length, count], ...] of model-generated context templates", factory=lambda: [[5, 10], [10, 10]]
    )
    stats_corpus: str | None = _help("statistics corpus (path, gensim-wiki, hf:...); None: the default", None)
    stats_seq_len: int = _help("tokens per statistics row", 256)
    stats_batch_size: int = _help("rows per statistics batch", 8)
    identity_cov: bool = _help("use the identity instead of E[k kᵀ] (same as mom2_adjustment false)", False)
    shuffle_text: bool = _help("research-code field (FastMEMIT): shuffle the statistics corpus; we always seed-shuffle", False)
    wikipedia_lang: str = _help("research-code field: Wikipedia language of the statistics corpus", "en")
    calculate_objective_value: bool = _help("research-code diagnostic (not computed)", False)
    skill_preservation: bool = _help("research-code experiment, not supported (must be false)", False)
    skill_lambda: float = _help("research-code experiment field (unused)", 1.0)
    skill_sample_size: int = _help("research-code experiment field (unused)", 10000)
    random_vector_preservation: bool = _help("research-code experiment, not supported (must be false)", False)
    proj_dim: int = _help("research-code experiment field (unused)", 0)
    model_name: str | None = _help("research-code field naming the model (informational)", None)
    rewrite_module_tmp: str | None = _help("research-code module template (checked, not used)", None)
    layer_module_tmp: str | None = _help("research-code module template (checked, not used)", None)
    mlp_module_tmp: str | None = _help("research-code module template (checked, not used)", None)
    attn_module_tmp: str | None = _help("research-code module template (checked, not used)", None)
    ln_f_module: str | None = _help("research-code module name (checked, not used)", None)
    lm_head_module: str | None = _help("research-code module name (checked, not used)", None)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NaN and inf pass every < / > check below: refuse them first
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise EditError(f"hparams.{f.name} must be a finite number, got {v}")
        if not self.layers:
            raise EditError("hparams.layers is empty")
        if any(layer < 0 for layer in self.layers):
            raise EditError(f"hparams.layers must be non-negative, got {self.layers}")
        self.fact_token = _FACT_TOKEN_ALIASES.get(self.fact_token, self.fact_token)
        if self.fact_token not in ("subject_last", "subject_first", "last"):
            raise EditError(f"hparams.fact_token must be subject_last, subject_first or last, got {self.fact_token!r}")
        if self.mom2_n_samples <= 0 and self.mom2_n_samples != -1:
            raise EditError(f"hparams.mom2_n_samples must be positive (or -1: the whole corpus), got {self.mom2_n_samples}")
        for name in ("v_num_grad_steps", "stats_batch_size"):
            if getattr(self, name) <= 0:
                raise EditError(f"hparams.{name} must be positive, got {getattr(self, name)}")
        if self.stats_seq_len < 2:
            raise EditError(f"hparams.stats_seq_len must be at least 2 tokens, got {self.stats_seq_len}")
        for name in ("v_lr", "clamp_norm_factor", "dynamic_multiplier"):
            if not getattr(self, name) > 0:
                raise EditError(f"hparams.{name} must be positive, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "mom2_update_weight", "update_norm_lambda", "emmet_lambda"):
            if getattr(self, name) < 0:
                raise EditError(f"hparams.{name} must be non-negative, got {getattr(self, name)}")
        for name in ("skill_preservation", "random_vector_preservation"):
            if getattr(self, name):
                raise EditError(f"hparams.{name} = true is a research experiment fastmemit does not implement")
        if self.wikipedia_lang != "en" and self.stats_corpus is None:
            raise EditError("hparams.wikipedia_lang other than 'en' needs stats_corpus (e.g. 'hf:wikimedia/wikipedia:20231101.xx')")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or pair[0] < 1 or pair[1] < 0:
                raise EditError(f"hparams.context_template_length_params entries are [length ≥ 1, count ≥ 0], got {pair}")
        if self.v_early_stop not in ("nll", "loss", "mpes"):
            raise EditError(f"hparams.v_early_stop must be 'nll', 'loss' or 'mpes', got {self.v_early_stop!r}")
        if self.v_site not in ("auto", "block", "matrix"):
            raise EditError(f"hparams.v_site must be 'auto', 'block' or 'matrix', got {self.v_site!r}")
        if self.v_max_rows < 0:
            raise EditError(f"hparams.v_max_rows must be ≥ 0 (0: all rows at once), got {self.v_max_rows}")

    # --- (de)serialization -------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "hparams") -> T:
        if not isinstance(data, dict):
            raise EditError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        unknown = sorted(k for k in data if k not in fields and not k.startswith("_"))
        if unknown:
            raise EditError(
                f"{source}: unknown field(s) {unknown} for {cls.__name__}; known fields: {', '.join(sorted(fields))}"
            )
        for k, v in data.items():
            if k.startswith("_"):
                continue
            kwargs[k] = _coerce(v, hints[k], f"{source}: field {k!r}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[T], path: str | Path) -> T:
        p = Path(path)
        data = read_json(p, "hparams file", EditError)
        return cls.from_dict(data, source=f"hparams file {p.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        return self.from_dict({**self.to_dict(), **changes})


_FACT_TOKEN_ALIASES = {"subject_last": "subject_last", "subject_first": "subject_first", "last": "last",
                       "subject_subseq_last": "subject_last", "subject_subseq_first": "subject_first"}


def _coerce(v: Any, tp: Any, where: str) -> Any:
    """Check ``v`` against the annotation ``tp`` (int accepted for float; bool never for numbers)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, where)
            except EditError as e:
                errors.append(str(e))
        raise EditError(errors[0] if errors else f"{where}: invalid value {v!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(v, list):
            raise EditError(f"{where}: expected a list, got {type(v).__name__} {v!r}")
        return [_coerce(x, item, f"{where}[{i}]") for i, x in enumerate(v)]
    if tp is bool:
        if not isinstance(v, bool):
            raise EditError(f"{where}: expected true/false, got {type(v).__name__} {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise EditError(f"{where}: expected an integer, got {type(v).__name__} {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise EditError(f"{where}: expected a number, got {type(v).__name__} {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise EditError(f"{where}: expected a string, got {type(v).__name__} {v!r}")
        return v
    return v
