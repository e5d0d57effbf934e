"""Lifelong runs on a tiny random Llama: per-batch diagnostics in the run folder, retention checks that
resume exactly, and ``stop_on_collapse`` stopping on a forced rule with the last healthy model kept
bit for bit; the collapse rules themselves on synthetic records; the new flags.

Every run uses the real pipeline with tiny hparams (as tests/test_runner.py); files live in pytest's
temporary folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fastmemit.cli import build_parser
from fastmemit.cli.evaluate_cmd import build_config
from fastmemit.editing import apply_deltas
from fastmemit.errors import RunError
from fastmemit.eval import RunConfig, run_evaluation
from fastmemit.eval.collapse import CollapseMonitor, CollapseRules
from fastmemit.eval.plots import plot_lifelong
from tests.helpers import RUN_HPARAMS, cf_record, tiny_llm, write_tiny_corpus

HPARAMS = RUN_HPARAMS
N_CASES = 7  # edits_per_batch 3 → batches of 3, 3, 1


pytestmark = pytest.mark.usefixtures("private_cache")

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lifelong")





@pytest.fixture(scope="module")
def files(work, tokenizer) -> dict[str, Path]:
    corpus = write_tiny_corpus(work / "corpus.jsonl", tokenizer)
    cf = work / "cf.json"
    cf.write_text(json.dumps([cf_record(i) for i in range(10)]))
    hp = work / "hparams.json"
    hp.write_text(json.dumps(HPARAMS))
    return {"corpus": corpus, "cf": cf, "hparams": hp, "stats": work / "stats"}


def config(files: dict[str, Path], **kw: Any) -> RunConfig:
    base = dict(method="EMMET", model="tiny-llama", hparams=str(files["hparams"]), dataset="cf", data=str(files["cf"]),
                dataset_size_limit=N_CASES, edits_per_batch=3, corpus=str(files["corpus"]),
                stats_cache_dir=str(files["stats"]), eval_chunk=4, show_progress=False, plots=False)
    base.update(kw)
    return RunConfig(**base)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Interrupt:
    """on_event hook raising KeyboardInterrupt at (event, batch)."""

    def __init__(self, event: str, batch: int) -> None:
        self.at = (event, batch)

    def __call__(self, event: str, batch: int) -> None:
        if (event, batch) == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def reference(files, tokenizer, work):
    """An uninterrupted sequential run with retention after every batch and cumulative deltas saved
    after every batch (to rebuild the model after any batch exactly)."""
    cfg = config(files, retention_eval_steps=1, save_model=True, save_model_interval=1)
    return run_evaluation(cfg, work / "reference", model=tiny_llm("llama", len(tokenizer)), tok=tokenizer)


def model_after(batches: int, ref_dir: Path, tok: Any) -> torch.nn.Module:
    model = tiny_llm("llama", len(tok))
    if batches:
        edits = {1: 3, 2: 6, 3: 7}[batches]
        apply_deltas(model, ref_dir / "models" / f"deltas_batch{batches:05d}_{edits}edits.safetensors")
    return model


def max_rel_distance(run_dir: Path) -> list[float]:
    return [max(r["relative_distance_w0"] for r in line["layers"]) for line in lines(run_dir / "diagnostics.jsonl")]


# ----------------------------------------------------------------------------- diagnostics and retention


def test_diagnostics_and_retention_are_written_per_batch_and_summarized(reference):
    d, s = reference.run_dir, reference.summary
    diag = lines(d / "diagnostics.jsonl")
    assert [(x["batch"], x["edits_so_far"]) for x in diag] == [(0, 3), (1, 6), (2, 7)]
    assert all([r["layer"] for r in x["layers"]] == [0, 1] for x in diag)
    dist = max_rel_distance(d)
    assert 0 < dist[0] and s["diagnostics"]["max"]["1"]["relative_distance_w0"] == max(
        r["relative_distance_w0"] for x in diag for r in x["layers"] if r["layer"] == 1)
    ret = lines(d / "retention.jsonl")
    # none after the last batch: the final scoring scores the same cases on the same model
    assert [(c["batches_done"], c["edits_so_far"], c["means"]["n_cases"]) for c in ret] == [(1, 3, 3), (2, 6, 6)]
    assert [c["case_id"] for c in ret[1]["cases"]] == list(range(100, 106))
    assert [c["batch"] for c in ret[1]["cases"]] == [0, 0, 0, 1, 1, 1]
    # the first check scores batch 0's cases on the model right after batch 0: their post scores
    post0 = [r["post"]["es"] for r in lines(d / "cases.jsonl") if r["batch"] == 0]
    assert ret[0]["means"]["es"] == pytest.approx(100 * sum(post0) / 3, abs=1e-9)
    assert s["retention"]["checks"] == 2 and "cases" not in s["retention"]["last"]


def test_retention_after_the_last_batch_without_final_scoring_equals_what_the_final_scoring_gives(
        files, tokenizer, work, reference):
    res = run_evaluation(config(files, retention_eval_steps=3, final_eval=False), work / "no-final",
                         model=tiny_llm("llama", len(tokenizer)), tok=tokenizer)
    ret = lines(res.run_dir / "retention.jsonl")
    assert [c["batches_done"] for c in ret] == [3] and "final" not in res.summary
    for k in ("es", "ps", "ns"):  # every case on the final model: the reference's final scoring
        assert ret[0]["means"][k] == pytest.approx(reference.summary["final"][k], abs=1e-9)


@pytest.mark.parametrize("stop", [0, 1], ids=["after-batch-0", "after-batch-1"])
def test_retention_and_diagnostics_logs_resume_to_the_same_lines(stop, files, tokenizer, work, reference):
    cfg = config(files, retention_eval_steps=1, save_model=True, save_model_interval=1)
    out = work / f"resume-{stop}"
    with pytest.raises(KeyboardInterrupt):  # batch `stop` written, its checkpoint not: redone on resume
        run_evaluation(cfg, out, model=tiny_llm("llama", len(tokenizer)), tok=tokenizer,
                       on_event=Interrupt("batch_written", stop))
    assert len(lines(out / "retention.jsonl")) == min(stop + 1, 2)
    with open(out / "retention.jsonl", "ab") as f:  # a torn line, as from a kill in the middle of a write
        f.write(b'{"check": 9, "batches_')
    run_evaluation(cfg, out, model=tiny_llm("llama", len(tokenizer)), tok=tokenizer)
    ref = reference.run_dir
    for name in ("retention.jsonl", "diagnostics.jsonl"):
        a, b = lines(ref / name), lines(out / name)
        strip = ("seconds",)
        assert [{k: v for k, v in x.items() if k not in strip} for x in a] == \
               [{k: v for k, v in x.items() if k not in strip} for x in b], name


def test_pre_scores_are_reused_only_from_runs_on_the_same_model_and_cases(files, tokenizer, work, reference):
    ref_pre = lines(reference.run_dir / "pre.jsonl")
    out = work / "reuse"
    res = run_evaluation(config(files, method="MEMIT"), out, model=tiny_llm("llama", len(tokenizer)), tok=tokenizer,
                         reuse_pre_from=[reference.run_dir, work / "no-such-run"])
    got = lines(out / "pre.jsonl")
    assert [x["pre"] for x in got] == [x["pre"] for x in ref_pre] and all(x["seconds_chunk"] == 0 for x in got)
    assert res.summary["pre"] == reference.summary["pre"]
    # another unedited model (another seed): its own scores
    other = run_evaluation(config(files, method="MEMIT"), work / "reuse-other", model=tiny_llm("llama", len(tokenizer), seed=1),
                           tok=tokenizer, reuse_pre_from=[reference.run_dir])
    assert all(x["seconds_chunk"] > 0 for x in lines(other.run_dir / "pre.jsonl"))
    # more cases than the other run: its chunks where they match, the rest scored
    more = run_evaluation(config(files, dataset_size_limit=10, eval_chunk=4), work / "reuse-more",
                          model=tiny_llm("llama", len(tokenizer)), tok=tokenizer, reuse_pre_from=[reference.run_dir])
    pre = lines(more.run_dir / "pre.jsonl")
    assert [x["seconds_chunk"] == 0 for x in pre] == [True] * 4 + [False] * 6  # chunk 1 of 7 cases is shorter
    assert [x["pre"] for x in pre[:4]] == [x["pre"] for x in ref_pre[:4]]


# ----------------------------------------------------------------------------- stop on collapse


@pytest.mark.parametrize("interval, fire_at, healthy", [(1, 1, 1), (2, 1, 0), (2, 2, 2)],
                         ids=["every-batch", "before-first-checkpoint", "at-a-checkpoint-interval"])
def test_stop_on_collapse_keeps_the_last_healthy_checkpoint_exactly(interval, fire_at, healthy, files, tokenizer,
                                                                    work, reference):
    """A relative-distance limit between batch ``fire_at - 1``'s and batch ``fire_at``'s forces the rule to
    fire after batch ``fire_at``; the model left is the one after ``healthy`` batches, bit for bit."""
    dist = max_rel_distance(reference.run_dir)
    assert dist[fire_at] > dist[fire_at - 1]
    limit = (dist[fire_at - 1] + dist[fire_at]) / 2
    cfg = config(files, stop_on_collapse=True, collapse_rel_distance=limit, collapse_ns_drop=None,
                 checkpoint_interval=interval, retention_eval_steps=1)
    out = work / f"stop-{interval}-{fire_at}"
    res = run_evaluation(cfg, out, model=tiny_llm("llama", len(tokenizer)), tok=tokenizer)
    st = res.summary["stopped"]
    assert st["rule"] == "rel_distance" and st["batch"] == fire_at and st["batches_done"] == fire_at + 1
    assert st["value"] == pytest.approx(dist[fire_at]) and "layer" in st["reason"]
    assert st["healthy_batches_done"] == healthy and st["healthy_edits"] == [0, 3, 6][healthy]
    assert json.loads((out / "stopped.json").read_text()) == st
    assert not res.summary["partial"] and "final" not in res.summary
    assert res.summary["batches_done"] == fire_at + 1  # the batch that collapsed is logged
    want = model_after(healthy, reference.run_dir, tokenizer)
    got = dict(res.model.named_parameters())
    assert all(torch.equal(p.detach(), got[n].detach()) for n, p in want.named_parameters())
    # a rerun reports the stop, edits nothing, and hands back the same healthy model
    before = (out / "cases.jsonl").read_bytes()
    again = run_evaluation(cfg, out, model=tiny_llm("llama", len(tokenizer)), tok=tokenizer)
    assert again.summary["stopped"] == st and (out / "cases.jsonl").read_bytes() == before
    got = dict(again.model.named_parameters())
    assert all(torch.equal(p.detach(), got[n].detach()) for n, p in want.named_parameters())


def test_stop_on_collapse_without_a_rule_firing_changes_nothing(files, tokenizer, work, reference):
    cfg = config(files, stop_on_collapse=True, collapse_rel_distance=1e9, collapse_ns_drop=None,
                 retention_eval_steps=1, save_model=True, save_model_interval=1)
    res = run_evaluation(cfg, work / "no-collapse", model=tiny_llm("llama", len(tokenizer)), tok=tokenizer)
    assert "stopped" not in res.summary and res.summary["final"] == reference.summary["final"]
    manifest = json.loads((res.run_dir / "checkpoint" / "checkpoint.json").read_text())
    assert manifest["healthy"]["batches_done"] == 3  # the final model was judged healthy


def test_collapse_settings_are_checked():
    with pytest.raises(RunError, match="sequential"):
        RunConfig(sequential=False, stop_on_collapse=True)
    with pytest.raises(RunError, match="at least one collapse rule"):
        RunConfig(stop_on_collapse=True, collapse_ns_drop=None)
    with pytest.raises(RunError, match="non-negative"):
        RunConfig(collapse_ns_drop=-1.0)
    with pytest.raises(RunError, match="retention_eval_steps"):
        RunConfig(retention_eval_steps=0)


def test_lifelong_flags_build_the_config(tmp_path):
    args = build_parser().parse_args(["evaluate", "--stop_on_collapse", "--collapse-ns-drop", "off",
                                      "--collapse_rel_distance", "0.5", "--retention_eval_steps", "4",
                                      "--collapse_window", "50", "--out", str(tmp_path / "r")])
    cfg, _ = build_config(args)
    assert (cfg.stop_on_collapse, cfg.collapse_ns_drop, cfg.collapse_rel_distance, cfg.retention_eval_steps,
            cfg.collapse_window, cfg.collapse_downstream_drop) == (True, None, 0.5, 4, 50, 0.1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--collapse_ns_drop", "-3"])


# ----------------------------------------------------------------------------- the rules on synthetic records


def batch_lines(pre_ns: float, post_ns: float, n: int) -> list[dict[str, Any]]:
    return [{"pre": {"ns": pre_ns}, "post": {"ns": post_ns}} for _ in range(n)]


def check(done: int, acc: dict[tuple[str, str], float], invalid: float = 0.0) -> dict[str, Any]:
    return {"batches_done": done, "records": [{"task": t, "mode": m, "accuracy": a, "invalid": invalid if m == "generate"
                                               else 0.0} for (t, m), a in acc.items()]}


def test_ns_rule_averages_the_latest_window_of_cases():
    mon = CollapseMonitor(CollapseRules(ns_drop=20.0, window=20))
    mon.add_batch(batch_lines(0.7, 0.7, 10))
    assert mon.verdict(1, None, []) is None  # 10 cases: not judged yet
    mon.add_batch(batch_lines(0.7, 0.4, 10))
    assert mon.verdict(2, None, []) is None  # 20 cases: drop 15 points
    mon.add_batch(batch_lines(0.7, 0.4, 10))
    got = mon.verdict(3, None, [])  # the first batch left the window: drop 30 points
    assert got["rule"] == "ns_drop" and got["value"] == pytest.approx(30.0)


def test_downstream_rules_compare_with_the_baseline_check_only_at_check_points():
    rules = CollapseRules(downstream_drop=0.1, invalid_rise=0.5)
    mon = CollapseMonitor(rules, downstream_points=[0, 2, 4])
    base = check(0, {("sst2", "generate"): 0.7, ("sst2", "loglik"): 0.7, ("rte", "loglik"): 0.5})
    ok = check(2, {("sst2", "generate"): 0.62, ("sst2", "loglik"): 0.66, ("rte", "loglik"): 0.5})
    assert mon.verdict(2, None, [base, ok]) is None and mon.candidate(2, False) and not mon.candidate(3, True)
    bad = check(4, {("sst2", "generate"): 0.45, ("sst2", "loglik"): 0.6, ("rte", "loglik"): 0.5})
    got = mon.verdict(4, None, [base, ok, bad])
    assert got["rule"] == "downstream_drop" and got["value"] == pytest.approx(0.35 / 3)
    assert mon.verdict(3, None, [base, ok, bad]) is None  # no check after batch 3
    mute = check(4, {("sst2", "generate"): 0.7, ("sst2", "loglik"): 0.7, ("rte", "loglik"): 0.5}, invalid=0.9)
    got = mon.verdict(4, None, [base, mute])
    assert got["rule"] == "invalid_rise" and got["value"] == pytest.approx(0.9)


def test_distance_rule_names_the_layer():
    mon = CollapseMonitor(CollapseRules(rel_distance=0.5))
    rows = [{"layer": 4, "relative_distance_w0": 0.2}, {"layer": 8, "relative_distance_w0": 0.6}]
    got = mon.verdict(1, rows, [])
    assert got["rule"] == "rel_distance" and "layer 8" in got["reason"] and mon.candidate(1, True)


def test_plot_lifelong_draws_runs_together(reference, work):
    paths = plot_lifelong([reference.run_dir, reference.run_dir], work / "lifelong.png", labels=["a", "b"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = paths["csv"].read_text().splitlines()
    assert any(",es," in r for r in rows) and any(",relative_distance_w0," in r for r in rows)
