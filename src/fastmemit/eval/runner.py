"""Evaluation runs: edit a dataset's cases batch after batch, score each case before and after.

``run_evaluation(RunConfig(...), out_dir)`` (CLI: ``fastmemit evaluate``) does, in this order:

1. load and order the cases (fail here, before any file is written, on a malformed dataset);
   load the model (or take the caller's), resolve the hparams, write ``config.json``;
2. **pre**: score every case on the unedited model (chunks of ``eval_chunk`` cases → ``pre.jsonl``);
3. downstream baseline (optional) on the unedited model;
4. **edits** (:func:`~fastmemit.eval.loop.edit_batches`): ``edits_per_batch`` cases a batch.
   *Sequential* (default): one :class:`~fastmemit.Editor` for the whole run, edits accumulate.
   *Batched*: the model is restored after every batch. Right after a batch's edit its cases are
   scored (**post**); their lines go to ``cases.jsonl``;
   Per batch also: the Editor's diagnostics (``diagnostics.jsonl``: weight distances, objective terms,
   max kᵀC⁻¹k per layer); every ``retention_eval_steps`` batches every case edited so far is scored
   again (``retention.jsonl``); with ``stop_on_collapse`` the batch is judged by the collapse rules
   (:mod:`~fastmemit.eval.collapse`): when one fires, the last healthy checkpoint is restored,
   ``stopped.json`` says why, and the run ends there (a rerun reports the stop and edits nothing);
5. **final** (sequential; ``final_eval``): every case scored again on the finally edited model;
6. ``summary.json`` (also rewritten after every batch with ``"partial": true``) and plots.

Resuming. Every result file is written a group at a time (a batch of ``cases.jsonl``, a chunk of
``pre.jsonl``/``final.jsonl``, one downstream check) with one ``write`` + flush + fsync; a restart
keeps the longest prefix of complete groups and truncates the rest (a torn line, a half batch).
In sequential mode the edited model is rebuilt from a checkpoint written after the batch's lines:
the cumulative deltas W − W₀ in float64 (exact: W₀ + Δ rounds back to W bit for bit; the file is an
ordinary deltas file, ``apply_deltas`` takes it) plus the method's state (``Editor.state_dict``),
and batches after the last checkpoint are redone. Statistics and context templates are prepared on
the unedited model before the checkpoint is applied, as in an uninterrupted run, and every batch
seeds torch's RNG with ``seed + batch``: a resumed run writes the same numbers.

The parts: :mod:`~fastmemit.eval.config` (settings), :mod:`~fastmemit.eval.run_folder` (files),
:mod:`~fastmemit.eval.loop` (edit → score → keep/restore), :mod:`~fastmemit.eval.summary`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastmemit
from fastmemit.downstream import (
    TaskFlags,
    evaluate_tasks,
    get_task,
    load_task_data,
    parse_task_flags,
    results_to_records,
)
from fastmemit.editing import Editor, resolve_hparams, write_weights
from fastmemit.errors import EditError, FastMemitError, RunError
from fastmemit.eval.collapse import CollapseMonitor, CollapseRules
from fastmemit.eval.config import DATASETS, RunConfig, renamed, stored_config
from fastmemit.eval.datasets import (
    CounterFactCase,
    DatasetError,
    TfidfTable,
    ZsreCase,
    default_data_dir,
    load_attribute_snippets,
    load_dataset,
    load_seed_ordering,
    load_tfidf,
    order_cases,
)
from fastmemit.eval.loop import BatchRecord, edit_batches
from fastmemit.eval.metrics import evaluate_counterfact_cases, evaluate_zsre_cases
from fastmemit.eval.plots import plot_run
from fastmemit.eval.run_folder import GroupLog, RunFolder, copy_file, save_model_folder
from fastmemit.eval.summary import AVERAGED_KEYS, STATS_FIELDS, MetricMeans, RunSummary, hparams_label
from fastmemit.hparams_registry import model_key
from fastmemit.methods import EditHparams, EditMethod, get_method
from fastmemit.models import load_model
from fastmemit.models.arch import check_layers, mlp_down_weight
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.requests import EditRequest
from fastmemit.utils import logger, progress

__all__ = ["CollapseStop", "RunConfig", "RunError", "RunResult", "default_run_dir", "load_cases", "run_evaluation"]

Case = CounterFactCase | ZsreCase
Event = Callable[[str, int], None]

# ----------------------------------------------------------------------------- cases and hparams


def seed_samples_file(cfg: RunConfig, data_path: Path | None) -> Path:
    """The seed-ordering file for ``cfg.dataset``: ``cfg.seed_samples`` (file or folder), else
    ``seed-samples/`` beside the dataset file, the dataset's folder, or ``<cache>/data/seed-samples``."""
    fname = DATASETS[cfg.dataset][1]
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
    loader = DATASETS[cfg.dataset][0]
    data_path = Path(cfg.data).expanduser() if cfg.data is not None else None
    # without an ordering the first N records are the first N cases (zsRE: skipped records aside)
    head = cfg.dataset_size_limit if cfg.sample_num is None and loader != "zsre" else None
    cases = list(load_dataset(loader, data_path, dataset_size_limit=head, download=cfg.download,
                              zsre_convention=cfg.zsre_convention))
    if not cases:
        raise DatasetError(f"{cfg.data or cfg.dataset}: no cases")
    if cfg.sample_num is not None:
        path = seed_samples_file(cfg, data_path)
        ordering = load_seed_ordering(path, cfg.sample_num)
        picked = order_cases(cases, ordering, limit=cfg.dataset_size_limit)
        if not picked:
            raise DatasetError(f"ordering {cfg.sample_num} of {path.name} names none of the {len(cases)} case ids "
                               "in the dataset file")
        return picked
    return cases[: cfg.dataset_size_limit] if cfg.dataset_size_limit is not None else cases


def case_request(case: Case) -> EditRequest:
    return EditRequest.from_any(case.requested_rewrite)


def resolve_run_hparams(method: EditMethod, cfg: RunConfig, model: nn.Module) -> tuple[EditHparams, str]:
    """(hparams, source): ``cfg.hparams`` (file or built-in name), else the built-in for the model;
    then ``cfg.hparams_overrides``."""
    if cfg.hparams is not None:
        p = Path(cfg.hparams).expanduser()
        hp = resolve_hparams(method, str(p.resolve()) if p.exists() else cfg.hparams, model)
        source = str(p.resolve()) if p.exists() else f"built-in {cfg.hparams}"
    else:
        hp = resolve_hparams(method, None, model)
        source = f"built-in {method.name}/{model_key(model)}"
    if cfg.hparams_overrides:
        hp = hp.replace(**cfg.hparams_overrides)
    return hp, source


def default_run_dir(method: str, root: str | os.PathLike[str] = "results") -> Path:
    """``results/<METHOD>/run_NNN``, the next free number (the research code's layout)."""
    base = Path(root) / method
    nums = [int(p.name[4:]) for p in base.glob("run_*") if p.name[4:].isdigit()] if base.is_dir() else []
    return base / f"run_{(max(nums) + 1 if nums else 0):03d}"


def _consistency_tables(cfg: RunConfig, cases: Sequence[Case]) -> tuple[Any, TfidfTable | None]:
    """(attribute snippets, tf-idf table) for the consistency metric, when their files are found."""
    if isinstance(cases[0], ZsreCase) or cfg.skip_generation_tests:
        return None, None
    folder = Path(cfg.consistency_dir).expanduser() if cfg.consistency_dir else (
        Path(cfg.data).expanduser().parent if cfg.data else None)
    if folder is None or not any(c.generation_prompts for c in cases):
        return None, None
    files = [folder / "attribute_snippets.json", folder / "idf.npy", folder / "tfidf_vocab.json"]
    if all(f.is_file() for f in files):
        return load_attribute_snippets(files[0]), load_tfidf(files[1], files[2])
    if cfg.consistency_dir:
        raise DatasetError(f"consistency_dir {folder} lacks {', '.join(f.name for f in files if not f.is_file())}")
    return None, None


def _groups(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


# ----------------------------------------------------------------------------- what a run needs


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module
    tok: Any


@dataclass
class _Setup:
    """Everything a run needs, prepared before its folder is touched."""

    cfg: RunConfig
    method: EditMethod
    cases: list[Case]
    requests: list[EditRequest]
    model: nn.Module
    tok: Any
    hp: EditHparams
    hp_source: str
    ds_flags: TaskFlags | None
    snippets: Any
    tfidf: TfidfTable | None
    session_times: dict[str, float]
    base_fp: str = field(init=False)  # fingerprint of the unedited model
    batches: list[list[int]] = field(init=False)  # case indices per edited batch
    chunks: list[list[int]] = field(init=False)  # case indices per pre/final scoring chunk

    def __post_init__(self) -> None:
        self.base_fp = model_fingerprint(self.model)
        self.batches = _groups(len(self.cases), self.cfg.edits_per_batch)
        self.chunks = _groups(len(self.cases), self.cfg.eval_chunk)

    def edits_after(self, batches_done: int) -> int:
        """Edits in the model after ``batches_done`` batches (batched: the last batch's)."""
        if self.cfg.sequential:
            return sum(len(b) for b in self.batches[:batches_done])
        return len(self.batches[batches_done - 1]) if batches_done else 0

    def editor(self, target_cache: dict[Any, Any] | None) -> Editor:
        """The run's Editor; batched runs share z* through ``target_cache`` (a new one when None)."""
        cfg = self.cfg
        if cfg.sequential or cfg.conserve_memory:
            cache = None
        else:
            cache = target_cache if target_cache is not None else {}
        return Editor(self.model, self.tok, self.method.name, self.hp, corpus=cfg.corpus,
                      stats_cache_dir=cfg.stats_cache_dir, seed=cfg.seed, show_progress=cfg.show_progress,
                      use_cache=cfg.use_cache, target_cache=cache, stats_device=cfg.stats_device,
                      solve_device=cfg.solve_device, diagnostics=True)

    def case_lines(self, rec: BatchRecord[int], pre: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The ``cases.jsonl`` lines of an edited batch (``pre``: the pre-phase lines by case index)."""
        b = rec.index
        edits = self.edits_after(b + 1)
        v_nll = rec.result.info.get("v_nll", [None] * len(rec.cases))
        return [{"batch": b, "case_id": self.cases[i].case_id, "edits_so_far": edits, "cases_done": rec.cases[-1] + 1,
                 "request": self.requests[i].to_dict(), "pre": pre[i]["pre"], "post": post,
                 "batch_timings": rec.timings, "v_nll": v_nll[j]}
                for j, (i, post) in enumerate(zip(rec.cases, rec.post))]

    def config_json(self, run_dir: Path, command: Sequence[str] | None) -> dict[str, Any]:
        hp = self.hp.to_dict()
        return stored_config(
            self.cfg, run_dir, method=self.method.name, hparams=hp, hparams_source=self.hp_source,
            hparams_label=hparams_label(hp), base_fingerprint=self.base_fp, model_class=type(self.model).__name__,
            n_cases=len(self.cases), n_batches=len(self.batches), case_ids=[c.case_id for c in self.cases],
            fastmemit_version=fastmemit.__version__, command=list(command) if command is not None else None)


def _prepare(cfg: RunConfig, folder: RunFolder, model: nn.Module | None, tok: Any, continue_run: bool) -> _Setup:
    """Load and check everything that can fail on bad input, before the run folder is touched."""
    method = get_method(cfg.method)  # unknown method: fail before loading anything
    folder.check_usable()
    ds_flags = parse_task_flags(cfg.downstream_tasks, cfg.number_of_few_shots, cfg.number_of_tests) \
        if cfg.do_downstream_eval else None
    for task in ds_flags.tasks if ds_flags else ():  # a missing data file: fail before the run folder exists
        load_task_data(get_task(task), cfg.downstream_data_dir)
    cases = load_cases(cfg)
    requests = [case_request(c) for c in cases]  # malformed requests: fail before writing
    snippets, tfidf = _consistency_tables(cfg, cases)
    times: dict[str, float] = {}
    if model is None:
        t0 = time.perf_counter()
        model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map)
        times["load_model"] = time.perf_counter() - t0
    elif tok is None:
        raise RunError("a model was passed without its tokenizer")
    model.eval()
    if continue_run:
        stored = folder.stored_config()
        hp = method.hparams_cls.from_dict(stored.get("hparams") or {}, source=str(folder.config_path))
        hp_source = stored.get("hparams_source", "stored")
    else:
        hp, hp_source = resolve_run_hparams(method, cfg, model)
    try:
        check_layers(model, hp.layers)
    except FastMemitError:
        raise
    except ValueError as e:
        raise EditError(f"hparams.layers: {e}") from None
    return _Setup(cfg, method, cases, requests, model, tok, hp, hp_source, ds_flags, snippets, tfidf, times)


class _Scorer:
    """Scores cases (by index) on the model as it is: zsRE or CounterFact metrics, with generation
    tests for every ``generation_test_interval``-th case."""

    def __init__(self, s: _Setup) -> None:
        self.s = s
        self.is_zsre = isinstance(s.cases[0], ZsreCase)

    def _generation_case(self, i: int) -> bool:
        k = self.s.cfg.generation_test_interval
        return not self.s.cfg.skip_generation_tests and k > 0 and i % k == 0

    def __call__(self, idx: Sequence[int], generation: bool = True) -> list[dict[str, Any]]:
        """Scores of the cases ``idx``; ``generation`` False: no generation tests at all."""
        s = self.s
        cases = [s.cases[i] for i in idx]
        bs = s.cfg.eval_batch_size
        if self.is_zsre:
            return evaluate_zsre_cases(s.model, s.tok, cases, batch_size=bs)
        # generation tests only for every K-th case: the others go in without generation prompts
        cases = [c if (generation and self._generation_case(i)) or not c.generation_prompts
                 else dataclasses.replace(c, generation_prompts=()) for i, c in zip(idx, cases)]
        return evaluate_counterfact_cases(s.model, s.tok, cases, batch_size=bs,
                                          generation=any(c.generation_prompts for c in cases),
                                          snippets=s.snippets, tfidf=s.tfidf)

    def chunks(self, log: GroupLog, key: str, desc: str,
               reuse: Mapping[int, Sequence[Mapping[str, Any]]] | None = None) -> dict[int, dict[str, Any]]:
        """Score every chunk of cases not already in ``log``; {case index: line}. ``reuse``: lines of
        chunks scored already elsewhere on the same model ({chunk: lines}), taken when their case ids match."""
        s = self.s
        done = log.load([(g, [s.cases[i].case_id for i in ch]) for g, ch in enumerate(s.chunks)])
        out = {i: rec for g, lines in enumerate(done) for i, rec in zip(s.chunks[g], lines)}
        todo = range(len(done), len(s.chunks))
        if not todo:
            return out
        bar = progress(total=len(todo), desc=desc, unit="chunk", disable=None if s.cfg.show_progress else True)
        try:
            for g in todo:
                ids = [s.cases[i].case_id for i in s.chunks[g]]
                other = (reuse or {}).get(g)
                if other is not None and [x["case_id"] for x in other] == ids:
                    lines = [{**x, "seconds_chunk": 0.0} for x in other]  # no time spent here
                else:
                    t0 = time.perf_counter()
                    recs = self(s.chunks[g])
                    seconds = time.perf_counter() - t0
                    lines = [{"chunk": g, "case_id": r["case_id"], "seconds_chunk": seconds, key: r} for r in recs]
                log.append(lines)
                out.update(zip(s.chunks[g], lines))
                bar.update(1)
        finally:
            bar.close()
        return out


class _Downstream:
    """Downstream checks: before the first edit and after every ``downstream_eval_steps`` batches."""

    def __init__(self, s: _Setup, flags: TaskFlags, log: GroupLog, summary: RunSummary) -> None:
        self.s, self.flags, self.log, self.summary = s, flags, log, summary
        K, n = s.cfg.downstream_eval_steps, len(s.batches)
        pts = [0] + [b for b in range(1, n + 1) if b % K == 0]
        self.points = pts if pts[-1] == n else [*pts, n]  # batches_done values after which a check runs

    def resume(self, start: int) -> None:
        """Keep the checks made up to ``start`` batches (drop later ones); the baseline if none."""
        pts = [p for p in self.points if p <= start]
        for group in self.log.load([(i, [p]) for i, p in enumerate(pts)]):
            self.summary.add_check(group[0])
        if not self.summary.checks:
            self.check(0)

    def check(self, batches_done: int) -> None:
        s = self.s
        t0 = time.perf_counter()
        f = self.flags
        res = evaluate_tasks(s.model, s.tok, tasks=f.tasks, n_shots=f.n_shots, n_tests=f.n_tests,
                             data_dir=s.cfg.downstream_data_dir, seed=s.cfg.seed)
        edits = s.edits_after(batches_done)
        rec = {"check": self.points.index(batches_done), "batches_done": batches_done, "edits_so_far": edits,
               "seconds": time.perf_counter() - t0, "results": res,
               "records": results_to_records(res, edits_so_far=edits, batches_done=batches_done)}
        self.log.append([rec])
        self.summary.add_check(rec)


class _Retention:
    """Retention checks: after every ``retention_eval_steps`` batches, every case edited so far scored on
    the model as it is then (no generation tests); one ``retention.jsonl`` line a check. None after the
    last batch when the final scoring runs (it scores the same cases on the same model)."""

    def __init__(self, s: _Setup, scorer: _Scorer, log: GroupLog, summary: RunSummary) -> None:
        self.s, self.scorer, self.log, self.summary = s, scorer, log, summary
        K, n = s.cfg.retention_eval_steps or 1, len(s.batches)
        # batches_done values; the last batch's check would repeat the final scoring (all cases, same model)
        self.points = [b for b in range(1, n + 1) if b % K == 0 and not (b == n and s.cfg.do_final_eval)]

    def resume(self, start: int) -> None:
        """Keep the checks made up to ``start`` batches (drop later ones)."""
        pts = [p for p in self.points if p <= start]
        for group in self.log.load([(i, [p]) for i, p in enumerate(pts)]):
            self.summary.add_retention(group[0])

    def check(self, batches_done: int) -> None:
        s = self.s
        edited = [(b, i) for b, idx in enumerate(s.batches[:batches_done]) for i in idx]
        t0 = time.perf_counter()
        recs = self.scorer([i for _, i in edited], generation=False)
        cases = [{"case_id": s.cases[i].case_id, "batch": b, **{k: r[k] for k in AVERAGED_KEYS if r.get(k) is not None}}
                 for (b, i), r in zip(edited, recs)]
        rec = {"check": self.points.index(batches_done), "batches_done": batches_done,
               "edits_so_far": s.edits_after(batches_done), "seconds": time.perf_counter() - t0,
               "means": MetricMeans(recs).summary(), "cases": cases}
        self.log.append([rec])
        self.summary.add_retention(rec)


class CollapseStop(RunError):
    """A collapse rule fired after a batch (``stop_on_collapse``); caught by the run, which then stops."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        super().__init__(record["reason"])
        self.record = dict(record)


def _v_summary(info: Mapping[str, Any]) -> dict[str, Any]:
    """v*'s final NLLs and steps of a batch, in brief."""
    nll = [x for x in info.get("v_nll", []) if x is not None]
    steps = info.get("v_steps", [])
    return {"nll_mean": sum(nll) / len(nll) if nll else None, "nll_max": max(nll) if nll else None,
            "steps_mean": sum(steps) / len(steps) if steps else None}


# ----------------------------------------------------------------------------- the run


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
    reuse_pre_from: Sequence[str | os.PathLike[str]] = (),
) -> RunResult:
    """Run (or resume) the evaluation ``cfg`` in ``out_dir``; returns the summary.

    ``model``/``tok``: an already loaded model (``cfg.model`` is then only a label); otherwise
    the runner loads ``cfg.model``. Batched runs leave the model's weights as they were;
    sequential runs leave it edited with all the run's edits (restored to the original weights if
    the run is interrupted). ``target_cache``: a z* cache shared between batched runs on the same
    model. ``on_event(name, batch)`` is called at "batch_written" and "checkpoint_written" (tests use
    it to interrupt a run at a chosen point). ``continue_run``: ``out_dir`` must hold a run, whose
    stored hparams are used as they are (not resolved again: a built-in file may have changed since).
    ``reuse_pre_from``: other run folders whose pre-edit scores may be copied instead of scored again,
    chunk by chunk, when they scored the same cases of the same data file on the same unedited model
    (fingerprint) with the same scoring settings (:func:`reusable_pre`).
    """
    t_start = time.perf_counter()
    folder = RunFolder(Path(out_dir))
    setup = _prepare(cfg, folder, model, tok, continue_run)  # everything that can fail on bad input
    config_json = setup.config_json(folder.path, command)
    with folder.lock():
        resumed = folder.open(config_json)
        reuse = reusable_pre(config_json, [Path(d) for d in reuse_pre_from if Path(d).resolve() != folder.path.resolve()])
        run = _Run(setup, folder, config_json, target_cache, on_event or (lambda name, batch: None), t_start, reuse)
        return run.run(resumed)


_SCORING_FIELDS = ("dataset", "data", "eval_batch_size", "eval_chunk", "skip_generation_tests",
                   "generation_test_interval", "consistency_dir")


def reusable_pre(config_json: Mapping[str, Any], folders: Sequence[Path]) -> dict[int, list[dict[str, Any]]]:
    """{chunk: pre.jsonl lines} of the first of ``folders`` that holds each chunk and whose run scored on
    the same unedited model (``base_fingerprint``) with the same data file and scoring settings
    (:data:`_SCORING_FIELDS`) as ``config_json``. The folders are only read."""
    mine = renamed(config_json["run"])
    out: dict[int, list[dict[str, Any]]] = {}
    for d in folders:
        try:
            other = RunFolder(d).stored_config()
        except RunError:
            continue
        theirs = renamed(other.get("run", {}))
        if other.get("base_fingerprint") != config_json["base_fingerprint"] or any(
                theirs.get(k) != mine.get(k) for k in _SCORING_FIELDS):
            continue
        for g, lines in RunFolder(d).pre_log.read_groups().items():
            out.setdefault(g, lines)
    return out


class _Run:
    """One run in its (locked, opened) folder: pre scores, edits, final scores, summary."""

    def __init__(self, s: _Setup, folder: RunFolder, config_json: Mapping[str, Any],
                 target_cache: dict[Any, Any] | None, on_event: Event, t_start: float,
                 reuse_pre: dict[int, list[dict[str, Any]]] | None = None) -> None:
        self.s, self.cfg, self.folder, self.on_event = s, s.cfg, folder, on_event
        self.target_cache = target_cache
        header = {"run_dir": str(folder.path), "method": s.method.name, "model": s.cfg.model,
                  "dataset": s.cfg.dataset, "mode": s.cfg.mode, "num_edits": s.cfg.edits_per_batch,
                  "hparams_label": config_json["hparams_label"],
                  "stats": {k: s.hp.to_dict().get(k) for k in STATS_FIELDS}}
        self.summary = RunSummary(header, len(s.cases), len(s.batches), t_start)
        self.scorer = _Scorer(s)
        self.downstream = None if s.ds_flags is None else _Downstream(s, s.ds_flags, folder.downstream_log, self.summary)
        self.retention = _Retention(s, self.scorer, folder.retention_log, self.summary) \
            if s.cfg.retention_eval_steps else None
        self.monitor = CollapseMonitor(CollapseRules.from_settings(s.cfg), self.downstream.points if self.downstream
                                       else ()) if s.cfg.stop_on_collapse else None
        self.stopped: dict[str, Any] | None = None  # the record of a stop on collapse
        self.reuse_pre = reuse_pre or {}  # pre.jsonl chunks of other runs (reusable_pre)
        self.pre: dict[int, dict[str, Any]] = {}
        self.final: dict[int, dict[str, Any]] = {}
        # W₀ of the edited matrices: checkpoints hold W − W₀; an interrupted sequential run goes back to it
        self.w0 = {name: p.detach().cpu().clone() for name, p in (mlp_down_weight(s.model, layer) for layer in s.hp.layers)}

    def run(self, resumed: bool) -> RunResult:
        cfg, s, n_batches = self.cfg, self.s, len(self.s.batches)
        self.pre = self.scorer.chunks(self.folder.pre_log, "pre", "pre-edit scoring", self.reuse_pre)
        self.summary.set_chunk_times(self.pre.values())
        stopped = self.folder.stopped()
        start = self._resume_point(resumed, stopped is not None)
        if self.downstream is not None:
            self.downstream.resume(start)
        if self.retention is not None:
            self.retention.resume(start)
        for line in self.folder.diagnostics_log.load_before(start):
            self.summary.add_diagnostics(line)
        if stopped is not None:  # stopped on collapse before: report it again, edit nothing
            return self._finish_stopped(stopped)
        editor = s.editor(self.target_cache)
        try:
            if cfg.sequential and start > 0:
                self._restore_checkpoint(editor, start)
            self._edit(editor, start)
            if cfg.do_final_eval:  # every case on the finally edited model
                self.final = self.scorer.chunks(self.folder.final_log, "final", "final scoring")
                self.summary.set_chunk_times(self.pre.values(), self.final.values())
        except CollapseStop as stop:
            return self._finish_stopped(self._stopped_record(stop.record))
        except BaseException:
            if cfg.sequential:
                write_weights(s.model, self.w0)
            logger.warning("%s: stopped after %d of %d batches; run the same command again to resume",
                           self.folder.path, self.summary.batches_done, n_batches)
            raise
        summary = self._write_summary(partial=False)
        self._plots()
        return RunResult(self.folder.path, summary, s.model, s.tok)

    def _plots(self) -> None:
        if self.cfg.plots:
            try:
                plot_run(self.folder.path)
            except Exception as e:  # a plot must not fail a finished run
                logger.warning("plots not written: %s", e)

    def _stopped_record(self, fired: Mapping[str, Any]) -> dict[str, Any]:
        """``stopped.json`` for a rule that fired: what, when, and the healthy checkpoint kept."""
        mark = self.folder.checkpoint.healthy()
        h = int(mark["batches_done"]) if mark else 0
        record = {**fired, "healthy_batches_done": h, "healthy_edits": self.s.edits_after(h),
                  "healthy_fingerprint": mark["fingerprint"] if mark else self.s.base_fp,
                  "rules": CollapseRules.from_settings(self.cfg).to_dict()}
        self.folder.write_stopped(record)
        logger.warning("%s: stopped after batch %d (%d edits): %s; the model is back at the last healthy checkpoint "
                       "(%d batches, %d edits)", self.folder.path, fired["batches_done"], fired["edits_so_far"],
                       fired["reason"], h, record["healthy_edits"])
        return record

    def _finish_stopped(self, stopped: dict[str, Any]) -> RunResult:
        """A run stopped on collapse: the model at its last healthy checkpoint, the summary, the plots."""
        s = self.s
        self.stopped = stopped
        try:
            self.folder.checkpoint.restore_healthy(s.model, self.w0, s.base_fp)
        except BaseException:
            write_weights(s.model, self.w0)
            raise
        summary = self._write_summary(partial=False)
        self._plots()
        return RunResult(self.folder.path, summary, s.model, s.tok)

    def _add_batch(self, lines: Sequence[Mapping[str, Any]]) -> None:
        self.summary.add_batch(lines)
        if self.monitor is not None:
            self.monitor.add_batch(lines)

    def _resume_point(self, resumed: bool, stopped: bool = False) -> int:
        """Complete batches in cases.jsonl; in sequential mode no further than the checkpoint (later
        batches are redone from it), unless the run stopped on collapse (its lines are all kept). Their
        lines go into the summary."""
        s, log = self.s, self.folder.cases_log
        expected = [(b, [s.cases[i].case_id for i in idx]) for b, idx in enumerate(s.batches)]
        ck_batches = self.folder.checkpoint.batches_done() if self.cfg.sequential and not stopped else None
        done = log.load(expected, max_groups=ck_batches)
        if self.cfg.sequential and ck_batches and ck_batches > len(done):
            # results behind the checkpoint (a file edited by hand?): no model state to continue from
            logger.warning("checkpoint after %d batches but cases.jsonl holds %d complete batches: redoing all edits",
                           ck_batches, len(done))
            done = log.load(expected, max_groups=0)
        if resumed:
            logger.info("%s: resuming after %d of %d batches", self.folder.path, len(done), len(s.batches))
        for lines in done:
            self._add_batch(lines)
        return len(done)

    def _restore_checkpoint(self, editor: Editor, start: int) -> None:
        """Rebuild the model after ``start`` batches from the checkpoint (model at W₀ on entry)."""
        t0 = time.perf_counter()
        more = start < len(self.s.batches)
        if more:
            editor.templates()  # generated by the unedited model, as in an uninterrupted run
            if not self.s.hp.recompute_stats:
                editor.prepare_stats()  # statistics of the unedited model
        self.folder.checkpoint.restore(start, self.s.model, self.w0, self.s.base_fp, editor if more else None)
        self.s.session_times["resume"] = time.perf_counter() - t0

    def _edit(self, editor: Editor, start: int) -> None:
        s, cfg = self.s, self.cfg
        if start >= len(s.batches):
            return
        bar = progress(total=len(s.batches) - start, desc=f"{s.method.name} {cfg.mode} batches", unit="batch",
                       disable=None if cfg.show_progress else True)
        records = edit_batches(editor, s.batches, self.scorer, request=lambda i: s.requests[i],
                               sequential=cfg.sequential, start=start, seed=cfg.seed)
        try:
            with contextlib.closing(records):  # batched: an interrupted batch is restored too
                for rec in records:
                    self._keep(rec, editor)
                    if cfg.conserve_memory and torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    self._write_summary(partial=True)
                    bar.set_postfix(self.summary.short(), refresh=False)
                    bar.update(1)
        finally:
            bar.close()

    def _keep(self, rec: BatchRecord[int], editor: Editor) -> None:
        """Checks due after the batch, its diagnostics, its lines (its commit point), the collapse
        verdict, then its checkpoint and saved model if due."""
        s, cfg, b = self.s, self.cfg, rec.index
        done = b + 1
        if self.downstream is not None and done in self.downstream.points:
            self.downstream.check(done)
        if self.retention is not None and done in self.retention.points:
            self.retention.check(done)
        diagnostics = rec.result.info.get("diagnostics")
        if diagnostics is not None:
            line = {"batch": b, "edits_so_far": s.edits_after(done), "seconds": rec.timings.get("diagnostics", 0.0),
                    "v": _v_summary(rec.result.info), "layers": diagnostics}
            self.folder.diagnostics_log.append([line])
            self.summary.add_diagnostics(line)
        lines = s.case_lines(rec, self.pre)
        self.folder.cases_log.append(lines)
        self._add_batch(lines)
        self.on_event("batch_written", b)
        last = done == len(s.batches)
        due = cfg.sequential and (done % cfg.checkpoint_interval == 0 or last)
        healthy = self._judge(done, diagnostics, due)
        if due or healthy:
            self._checkpoint(done, editor, healthy=healthy)
            self.on_event("checkpoint_written", b)
        if cfg.save_model and (done % cfg.save_model_interval == 0 or (last and cfg.sequential)):
            self._save_model(done, rec, editor)

    def _judge(self, done: int, diagnostics: Sequence[Mapping[str, Any]] | None, checkpoint_due: bool) -> bool:
        """Whether the model after ``done`` batches is a verified healthy point; a :class:`CollapseStop`
        when a collapse rule fires (``stop_on_collapse``; False without it)."""
        if self.monitor is None:
            return False
        fired = self.monitor.verdict(done, diagnostics, self.summary.checks)
        if fired is not None:
            raise CollapseStop({**fired, "batch": done - 1, "batches_done": done, "edits_so_far": self.s.edits_after(done)})
        return self.monitor.candidate(done, checkpoint_due)

    def _checkpoint(self, batches_done: int, editor: Editor, healthy: bool = False) -> Path:
        t0 = time.perf_counter()
        n_done = self.s.edits_after(batches_done)
        path = self.folder.checkpoint.write(batches_done, self.s.model, self.w0, editor, self.s.requests[:n_done],
                                            self.s.base_fp, healthy=healthy)
        times = self.s.session_times
        times["checkpoint"] = times.get("checkpoint", 0.0) + time.perf_counter() - t0
        return path

    def _save_model(self, batches_done: int, rec: BatchRecord[int], editor: Editor) -> None:
        cfg = self.cfg
        loc = Path(cfg.save_model_location).expanduser() if cfg.save_model_location else self.folder.path / "models"
        loc.mkdir(parents=True, exist_ok=True)
        edits = self.s.edits_after(batches_done)
        if cfg.save_model_format == "full":
            save_model_folder(self.s.model, self.s.tok, loc / f"model_batch{batches_done:05d}_{edits}edits")
        elif cfg.sequential:
            src = self.folder.checkpoint.deltas_path(batches_done)
            if not src.is_file():
                src = self._checkpoint(batches_done, editor)
            copy_file(src, loc / f"deltas_batch{batches_done:05d}_{edits}edits.safetensors")
        else:
            rec.result.save(loc / f"deltas_batch{batches_done:05d}.safetensors")

    def _write_summary(self, partial: bool) -> dict[str, Any]:
        n = len(self.s.cases)
        complete = self.cfg.do_final_eval and len(self.final) == n
        final = [self.final[i]["final"] for i in range(n)] if complete else None
        pre_all = [self.pre[i]["pre"] for i in range(n)] if complete else None
        summary = self.summary.to_dict(partial, final, pre_all, self.s.session_times, self.stopped)
        self.folder.write_summary(summary)
        return summary
