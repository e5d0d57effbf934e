"""Statistics on torch.distributed: two gloo processes (torchrun) give the one-process result.

N processes must equal one process to 1e-10 relative with the same count: every rank reads the same
batches, runs its share (batch i on rank i mod N) of exactly the keys one process would take, and the
float64 sums are all-reduced. Two torchrun launches (about 20-60 s each on a busy 2-core machine):
- ``tests/scale_dist_worker.py``: the library called on every rank (several counts, a cache written by
  rank 0 and its hits sent to every rank), an edit on rank 0 while rank 1 serves its statistics
  pass, and ``fastmemit edit`` through the CLI's main;
- ``torchrun -m fastmemit stats`` on a tiny model saved to a folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmemit
from fastmemit.editing import edit
from fastmemit.models import load_model
from fastmemit.stats import compute_layer_stats
from tests.helpers import REPO, TESTS, tiny_llm, write_tiny_corpus
from tests.scale_dist_worker import CACHED, EDIT_HP, REQS, SCENARIOS

SRC = Path(fastmemit.__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """The same thread count as the workers: the same float32 keys."""


def _env(work: Path) -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "FASTMEMIT_PROGRESS": "0",
            "FASTMEMIT_CACHE": str(work / "user-cache")}


def torchrun(work: Path, args: list[str], nproc: int = 2) -> str:
    """Run ``args`` under torchrun; its stdout (stderr goes to a log file, shown on failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    log = work / f"torchrun-{len(list(work.glob('torchrun-*.log')))}.log"
    with log.open("w") as err:
        try:
            proc = subprocess.run(cmd, env=_env(work), cwd=work, stdout=subprocess.PIPE, stderr=err, text=True,
                                  timeout=1200)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun timed out:\n{log.read_text()[-6000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{log.read_text()[-6000:]}"
    return proc.stdout


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.dtype == b.dtype == torch.float64
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenizer) -> Path:
    """A corpus (words and decoded random token ids: full-rank statistics), the tiny llama saved to a folder."""
    work = tmp_path_factory.mktemp("dist")
    write_tiny_corpus(work / "corpus.jsonl", tokenizer)
    tiny_llm("llama", len(tokenizer)).save_pretrained(work / "tiny-llama")
    tokenizer.save_pretrained(work / "tiny-llama")
    (work / "hp.json").write_text(json.dumps(EDIT_HP))
    return work


@pytest.fixture(scope="module")
def launched(work) -> Path:
    """The worker's outputs, after one 2-process launch."""
    out = work / "out"
    out.mkdir()
    cli_edit = ["edit", "--model", str(work / "tiny-llama"), "--request", json.dumps(REQS[0]), "--hparams",
                str(work / "hp.json"), "--corpus", str(work / "corpus.jsonl"), "--cache-dir", str(work / "cache3"),
                "--save-deltas", str(out / "cli.safetensors"), "--max-new-tokens", "2", "--json"]
    settings = {"out": str(out), "corpus": str(work / "corpus.jsonl"), "cache": str(work / "cache"),
                "cache2": str(work / "cache2"), "cli_edit": cli_edit}
    (work / "settings.json").write_text(json.dumps(settings))
    torchrun(work, [str(TESTS / "scale_dist_worker.py"), str(work / "settings.json")])
    return out


def one_process(tokenizer, work: Path, calls: list[int] | None = None, **kw) -> dict:
    model = tiny_llm("llama", len(tokenizer))
    hook = model.register_forward_pre_hook(lambda _m, _a: calls.append(1)) if calls is not None else None
    try:
        return compute_layer_stats(model, tokenizer, corpus=str(work / "corpus.jsonl"), show_progress=False, **kw)
    finally:
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_gloo_processes_give_the_one_process_statistics(scenario, launched, work, tokenizer):
    ranks = [torch.load(launched / f"rank{r}.pt") for r in (0, 1)]
    calls: list[int] = []
    ref = one_process(tokenizer, work, calls, cache=False, distributed=False, **SCENARIOS[scenario])
    # the batches were shared: batch i on rank i mod 2
    n = len(calls)
    assert [got["forwards"][scenario] for got in ranks] == [(n + 1) // 2, n // 2]
    for layer, st in ref.items():
        for got in ranks:
            s, count, hit = got[scenario][layer]
            assert count == st.count and not hit
            assert rel_err(s, st.sum_kk) <= 1e-10, f"{scenario} layer {layer}: {rel_err(s, st.sum_kk):.2e}"
        assert torch.equal(ranks[0][scenario][layer][0], ranks[1][scenario][layer][0]), "ranks disagree"


def test_a_rank_that_cannot_join_makes_every_rank_raise(launched):
    """A corpus missing on rank 1 only, or another seed on rank 1: an error on every rank, no rank left waiting."""
    errors = [torch.load(launched / f"rank{r}.pt")["errors"] for r in (0, 1)]
    assert errors[0] == {"corpus_missing_on_rank1": "StatisticsError", "seed_differs": "StatisticsError"}
    assert errors[1] == {"corpus_missing_on_rank1": "CorpusError", "seed_differs": "StatisticsError"}


def test_rank0_writes_the_cache_and_every_rank_gets_its_hits(launched, work, tokenizer):
    ranks = [torch.load(launched / f"rank{r}.pt") for r in (0, 1)]
    for got in ranks:
        for layer in CACHED["layers"]:
            first, again = got["cached_first"][layer], got["cached_again"][layer]
            assert not first[2] and again[2], "the second call is no cache hit"
            assert torch.equal(first[0], again[0]) and first[1] == again[1] == CACHED["n_keys"]
    entries = sorted(p.name for p in (work / "cache").rglob("*.safetensors"))
    assert len(entries) == 2, entries  # one per layer, written once
    # the entries rank 0 wrote serve a one-process call, and hold the one-process sums
    hit = one_process(tokenizer, work, cache=True, cache_dir=work / "cache", **CACHED)
    ref = one_process(tokenizer, work, cache=False, **CACHED)
    for layer in CACHED["layers"]:
        assert hit[layer].cache_hit and rel_err(hit[layer].sum_kk, ref[layer].sum_kk) <= 1e-10


def test_rank0_edits_while_rank1_serves_its_statistics_pass(launched, work, tokenizer, monkeypatch):
    served = [json.loads((launched / f"served{r}.json").read_text()) for r in (0, 1)]
    assert served[0] == {"rc": 0, "passes": []} and served[1] == {"rc": 0, "passes": [EDIT_HP["layers"]]}
    monkeypatch.setenv("FASTMEMIT_CACHE", str(work / "user-cache-1p"))
    model = tiny_llm("llama", len(tokenizer))
    ref = edit(model, tokenizer, REQS, "EMMET", EDIT_HP, corpus=str(work / "corpus.jsonl"), use_cache=False,
               show_progress=False)
    got = torch.load(launched / "served_deltas.pt")
    assert got.keys() == ref.deltas.keys()
    for name in got:
        torch.testing.assert_close(got[name], ref.deltas[name], rtol=1e-4, atol=1e-7)


def test_fastmemit_edit_cli_under_torchrun_runs_on_rank0_only(launched):
    assert [json.loads((launched / f"cli_rc{r}.json").read_text()) for r in (0, 1)] == [0, 0]
    report = json.loads((launched / "cli0.txt").read_text())
    assert report["method"] == "EMMET" and report["deltas"] == str(launched / "cli.safetensors")
    assert (launched / "cli.safetensors").is_file()
    assert (launched / "cli1.txt").read_text() == ""


def test_torchrun_fastmemit_stats_cli_equals_one_process(work, tokenizer):
    folder, cache = work / "tiny-llama", work / "cache-cli"
    args = ["--model", str(folder), "--layers", "0,2", "--n-tokens", "509", "--corpus", str(work / "corpus.jsonl"),
            "--cache-dir", str(cache), "--batch-size", "4", "--seq-len", "64", "--json"]
    stdout = torchrun(work, ["-m", "fastmemit", "stats", *args])
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [(r["layer"], r["count"], r["cache_hit"]) for r in rows] == [(0, 509, False), (2, 509, False)]
    model, tok = load_model(str(folder))
    kw = dict(n_keys=509, batch_size=4, seq_len=64, show_progress=False)
    hit = compute_layer_stats(model, tok, [0, 2], str(work / "corpus.jsonl"), cache=True, cache_dir=cache, **kw)
    ref = compute_layer_stats(model, tok, [0, 2], str(work / "corpus.jsonl"), cache=False, **kw)
    for layer in (0, 2):
        assert hit[layer].cache_hit and hit[layer].count == 509
        assert rel_err(hit[layer].sum_kk, ref[layer].sum_kk) <= 1e-10
