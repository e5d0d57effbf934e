"""Evaluation runs on a tiny random Llama: files and counts, batched vs sequential semantics, exact
resume after an interruption (KeyboardInterrupt at chosen points, a torn line, a SIGKILLed
subprocess), refusal of a changed configuration, case selection, zsRE, malformed data, flags, and
the plot/summarize commands.

Every run uses the real pipeline (statistics from a small corpus file, model-generated templates,
v*, the solve, teacher-forced scoring) with tiny hparams; all files live in pytest's temporary
folders (``FASTMEMIT_CACHE`` included).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fastmemit.cli import build_parser, main
from fastmemit.cli.evaluate_cmd import build_config
from fastmemit.downstream import DownstreamDataError
from fastmemit.downstream import default_data_dir as downstream_data_dir
from fastmemit.errors import RunError
from fastmemit.eval import RunConfig, run_evaluation, summarize
from fastmemit.eval.config import ALIASES
from fastmemit.eval.datasets import DatasetError
from fastmemit.eval.runner import load_cases
from tests.helpers import CF_OBJECTS as OBJECTS
from tests.helpers import CF_SUBJECTS as SUBJECTS
from tests.helpers import REPO, RUN_HPARAMS, cf_record, tiny_llm, write_tiny_corpus

HPARAMS = RUN_HPARAMS
N_CASES = 7  # edits_per_batch 3 → batches of 3, 3, 1


pytestmark = pytest.mark.usefixtures("private_cache")

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runner")






@pytest.fixture(scope="module")
def files(work, tokenizer) -> dict[str, Path]:
    corpus = write_tiny_corpus(work / "corpus.jsonl", tokenizer)
    data = work / "data"
    (data / "seed-samples").mkdir(parents=True)
    cf = data / "cf.json"
    cf.write_text(json.dumps([cf_record(i) for i in range(10)]))
    # orderings name ids of the full dataset: most are absent from this small file
    (data / "seed-samples" / "counterfact_sampled_unique_cf_10_20000.json").write_text(
        json.dumps({"0": [5, 107, 999, 102, 109, 100, 7000, 104], "1": [103, 101]}))
    zsre = data / "zsre.json"
    zsre.write_text(json.dumps([
        {"subject": s, "src": f"What is the product made by {s}?", "pred": "x", "rephrase": f"What does {s} make?",
         "alt": OBJECTS[i], "answers": [OBJECTS[i + 1]], "loc": "nq question: who plays the guitar",
         "loc_ans": "John Lennon", "cond": "x"} for i, s in enumerate(SUBJECTS[:4])]))
    hp = work / "hparams.json"
    hp.write_text(json.dumps(HPARAMS))
    return {"corpus": corpus, "cf": cf, "zsre": zsre, "hparams": hp, "data": data}


def config(files: dict[str, Path], **kw: Any) -> RunConfig:
    base = dict(method="EMMET", model="tiny-llama", hparams=str(files["hparams"]), dataset="cf",
                data=str(files["cf"]), dataset_size_limit=N_CASES, edits_per_batch=3, corpus=str(files["corpus"]),
                stats_cache_dir=str(files["data"].parent / "stats"), eval_chunk=4, show_progress=False, plots=False)
    base.update(kw)
    return RunConfig(**base)


def fresh_model(tok: Any) -> torch.nn.Module:
    return tiny_llm("llama", len(tok))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Interrupt:
    """on_event hook raising KeyboardInterrupt at (event, batch)."""

    def __init__(self, event: str, batch: int) -> None:
        self.at = (event, batch)

    def __call__(self, event: str, batch: int) -> None:
        if (event, batch) == self.at:
            raise KeyboardInterrupt


def assert_same_results(a: Path, b: Path) -> None:
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert not sa["partial"] and not sb["partial"]
    for block in ("pre", "post", "final", "pre_all"):
        assert (block in sa) == (block in sb)
        for k, v in sa.get(block, {}).items():
            assert sb[block][k] == pytest.approx(v, abs=1e-9, rel=0), f"{block}.{k}"
    ca, cb = lines(a / "cases.jsonl"), lines(b / "cases.jsonl")
    assert [(r["batch"], r["case_id"]) for r in ca] == [(r["batch"], r["case_id"]) for r in cb]
    for ra, rb in zip(ca, cb):  # per-case NLLs, not only means
        assert ra["post"] == rb["post"] and ra["pre"] == rb["pre"], ra["case_id"]


# ----------------------------------------------------------------------------- flags


def test_bool_flags_parse_values_and_both_spellings(files):
    p = build_parser()
    a = p.parse_args(["evaluate", "--sequential", "false", "--num-edits", "4", "--alg-name", "MEMIT"])
    assert a.sequential is False and a.edits_per_batch == 4 and a.method == "MEMIT"
    assert p.parse_args(["evaluate", "--sequential"]).sequential is True
    assert p.parse_args(["evaluate", "--sequential=False"]).sequential is False
    assert p.parse_args(["evaluate", "--skip-generation-tests", "no"]).skip_generation_tests is False
    assert p.parse_args(["evaluate", "--use_cache", "0", "--recompute-stats", "yes"]).use_cache is False
    with pytest.raises(SystemExit):
        p.parse_args(["evaluate", "--sequential", "maybe"])
    cfg, out = build_config(p.parse_args(["evaluate", "--out", "x", "--recompute_stats", "true",
                                          "--dynamic-multiplier", "3", "--set", "v_lr=0.1"]))
    assert cfg.sequential is True and cfg.edits_per_batch == 1 and out == Path("x")  # defaults: sequential, 1 edit
    assert cfg.hparams_overrides == {"recompute_stats": True, "dynamic_multiplier": 3.0, "v_lr": 0.1}
    cfg, _ = build_config(p.parse_args(["evaluate", "--sequential", "false"]))
    assert cfg.sequential is False


# ----------------------------------------------------------------------------- runs and their files


@pytest.fixture(scope="module")
def batched_run(files, tokenizer, work):
    model = fresh_model(tokenizer)
    before = snapshot(model)
    res = run_evaluation(config(files, sequential=False, save_model=True), work / "batched", model=model, tok=tokenizer)
    return res, before


@pytest.fixture(scope="module")
def sequential_run(files, tokenizer, work):
    model = fresh_model(tokenizer)
    before = snapshot(model)
    res = run_evaluation(config(files, sequential=True, save_model=True, save_model_interval=2), work / "sequential",
                         model=model, tok=tokenizer)
    return res, before


def test_batched_run_writes_files_with_right_counts_and_restores_weights(batched_run):
    res, before = batched_run
    d = res.run_dir
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["n_cases"] == N_CASES and cfg["n_batches"] == 3 and cfg["run"]["sequential"] is False
    assert json.loads((d / "hparams.json").read_text())["layers"] == [0, 1]
    recs = lines(d / "cases.jsonl")
    assert [r["batch"] for r in recs] == [0, 0, 0, 1, 1, 1, 2]
    assert [r["case_id"] for r in recs] == cfg["case_ids"] == list(range(100, 100 + N_CASES))
    assert len(lines(d / "pre.jsonl")) == N_CASES
    s = res.summary
    assert s == json.loads((d / "summary.json").read_text())
    assert not s["partial"] and s["n_cases"] == N_CASES and s["batches_done"] == 3 and "final" not in s
    for block in ("pre", "post"):
        assert s[block]["n_cases"] == N_CASES and {"es", "ps", "ns", "score"} <= s[block].keys()
    assert {"stats", "v", "solve", "eval", "downstream"} <= s["time_seconds"].keys()
    assert s["edits_per_second"] > 0
    after = dict(res.model.named_parameters())
    assert all(torch.equal(after[n].detach(), w) for n, w in before.items()), "batched run left the model edited"
    # --save_model: each batch's own deltas
    assert sorted(f.name for f in (d / "models").iterdir()) == [f"deltas_batch{b:05d}.safetensors" for b in (1, 2, 3)]


def test_sequential_run_keeps_edits_checkpoints_them_and_scores_all_cases_at_the_end(sequential_run, tokenizer):
    from fastmemit.editing import apply_deltas

    res, before = sequential_run
    d = res.run_dir
    s = res.summary
    assert s["mode"] == "sequential" and s["n_cases"] == N_CASES
    assert s["final"]["n_cases"] == N_CASES and s["pre_all"]["n_cases"] == N_CASES
    assert [r["edits_so_far"] for r in lines(d / "cases.jsonl")] == [3, 3, 3, 6, 6, 6, 7]
    assert len(lines(d / "final.jsonl")) == N_CASES
    changed = [n for n, p in res.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    # the checkpoint is an ordinary deltas file: apply_deltas on the unedited model reproduces the edits
    manifest = json.loads((d / "checkpoint" / "checkpoint.json").read_text())
    assert manifest["batches_done"] == 3 and manifest["edits"] == N_CASES
    # --save_model every 2 batches and after the last: cumulative deltas
    assert sorted(f.name for f in (d / "models").iterdir()) == ["deltas_batch00002_6edits.safetensors",
                                                                 "deltas_batch00003_7edits.safetensors"]
    other = fresh_model(tokenizer)
    apply_deltas(other, d / "models" / "deltas_batch00003_7edits.safetensors")
    edited = dict(res.model.named_parameters())
    for n, p in other.named_parameters():
        torch.testing.assert_close(p.detach(), edited[n].detach(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("variant, stop", [
    (dict(sequential=False), 1),
    (dict(sequential=True), 1),  # batch 1 written, its checkpoint not: batch 1 is redone
    (dict(sequential=True, method="AlphaEdit"), 2),  # resumes from a checkpoint holding earlier keys
    (dict(sequential=True, hparams_overrides={"recompute_stats": True}), 2),  # statistics of the edited model
], ids=["batched", "sequential", "alphaedit", "recompute-stats"])
def test_interrupted_run_resumes_to_the_same_results(variant, stop, files, tokenizer, work, request):
    cfg = config(files, **variant)
    name = request.node.callspec.id
    ref = run_evaluation(cfg, work / f"ref-{name}", model=fresh_model(tokenizer), tok=tokenizer).run_dir
    out = work / f"int-{name}"
    model = fresh_model(tokenizer)
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):  # after the lines of batch `stop`, before its checkpoint
        run_evaluation(cfg, out, model=model, tok=tokenizer, on_event=Interrupt("batch_written", stop))
    partial = json.loads((out / "summary.json").read_text())
    assert partial["partial"] and partial["batches_done"] == stop
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()), "interrupted run left edits"
    with open(out / "cases.jsonl", "ab") as f:  # and a torn line, as from a kill in the middle of a write
        f.write(b'{"batch": 2, "case_id": 10')
    resumed = run_evaluation(cfg, out, model=model, tok=tokenizer)
    assert_same_results(ref, resumed.run_dir)
    if variant.get("method") == "AlphaEdit":
        from safetensors.torch import load_file

        manifest = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
        state = load_file(str(out / "checkpoint" / manifest["state"]))
        assert state["1/Kp"].shape == (128, N_CASES)  # earlier edits' keys travel with the checkpoint


@pytest.mark.slow
def test_sigkilled_sequential_run_resumes_to_the_same_results(files, tokenizer, work, sequential_run):
    cfg = config(files)
    out = work / "killed"
    tokenizer.save_pretrained(work / "tokenizer")  # quicker to load than to rebuild from the BPE files
    script = f"""
import os, signal, sys, json
sys.path.insert(0, {str(REPO)!r})
import torch
torch.set_num_threads(1)
from transformers import AutoTokenizer
from tests.helpers import tiny_llm
from fastmemit.eval import RunConfig, run_evaluation
tok = AutoTokenizer.from_pretrained({str(work / "tokenizer")!r})
def hook(event, batch):
    if (event, batch) == ("checkpoint_written", 1):
        os.kill(os.getpid(), signal.SIGKILL)
run_evaluation(RunConfig(**json.loads({json.dumps(json.dumps(cfg.to_dict()))})), {str(out)!r},
               model=tiny_llm("llama", len(tok)), tok=tok, on_event=hook)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["batches_done"] == 2
    resumed = run_evaluation(cfg, out, model=fresh_model(tokenizer), tok=tokenizer)
    assert_same_results(sequential_run[0].run_dir, resumed.run_dir)


def test_restart_with_another_configuration_is_refused(files, tokenizer, batched_run):
    d = batched_run[0].run_dir
    stored = (d / "config.json").read_text()
    with pytest.raises(RunError, match=r"edits_per_batch \(num_edits\): 3 → 2"):
        run_evaluation(config(files, sequential=False, edits_per_batch=2), d, model=fresh_model(tokenizer), tok=tokenizer)
    assert (d / "config.json").read_text() == stored
    # --continue_from_run takes the stored settings and refuses flags that contradict them
    p = build_parser()
    cfg, out = build_config(p.parse_args(["evaluate", "--continue_from_run", str(d), "--plots", "true"]))
    assert out == d and cfg.edits_per_batch == 3 and cfg.sequential is False and cfg.plots is True
    with pytest.raises(RunError, match="num_edits"):
        build_config(p.parse_args(["evaluate", "--continue_from_run", str(d), "--num_edits", "5"]))
    # --config reproduces the settings in a new folder; flags given with it override them
    cfg2, out2 = build_config(p.parse_args(["evaluate", "--config", str(d / "config.json"), "--out", "new"]))
    assert cfg2 == cfg.__class__.from_json(d / "config.json") and out2 == Path("new")
    cfg3, _ = build_config(p.parse_args(["evaluate", "--config", str(d / "config.json"), "--num-edits", "2"]))
    assert cfg3.edits_per_batch == 2 and cfg3.data == cfg2.data
    # a finished run restarted unchanged does nothing new and reports the same summary
    again = run_evaluation(config(files, sequential=False), d, model=fresh_model(tokenizer), tok=tokenizer)
    assert again.summary["post"] == batched_run[0].summary["post"]


@pytest.mark.parametrize("which", ["batched_run", "sequential_run"])
def test_summary_json_equals_a_full_resummary_of_the_run_files(which, request):
    """summary.json is kept batch by batch; it must equal summarize() of all lines of the finished run."""
    d = request.getfixturevalue(which)[0].run_dir
    s = json.loads((d / "summary.json").read_text())
    cases = lines(d / "cases.jsonl")
    assert s["pre"] == summarize([r["pre"] for r in cases]) and s["post"] == summarize([r["post"] for r in cases])
    if which == "sequential_run":
        assert s["final"] == summarize([r["final"] for r in lines(d / "final.jsonl")])
        assert s["pre_all"] == summarize([r["pre"] for r in lines(d / "pre.jsonl")])
    else:
        assert "final" not in s and not (d / "final.jsonl").exists()
    firsts = [r for r in cases if r["case_id"] == min(c["case_id"] for c in cases if c["batch"] == r["batch"])]
    for key in ("stats", "v", "solve"):
        assert s["time_seconds"][key] == round(sum(r["batch_timings"][key] for r in firsts), 3)
    assert s["time_seconds"]["eval_pre"] == round(sum({r["chunk"]: r["seconds_chunk"]
                                                       for r in lines(d / "pre.jsonl")}.values()), 3)


def test_a_run_folder_stored_with_the_research_names_is_continued(files, tokenizer, work, batched_run):
    """config.json of runs written before the rename (alg_name, num_edits, ...) still resumes."""
    d = work / "old-names"
    shutil.copytree(batched_run[0].run_dir, d)
    stored = json.loads((d / "config.json").read_text())
    research_name = {field: alias for alias, field in ALIASES.items()}
    stored["run"] = {research_name.get(k, k): v for k, v in stored["run"].items()}
    assert {"alg_name", "num_edits", "ds_name"} <= stored["run"].keys()
    (d / "config.json").write_text(json.dumps(stored))
    again = run_evaluation(config(files, sequential=False), d, model=fresh_model(tokenizer), tok=tokenizer)
    assert again.summary["post"] == batched_run[0].summary["post"] and again.summary["batches_done"] == 3
    p = build_parser()
    cfg, out = build_config(p.parse_args(["evaluate", "--continue_from_run", str(d), "--num_edits", "3"]))
    assert out == d and cfg == RunConfig.from_json(d / "config.json") and cfg.edits_per_batch == 3
    with pytest.raises(RunError, match="num_edits"):
        build_config(p.parse_args(["evaluate", "--continue_from_run", str(d), "--num_edits", "5"]))
    with pytest.raises(RunError, match=r"edits_per_batch \(num_edits\): 3 → 2"):
        run_evaluation(config(files, sequential=False, edits_per_batch=2), d, model=fresh_model(tokenizer), tok=tokenizer)


# ----------------------------------------------------------------------------- which cases


def test_dataset_size_limit_and_seed_orderings_select_cases(files):
    assert [c.case_id for c in load_cases(config(files, dataset_size_limit=5))] == [100, 101, 102, 103, 104]
    assert len(load_cases(config(files, dataset_size_limit=None))) == 10
    # ordering 0 with the ids absent from the file skipped, then the limit
    assert [c.case_id for c in load_cases(config(files, sample_num=0, dataset_size_limit=None))] == \
        [107, 102, 109, 100, 104]
    assert [c.case_id for c in load_cases(config(files, sample_num=0, dataset_size_limit=3))] == [107, 102, 109]
    with pytest.raises(DatasetError, match="no ordering '7'"):
        load_cases(config(files, sample_num=7))
    with pytest.raises(DatasetError, match="not found"):
        load_cases(config(files, sample_num=0, seed_samples=str(files["data"] / "nowhere")))


def test_zsre_runs_end_to_end_and_resumes_with_its_stored_hparams(files, tokenizer, work):
    hp = work / "zsre-hparams.json"
    hp.write_text(json.dumps(HPARAMS))
    cfg = config(files, dataset="zsre", data=str(files["zsre"]), edits_per_batch=2, hparams=str(hp))
    res = run_evaluation(cfg, work / "zsre", model=fresh_model(tokenizer), tok=tokenizer)
    s = res.summary
    assert s["n_cases"] == 4 and s["batches_done"] == 2
    assert {"efficacy", "generalization", "specificity"} <= s["post"].keys() <= s["final"].keys() | {"n_cases"}
    # the hparams file changes after the run: a plain restart is refused, continue_run uses the stored values
    hp.write_text(json.dumps({**HPARAMS, "v_lr": 0.1}))
    with pytest.raises(RunError, match=r"hparams.v_lr: 0.5 → 0.1"):
        run_evaluation(cfg, work / "zsre", model=fresh_model(tokenizer), tok=tokenizer)
    again = run_evaluation(cfg, work / "zsre", model=fresh_model(tokenizer), tok=tokenizer, continue_run=True)
    assert again.summary["post"] == s["post"]
    with pytest.raises(RunError, match="no run to continue"):
        run_evaluation(cfg, work / "nothing-here", model=fresh_model(tokenizer), tok=tokenizer, continue_run=True)


def test_generation_tests_every_kth_case(files, tokenizer, work):
    data = work / "cf-original.json"
    data.write_text(json.dumps([
        {"case_id": i, "requested_rewrite": {"prompt": "{} plays the", "subject": SUBJECTS[i],
                                             "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}},
         "paraphrase_prompts": [f"{SUBJECTS[i]} is known for the"], "neighborhood_prompts": ["Lennon plays the"],
         "generation_prompts": [f"{SUBJECTS[i]} is"]} for i in range(3)]))
    res = run_evaluation(config(files, data=str(data), edits_per_batch=3, sequential=False, generation_test_interval=2),
                         work / "gen", model=fresh_model(tokenizer), tok=tokenizer)
    recs = lines(res.run_dir / "cases.jsonl")
    assert ["ngram_entropy" in r["post"] for r in recs] == [True, False, True]
    assert ["ngram_entropy" in r["pre"] for r in recs] == [True, False, True]


def test_malformed_dataset_is_a_clear_error_and_writes_nothing(files, tokenizer, work):
    bad = work / "bad.json"
    records = [cf_record(i) for i in range(3)]
    del records[1]["target_new"]
    bad.write_text(json.dumps(records))
    out = work / "bad-run"
    with pytest.raises(DatasetError, match=r"record 1 \(case_id 101\), field 'target_new': missing"):
        run_evaluation(config(files, data=str(bad)), out, model=fresh_model(tokenizer), tok=tokenizer)
    assert not out.exists()
    bad.write_text("[{")
    with pytest.raises(DatasetError, match="invalid JSON"):
        run_evaluation(config(files, data=str(bad)), out, model=fresh_model(tokenizer), tok=tokenizer)
    assert not out.exists()


# ----------------------------------------------------------------------------- downstream


def test_downstream_checks_before_and_every_k_batches(files, tokenizer, work):
    try:
        downstream_data_dir()
    except DownstreamDataError:
        pytest.skip("no downstream data folder")
    cfg = config(files, do_downstream_eval=True, downstream_eval_steps=2, downstream_tasks="sst2",
                 number_of_tests=2, plots=True)
    out = work / "downstream"
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(cfg, out, model=fresh_model(tokenizer), tok=tokenizer, on_event=Interrupt("batch_written", 1))
    assert [c["batches_done"] for c in lines(out / "downstream.jsonl")] == [0, 2]
    res = run_evaluation(cfg, out, model=fresh_model(tokenizer), tok=tokenizer)
    checks = lines(out / "downstream.jsonl")
    assert [(c["batches_done"], c["edits_so_far"]) for c in checks] == [(0, 0), (2, 6), (3, 7)]
    assert res.summary["downstream"]["checks"] == 3
    assert (out / "plots" / "metrics.png").is_file() and (out / "plots" / "downstream.png").is_file()


# ----------------------------------------------------------------------------- plot / summarize


def test_plot_and_summarize_commands_compare_two_runs(batched_run, sequential_run, work, capsys):
    a, b = str(batched_run[0].run_dir), str(sequential_run[0].run_dir)
    png = work / "compare.png"
    assert main(["plot", a, b, "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.with_suffix(".csv").is_file()
    assert main(["plot", b]) == 0
    assert (Path(b) / "plots" / "metrics.png").is_file() and (Path(b) / "plots" / "metrics.csv").is_file()
    capsys.readouterr()
    assert main(["summarize", a, b]) == 0
    table = [re.split(r" {2,}", line.strip()) for line in capsys.readouterr().out.splitlines()]
    header, rows = table[0], {row[0]: dict(zip(table[0], row)) for row in table[2:4]}
    assert header[:8] == ["run", "method", "mode", "n", "ES", "PS", "NS", "Score"]
    # the columns themselves, not the folder names (which are "batched" and "sequential")
    assert rows["batched"]["mode"] == "batch×3" and rows["sequential"]["mode"] == "seq×3"
    assert rows["batched"]["n"] == rows["sequential"]["n"] == f"{N_CASES}/{N_CASES}"
    assert all(r["method"] == "EMMET" and r["status"] == "done" for r in rows.values())
    s_seq = sequential_run[0].summary
    assert rows["sequential"]["ES"] == f"{s_seq['pre']['es']:.1f}→{s_seq['post']['es']:.1f} ({s_seq['final']['es']:.1f})"
    assert main(["summarize", a, b, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in rows] == ["batched", "sequential"] and rows[1]["final"]["n_cases"] == N_CASES


def test_seed_sliding_adds_the_seeds_generation_check_per_prompt(files, tokenizer, work):
    """``seed_sliding``: every per-case record also holds the seed's ``*_prompts_correct`` (one bool per
    prompt of that kind); off (the default), the keys are absent."""
    cfg = config(files, sequential=False, dataset_size_limit=3, seed_sliding=True, skip_generation_tests=True)
    res = run_evaluation(cfg, work / "sliding", model=fresh_model(tokenizer), tok=tokenizer)
    recs = lines(res.run_dir / "cases.jsonl")
    assert len(recs) == 3
    for r in recs:
        for part in ("pre", "post"):
            assert len(r[part]["rewrite_prompts_correct"]) == 1
            assert len(r[part]["paraphrase_prompts_correct"]) == 1 and len(r[part]["neighborhood_prompts_correct"]) == 1
            assert all(isinstance(x, bool) for x in r[part]["rewrite_prompts_correct"])
    plain = lines(run_evaluation(config(files, sequential=False, dataset_size_limit=3, skip_generation_tests=True),
                                 work / "no-sliding", model=fresh_model(tokenizer), tok=tokenizer).run_dir / "cases.jsonl")
    assert all("rewrite_prompts_correct" not in r["post"] for r in plain)
