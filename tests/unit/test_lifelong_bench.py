"""bench/lifelong.py end to end on a tiny random Llama saved to a folder: two configurations of two
batches each (``--max-edits 20``, batch 10), with retention and a downstream check, the results table,
JSON and plot; a second invocation continues nothing and reports the same rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fastmemit.downstream import DownstreamDataError
from fastmemit.downstream import default_data_dir as downstream_data_dir
from tests.helpers import REPO, RUN_HPARAMS, tiny_llm, write_tiny_corpus

HPARAMS = RUN_HPARAMS
SUBJECTS = ["Toko Yasuda", "Danielle Darrieux", "Edwin of Northumbria", "Apple A5", "Honda Civic", "Michel Denisot"]
OBJECTS = ["piano", "guitar", "French", "English", "Paris", "London", "Toyota", "Apple", "violin", "Berlin"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_lifelong", REPO / "bench" / "lifelong.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("lifelong-bench")
    model = tiny_llm("llama", len(tokenizer))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    write_tiny_corpus(work / "corpus.jsonl", tokenizer)
    records = [{"case_id": 500 + i, "prompt": f"{SUBJECTS[i % 6]} plays the", "target_new": OBJECTS[i % 10],
                "subject": SUBJECTS[i % 6], "ground_truth": OBJECTS[(i + 3) % 10],
                "rephrase_prompt": f"In the city, {SUBJECTS[i % 6]} is known for the",
                "locality_prompt": "John Lennon performs on the", "locality_ground_truth": OBJECTS[(i + 3) % 10]}
               for i in range(30)]
    (work / "cf.json").write_text(json.dumps(records))
    (work / "hparams.json").write_text(json.dumps(HPARAMS))
    return {"work": work}


def test_two_configurations_of_two_batches_run_resume_and_report(bench, setup, monkeypatch, capsys):
    work = setup["work"]
    monkeypatch.setenv("FASTMEMIT_CACHE", str(work / "user-cache"))
    try:
        downstream_data_dir()
        tasks = ["--tasks", "sst2", "--n-tests", "2", "--shots", "1"]
    except DownstreamDataError:
        tasks = ["--tasks", ""]
    argv = ["--out", str(work / "runs"), "--results", str(work / "results" / "lifelong"), "--model",
            str(work / "model"), "--hparams", str(work / "hparams.json"), "--corpus", str(work / "corpus.jsonl"),
            "--stats-cache-dir", str(work / "stats"), "--data", str(work / "cf.json"), "--start", "5",
            "--only", "EMMET-1000-b10,MEMIT-1000-b10", "--max-edits", "20", "--check-every", "10", "--no-run-plots",
            "--set", "kl_factor=0.07", *tasks]
    assert bench.main(argv) == 0
    rows = json.loads((work / "results" / "lifelong.json").read_text())
    assert [(r["config"], r["status"], r["edits_done"]) for r in rows] == [
        ("EMMET-1000-b10", "done", 20), ("MEMIT-1000-b10", "done", 20)]
    for r in rows:
        d = Path(r["run_dir"])
        assert d.name == f"{r['config']}-max20"
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["case_ids"] == list(range(505, 525))  # records 5..24 of the data file
        assert cfg["run"]["edits_per_batch"] == 10 and cfg["run"]["retention_eval_steps"] == 1
        assert cfg["command"][:2] == ["fastmemit", "evaluate"]
        assert cfg["run"]["hparams_overrides"] == {"kl_factor": 0.07} and "kl_factor=0.07" in cfg["command"]
        assert json.loads((d / "hparams.json").read_text())["kl_factor"] == 0.07
        assert [c["batches_done"] for c in map(json.loads, (d / "retention.jsonl").read_text().splitlines())] == [1]
        assert len((d / "diagnostics.jsonl").read_text().splitlines()) == 2
        assert r["all_so_far"]["source"] == "final" and r["max_rel_distance"] > 0
    assert (work / "results" / "lifelong.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (work / "results" / "lifelong.md").read_text()
    assert "| EMMET-1000-b10 | done | 20/20 |" in table
    capsys.readouterr()
    # again: both finished, nothing is run, the same rows
    assert bench.main([*argv, "--no-plot"]) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert json.loads((work / "results" / "lifelong.json").read_text()) == rows


def test_configurations_and_selection(bench):
    names = [c.name for c in bench.all_configs()]
    assert names[:4] == ["ENCORE-1000-b10", "EMMET-1000-b10", "AlphaEdit-1000-b10", "MEMIT-1000-b10"]
    assert len(names) == 21 and "EMMET-full-1000-b10" in names
    sweep = {c.name: c.overrides for c in bench.select(bench.all_configs(), "ENCORE-ln*,ENCORE-orig*")}
    assert sweep == {"ENCORE-ln1-1000-b10": {"norm_constraint": 1}, "ENCORE-ln100-1000-b10": {"norm_constraint": 100},
                     "ENCORE-ln1000-1000-b10": {"norm_constraint": 1000},
                     "ENCORE-orig-1000-b10": {"norm_anchor": "original"}}
    assert [c.name for c in bench.select(bench.all_configs(), "*-3000-b100")] == [
        f"{m}-3000-b100" for m in ("ENCORE", "EMMET", "AlphaEdit", "MEMIT")]
    with pytest.raises(SystemExit):
        bench.select(bench.all_configs(), "ROME-*")
