"""Typed hyperparameters, loadable from the research code's JSON files as they are.

Algorithm hyperparameters only: where modules live is the architecture table's business, so the
research files' module templates (``rewrite_module_tmp`` ...) are accepted and never used to find
modules. Unknown fields and wrongly typed values are errors that name the field; fields starting
with ``_`` (comments, provenance) are ignored.

**Research-code files.** A JSON file that names none of fastmemit's own fields (every field it names
is one of the research code's, :data:`RESEARCH_FIELDS`) is read as a research-code file, e.g. one of
the seed's (scalable-model-editing/efficient-model-editing) or unified-model-editing's: the fields it
leaves out take the value the research code hard-codes (:attr:`EditHparams.research_defaults`: the
six context templates ``[[10, 5]]`` of MEMIT/EMMET, EMMET's ridge only for more than one edit, v*
stopped by the total loss), not fastmemit's default. The research code's other v* choices are
fastmemit's defaults already: the threshold 5e-2 (``v_early_stop_nll``), δ at the block output for
MEMIT/EMMET/AlphaEdit and at the MLP output for ROME (``v_site = "auto"``); ``v_max_rows`` only bounds
memory (the research code optimizes one request at a time, fastmemit all together: each request's
δ has its own loss and Adam state either way). Objects built in Python, dicts and files that name any fastmemit field keep
fastmemit's defaults. docs/seed-compat.md lists every research field and what it does here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from fastmemit.errors import EditError
from fastmemit.utils import logger, read_json

T = TypeVar("T", bound="EditHparams")

# Every field name of the research code's hparams classes: ROME/MEMIT (kmeng01), ROME/MEMIT/EMMET/FT of
# unified-model-editing and efficient-model-editing (the seed), AlphaEdit. A file naming only these is
# a research-code file (see the module docstring).
RESEARCH_FIELDS = frozenset({
    "layers", "layer_selection", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay",
    "clamp_norm_factor", "kl_factor", "mom2_adjustment", "mom2_update_weight", "context_template_length_params",
    "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
    "mom2_dataset", "mom2_n_samples", "mom2_dtype", "calculate_objective_value", "update_norm_lambda",
    "emmet_lambda", "dynamic_multiplier", "dynamic", "shuffle_text", "wikipedia_lang", "skill_preservation",
    "skill_lambda", "skill_sample_size", "random_vector_preservation", "proj_dim", "identity_cov", "bias_update",
    "model_name", "nullspace_threshold", "L2",
    "num_steps", "lr", "weight_decay", "norm_constraint", "batch_size", "wd_power_law",  # FT
})


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
        "holds at least one request's prompts (templates + 1); 0: all requests at once. The default, 70, is "
        "10 requests with the built-in smollm2 templates (6 + 1 prompts each); with v_prefix_cache_mb it bounds "
        "v*'s memory whatever the batch size", 70)
    v_prefix_cache_mb: float = _help(
        "MiB of prompt-prefix key/value caches v*'s micro-batches may keep across optimization steps (tokens "
        "before the fact token never see δ, so they run once); micro-batches past the budget recompute theirs "
        "in every step (the same numbers; v* took 1.5x as long with none held at batch 100). Unused with a single micro-batch, which "
        "always keeps its cache. The default keeps v* under 2 GiB at batch 100 on smollm2 (bench/README.md)", 384.0)
    v_compute_dtype: str | None = _help(
        "dtype v*'s forward and backward passes compute in (torch.autocast): 'bfloat16' | 'float16' | null (the "
        "model's own, no autocast). δ, Adam and the loss stay float32, and h (the site's value at δ = 0) and z* are "
        "read by one more forward in the model's dtype, so only the optimization path is approximate: about 2x "
        "faster on CPUs with bfloat16 instructions (AVX-512 BF16, AMX) and on GPUs, several times slower on CPUs "
        "without them (AVX2: v* warns); bench/README.md measures it", None)
    mom2_adjustment: bool = _help("use C0 (False: identity, i.e. plain least squares)", True)
    mom2_update_weight: float = _help("λ: weight of the preserved keys' second moment", 15000.0)
    mom2_dataset: str = _help("research-code name of the statistics corpus ('wikipedia' → our default corpus)", "wikipedia")
    update_norm_lambda: float = _help("ε added to λC0 as ε·I (FastMEMIT's fix for C0 from few keys)", 0.0)
    emmet_lambda: float = _help("EMMET: ridge μ on the B×B system (0: exact equality constraints); unused elsewhere", 0.1)
    emmet_ridge_one_edit: bool = _help(
        "EMMET: add emmet_lambda·I also for a batch of one request (false: the seed's rule, only for B > 1, so that "
        "one request is exactly ROME's closed form; research-code files default to false)", True)
    prune_log_base: float = _help(
        "PRUNE (Ma et al. 2025, arXiv 2405.16821) after every layer's solve, for every closed-form method (0: off; e "
        "is PRUNE's default base): singular values of the accumulated edit W + Δ − W0 above σ_max(W0) are compressed "
        "logarithmically, capping the edited matrix's condition number", 0.0)
    mom2_n_samples: int = _help("classic MEMIT count: number of keys (tokens) for C0 when dynamic is false; -1: the whole corpus", 100000)
    mom2_dtype: str = _help("research-code field; our statistics always accumulate in float64", "float32")
    dynamic: bool = _help("FastMEMIT: C0 from dynamic_multiplier × d_k keys instead of mom2_n_samples", False)
    dynamic_multiplier: float = _help(
        "FastMEMIT multiplier of d_k (read when dynamic is true; setting it through replace() or a flag turns "
        "dynamic on, a file that sets it with dynamic false gets a warning)", 10.0)
    recompute_stats: bool | str = _help(
        "statistics of the edited model: false = computed once (cached); true = recomputed before every batch; "
        "'layer' = recomputed for every layer of every batch after the earlier layers of the batch are written "
        "(what the seed's dynamic: true does)", False)
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
    proj_dim: int = _help("research-code field: d_k for identity_cov/random vectors (we read d_k from the model)", 0)
    bias_update: bool = _help("research-code field (ROME): also update the module's bias; not supported (must be false)",
                              False)
    model_name: str | None = _help("research-code field naming the model (informational)", None)
    rewrite_module_tmp: str | None = _help("research-code module template (accepted, not used)", None)
    layer_module_tmp: str | None = _help("research-code module template (accepted, not used)", None)
    mlp_module_tmp: str | None = _help("research-code module template (accepted, not used)", None)
    attn_module_tmp: str | None = _help("research-code module template (accepted, not used)", None)
    ln_f_module: str | None = _help("research-code module name (accepted, not used)", None)
    lm_head_module: str | None = _help("research-code module name (accepted, not used)", None)

    # values of the fields a research-code file leaves out (module docstring); subclasses extend it
    research_defaults: ClassVar[dict[str, Any]] = {
        "context_template_length_params": [[10, 5]],  # MEMIT/EMMET/AlphaEdit hard-code [(10, 5)]: 6 templates
        "emmet_ridge_one_edit": False,  # the seed's emmet_main.py: `if D.shape[0] > 1`
        "v_early_stop": "loss",  # compute_v / compute_z: `if loss < 5e-2: break` (v_early_stop_nll's default)
    }
    # research-code values that fastmemit does not implement: field -> (accepted values, why)
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "skill_preservation": ((False,), "a research experiment whose function is missing from the seed's code"),
        "random_vector_preservation": ((False,), "a research ablation (random keys instead of corpus keys)"),
        "shuffle_text": ((False,), "a research ablation (corpus tokens shuffled inside each text)"),
        "bias_update": ((False,), "ROME's bias update (keys extended by a constant 1)"),
        "layer_selection": (("all",), "the seed declares 'random' but never implements it"),
    }

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
        for name, (ok, why) in self.unsupported.items():
            if getattr(self, name) not in ok:
                raise EditError(f"hparams.{name} = {getattr(self, name)!r} is not implemented in fastmemit: {why} "
                                f"(accepted: {', '.join(map(repr, ok))})")
        if not (isinstance(self.recompute_stats, bool) or self.recompute_stats == "layer"):
            raise EditError(f"hparams.recompute_stats must be false, true or 'layer', got {self.recompute_stats!r}")
        if self.wikipedia_lang != "en" and self.stats_corpus is None:
            raise EditError("hparams.wikipedia_lang other than 'en' needs stats_corpus (e.g. 'hf:wikimedia/wikipedia:20231101.xx')")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or pair[0] < 1 or pair[1] < 0:
                raise EditError(f"hparams.context_template_length_params entries are [length ≥ 1, count ≥ 0], got {pair}")
        if self.prune_log_base and not self.prune_log_base > 1:
            raise EditError(f"hparams.prune_log_base must be 0 (off) or a logarithm base > 1, got {self.prune_log_base}")
        if self.v_early_stop not in ("nll", "loss", "mpes"):
            raise EditError(f"hparams.v_early_stop must be 'nll', 'loss' or 'mpes', got {self.v_early_stop!r}")
        if self.v_site not in ("auto", "block", "matrix"):
            raise EditError(f"hparams.v_site must be 'auto', 'block' or 'matrix', got {self.v_site!r}")
        if self.v_compute_dtype not in (None, "bfloat16", "float16"):
            raise EditError(f"hparams.v_compute_dtype must be null, 'bfloat16' or 'float16', got {self.v_compute_dtype!r}")
        if self.v_max_rows < 0:
            raise EditError(f"hparams.v_max_rows must be ≥ 0 (0: all rows at once), got {self.v_max_rows}")
        if not self.v_prefix_cache_mb >= 0:
            raise EditError(f"hparams.v_prefix_cache_mb must be ≥ 0, got {self.v_prefix_cache_mb}")

    # --- (de)serialization -------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "hparams") -> T:
        """Hparams from a dict of fields (every field it leaves out takes the dataclass default)."""
        return cls._build(data, source)

    @classmethod
    def is_research_file(cls, data: dict[str, Any]) -> bool:
        """Whether ``data`` names only research-code fields (:data:`RESEARCH_FIELDS`; ``_`` keys ignored)."""
        return all(k in RESEARCH_FIELDS for k in data if not k.startswith("_"))

    @classmethod
    def _build(cls: type[T], data: dict[str, Any], source: str) -> T:
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
        """Hparams from a JSON file; a research-code file gets :attr:`research_defaults` for what it leaves out."""
        p = Path(path)
        data = read_json(p, "hparams file", EditError)
        source = f"hparams file {p.name}"
        if isinstance(data, dict) and cls.is_research_file(data):
            added = {k: v for k, v in cls.research_defaults.items() if k not in data}
            if added:
                logger.info("%s names only research-code fields: the research code's %s", source,
                            ", ".join(f"{k}={v!r}" for k, v in added.items()))
            data = {**data, **added}
        hp = cls.from_dict(data, source=source)
        if isinstance(data, dict) and "dynamic_multiplier" in data and not hp.dynamic:
            logger.warning("%s: dynamic_multiplier = %g is not used because dynamic is false: the statistics come from "
                           "mom2_n_samples = %d keys (the seed's ROME does the same; set dynamic: true, or pass "
                           "--dynamic_multiplier, for FastMEMIT's reduced statistics)", source, hp.dynamic_multiplier,
                           hp.mom2_n_samples)
        return hp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, as :meth:`to_dict` writes it (the values of fields a stored dict predates)."""
        return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)}

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes``. Setting ``dynamic_multiplier`` without ``dynamic`` turns dynamic on (the
        seed's rule: a multiplier means reduced statistics), so that an override is never silently unused."""
        if "dynamic_multiplier" in changes and "dynamic" not in changes and not self.dynamic:
            logger.info("dynamic_multiplier = %s given: dynamic turned on (statistics from dynamic_multiplier × d_k "
                        "keys instead of mom2_n_samples)", changes["dynamic_multiplier"])
            changes = {**changes, "dynamic": True}
        elif "dynamic_multiplier" in changes and changes.get("dynamic") is False:
            logger.warning("dynamic_multiplier = %s given with dynamic false: the multiplier is not used",
                           changes["dynamic_multiplier"])
        return self._build({**self.to_dict(), **changes}, "hparams")


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
