"""Evaluation runs: edit a dataset's cases batch after batch, score each case before and after.

``run_evaluation(RunConfig(...), out_dir)`` (CLI: ``fastmemit evaluate``) does, in this order:

1. load and order the cases (fail here, before any file is written, on a malformed dataset);
   load the model (or take the caller's), resolve the hparams, write ``config.json``;
2. **pre**: score every case on the unedited model (chunks of ``eval_chunk`` cases → ``pre.jsonl``);
3. downstream baseline (optional) on the unedited model;
4. **edits**: ``num_edits`` cases a batch. *Sequential* (default): one :class:`~fastmemit.Editor`
   for the whole run, edits accumulate. *Batched*: the model is restored after every batch. Right
   after a batch's edit its cases are scored (**post**); their lines go to ``cases.jsonl``;
5. **final** (sequential; ``final_eval``): every case scored again on the finally edited model;
6. ``summary.json`` (also rewritten after every batch with ``"partial": true``) and plots.

Resuming. Every result file is written a group at a time (a batch of ``cases.jsonl``, a chunk of
``pre.jsonl``/``final.jsonl``, one downstream check) with one ``write`` + flush + fsync; a restart
keeps the longest prefix of complete groups and truncates the rest (a torn line, a half batch).
In sequential mode the edited model is rebuilt from a checkpoint written after the batch's lines:
the cumulative deltas W − W₀ in float64 (exact: W₀ + Δ rounds back to W bit for bit; the file is an
ordinary deltas file, ``apply_deltas`` takes it) plus the method's tensor state (AlphaEdit's keys of
earlier edits), and batches after the last checkpoint are redone. Statistics and context templates
are prepared on the unedited model before the checkpoint is applied, as in an uninterrupted run,
and every batch seeds torch's RNG with ``seed + batch``: a resumed run writes the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmemit.editing import write_weights
from fastmemit.errors import DeltaMismatchError, EditError, FastMemitError
from fastmemit.eval.datasets import (
    CounterFactCase,
    DatasetError,
    ZsreCase,
    default_data_dir,
    load_attribute_snippets,
    load_dataset,
    load_seed_ordering,
    load_tfidf,
    order_cases,
)
from fastmemit.utils import atomic_path, logger, progress, read_json, write_json_atomic

RUN_FORMAT = 1

# Built-in short names → (loader name, seed-ordering file).
DATASETS: dict[str, tuple[str, str]] = {
    "cf": ("counterfact", "counterfact_sampled_unique_cf_10_20000.json"),
    "counterfact": ("counterfact", "counterfact_sampled_unique_cf_10_20000.json"),
    "mcf": ("mcf", "counterfact_sampled_unique_mcf_10_20000.json"),
    "multi_counterfact": ("mcf", "counterfact_sampled_unique_mcf_10_20000.json"),
    "zsre": ("zsre", "zsre_sampled_unique_10_10000.json"),
}

ALL_DOWNSTREAM_TASKS = "sst2,mrpc,cola,rte,mmlu,nli,sentiment_analysis,dialogue"


class RunError(FastMemitError, ValueError):
    """A run folder cannot be used: another configuration, a broken checkpoint, a bad flag."""


# ----------------------------------------------------------------------------- configuration


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Everything that defines a run. Fields in :data:`RUNTIME_FIELDS` may change on a restart;
    any other difference from the run folder's ``config.json`` is refused."""

    alg_name: str = _f("EMMET", "editing method (a registered name: ROME, MEMIT, EMMET, AlphaEdit)")
    model_name: str = _f("smollm2-135m", "model alias, folder or hub id (a label when a model object is passed)")
    hparams_fname: str | None = _f(None, "hparams JSON file or built-in name; None: the built-in for (method, model)")
    hparams_overrides: dict[str, Any] = _f(help="hparams fields set on top of the file (recompute_stats, --set ...)",
                                            factory=dict)
    ds_name: str = _f("cf", "cf | counterfact | mcf | zsre")
    data: str | None = _f(None, "dataset file; None: the download cache (see load_dataset)")
    download: bool = _f(False, "fetch the published dataset file when data is None and it is not cached")
    dataset_size_limit: int | None = _f(None, "use at most this many cases (after ordering)")
    sample_num: int | None = _f(None, "seed ordering K of the dataset's seed-samples file; None: file order")
    seed_samples: str | None = _f(None, "seed-samples file or folder; None: looked up beside the data")
    num_edits: int = _f(1, "cases per batch (edited together)")
    sequential: bool = _f(True, "edits accumulate over batches (False: restore the model after each batch)")
    seed: int = _f(0, "seeds context templates, the statistics corpus shuffle and torch's RNG per batch")
    corpus: str | None = _f(None, "statistics corpus; None: hparams.stats_corpus or the default")
    eval_batch_size: int = _f(32, "(prompt, target) pairs per scoring forward pass")
    eval_chunk: int = _f(100, "cases per pre/final scoring chunk (the unit written and resumed)")
    skip_generation_tests: bool = _f(False, "no fluency/consistency generations")
    generation_test_interval: int = _f(1, "generation tests for every K-th case (K ≤ 0: none)")
    consistency_dir: str | None = _f(None, "folder of attribute_snippets.json, idf.npy, tfidf_vocab.json")
    final_eval: bool | None = _f(None, "sequential: score all cases again on the final model (None: on)")
    do_downstream_eval: bool = _f(False, "few-shot downstream checks before the first edit and every K batches")
    downstream_eval_steps: int = _f(1, "K: a downstream check after every K batches (and after the last)")
    downstream_tasks: str = _f(ALL_DOWNSTREAM_TASKS, "comma list of downstream tasks")
    number_of_few_shots: str | None = _f(None, "comma list, one shot count per task (None: 0)")
    number_of_tests: int | None = _f(None, "test items per task (None: all)")
    downstream_data_dir: str | None = _f(None, "folder of <task>.jsonl (None: the downstream default)")
    dtype: str = _f("float32", "model dtype when the runner loads the model")
    # --- runtime: may change between a run and its restart
    device: str = _f("cpu", "torch device when the runner loads the model")
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
        if self.ds_name not in DATASETS:
            raise RunError(f"ds_name must be one of {', '.join(DATASETS)}, got {self.ds_name!r}")
        for name in ("num_edits", "eval_batch_size", "eval_chunk", "downstream_eval_steps", "checkpoint_interval",
                     "save_model_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RunError(f"{name} must be a positive integer, got {v!r}")
        if self.dataset_size_limit is not None and (
                isinstance(self.dataset_size_limit, bool) or not isinstance(self.dataset_size_limit, int)
                or self.dataset_size_limit < 1):
            raise RunError(f"dataset_size_limit must be a positive integer or None, got {self.dataset_size_limit!r}")
        if self.sample_num is not None and (isinstance(self.sample_num, bool) or not isinstance(self.sample_num, int)
                                            or self.sample_num < 0):
            raise RunError(f"sample_num must be a non-negative integer or None, got {self.sample_num!r}")
        if self.save_model_format not in ("deltas", "full"):
            raise RunError(f"save_model_format must be 'deltas' or 'full', got {self.save_model_format!r}")
        if not isinstance(self.hparams_overrides, dict):
            raise RunError("hparams_overrides must be a dict")

    @property
    def mode(self) -> str:
        return "sequential" if self.sequential else "batched"

    @property
    def do_final_eval(self) -> bool:
        return self.sequential and (self.final_eval is None or bool(self.final_eval))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RunError(f"unknown run setting(s) {unknown}; known: {', '.join(sorted(names))}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> RunConfig:
        """A run's ``config.json`` (its ``"run"`` block) or a plain JSON object of settings."""
        p = Path(path)
        data = read_json(p, "config file", RunError)
        if isinstance(data, dict) and "run" in data and isinstance(data["run"], dict):
            data = data["run"]
        if not isinstance(data, dict):
            raise RunError(f"config file {str(p)!r}: expected a JSON object")
        return cls.from_dict(data)


RUNTIME_FIELDS = frozenset({"device", "use_cache", "stats_cache_dir", "conserve_memory", "checkpoint_interval",
                            "save_model", "save_model_interval", "save_model_location", "save_model_format",
                            "plots", "show_progress", "download"})


def identity(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a stored config that must be equal for a restart to continue the run."""
    run = {k: v for k, v in config_json.get("run", {}).items() if k not in RUNTIME_FIELDS}
    return {"format": config_json.get("format"), "run": run, "method": config_json.get("method"),
            "hparams": config_json.get("hparams"), "base_fingerprint": config_json.get("base_fingerprint"),
            "case_ids": config_json.get("case_ids")}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            if isinstance(a, list) and isinstance(b, list) and (len(a) > 8 or len(b) > 8):
                out.append(f"{prefix}{k}: {len(a)} items → {len(b)} items" if len(a) != len(b)
                           else f"{prefix}{k}: lists differ")
            else:
                out.append(f"{prefix}{k}: {a!r} → {b!r}")
    return out


# ----------------------------------------------------------------------------- cases


Case = CounterFactCase | ZsreCase


def seed_samples_file(cfg: RunConfig, data_path: Path | None) -> Path:
    """The seed-ordering file for ``cfg.ds_name``: ``cfg.seed_samples`` (file or folder), else
    ``seed-samples/`` beside the dataset file, the dataset's folder, or ``<cache>/data/seed-samples``."""
    fname = DATASETS[cfg.ds_name][1]
    if cfg.seed_samples is not None:
        p = Path(cfg.seed_samples).expanduser()
        cands = [p / fname, p] if p.is_dir() else [p]
    else:
        cands = []
        if data_path is not None:
            cands += [data_path.parent / "seed-samples" / fname, data_path.parent / fname]
        cands += [default_data_dir() / "seed-samples" / fname, default_data_dir() / fname]
    for c in cands:
        if c.is_file():
            return c
    raise DatasetError(f"--sample_num {cfg.sample_num}: seed-ordering file {fname} not found (looked at "
                       f"{', '.join(map(str, cands))}); pass --seed_samples FILE_OR_FOLDER or omit --sample_num "
                       "for the file's own order")


def load_cases(cfg: RunConfig) -> list[Case]:
    """The run's cases in run order: ordering ``sample_num`` when given (else file order), at most
    ``dataset_size_limit``."""
    loader = DATASETS[cfg.ds_name][0]
    data_path = Path(cfg.data).expanduser() if cfg.data is not None else None
    # without an ordering the first N records are the first N cases (zsRE: skipped records aside)
    head = cfg.dataset_size_limit if cfg.sample_num is None and loader != "zsre" else None
    cases = list(load_dataset(loader, data_path, dataset_size_limit=head, download=cfg.download))
    if not cases:
        raise DatasetError(f"{cfg.data or cfg.ds_name}: no cases")
    if cfg.sample_num is not None:
        path = seed_samples_file(cfg, data_path)
        ordering = load_seed_ordering(path, cfg.sample_num)
        picked = order_cases(cases, ordering, limit=cfg.dataset_size_limit)
        if not picked:
            raise DatasetError(f"ordering {cfg.sample_num} of {path.name} names none of the {len(cases)} case ids "
                               "in the dataset file")
        return picked
    return cases[: cfg.dataset_size_limit] if cfg.dataset_size_limit is not None else cases


def case_request(case: Case) -> Any:
    from fastmemit.requests import EditRequest

    return EditRequest.from_any(case.requested_rewrite)


# ----------------------------------------------------------------------------- group-atomic JSON Lines


class GroupLog:
    """A JSON Lines file written one group (a batch, a chunk, a check) at a time.

    Each group's lines go out in one ``write`` followed by flush and fsync. :meth:`load` returns the
    longest prefix of complete groups and truncates the file after it, so that a torn line or a
    half-written group from an interrupted run is dropped and redone.
    """

    def __init__(self, path: Path, group_key: str, id_key: str) -> None:
        self.path, self.group_key, self.id_key = path, group_key, id_key

    def load(self, expected: Sequence[tuple[int, Sequence[Any]]], max_groups: int | None = None) -> list[list[dict[str, Any]]]:
        """Complete groups, in order; ``expected`` = [(group, [ids in order]), ...]."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines: list[tuple[int, dict[str, Any]]] = []  # (end offset, record)
        pos = 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl < 0:
                break  # torn final line
            try:
                rec = json.loads(raw[pos:nl].decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not isinstance(rec, dict):
                break
            lines.append((nl + 1, rec))
            pos = nl + 1
        groups: list[list[dict[str, Any]]] = []
        keep, i = 0, 0
        limit = len(expected) if max_groups is None else min(max_groups, len(expected))
        for gid, ids in expected[:limit]:
            chunk = lines[i : i + len(ids)]
            if len(chunk) < len(ids) or any(r.get(self.group_key) != gid or r.get(self.id_key) != cid
                                            for (_, r), cid in zip(chunk, ids)):
                break
            groups.append([r for _, r in chunk])
            i += len(ids)
            keep = chunk[-1][0]
        if keep < len(raw):
            dropped = len(raw) - keep
            logger.info("%s: dropping %d trailing byte(s) of unfinished or superseded groups", self.path.name, dropped)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        return groups

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "ab") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One process per run folder (POSIX advisory lock; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunError(f"another process is running in {run_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- hparams


def resolve_run_hparams(method: Any, cfg: RunConfig, model: nn.Module) -> tuple[Any, str]:
    """(hparams, source): ``cfg.hparams_fname`` (file or built-in name), else the built-in for the
    model; then ``cfg.hparams_overrides``."""
    from fastmemit.editing import resolve_hparams
    from fastmemit.hparams_registry import model_key

    if cfg.hparams_fname is not None:
        p = Path(cfg.hparams_fname).expanduser()
        hp = resolve_hparams(method, str(p.resolve()) if p.exists() else cfg.hparams_fname, model)
        source = str(p.resolve()) if p.exists() else f"built-in {cfg.hparams_fname}"
    else:
        hp = resolve_hparams(method, None, model)
        source = f"built-in {method.name}/{model_key(model)}"
    if cfg.hparams_overrides:
        hp = hp.replace(**cfg.hparams_overrides)
    return hp, source


def hparams_label(hp: Mapping[str, Any]) -> str:
    """A short label of the hparams that usually differ between compared runs."""
    layers = hp.get("layers") or []
    lay = f"L{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) \
        else "L" + ",".join(map(str, layers))
    stats = f"dm{hp.get('dynamic_multiplier'):g}" if hp.get("dynamic") else f"n{hp.get('mom2_n_samples')}"
    parts = [lay, stats, f"λ{hp.get('mom2_update_weight'):g}"]
    if hp.get("recompute_stats"):
        parts.append("recompute")
    return " ".join(parts)


# ----------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module
    tok: Any


Event = Callable[[str, int], None]


def default_run_dir(alg_name: str, root: str | os.PathLike[str] = "results") -> Path:
    """``results/<ALG>/run_NNN``, the next free number (the research code's layout)."""
    base = Path(root) / alg_name
    nums = [int(p.name[4:]) for p in base.glob("run_*") if p.name[4:].isdigit()] if base.is_dir() else []
    return base / f"run_{(max(nums) + 1 if nums else 0):03d}"


def run_evaluation(
    cfg: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    tok: Any = None,
    target_cache: dict[Any, Any] | None = None,
    on_event: Event | None = None,
    command: Sequence[str] | None = None,
    continue_run: bool = False,
) -> RunResult:
    """Run (or resume) the evaluation ``cfg`` in ``out_dir``; returns the summary.

    ``model``/``tok``: an already loaded model (``cfg.model_name`` is then only a label); otherwise
    the runner loads ``cfg.model_name``. Batched runs leave the model's weights as they were;
    sequential runs leave it edited with all the run's edits (restored to the original weights if
    the run is interrupted). ``target_cache``: a z* cache shared between batched runs on the same
    model. ``on_event(name, batch)`` is called at "batch_written" and "checkpoint_written" (tests use
    it to interrupt a run at a chosen point). ``continue_run``: ``out_dir`` must hold a run, whose
    stored hparams are used as they are (not resolved again: a built-in file may have changed since).
    """
    return _Run(cfg, Path(out_dir), model, tok, target_cache, on_event, command, continue_run).run()


class _Run:
    def __init__(self, cfg: RunConfig, run_dir: Path, model: nn.Module | None, tok: Any,
                 target_cache: dict[Any, Any] | None, on_event: Event | None, command: Sequence[str] | None,
                 continue_run: bool = False) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.continue_run = continue_run
        self.model, self.tok = model, tok
        self.target_cache = target_cache
        self.on_event = on_event or (lambda name, batch: None)
        self.command = list(command) if command is not None else None
        self.t_start = time.perf_counter()
        self.session_times: dict[str, float] = {}

    # --- setup ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        from fastmemit.methods import get_method
        from fastmemit.models.fingerprint import model_fingerprint

        cfg = self.cfg
        self.method = get_method(cfg.alg_name)  # unknown method: fail before loading anything
        if cfg.do_downstream_eval:
            from fastmemit.downstream import parse_task_flags

            self.ds_flags = parse_task_flags(cfg.downstream_tasks, cfg.number_of_few_shots, cfg.number_of_tests)
        self.cases = load_cases(cfg)
        self.requests = [case_request(c) for c in self.cases]  # malformed requests: fail before writing
        self.is_zsre = isinstance(self.cases[0], ZsreCase)
        self.snippets = self.tfidf = None
        if not self.is_zsre and not cfg.skip_generation_tests:
            self._load_consistency()
        if self.model is None:
            from fastmemit.models import load_model

            t0 = time.perf_counter()
            self.model, self.tok = load_model(cfg.model_name, device=cfg.device, dtype=cfg.dtype)
            self.session_times["load_model"] = time.perf_counter() - t0
        elif self.tok is None:
            raise RunError("a model was passed without its tokenizer")
        self.model.eval()
        if self.continue_run:
            stored = self._stored_config()
            self.hp = self.method.hparams_cls.from_dict(stored.get("hparams") or {}, source=f"{self.run_dir}/config.json")
            self.hp_source = stored.get("hparams_source", "stored")
        else:
            self.hp, self.hp_source = resolve_run_hparams(self.method, cfg, self.model)
        from fastmemit.models.arch import check_layers

        try:
            check_layers(self.model, self.hp.layers)
        except ValueError as e:
            raise EditError(f"hparams.layers: {e}") from None
        self.base_fp = model_fingerprint(self.model)
        n = cfg.num_edits
        self.batches = [list(range(s, min(s + n, len(self.cases)))) for s in range(0, len(self.cases), n)]
        m = cfg.eval_chunk
        self.chunks = [list(range(s, min(s + m, len(self.cases)))) for s in range(0, len(self.cases), m)]
        self.config_json = self._config_json()

    def _stored_config(self) -> dict[str, Any]:
        path = self.run_dir / "config.json"
        if not path.is_file():
            raise RunError(f"{self.run_dir} holds no run to continue (no config.json)")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{path} is not valid JSON ({e.msg}); remove the folder or choose another --out") from None

    def _load_consistency(self) -> None:
        folder = Path(self.cfg.consistency_dir).expanduser() if self.cfg.consistency_dir else (
            Path(self.cfg.data).expanduser().parent if self.cfg.data else None)
        if folder is None or not any(c.generation_prompts for c in self.cases):
            return
        files = [folder / "attribute_snippets.json", folder / "idf.npy", folder / "tfidf_vocab.json"]
        if all(f.is_file() for f in files):
            self.snippets = load_attribute_snippets(files[0])
            self.tfidf = load_tfidf(files[1], files[2])
        elif self.cfg.consistency_dir:
            raise DatasetError(f"consistency_dir {folder} lacks {', '.join(f.name for f in files if not f.is_file())}")

    def _config_json(self) -> dict[str, Any]:
        import fastmemit

        run = self.cfg.to_dict()
        for k in ("data", "seed_samples", "consistency_dir", "downstream_data_dir"):
            if run[k] is not None:
                run[k] = str(Path(run[k]).expanduser().resolve())
        if run["hparams_fname"] is not None and Path(run["hparams_fname"]).expanduser().exists():
            run["hparams_fname"] = str(Path(run["hparams_fname"]).expanduser().resolve())
        return {
            "format": RUN_FORMAT,
            "run": run,
            "method": self.method.name,
            "hparams": self.hp.to_dict(),
            "hparams_source": self.hp_source,
            "hparams_label": hparams_label(self.hp.to_dict()),
            "base_fingerprint": self.base_fp,
            "model_class": type(self.model).__name__,
            "n_cases": len(self.cases),
            "n_batches": len(self.batches),
            "case_ids": [c.case_id for c in self.cases],
            "fastmemit_version": fastmemit.__version__,
            "command": self.command,
            "reproduce": f"fastmemit evaluate --config {shlex.quote(str(self.run_dir / 'config.json'))} --out NEW_DIR",
        }

    def _open_run_dir(self) -> None:
        cfg_path = self.run_dir / "config.json"
        if cfg_path.is_file():
            old = self._stored_config()
            diffs = _differences(identity(old), identity(self.config_json))
            if diffs:
                raise RunError(
                    f"{self.run_dir} holds a run with another configuration; refusing to mix results. Differences "
                    f"(stored → now): {'; '.join(diffs[:12])}{' ...' if len(diffs) > 12 else ''}. Use a new --out, or "
                    f"--continue_from_run {self.run_dir} to resume that run with its own settings"
                )
            runtime = {k: v for k, v in self.config_json["run"].items() if k in RUNTIME_FIELDS}
            if any(old.get("run", {}).get(k) != v for k, v in runtime.items()):
                old["run"].update(runtime)
                write_json_atomic(cfg_path, old)
            self.resumed = True
        else:
            write_json_atomic(self.run_dir / "hparams.json", self.config_json["hparams"])
            write_json_atomic(cfg_path, self.config_json)  # the last file of a fresh run's setup
            self.resumed = False

    # --- evaluation ------------------------------------------------------------------------
    def _gen_case(self, i: int) -> bool:
        k = self.cfg.generation_test_interval
        return not self.cfg.skip_generation_tests and k > 0 and i % k == 0

    def _score(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        from fastmemit.eval.metrics import evaluate_counterfact_cases, evaluate_zsre_cases

        cases = [self.cases[i] for i in idx]
        bs = self.cfg.eval_batch_size
        if self.is_zsre:
            return evaluate_zsre_cases(self.model, self.tok, cases, batch_size=bs)
        # generation tests only for every K-th case: the others go in without generation prompts
        cases = [c if self._gen_case(i) or not c.generation_prompts else dataclasses.replace(c, generation_prompts=())
                 for i, c in zip(idx, cases)]
        return evaluate_counterfact_cases(self.model, self.tok, cases, batch_size=bs,
                                          generation=any(c.generation_prompts for c in cases),
                                          snippets=self.snippets, tfidf=self.tfidf)

    def _chunk_phase(self, log: GroupLog, key: str, desc: str) -> dict[int, dict[str, Any]]:
        """Score every chunk of cases (those not already in ``log``); {case index: record}."""
        expected = [(g, [self.cases[i].case_id for i in ch]) for g, ch in enumerate(self.chunks)]
        done = log.load(expected)
        out: dict[int, dict[str, Any]] = {}
        for g, lines in enumerate(done):
            for i, rec in zip(self.chunks[g], lines):
                out[i] = rec
        todo = range(len(done), len(self.chunks))
        if not todo:
            return out
        bar = progress(total=len(todo), desc=desc, unit="chunk", disable=None if self.cfg.show_progress else True)
        try:
            for g in todo:
                t0 = time.perf_counter()
                recs = self._score(self.chunks[g])
                seconds = time.perf_counter() - t0
                lines = [{"chunk": g, "case_id": r["case_id"], "seconds_chunk": seconds, key: r} for r in recs]
                log.append(lines)
                for i, rec in zip(self.chunks[g], lines):
                    out[i] = rec
                bar.update(1)
        finally:
            bar.close()
        return out

    # --- downstream ---------------------------------------------------------------------------
    def _check_points(self) -> list[int]:
        """batches_done values after which a downstream check runs (0: the baseline)."""
        K, n = self.cfg.downstream_eval_steps, len(self.batches)
        pts = [0] + [b for b in range(1, n + 1) if b % K == 0]
        return pts if pts[-1] == n else [*pts, n]

    def _edits_after(self, batches_done: int) -> int:
        if self.cfg.sequential:
            return sum(len(b) for b in self.batches[:batches_done])
        return len(self.batches[batches_done - 1]) if batches_done else 0

    def _downstream_check(self, batches_done: int) -> dict[str, Any]:
        from fastmemit.downstream import evaluate_tasks, results_to_records

        t0 = time.perf_counter()
        f = self.ds_flags
        res = evaluate_tasks(self.model, self.tok, tasks=f.tasks, n_shots=f.n_shots, n_tests=f.n_tests,
                             data_dir=self.cfg.downstream_data_dir, seed=self.cfg.seed)
        edits = self._edits_after(batches_done)
        rec = {"check": self._check_points().index(batches_done), "batches_done": batches_done,
               "edits_so_far": edits, "seconds": time.perf_counter() - t0, "results": res,
               "records": results_to_records(res, edits_so_far=edits, batches_done=batches_done)}
        self.ds_log.append([rec])
        self.downstream.append(rec)
        return rec

    # --- checkpoints (sequential) --------------------------------------------------------------
    def _edited_params(self) -> dict[str, nn.Parameter]:
        from fastmemit.models.arch import mlp_down_weight

        return dict(mlp_down_weight(self.model, layer) for layer in self.hp.layers)

    def _write_checkpoint(self, batches_done: int, editor: Any) -> Path:
        from safetensors.torch import save_file

        from fastmemit.editing import EditResult
        from fastmemit.models.fingerprint import model_fingerprint

        t0 = time.perf_counter()
        ck = self.run_dir / "checkpoint"
        ck.mkdir(exist_ok=True)
        tag = f"{batches_done:06d}"
        deltas = {}
        for name, p in self._edited_params().items():
            w = p.detach().cpu()
            d = w.double() - self.w0[name].double()  # exact: W and W₀ are float32/16 values
            if not torch.equal((self.w0[name].double() + d).to(w.dtype), w):  # pragma: no cover - cannot happen
                raise RunError(f"checkpoint of {name} would not reproduce the edited weights")
            deltas[name] = d
        n_done = sum(len(b) for b in self.batches[:batches_done])
        result = EditResult(deltas, self.method.name, self.hp.to_dict(), self.requests[:n_done], self.base_fp)
        result.save(ck / f"deltas-{tag}.safetensors")
        state = editor.state_dict()
        with atomic_path(ck / f"state-{tag}.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"batches_done": str(batches_done)})
        write_json_atomic(ck / "checkpoint.json", {
            "batches_done": batches_done, "edits": n_done, "deltas": f"deltas-{tag}.safetensors",
            "state": f"state-{tag}.safetensors", "base_fingerprint": self.base_fp,
            "fingerprint": model_fingerprint(self.model),
        })
        for old in ck.glob("*.safetensors"):  # older checkpoints, and orphans of an interrupted write
            if tag not in old.name:
                old.unlink()
        self.session_times["checkpoint"] = self.session_times.get("checkpoint", 0.0) + time.perf_counter() - t0
        return ck / f"deltas-{tag}.safetensors"

    def _checkpoint_batches(self) -> int:
        manifest = self.run_dir / "checkpoint" / "checkpoint.json"
        if not manifest.is_file():
            return 0
        try:
            return int(json.loads(manifest.read_text())["batches_done"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s is unreadable: starting the edits over", manifest)
            return 0

    def _restore_checkpoint(self, batches_done: int, editor: Any, with_state: bool = True) -> None:
        """Re-apply the checkpoint of ``batches_done`` batches (model at W₀ on entry)."""
        from safetensors.torch import load_file

        from fastmemit.editing import load_deltas
        from fastmemit.models.fingerprint import model_fingerprint

        ck = self.run_dir / "checkpoint"
        manifest = json.loads((ck / "checkpoint.json").read_text())
        if manifest.get("batches_done") != batches_done:
            raise RunError(f"{ck}: checkpoint holds {manifest.get('batches_done')} batches, expected {batches_done}")
        tensors, meta = load_deltas(ck / manifest["deltas"])
        # the deltas are applied to W₀ without apply_deltas' own check: the base model is checked here
        if meta.get("fingerprint") != self.base_fp or model_fingerprint(self.model) != self.base_fp:
            raise DeltaMismatchError(f"{ck}: checkpoint made on model {meta.get('fingerprint')}, run's model is "
                                     f"{self.base_fp}, loaded model is {model_fingerprint(self.model)}")
        params = self._edited_params()
        if set(tensors) != set(params):
            raise RunError(f"{ck}: checkpoint edits {sorted(tensors)}, the run edits {sorted(params)}")
        write_weights(self.model, self.w0, {name: d.double() for name, d in tensors.items()})
        if model_fingerprint(self.model) != manifest.get("fingerprint"):
            raise RunError(f"{ck}: re-applied checkpoint does not reproduce the edited model's fingerprint")
        if with_state:  # statistics prepared as needed (recompute_stats: on the edited model)
            editor.load_state_dict(load_file(str(ck / manifest["state"])))
        logger.info("resumed from checkpoint after %d batches (%d edits)", batches_done, manifest.get("edits"))

    def _restore_base(self) -> None:
        write_weights(self.model, self.w0)

    def _save_model(self, batches_done: int, result: Any) -> None:
        cfg = self.cfg
        loc = Path(cfg.save_model_location).expanduser() if cfg.save_model_location else self.run_dir / "models"
        loc.mkdir(parents=True, exist_ok=True)
        edits = self._edits_after(batches_done)
        if cfg.save_model_format == "full":
            import shutil
            import tempfile

            target = loc / f"model_batch{batches_done:05d}_{edits}edits"
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=loc))
            try:
                self.model.save_pretrained(tmp)
                self.tok.save_pretrained(tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        elif cfg.sequential:
            import shutil

            src = self.run_dir / "checkpoint" / f"deltas-{batches_done:06d}.safetensors"
            if not src.is_file():
                src = self._write_checkpoint(batches_done, self.editor)
            with atomic_path(loc / f"deltas_batch{batches_done:05d}_{edits}edits.safetensors") as tmp:
                shutil.copyfile(src, tmp)
        else:
            result.save(loc / f"deltas_batch{batches_done:05d}.safetensors")

    # --- summary ---------------------------------------------------------------------------
    def _summary(self, partial: bool) -> dict[str, Any]:
        from fastmemit.eval.metrics import summarize

        done = [r for lines in self.batch_lines for r in lines]
        times = {"stats": 0.0, "v": 0.0, "solve": 0.0, "eval_pre": 0.0, "eval_post": 0.0, "eval_final": 0.0,
                 "downstream": 0.0}
        for lines in self.batch_lines:
            t = lines[0]["batch_timings"]
            for k in ("stats", "v", "solve"):
                times[k] += t.get(k, 0.0)
            times["eval_post"] += t.get("eval", 0.0)
        for recs, key in ((self.pre, "eval_pre"), (self.final, "eval_final")):
            seen = {}
            for r in recs.values():
                seen[r["chunk"]] = r["seconds_chunk"]
            times[key] = sum(seen.values())
        times["downstream"] = sum(r["seconds"] for r in self.downstream)
        times["eval"] = times["eval_pre"] + times["eval_post"] + times["eval_final"]
        times["edit"] = times["stats"] + times["v"] + times["solve"]
        times["total"] = times["edit"] + times["eval"] + times["downstream"]
        s: dict[str, Any] = {
            "partial": partial,
            "run_dir": str(self.run_dir),
            "method": self.method.name,
            "model": self.cfg.model_name,
            "dataset": self.cfg.ds_name,
            "mode": self.cfg.mode,
            "num_edits": self.cfg.num_edits,
            "hparams_label": self.config_json["hparams_label"],
            "stats": {k: self.hp.to_dict().get(k) for k in ("dynamic", "dynamic_multiplier", "mom2_n_samples",
                                                             "mom2_update_weight", "update_norm_lambda",
                                                             "recompute_stats", "stats_corpus")},
            "n_cases_planned": len(self.cases),
            "n_cases": len(done),
            "batches_done": len(self.batch_lines),
            "n_batches": len(self.batches),
            "pre": summarize([r["pre"] for r in done]) if done else {},
            "post": summarize([r["post"] for r in done]) if done else {},
        }
        if self.cfg.do_final_eval and len(self.final) == len(self.cases):
            s["final"] = summarize([self.final[i]["final"] for i in range(len(self.cases))])
            s["pre_all"] = summarize([self.pre[i]["pre"] for i in range(len(self.cases))])
        s["time_seconds"] = {k: round(v, 3) for k, v in times.items()}
        s["edits_per_second"] = len(done) / times["edit"] if times["edit"] > 0 else None
        if self.downstream:
            s["downstream"] = {"checks": len(self.downstream),
                               "baseline": self.downstream[0]["records"] if self.downstream[0]["batches_done"] == 0 else None,
                               "last": self.downstream[-1]["records"],
                               "last_edits_so_far": self.downstream[-1]["edits_so_far"]}
        s["session_seconds"] = {k: round(v, 3) for k, v in self.session_times.items()}
        s["session_seconds"]["wall"] = round(time.perf_counter() - self.t_start, 3)
        return s

    def _write_summary(self, partial: bool) -> dict[str, Any]:
        s = self._summary(partial)
        write_json_atomic(self.run_dir / "summary.json", s)
        return s

    # --- main ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self._prepare()  # everything that can fail on bad input, before the run folder is touched
        if self.run_dir.exists() and not (self.run_dir / "config.json").is_file() and any(
                p.name != ".lock" for p in self.run_dir.iterdir()):
            raise RunError(f"{self.run_dir} exists, is not empty and holds no config.json: not a run folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _run_lock(self.run_dir):
            self._open_run_dir()
            return self._run_locked()

    def _run_locked(self) -> RunResult:
        from fastmemit.editing import Editor

        cfg = self.cfg
        rd = self.run_dir
        n_batches = len(self.batches)
        self.final: dict[int, dict[str, Any]] = {}
        self.downstream: list[dict[str, Any]] = []

        # 1. pre-edit scores of every case, on the unedited model
        self.pre = self._chunk_phase(GroupLog(rd / "pre.jsonl", "chunk", "case_id"), "pre", "pre-edit scoring")

        # 2. how far the edits got: complete batches in cases.jsonl, in sequential mode no further than
        #    the checkpoint (later batches are redone from it)
        cases_log = GroupLog(rd / "cases.jsonl", "batch", "case_id")
        expected = [(b, [self.cases[i].case_id for i in idx]) for b, idx in enumerate(self.batches)]
        ck_batches = self._checkpoint_batches() if cfg.sequential else None
        self.batch_lines = cases_log.load(expected, max_groups=ck_batches)
        start = len(self.batch_lines)
        if cfg.sequential and ck_batches and ck_batches > start:
            # results behind the checkpoint (a file edited by hand?): no model state to continue from
            logger.warning("checkpoint after %d batches but cases.jsonl holds %d complete batches: redoing all edits",
                           ck_batches, start)
            self.batch_lines = cases_log.load(expected, max_groups=0)
            start = 0
        if self.resumed:
            logger.info("%s: resuming after %d of %d batches", rd, start, n_batches)

        # 3. downstream checks already made (those beyond the resume point are dropped)
        if cfg.do_downstream_eval:
            self.ds_log = GroupLog(rd / "downstream.jsonl", "check", "batches_done")
            pts = [p for p in self._check_points() if p <= start]
            self.downstream = [g[0] for g in self.ds_log.load([(i, [p]) for i, p in enumerate(pts)])]
            if not self.downstream:
                self._downstream_check(0)

        # 4. the edits
        params = self._edited_params()
        self.w0 = {name: p.detach().cpu().clone() for name, p in params.items()}  # W₀ of the edited matrices
        if cfg.sequential or cfg.conserve_memory:
            cache = None
        else:
            cache = self.target_cache if self.target_cache is not None else {}
        editor = Editor(self.model, self.tok, self.method.name, self.hp, corpus=cfg.corpus,
                        stats_cache_dir=cfg.stats_cache_dir, seed=cfg.seed, show_progress=cfg.show_progress,
                        use_cache=cfg.use_cache, target_cache=cache)
        self.editor = editor
        try:
            if cfg.sequential and start > 0:
                t0 = time.perf_counter()
                more = start < n_batches
                if more:
                    editor.templates()  # generated by the unedited model, as in an uninterrupted run
                    if not self.hp.recompute_stats:
                        editor.prepare_stats()  # statistics of the unedited model
                self._restore_checkpoint(start, editor, with_state=more)
                self.session_times["resume"] = time.perf_counter() - t0
            self._edit_batches(editor, start)
            # 5. final scores of every case on the finally edited model
            if cfg.do_final_eval:
                self.final = self._chunk_phase(GroupLog(rd / "final.jsonl", "chunk", "case_id"), "final",
                                               "final scoring")
        except BaseException:
            if cfg.sequential:
                self._restore_base()
            logger.warning("%s: stopped after %d of %d batches; run the same command again to resume",
                           rd, len(self.batch_lines), n_batches)
            raise
        summary = self._write_summary(partial=False)
        if cfg.plots:
            try:
                from fastmemit.eval.plots import plot_run

                plot_run(rd)
            except Exception as e:  # a plot must not fail a finished run
                logger.warning("plots not written: %s", e)
        return RunResult(rd, summary, self.model, self.tok)

    def _edit_batches(self, editor: Any, start: int) -> None:
        cfg = self.cfg
        n_batches = len(self.batches)
        if start >= n_batches:
            return
        cases_log = GroupLog(self.run_dir / "cases.jsonl", "batch", "case_id")
        checks = set(self._check_points()) if cfg.do_downstream_eval else set()
        bar = progress(total=n_batches - start, desc=f"{self.method.name} {cfg.mode} batches", unit="batch",
                       disable=None if cfg.show_progress else True)
        try:
            for b in range(start, n_batches):
                idx = self.batches[b]
                torch.manual_seed(cfg.seed + b)
                t0 = time.perf_counter()
                result = editor.edit([self.requests[i] for i in idx])
                t_edit = time.perf_counter() - t0
                try:
                    t1 = time.perf_counter()
                    post = self._score(idx)
                    t_eval = time.perf_counter() - t1
                    if (b + 1) in checks:
                        self._downstream_check(b + 1)
                    timings = {**{k: float(v) for k, v in result.timings.items()}, "edit": t_edit, "eval": t_eval}
                    edits = self._edits_after(b + 1)
                    lines = [{"batch": b, "case_id": self.cases[i].case_id, "edits_so_far": edits,
                              "cases_done": idx[-1] + 1,
                              "request": self.requests[i].to_dict(), "pre": self.pre[i]["pre"], "post": rec,
                              "batch_timings": timings, "v_nll": result.info.get("v_nll", [None] * len(idx))[j]}
                             for j, (i, rec) in enumerate(zip(idx, post))]
                    cases_log.append(lines)  # the batch's commit point
                    self.batch_lines.append(lines)
                    self.on_event("batch_written", b)
                    last = b + 1 == n_batches
                    if cfg.sequential and ((b + 1) % cfg.checkpoint_interval == 0 or last):
                        self._write_checkpoint(b + 1, editor)
                        self.on_event("checkpoint_written", b)
                    if cfg.save_model and ((b + 1) % cfg.save_model_interval == 0 or (last and cfg.sequential)):
                        self._save_model(b + 1, result)
                finally:
                    if not cfg.sequential:
                        result.restore()
                if cfg.conserve_memory and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._write_summary(partial=True)
                post_s = self._summary_short()
                bar.set_postfix(post_s, refresh=False)
                bar.update(1)
        finally:
            bar.close()

    def _summary_short(self) -> dict[str, str]:
        from fastmemit.eval.metrics import summarize

        s = summarize([r["post"] for lines in self.batch_lines for r in lines])
        keys = ("efficacy", "specificity") if self.is_zsre else ("es", "ps", "ns")
        return {k: f"{s[k]:.0f}" for k in keys if k in s and not math.isnan(s[k])}
