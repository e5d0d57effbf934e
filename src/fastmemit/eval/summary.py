"""Summaries of evaluation runs: the metric names and their labels, the score, and ``summary.json``.

- :data:`CF_METRICS` / :data:`ZSRE_METRICS`: the headline metrics of a CounterFact / zsRE run (the
  columns of tables and panels of plots); :data:`LABELS` and :data:`TITLES` name them. The per-case
  metric keys that are averaged are :data:`~fastmemit.eval.metrics.COUNTERFACT_KEYS` and
  :data:`~fastmemit.eval.metrics.ZSRE_KEYS`.
- :func:`score`: the harmonic mean of the ES, PS and NS means.
- :class:`MetricMeans`: the means ×100 of per-case records, added one at a time; its
  :meth:`~MetricMeans.summary` equals :func:`~fastmemit.eval.metrics.summarize` of the same records.
- :class:`RunSummary`: a run's ``summary.json``, kept up to date batch by batch (each batch's lines
  are added once; nothing is re-read).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastmemit.eval.metrics import COUNTERFACT_KEYS, SCORE_PARTS, ZSRE_KEYS, harmonic_mean

CF_METRICS = ("es", "ps", "ns", "score")
ZSRE_METRICS = ("efficacy", "generalization", "specificity")
PROGRESS_METRICS = {"cf": ("es", "ps", "ns"), "zsre": ("efficacy", "specificity")}  # progress bar postfix
LABELS = {"es": "ES", "ps": "PS", "ns": "NS", "score": "Score", "efficacy": "Eff", "generalization": "Gen",
          "specificity": "Spec"}
TITLES = {"es": "efficacy success ES", "ps": "paraphrase success PS", "ns": "neighbourhood success NS",
          "score": "score S", "efficacy": "efficacy", "generalization": "generalization", "specificity": "specificity"}
AVERAGED_KEYS = (*COUNTERFACT_KEYS, *ZSRE_KEYS)
STATS_FIELDS = ("dynamic", "dynamic_multiplier", "mom2_n_samples", "mom2_update_weight", "update_norm_lambda",
                "recompute_stats", "stats_corpus")  # the hparams a summary repeats
_TIME_KEYS = ("stats", "v", "solve", "eval_pre", "eval_post", "eval_final", "downstream", "diagnostics", "retention")
# per-layer diagnostics whose largest value over the run the summary keeps
DIAGNOSTIC_MAXIMA = ("relative_distance_w0", "preservation_rms_w0", "max_kCk", "delta_norm")


def metrics_of(summary_block: Mapping[str, Any]) -> tuple[str, ...]:
    """The headline metrics of a summary block or per-case record (zsRE when it has ``efficacy``)."""
    return ZSRE_METRICS if "efficacy" in summary_block else CF_METRICS


def score(means: Mapping[str, float | None]) -> float | None:
    """Harmonic mean of the ES, PS and NS means; None when one of them is missing."""
    parts = [means.get(k) for k in SCORE_PARTS]
    return None if any(p is None for p in parts) else harmonic_mean([float(p) for p in parts if p is not None])


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


class MetricMeans:
    """Means ×100 over per-case records of every metric present (``None`` values left out).

    Running sums give the means after every record in O(1); :meth:`summary` with ``exact`` sums each
    metric's values with ``sum`` once, as :func:`~fastmemit.eval.metrics.summarize` does (the same
    floats: ``sum`` adds left to right; Python ≥ 3.12 compensates, hence the values are kept).
    """

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self.n_cases = 0
        self._totals: dict[str, float] = {}
        self._values: dict[str, list[float]] = {k: [] for k in AVERAGED_KEYS}
        self.add_all(records)

    def add(self, record: Mapping[str, Any]) -> None:
        self.n_cases += 1
        for key in AVERAGED_KEYS:
            v = record.get(key)
            if v is not None:
                self._values[key].append(float(v))
                self._totals[key] = self._totals.get(key, 0.0) + float(v)

    def add_all(self, records: Iterable[Mapping[str, Any]]) -> MetricMeans:
        for r in records:
            self.add(r)
        return self

    def mean(self, key: str, exact: bool = False) -> float | None:
        """Mean ×100 of ``key`` (``score``: the harmonic mean of ES, PS, NS); None without values."""
        if key == "score":
            return score({k: self.mean(k, exact) for k in SCORE_PARTS})
        vals = self._values.get(key)
        if not vals:
            return None
        return 100.0 * (sum(vals) if exact else self._totals[key]) / len(vals)

    def summary(self, exact: bool = True) -> dict[str, Any]:
        """``{"n_cases", <metric>: mean ×100 ..., "score"}``: :func:`~fastmemit.eval.metrics.summarize`."""
        out: dict[str, Any] = {"n_cases": self.n_cases}
        for key in AVERAGED_KEYS:
            if self._values[key]:
                out[key] = self.mean(key, exact)
        if all(k in out for k in SCORE_PARTS):
            out["score"] = harmonic_mean([out[k] for k in SCORE_PARTS])
        return out


def _chunk_seconds(records: Iterable[Mapping[str, Any]]) -> float:
    seen: dict[int, float] = {}
    for r in records:
        seen[r["chunk"]] = r["seconds_chunk"]
    return sum(seen.values())


class RunSummary:
    """``summary.json`` of a run, updated batch by batch.

    ``header``: the fixed entries (run_dir, method, model, dataset, mode, num_edits, hparams_label,
    stats); ``n_cases``/``n_batches``: planned; ``t_start``: when the session began (``perf_counter``). :meth:`add_batch` takes a batch's ``cases.jsonl``
    lines (pre and post scores, ``batch_timings``), :meth:`add_check` a downstream check.
    """

    def __init__(self, header: Mapping[str, Any], n_cases: int, n_batches: int, t_start: float | None = None) -> None:
        self.header = dict(header)
        self.n_cases_planned, self.n_batches = n_cases, n_batches
        self.pre, self.post = MetricMeans(), MetricMeans()
        self.batches_done = 0
        self.times = dict.fromkeys(_TIME_KEYS, 0.0)
        self.checks: list[dict[str, Any]] = []
        self.retention: list[dict[str, Any]] = []  # retention checks without their per-case lines
        self.diagnostics_last: dict[str, Any] | None = None  # the latest diagnostics.jsonl line
        self.diagnostics_max: dict[str, dict[str, float]] = {}  # layer -> key -> largest value so far
        self.t_start = time.perf_counter() if t_start is None else t_start  # of the session, for "wall"

    def add_batch(self, lines: Sequence[Mapping[str, Any]]) -> None:
        for r in lines:
            self.pre.add(r["pre"])
            self.post.add(r["post"])
        t = lines[0]["batch_timings"]
        for k in ("stats", "v", "solve"):
            self.times[k] += t.get(k, 0.0)
        self.times["eval_post"] += t.get("eval", 0.0)
        self.batches_done += 1

    def add_check(self, check: Mapping[str, Any]) -> None:
        self.checks.append(dict(check))
        self.times["downstream"] += check["seconds"]

    def add_retention(self, check: Mapping[str, Any]) -> None:
        """A ``retention.jsonl`` line (its per-case records are left out of the summary)."""
        self.retention.append({k: v for k, v in check.items() if k != "cases"})
        self.times["retention"] += check["seconds"]

    def add_diagnostics(self, line: Mapping[str, Any]) -> None:
        """A ``diagnostics.jsonl`` line: one batch's per-layer rows."""
        self.diagnostics_last = dict(line)
        self.times["diagnostics"] += line.get("seconds") or 0.0
        for row in line.get("layers", []):
            top = self.diagnostics_max.setdefault(str(row["layer"]), {})
            for k in DIAGNOSTIC_MAXIMA:
                v = row.get(k)
                if v is not None and (k not in top or v > top[k]):
                    top[k] = v

    def set_chunk_times(self, pre: Iterable[Mapping[str, Any]], final: Iterable[Mapping[str, Any]] = ()) -> None:
        """Scoring seconds of the pre and final phases from their ``pre.jsonl``/``final.jsonl`` lines."""
        self.times["eval_pre"], self.times["eval_final"] = _chunk_seconds(pre), _chunk_seconds(final)

    def short(self) -> dict[str, str]:
        """Running post means for a progress bar."""
        keys = PROGRESS_METRICS["zsre" if self.post.mean("efficacy") is not None else "cf"]
        out = {}
        for k in keys:
            v = self.post.mean(k)
            if v is not None and not math.isnan(v):
                out[k] = f"{v:.0f}"
        return out

    def _lifelong(self, stopped: Mapping[str, Any] | None) -> dict[str, Any]:
        """The summary's diagnostics, retention and stopped entries (only those the run has)."""
        out: dict[str, Any] = {}
        if self.diagnostics_last is not None:
            out["diagnostics"] = {"last_batch": self.diagnostics_last["batch"],
                                  "last": {str(r["layer"]): r for r in self.diagnostics_last.get("layers", [])},
                                  "max": self.diagnostics_max}
        if self.retention:
            out["retention"] = {"checks": len(self.retention), "last": self.retention[-1]}
        if stopped is not None:
            out["stopped"] = dict(stopped)
        return out

    def _time_seconds(self) -> dict[str, float]:
        t = dict(self.times)
        t["eval"] = t["eval_pre"] + t["eval_post"] + t["eval_final"]
        t["edit"] = t["stats"] + t["v"] + t["solve"]
        t["total"] = t["edit"] + t["eval"] + t["downstream"] + t["retention"] + t["diagnostics"]
        return t

    def to_dict(self, partial: bool, final: Sequence[Mapping[str, Any]] | None = None,
                pre_all: Sequence[Mapping[str, Any]] | None = None,
                session_seconds: Mapping[str, float] | None = None,
                stopped: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The summary; ``final``/``pre_all``: every case's final and pre scores (a finished
        sequential run); ``session_seconds``: this process's extra timings (``wall`` is added);
        ``stopped``: the record of a run stopped on collapse."""
        done = self.post.n_cases
        s: dict[str, Any] = {"partial": partial, **self.header, "n_cases_planned": self.n_cases_planned,
                             "n_cases": done, "batches_done": self.batches_done, "n_batches": self.n_batches,
                             "pre": self.pre.summary(exact=not partial) if done else {},
                             "post": self.post.summary(exact=not partial) if done else {}}
        if final is not None and pre_all is not None:
            s["final"] = MetricMeans(final).summary()
            s["pre_all"] = MetricMeans(pre_all).summary()
        times = self._time_seconds()
        s["time_seconds"] = {k: round(v, 3) for k, v in times.items()}
        s["edits_per_second"] = done / times["edit"] if times["edit"] > 0 else None
        if self.checks:
            first, last = self.checks[0], self.checks[-1]
            s["downstream"] = {"checks": len(self.checks),
                               "baseline": first["records"] if first["batches_done"] == 0 else None,
                               "last": last["records"], "last_edits_so_far": last["edits_so_far"]}
        s.update(self._lifelong(stopped))
        s["session_seconds"] = {k: round(v, 3) for k, v in (session_seconds or {}).items()}
        s["session_seconds"]["wall"] = round(time.perf_counter() - self.t_start, 3)
        return s
