"""summary.py: incremental means equal summarize() of all records; RunSummary built batch by batch
equals a summary computed from all lines at once; the score and the metric tables."""

from __future__ import annotations

import random
from typing import Any

import pytest

from fastmemit.eval.metrics import COUNTERFACT_KEYS, ZSRE_KEYS, harmonic_mean, summarize
from fastmemit.eval.summary import (
    CF_METRICS,
    LABELS,
    TITLES,
    ZSRE_METRICS,
    MetricMeans,
    RunSummary,
    metrics_of,
    score,
)


def cf_record(rng: random.Random, i: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"case_id": i}
    for k in COUNTERFACT_KEYS:
        r = rng.random()
        # success rates are means over prompts; magnitudes are real; some cases lack a kind of prompt
        rec[k] = None if r < 0.1 else (rng.choice([0.0, 0.5, 1.0, 1 / 3]) if k in ("es", "ps", "ns") else rng.uniform(-1, 1))
    if i % 3 == 0:
        del rec["ngram_entropy"]
    return rec


def zsre_record(rng: random.Random, i: int) -> dict[str, Any]:
    return {"case_id": i, **{k: rng.choice([0.0, 0.25, 1 / 3, 1.0]) for k in ZSRE_KEYS}}


@pytest.mark.parametrize("make", [cf_record, zsre_record], ids=["counterfact", "zsre"])
def test_incremental_means_equal_summarize_of_all_records(make):
    rng = random.Random(1)
    records = [make(rng, i) for i in range(257)]
    means = MetricMeans()
    for k, r in enumerate(records):
        means.add(r)
        if k in (0, 1, 100, 256):  # the running means at any point are those of the records so far
            assert means.summary(exact=False) == pytest.approx(summarize(records[: k + 1]), rel=1e-12)
    assert means.summary() == summarize(records)  # exactly, key order included
    assert list(means.summary()) == list(summarize(records))
    assert MetricMeans().summary() == summarize([]) == {"n_cases": 0}


def test_score_is_the_harmonic_mean_of_es_ps_ns_or_none():
    assert score({"es": 100.0, "ps": 50.0, "ns": 25.0}) == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 25))
    assert score({"es": 100.0, "ps": 0.0, "ns": 25.0}) == 0.0
    assert score({"es": 100.0, "ps": None, "ns": 25.0}) is None and score({}) is None
    assert MetricMeans([{"es": 1.0, "ps": 0.5}]).mean("score") is None
    records = [{"es": 1.0, "ps": 0.5, "ns": 1.0}, {"es": 0.0, "ps": 1.0, "ns": 1.0}]
    assert MetricMeans(records).mean("score") == harmonic_mean([50.0, 75.0, 100.0]) == summarize(records)["score"]


def test_metric_tables_name_every_headline_metric():
    assert metrics_of({"es": 1.0}) == CF_METRICS and metrics_of({"efficacy": 1.0}) == ZSRE_METRICS
    for m in (*CF_METRICS, *ZSRE_METRICS):
        assert m in LABELS and m in TITLES


def batch_lines(rng: random.Random, b: int, size: int) -> list[dict[str, Any]]:
    t = {"stats": rng.random(), "v": rng.random(), "solve": rng.random(), "edit": 1.0, "eval": rng.random()}
    return [{"batch": b, "case_id": 10 * b + j, "pre": cf_record(rng, j), "post": cf_record(rng, j),
             "batch_timings": t} for j in range(size)]


def test_run_summary_batch_by_batch_equals_the_summary_of_all_lines():
    rng = random.Random(2)
    batches = [batch_lines(rng, b, 3 if b < 4 else 1) for b in range(5)]
    chunks = [{"chunk": i // 4, "seconds_chunk": 0.5 * (i // 4 + 1)} for i in range(13)]
    header = {"run_dir": "r", "method": "EMMET", "model": "m", "dataset": "cf", "mode": "batched", "num_edits": 3,
              "hparams_label": "L0-1", "stats": {}}
    s = RunSummary(header, n_cases=13, n_batches=5)
    first = s.to_dict(partial=True)
    assert first["pre"] == first["post"] == {} and first["batches_done"] == 0 and first["edits_per_second"] is None
    s.set_chunk_times(chunks)
    for lines in batches:
        s.add_batch(lines)
    s.add_check({"seconds": 2.0, "batches_done": 0, "edits_so_far": 0, "records": ["baseline"]})
    s.add_check({"seconds": 3.0, "batches_done": 5, "edits_so_far": 1, "records": ["last"]})
    out = s.to_dict(partial=False, session_seconds={"load_model": 1.23456})
    every = [r for lines in batches for r in lines]
    assert out["pre"] == summarize([r["pre"] for r in every]) and out["post"] == summarize([r["post"] for r in every])
    assert list(out)[:8] == ["partial", *header][:8] and out["n_cases"] == 13 and out["batches_done"] == 5
    t = out["time_seconds"]
    assert t["eval_pre"] == 0.5 + 1.0 + 1.5 + 2.0  # one time per chunk, not per line
    assert t["stats"] == round(sum(b[0]["batch_timings"]["stats"] for b in batches), 3)
    assert t["downstream"] == 5.0 and t["total"] == pytest.approx(t["edit"] + t["eval"] + t["downstream"], abs=2e-3)
    assert out["downstream"] == {"checks": 2, "baseline": ["baseline"], "last": ["last"], "last_edits_so_far": 1}
    assert out["session_seconds"]["load_model"] == 1.235 and "wall" in out["session_seconds"]
    assert "final" not in out
    final = s.to_dict(partial=False, final=[r["post"] for r in every], pre_all=[r["pre"] for r in every])
    assert final["final"] == summarize([r["post"] for r in every])
    assert s.short() == {k: f"{out['post'][k]:.0f}" for k in ("es", "ps", "ns")}
