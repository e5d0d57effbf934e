"""The settings of an evaluation run (:class:`RunConfig`), their stored form, and their comparison.

Field names are the library's own (``method``, ``model``, ``hparams``, ``dataset``,
``edits_per_batch``); the research code's names (``--alg_name``, ``--model_name``,
``--hparams_fname``, ``--ds_name``, ``--num_edits``) are accepted as aliases by
:meth:`RunConfig.from_dict` and the CLI, and in the ``config.json`` of run folders written before
the rename. :data:`ALIASES` is the whole mapping.

The ``evaluate`` command's defaults for the flags named as in the research code follow the FastMEMIT
code (the seed): :data:`SEED_CLI_DEFAULTS`; ``RunConfig()`` itself keeps neutral defaults for library use
(the dataset file's own order, one downstream check per batch). docs/seed-compat.md compares every flag.

A run folder's ``config.json`` holds the settings (its ``"run"`` block, paths made absolute by
:meth:`RunConfig.normalized`) beside the resolved hparams, the model's fingerprint and the case ids.
:func:`config_differences` compares two of them on what must not change between a run and its
restart (everything but :data:`RUNTIME_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmemit.errors import EditError, RunError
from fastmemit.eval.datasets import EVAL_DATASETS, ZSRE_CONVENTIONS
from fastmemit.methods import get_method
from fastmemit.utils import read_json

RUN_FORMAT = 1  # "format" of config.json

ALL_DOWNSTREAM_TASKS = "sst2,mrpc,cola,rte,mmlu,nli,sentiment_analysis,dialogue"

# The research code's setting name → RunConfig's field (also the keys of config.json files written
# before the rename).
ALIASES: dict[str, str] = {
    "alg_name": "method",
    "model_name": "model",
    "hparams_fname": "hparams",
    "ds_name": "dataset",
    "num_edits": "edits_per_batch",
}
ALIAS_OF: dict[str, str] = {field_name: alias for alias, field_name in ALIASES.items()}

# Fields holding a path, stored absolute so that a restart from another folder compares equal.
PATH_FIELDS = ("data", "seed_samples", "consistency_dir", "downstream_data_dir")

# Defaults of the evaluate command for the flags the seed names, as in the seed
# (experiments/evaluate_unified_editing.py): --ds_name mcf, --sample_num 0, --downstream_eval_steps 100,
# --save_model_interval 100. (The seed's download of missing data is RunConfig's default.)
SEED_CLI_DEFAULTS: dict[str, Any] = {"dataset": "mcf", "sample_num": 0, "downstream_eval_steps": 100,
                                     "save_model_interval": 100}

# Fields added after config.json's format 1 was first written, with the value that reproduces a stored
# zsRE run that predates them (for other datasets the field means nothing and is not compared).
ADDED_FIELDS: dict[str, Any] = {"zsre_convention": "alt"}

_POSITIVE = ("edits_per_batch", "eval_batch_size", "eval_chunk", "downstream_eval_steps", "checkpoint_interval",
             "save_model_interval", "collapse_window")
_THRESHOLDS = ("collapse_downstream_drop", "collapse_invalid_rise", "collapse_ns_drop", "collapse_rel_distance")


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class RunConfig:
    """Everything that defines a run. Fields in :data:`RUNTIME_FIELDS` may change on a restart;
    any other difference from the run folder's ``config.json`` is refused."""

    method: str = _f("EMMET", "editing method, a registered name: ROME, MEMIT, EMMET, AlphaEdit (alias alg_name)")
    model: str = _f("smollm2-135m", "model alias, folder or hub id; a label when a model object is passed "
                                    "(alias model_name)")
    hparams: str | None = _f(None, "hparams JSON file or built-in name; None: the built-in for (method, model) "
                                   "(alias hparams_fname)")
    hparams_overrides: dict[str, Any] = _f(help="hparams fields set on top of the file (recompute_stats, --set ...)",
                                           factory=dict)
    dataset: str = _f("cf", "cf | counterfact | mcf | multi_counterfact | zsre (alias ds_name)")
    data: str | None = _f(None, "dataset file; None: the download cache (see load_dataset)")
    download: bool = _f(True, "fetch the published dataset file when data is None and it is not cached (as the seed)")
    dataset_size_limit: int | None = _f(None, "use at most this many cases (after ordering)")
    sample_num: int | None = _f(None, "seed ordering K of the dataset's seed-samples file; None: file order")
    seed_samples: str | None = _f(None, "seed-samples file or folder; None: looked up beside the data")
    edits_per_batch: int = _f(1, "cases per batch, edited together (alias num_edits)")
    sequential: bool = _f(True, "edits accumulate over batches (False: restore the model after each batch)")
    seed: int = _f(0, "seeds context templates, the statistics corpus shuffle and torch's RNG per batch")
    corpus: str | None = _f(None, "statistics corpus; None: hparams.stats_corpus or the default")
    eval_batch_size: int = _f(32, "(prompt, target) pairs per scoring forward pass")
    eval_chunk: int = _f(100, "cases per pre/final scoring chunk (the unit written and resumed)")
    skip_generation_tests: bool = _f(False, "no fluency/consistency generations")
    generation_test_interval: int = _f(1, "generation tests for every K-th case (K ≤ 0: none)")
    seed_sliding: bool = _f(False, "CounterFact: also the seed's *_prompts_correct (its expected string in the greedy "
                                   "generation after each prompt; one generation per prompt)")
    consistency_dir: str | None = _f(None, "folder of attribute_snippets.json, idf.npy, tfidf_vocab.json")
    final_eval: bool | None = _f(None, "sequential: score all cases again on the final model (None: on)")
    do_downstream_eval: bool = _f(False, "few-shot downstream checks before the first edit and every K batches")
    downstream_eval_steps: int = _f(1, "K: a downstream check after every K batches (and after the last)")
    downstream_tasks: str = _f(ALL_DOWNSTREAM_TASKS, "comma list of downstream tasks")
    number_of_few_shots: str | None = _f(None, "comma list, one shot count per task (None: 0)")
    number_of_tests: int | None = _f(None, "test items per task (None: all)")
    downstream_data_dir: str | None = _f(None, "folder of <task>.jsonl (None: the downstream default)")
    dtype: str = _f("float32", "model dtype when the runner loads the model")
    zsre_convention: str = _f("seed", "zsRE: seed (edit towards answers[0], neighbour prompt without 'nq question:'), "
                                      "memit (answers[0], loc + '?'), alt (EasyEdit's target alt, loc + '?')")
    retention_eval_steps: int | None = _f(None, "sequential: every K batches, score ES/PS/NS of every case edited so "
                                                "far on the model as it is then (retention.jsonl; not after the last "
                                                "batch when the final scoring runs); None: off")
    stop_on_collapse: bool = _f(False, "sequential: stop when a collapse rule fires (docs/lifelong.md): the model goes "
                                       "back to the last healthy checkpoint and the summary says why")
    collapse_downstream_drop: float | None = _f(0.1, "collapse rule: mean downstream accuracy this much (0-1) below "
                                                     "the baseline check (needs do_downstream_eval); None: off")
    collapse_invalid_rise: float | None = _f(0.5, "collapse rule: rate of invalid generated downstream answers this "
                                                  "much (0-1) above the baseline's; None: off")
    collapse_ns_drop: float | None = _f(20.0, "collapse rule: post-edit NS of the latest collapse_window cases this "
                                              "many points (x100) under their pre-edit NS; None: off")
    collapse_rel_distance: float | None = _f(None, "collapse rule: some edited layer's ||W - W0||_F / ||W0||_F above "
                                                   "this; None: off")
    collapse_window: int = _f(100, "cases (latest batches) the NS collapse rule averages over")
    # --- runtime: may change between a run and its restart
    device: str = _f("cpu", "torch device when the runner loads the model")
    device_map: str | None = _f(None, "accelerate device map when the runner loads the model: auto, ... or a JSON file")
    stats_device: str | None = _f(None, "where statistics accumulate and are kept (None: each layer's device / the CPU)")
    solve_device: str | None = _f(None, "where each layer's factorization and solve run (None: the statistics' device)")
    use_cache: bool = _f(True, "disk caches of statistics and context templates")
    stats_cache_dir: str | None = _f(None, "statistics cache folder (None: the user cache)")
    conserve_memory: bool = _f(False, "no shared z* cache; free accelerator memory between batches")
    checkpoint_interval: int = _f(1, "sequential: checkpoint the edited model every K batches (and after the last)")
    save_model: bool = _f(False, "save deltas (or the edited model) every save_model_interval batches")
    save_model_interval: int = _f(1, "K for save_model")
    save_model_location: str | None = _f(None, "where save_model writes (None: RUN_DIR/models)")
    save_model_format: str = _f("deltas", "deltas (safetensors, apply_deltas) | full (save_pretrained folder)")
    plots: bool = _f(True, "write plots into RUN_DIR/plots at the end")
    show_progress: bool = _f(True, "progress bars (FASTMEMIT_PROGRESS=0 silences them too)")

    def __post_init__(self) -> None:
        if self.sample_num is not None and (not _is_int(self.sample_num) or self.sample_num < 0):
            raise RunError(f"sample_num must be a non-negative integer (an ordering of the seed-samples file) or "
                           f"None (the dataset file's own order; --sample_num none), got {self.sample_num!r:.60}")
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _HINTS[f.name])
        if self.dataset not in EVAL_DATASETS:
            raise RunError(f"dataset must be one of {', '.join(EVAL_DATASETS)}, got {self.dataset!r}")
        for name in _POSITIVE:
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise RunError(f"{field_label(name)} must be a positive integer, got {v!r}")
        if self.dataset_size_limit is not None and (not _is_int(self.dataset_size_limit) or self.dataset_size_limit < 1):
            raise RunError(f"dataset_size_limit must be a positive integer or None, got {self.dataset_size_limit!r}")
        if self.zsre_convention not in ZSRE_CONVENTIONS:
            raise RunError(f"zsre_convention must be one of {', '.join(ZSRE_CONVENTIONS)}, got {self.zsre_convention!r}")
        if self.save_model_format not in ("deltas", "full"):
            raise RunError(f"save_model_format must be 'deltas' or 'full', got {self.save_model_format!r}")
        if not isinstance(self.hparams_overrides, dict):
            raise RunError("hparams_overrides must be a dict")
        self._check_lifelong()

    def _check_lifelong(self) -> None:
        """The retention and collapse settings (sequential runs only)."""
        k = self.retention_eval_steps
        if k is not None and (not _is_int(k) or k < 1):
            raise RunError(f"retention_eval_steps must be a positive integer or None, got {k!r}")
        for name in _THRESHOLDS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")):
                raise RunError(f"{name} must be a non-negative number or None, got {v!r}")
        if not self.sequential and (self.stop_on_collapse or k is not None):
            raise RunError("stop_on_collapse and retention_eval_steps need a sequential run (edits that accumulate)")
        downstream = self.do_downstream_eval and (self.collapse_downstream_drop is not None
                                                  or self.collapse_invalid_rise is not None)
        if self.stop_on_collapse and not (downstream or self.collapse_ns_drop is not None
                                          or self.collapse_rel_distance is not None):
            raise RunError("stop_on_collapse needs at least one collapse rule: do_downstream_eval with "
                           "collapse_downstream_drop or collapse_invalid_rise, collapse_ns_drop, or collapse_rel_distance")

    @property
    def mode(self) -> str:
        return "sequential" if self.sequential else "batched"

    @property
    def do_final_eval(self) -> bool:
        return self.sequential and (self.final_eval is None or bool(self.final_eval))

    def normalized(self) -> RunConfig:
        """This config with its paths absolute (``hparams`` only when it names an existing file)."""
        return dataclasses.replace(self, **normalized_paths(self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Settings by field name or by the research code's name (:data:`ALIASES`)."""
        if not isinstance(data, Mapping):
            raise RunError(f"run settings must be a JSON object, got {type(data).__name__}")
        return cls(**canonical_settings(data))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> RunConfig:
        """A run's ``config.json`` (its ``"run"`` block) or a plain JSON object of settings."""
        p = Path(path)
        data = read_json(p, "config file", RunError)
        if isinstance(data, dict) and "run" in data and isinstance(data["run"], dict):
            data = with_added_fields(data["run"])
        if not isinstance(data, dict):
            raise RunError(f"config file {str(p)!r}: expected a JSON object")
        return cls.from_dict(data)


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RunConfig))
_HINTS = typing.get_type_hints(RunConfig)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}


def _check_type(name: str, value: Any, hint: Any) -> None:
    """RunError unless ``value`` has the field's declared type (bool is no int here; None only where
    the type says ``| None``; a float field takes an int)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in allowed:
        t = typing.get_origin(t) or t
        if value is None and t is type(None):
            return
        if t is bool and isinstance(value, bool):
            return
        if t is int and _is_int(value):
            return
        if t is float and (_is_int(value) or isinstance(value, float)):
            return
        if t in (str, dict) and isinstance(value, t):
            return
    names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise RunError(f"run setting {field_label(name)} must be {names}, got {type(value).__name__} {value!r:.60}")

RUNTIME_FIELDS = frozenset({"device", "device_map", "stats_device", "solve_device", "use_cache", "stats_cache_dir", "conserve_memory", "checkpoint_interval",
                            "save_model", "save_model_interval", "save_model_location", "save_model_format",
                            "plots", "show_progress", "download"})


def field_label(name: str) -> str:
    """``edits_per_batch (num_edits)``: a field with its research-code alias, for messages."""
    return f"{name} ({ALIAS_OF[name]})" if name in ALIAS_OF else name


def renamed(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the research code's names replaced by field names (nothing checked): the
    ``"run"`` block of any run folder's ``config.json``, old or new."""
    return {ALIASES.get(k, k): v for k, v in settings.items()}


def canonical_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with aliases renamed to field names; unknown names, or a field given under both of
    its names with different values, are a :class:`RunError`."""
    out: dict[str, Any] = {}
    unknown = sorted(k for k in data if k not in FIELD_NAMES and k not in ALIASES)
    if unknown:
        raise RunError(f"unknown run setting(s) {unknown}; known: {', '.join(sorted(FIELD_NAMES))} "
                       f"(aliases: {', '.join(f'{a}={f}' for a, f in ALIASES.items())})")
    for key, value in data.items():
        name = ALIASES.get(key, key)
        if name in out and out[name] != value:
            raise RunError(f"run setting {field_label(name)} given twice: {out[name]!r} and {value!r}")
        out[name] = value
    return out


def normalized_paths(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The path settings among ``settings`` (field names), absolute: :data:`PATH_FIELDS` always,
    ``hparams`` when it names an existing file (else it is a built-in name)."""
    out = {}
    for k in (*PATH_FIELDS, "hparams"):
        v = settings.get(k)
        if v is None or (k == "hparams" and not Path(v).expanduser().exists()):
            continue
        out[k] = str(Path(v).expanduser().resolve())
    return out


def stored_config(cfg: RunConfig, run_dir: Path, **facts: Any) -> dict[str, Any]:
    """The ``config.json`` of a run: ``format``, the settings (``run``, paths absolute), then
    ``facts`` (method, hparams, hparams_source, hparams_label, base_fingerprint, model_class,
    n_cases, n_batches, case_ids, fastmemit_version, command) and how to reproduce the run."""
    reproduce = f"fastmemit evaluate --config {shlex.quote(str(run_dir / 'config.json'))} --out NEW_DIR"
    return {"format": RUN_FORMAT, "run": cfg.normalized().to_dict(), **facts, "reproduce": reproduce}


def with_added_fields(run: Mapping[str, Any]) -> dict[str, Any]:
    """A stored ``"run"`` block with :data:`ADDED_FIELDS` it predates filled in as that run used them."""
    out = dict(run)
    if renamed(run).get("dataset") == "zsre":
        for k, v in ADDED_FIELDS.items():
            out.setdefault(k, v)
    return out


def identity(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a stored config that must be equal for a restart to continue the run (the
    settings by field name, whichever names the file uses; a field the file predates has the value the
    version that wrote it used (:data:`ADDED_FIELDS`) or its default; the zsRE convention only for zsRE;
    the hparams with the fields they predate at their defaults: :func:`hparams_identity`)."""
    run = {**_DEFAULTS, **renamed(with_added_fields(config_json.get("run", {})))}
    if run.get("dataset") != "zsre":
        run.pop("zsre_convention", None)
    return {"format": config_json.get("format"), "run": {k: v for k, v in run.items() if k not in RUNTIME_FIELDS},
            "method": config_json.get("method"), "hparams": hparams_identity(config_json),
            "base_fingerprint": config_json.get("base_fingerprint"), "case_ids": config_json.get("case_ids")}


def hparams_identity(config_json: Mapping[str, Any]) -> Any:
    """A stored config's resolved hparams, every field of the method's hparams class that they lack (a
    field added by a later fastmemit) at its default: new fields default to the behaviour before them,
    so an older run compares equal unless a value really changed. As stored for a method this version
    does not know."""
    hp = config_json.get("hparams")
    try:
        cls = get_method(str(config_json.get("method"))).hparams_cls
    except EditError:
        return hp
    return {**cls.defaults(), **hp} if isinstance(hp, Mapping) else hp


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{field_label(k) if prefix == 'run.' else k}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            if isinstance(a, list) and isinstance(b, list) and (len(a) > 8 or len(b) > 8):
                out.append(f"{name}: {len(a)} items → {len(b)} items" if len(a) != len(b) else f"{name}: lists differ")
            else:
                out.append(f"{name}: {a!r} → {b!r}")
    return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"<key>: old → new"`` for every difference between two stored configs that forbids
    continuing ``old`` with ``new`` (empty: the same run)."""
    return _differences(identity(old), identity(new))


def setting_conflicts(run: RunConfig, wanted: Mapping[str, Any]) -> list[str]:
    """The settings in ``wanted`` (field names or aliases) that contradict the stored run ``run``
    (runtime fields never do), as ``"--name value (run: value)"``."""
    wanted = canonical_settings(wanted)
    stored = run.to_dict()
    given = {**stored, **wanted, **normalized_paths(wanted)}
    return [f"--{field_label(k).replace(' (', ' (--')} {given[k]!r} (run: {stored[k]!r})" for k in wanted
            if k not in RUNTIME_FIELDS and given[k] != stored[k]]
