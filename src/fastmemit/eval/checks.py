"""Scoring cases on the model as it is, and the checks between a run's batches: downstream tasks
(``downstream.jsonl``) and retention of the cases edited so far (``retention.jsonl``), each at its
batch points (:class:`Checks`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastmemit.downstream import TaskFlags, evaluate_tasks, results_to_records
from fastmemit.eval.datasets import ZsreCase
from fastmemit.eval.metrics import evaluate_counterfact_cases, evaluate_zsre_cases
from fastmemit.eval.run_folder import GroupLog, RunFolder
from fastmemit.eval.run_setup import RunSetup
from fastmemit.eval.summary import AVERAGED_KEYS, MetricMeans, RunSummary
from fastmemit.utils import progress

__all__ = ["Checks", "DownstreamChecks", "RetentionChecks", "Scorer"]


class Scorer:
    """Scores cases (by index) on the model as it is: zsRE or CounterFact metrics, with generation
    tests for every ``generation_test_interval``-th case."""

    def __init__(self, s: RunSetup) -> None:
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
                                          snippets=s.snippets, tfidf=s.tfidf, sliding=s.cfg.seed_sliding)

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


class DownstreamChecks:
    """Downstream checks: before the first edit and after every ``downstream_eval_steps`` batches."""

    def __init__(self, s: RunSetup, flags: TaskFlags, log: GroupLog, summary: RunSummary) -> None:
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


class RetentionChecks:
    """Retention checks: after every ``retention_eval_steps`` batches, every case edited so far scored on
    the model as it is then (no generation tests); one ``retention.jsonl`` line a check. None after the
    last batch when the final scoring runs (it scores the same cases on the same model)."""

    def __init__(self, s: RunSetup, scorer: Scorer, log: GroupLog, summary: RunSummary) -> None:
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



class Checks:
    """The checks a run makes between batches, each at its points: downstream tasks (with
    ``do_downstream_eval``) and retention (with ``retention_eval_steps``)."""

    def __init__(self, s: RunSetup, scorer: Scorer, folder: RunFolder, summary: RunSummary) -> None:
        self.downstream = None if s.ds_flags is None else DownstreamChecks(s, s.ds_flags, folder.downstream_log, summary)
        self.retention = RetentionChecks(s, scorer, folder.retention_log, summary) if s.cfg.retention_eval_steps else None

    @property
    def downstream_points(self) -> Sequence[int]:
        """The ``batches_done`` values after which a downstream check runs (none without them)."""
        return self.downstream.points if self.downstream is not None else ()

    def resume(self, start: int) -> None:
        """Keep the checks made up to ``start`` batches; the downstream baseline if there is none yet."""
        if self.downstream is not None:
            self.downstream.resume(start)
        if self.retention is not None:
            self.retention.resume(start)

    def after(self, batches_done: int) -> None:
        """The checks due after ``batches_done`` batches, on the model as it is."""
        if self.downstream is not None and batches_done in self.downstream.points:
            self.downstream.check(batches_done)
        if self.retention is not None and batches_done in self.retention.points:
            self.retention.check(batches_done)
