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

The parts: :mod:`~fastmemit.eval.config` (settings), :mod:`~fastmemit.eval.run_setup` (cases, model,
hparams), :mod:`~fastmemit.eval.run_folder` (files), :mod:`~fastmemit.eval.loop` (edit → score →
keep/restore), :mod:`~fastmemit.eval.checks` (scoring, downstream and retention checks),
:mod:`~fastmemit.eval.summary`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmemit.editing import Editor, write_weights
from fastmemit.errors import RunError
from fastmemit.eval.checks import Checks, Scorer
from fastmemit.eval.collapse import CollapseMonitor, CollapseRules
from fastmemit.eval.config import RunConfig, renamed
from fastmemit.eval.loop import BatchRecord, edit_batches
from fastmemit.eval.plots import plot_run
from fastmemit.eval.run_folder import RunFolder, copy_file, save_model_folder
from fastmemit.eval.run_setup import RunSetup, load_cases, prepare_run, resolve_run_hparams, seed_samples_file
from fastmemit.eval.summary import STATS_FIELDS, RunSummary
from fastmemit.models.arch import mlp_down_weight
from fastmemit.utils import logger, progress

__all__ = ["CollapseStop", "RunConfig", "RunError", "RunResult", "default_run_dir", "load_cases", "resolve_run_hparams",
           "run_evaluation", "seed_samples_file"]

Event = Callable[[str, int], None]


def default_run_dir(method: str, root: str | os.PathLike[str] = "results") -> Path:
    """``results/<METHOD>/run_NNN``, the next free number (the research code's layout)."""
    base = Path(root) / method
    nums = [int(p.name[4:]) for p in base.glob("run_*") if p.name[4:].isdigit()] if base.is_dir() else []
    return base / f"run_{(max(nums) + 1 if nums else 0):03d}"



@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module
    tok: Any



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
    setup = prepare_run(cfg, folder, model, tok, continue_run)  # everything that can fail on bad input
    config_json = setup.config_json(folder.path, command)
    with folder.lock():
        resumed = folder.open(config_json)
        reuse = reusable_pre(config_json, [Path(d) for d in reuse_pre_from if Path(d).resolve() != folder.path.resolve()])
        run = _Run(setup, folder, config_json, target_cache, on_event or (lambda name, batch: None), t_start, reuse)
        return run.run(resumed)


_SCORING_FIELDS = ("dataset", "data", "eval_batch_size", "eval_chunk", "skip_generation_tests",
                   "generation_test_interval", "consistency_dir", "seed_sliding")


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




# ----------------------------------------------------------------------------- the run's collaborators


class _Weights:
    """W₀ of the edited matrices and what the run builds on it: checkpoints (W − W₀), saved models,
    the healthy point of a stopped run, and the way back to W₀ for an interrupted sequential run."""

    def __init__(self, s: RunSetup, folder: RunFolder) -> None:
        self.s, self.folder = s, folder
        self.w0 = {name: p.detach().cpu().clone() for name, p in (mlp_down_weight(s.model, layer) for layer in s.hp.layers)}

    def rollback(self) -> None:
        """The unedited weights W₀ back in the model."""
        write_weights(self.s.model, self.w0)

    def restore(self, editor: Editor, start: int) -> None:
        """Rebuild the model after ``start`` batches from the checkpoint (model at W₀ on entry)."""
        t0 = time.perf_counter()
        more = start < len(self.s.batches)
        if more:
            editor.templates()  # generated by the unedited model, as in an uninterrupted run
            if not self.s.hp.recompute_stats:
                editor.prepare_stats()  # statistics of the unedited model
        self.folder.checkpoint.restore(start, self.s.model, self.w0, self.s.base_fp, editor if more else None)
        self.s.session_times["resume"] = time.perf_counter() - t0

    def restore_healthy(self) -> None:
        """The model at the last healthy checkpoint (W₀ when that fails)."""
        try:
            self.folder.checkpoint.restore_healthy(self.s.model, self.w0, self.s.base_fp)
        except BaseException:
            self.rollback()
            raise

    def checkpoint(self, batches_done: int, editor: Editor, healthy: bool = False) -> Path:
        t0 = time.perf_counter()
        n_done = self.s.edits_after(batches_done)
        path = self.folder.checkpoint.write(batches_done, self.s.model, self.w0, editor, self.s.requests[:n_done],
                                            self.s.base_fp, healthy=healthy)
        times = self.s.session_times
        times["checkpoint"] = times.get("checkpoint", 0.0) + time.perf_counter() - t0
        return path

    def save_model(self, batches_done: int, rec: BatchRecord[int], editor: Editor) -> None:
        cfg = self.s.cfg
        loc = Path(cfg.save_model_location).expanduser() if cfg.save_model_location else self.folder.path / "models"
        loc.mkdir(parents=True, exist_ok=True)
        edits = self.s.edits_after(batches_done)
        if cfg.save_model_format == "full":
            save_model_folder(self.s.model, self.s.tok, loc / f"model_batch{batches_done:05d}_{edits}edits")
        elif cfg.sequential:
            src = self.folder.checkpoint.deltas_path(batches_done)
            if not src.is_file():
                src = self.checkpoint(batches_done, editor)
            copy_file(src, loc / f"deltas_batch{batches_done:05d}_{edits}edits.safetensors")
        else:
            rec.result.save(loc / f"deltas_batch{batches_done:05d}.safetensors")


class _CollapseGuard:
    """``stop_on_collapse``: every batch judged by the collapse rules (a :class:`CollapseStop` when one fires)."""

    def __init__(self, s: RunSetup, downstream_points: Sequence[int]) -> None:
        self.s = s
        self.monitor = CollapseMonitor(CollapseRules.from_settings(s.cfg), downstream_points)

    def judge(self, done: int, diagnostics: Sequence[Mapping[str, Any]] | None, checks: Sequence[Mapping[str, Any]],
              checkpoint_due: bool) -> bool:
        """Whether the model after ``done`` batches is a verified healthy point; a :class:`CollapseStop`
        when a collapse rule fires."""
        fired = self.monitor.verdict(done, diagnostics, checks)
        if fired is not None:
            raise CollapseStop({**fired, "batch": done - 1, "batches_done": done, "edits_so_far": self.s.edits_after(done)})
        return self.monitor.candidate(done, checkpoint_due)


def _stopped_record(s: RunSetup, folder: RunFolder, fired: Mapping[str, Any]) -> dict[str, Any]:
    """``stopped.json`` for a rule that fired, written: what, when, and the healthy checkpoint kept."""
    mark = folder.checkpoint.healthy()
    h = int(mark["batches_done"]) if mark else 0
    record = {**fired, "healthy_batches_done": h, "healthy_edits": s.edits_after(h),
              "healthy_fingerprint": mark["fingerprint"] if mark else s.base_fp,
              "rules": CollapseRules.from_settings(s.cfg).to_dict()}
    folder.write_stopped(record)
    logger.warning("%s: stopped after batch %d (%d edits): %s; the model is back at the last healthy checkpoint "
                   "(%d batches, %d edits)", folder.path, fired["batches_done"], fired["edits_so_far"],
                   fired["reason"], h, record["healthy_edits"])
    return record


def _diagnostics_line(s: RunSetup, rec: BatchRecord[int], diagnostics: Any) -> dict[str, Any]:
    """The ``diagnostics.jsonl`` line of an edited batch."""
    return {"batch": rec.index, "edits_so_far": s.edits_after(rec.index + 1),
            "seconds": rec.timings.get("diagnostics", 0.0), "v": _v_summary(rec.result.info), "layers": diagnostics}


# ----------------------------------------------------------------------------- the run


class _Run:
    """One run in its (locked, opened) folder: pre scores, edits, final scores, summary."""

    def __init__(self, s: RunSetup, folder: RunFolder, config_json: Mapping[str, Any],
                 target_cache: dict[Any, Any] | None, on_event: Event, t_start: float,
                 reuse_pre: dict[int, list[dict[str, Any]]] | None = None) -> None:
        self.s, self.cfg, self.folder, self.on_event = s, s.cfg, folder, on_event
        self.target_cache = target_cache
        header = {"run_dir": str(folder.path), "method": s.method.name, "model": s.cfg.model,
                  "dataset": s.cfg.dataset, "mode": s.cfg.mode, "num_edits": s.cfg.edits_per_batch,
                  "hparams_label": config_json["hparams_label"],
                  "stats": {k: s.hp.to_dict().get(k) for k in STATS_FIELDS}}
        self.summary = RunSummary(header, len(s.cases), len(s.batches), t_start)
        self.scorer = Scorer(s)
        self.checks = Checks(s, self.scorer, folder, self.summary)
        self.guard = _CollapseGuard(s, self.checks.downstream_points) if s.cfg.stop_on_collapse else None
        self.stopped: dict[str, Any] | None = None  # the record of a stop on collapse
        self.reuse_pre = reuse_pre or {}  # pre.jsonl chunks of other runs (reusable_pre)
        self.pre: dict[int, dict[str, Any]] = {}
        self.final: dict[int, dict[str, Any]] = {}
        # W₀ of the edited matrices: checkpoints hold W − W₀; an interrupted sequential run goes back to it
        self.weights = _Weights(s, folder)

    def run(self, resumed: bool) -> RunResult:
        cfg, n_batches = self.cfg, len(self.s.batches)
        self.pre = self.scorer.chunks(self.folder.pre_log, "pre", "pre-edit scoring", self.reuse_pre)
        self.summary.set_chunk_times(self.pre.values())
        stopped = self.folder.stopped()
        start = self._resume_point(resumed, stopped is not None)
        self.checks.resume(start)
        for line in self.folder.diagnostics_log.load_before(start):
            self.summary.add_diagnostics(line)
        if stopped is not None:  # stopped on collapse before: report it again, edit nothing
            return self._finish_stopped(stopped)
        editor = self.s.editor(self.target_cache)
        try:
            if cfg.sequential and start > 0:
                self.weights.restore(editor, start)
            self._edit(editor, start)
            if cfg.do_final_eval:  # every case on the finally edited model
                self.final = self.scorer.chunks(self.folder.final_log, "final", "final scoring")
                self.summary.set_chunk_times(self.pre.values(), self.final.values())
        except CollapseStop as stop:
            return self._finish_stopped(_stopped_record(self.s, self.folder, stop.record))
        except BaseException:
            if cfg.sequential:
                self.weights.rollback()
            logger.warning("%s: stopped after %d of %d batches; run the same command again to resume",
                           self.folder.path, self.summary.batches_done, n_batches)
            raise
        return self._finish()

    def _finish(self) -> RunResult:
        """The final summary and the plots (a plot must not fail a finished run)."""
        summary = self._write_summary(partial=False)
        if self.cfg.plots:
            try:
                plot_run(self.folder.path)
            except Exception as e:
                logger.warning("plots not written: %s", e)
        return RunResult(self.folder.path, summary, self.s.model, self.s.tok)

    def _finish_stopped(self, stopped: dict[str, Any]) -> RunResult:
        """A run stopped on collapse: the model at its last healthy checkpoint, the summary, the plots."""
        self.stopped = stopped
        self.weights.restore_healthy()
        return self._finish()

    def _add_batch(self, lines: Sequence[Mapping[str, Any]]) -> None:
        self.summary.add_batch(lines)
        if self.guard is not None:
            self.guard.monitor.add_batch(lines)

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
        self.checks.after(done)
        diagnostics = rec.result.info.get("diagnostics")
        if diagnostics is not None:
            line = _diagnostics_line(s, rec, diagnostics)
            self.folder.diagnostics_log.append([line])
            self.summary.add_diagnostics(line)
        lines = s.case_lines(rec, self.pre)
        self.folder.cases_log.append(lines)
        self._add_batch(lines)
        self.on_event("batch_written", b)
        last = done == len(s.batches)
        due = cfg.sequential and (done % cfg.checkpoint_interval == 0 or last)
        healthy = self.guard is not None and self.guard.judge(done, diagnostics, self.summary.checks, due)
        if due or healthy:
            self.weights.checkpoint(done, editor, healthy=healthy)
            self.on_event("checkpoint_written", b)
        if cfg.save_model and (done % cfg.save_model_interval == 0 or (last and cfg.sequential)):
            self.weights.save_model(done, rec, editor)

    def _write_summary(self, partial: bool) -> dict[str, Any]:
        n = len(self.s.cases)
        complete = self.cfg.do_final_eval and len(self.final) == n
        final = [self.final[i]["final"] for i in range(n)] if complete else None
        pre_all = [self.pre[i]["pre"] for i in range(n)] if complete else None
        summary = self.summary.to_dict(partial, final, pre_all, self.s.session_times, self.stopped)
        self.folder.write_summary(summary)
        return summary
