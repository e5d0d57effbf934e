"""Reliability: failed calls change nothing, killed writers leave nothing that blocks or misleads a
later run, concurrent statistics are computed once, and unavailable resources fail fast and clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmemit.editing import apply_deltas, edit
from fastmemit.errors import ConfigurationError, DeltaMismatchError, UnknownModelError
from fastmemit.methods import EditHparams
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.models.loading import load_model, resolve_device
from fastmemit.stats import compute_layer_stats
from fastmemit.stats.cache import entry_path, load_entry, stats_dir
from fastmemit.utils import atomic_path, sweep_orphan_temps
from tests.helpers import REPO, gpt2_tokenizer, tiny_llm

REQ = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}
HP = EditHparams(layers=[0], v_num_grad_steps=2, context_template_length_params=[], mom2_adjustment=False)


@pytest.fixture(scope="module")
def saved_deltas(tmp_path_factory) -> tuple[Path, str]:
    """A deltas file made on a tiny llama, and that model's fingerprint before the edit."""
    tok = gpt2_tokenizer()
    model = tiny_llm("llama", len(tok))
    fp = model_fingerprint(model)
    result = edit(model, tok, [REQ], method="EMMET", hparams=HP, show_progress=False)
    path = tmp_path_factory.mktemp("deltas") / "d.safetensors"
    result.save(path)
    return path, fp


def _rewrite(src: Path, dst: Path, *, meta: dict[str, str] | None = None, nan: bool = False) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        old = dict(f.metadata())
    tensors = load_file(str(src))
    if nan:
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float("nan")
    save_file(tensors, str(dst), metadata={**old, **(meta or {})})
    return dst


@pytest.mark.parametrize(("change", "message"), [
    ({"meta": {"hparams": "{not json"}}, "not valid JSON"),
    ({"meta": {"requests": "{\"a\": 1}"}}, "'requests' a list"),
    ({"meta": {"requests": json.dumps([{"prompt": "{} is", "subject": "X"}])}}, "malformed request"),
    ({"meta": {"hparams": "[1, 2]"}}, "'hparams' must be an object"),
    ({"nan": True}, "not a finite floating-point tensor"),
])
def test_apply_deltas_checks_the_whole_file_before_writing_a_weight(saved_deltas, tmp_path, change, message):
    src, fp = saved_deltas
    bad = _rewrite(src, tmp_path / "bad.safetensors", **change)
    tok = gpt2_tokenizer()
    model = tiny_llm("llama", len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeltaMismatchError, match=message):
        apply_deltas(model, bad)
    assert model_fingerprint(model) == fp
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_deltas_of_a_good_file_still_works_and_restores(saved_deltas):
    src, fp = saved_deltas
    tok = gpt2_tokenizer()
    model = tiny_llm("llama", len(tok))
    result = apply_deltas(model, src)
    assert model_fingerprint(model) != fp and result.requests[0].target_new == "English"
    result.restore()
    assert model_fingerprint(model) == fp


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    target = tmp_path / "entry.safetensors"
    dead = tmp_path / f".entry.safetensors.{_dead_pid()}.abc123.tmp"
    live = tmp_path / f".entry.safetensors.{os.getpid()}.def456.tmp"
    dead_dir = tmp_path / f".entry.safetensors.{_dead_pid()}.ghi789.tmp"
    other = tmp_path / f".other.safetensors.{_dead_pid()}.jkl000.tmp"  # another target's: not ours to judge
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"partial")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert not dead.exists() and not dead_dir.exists()
    assert live.exists() and other.exists()
    assert sweep_orphan_temps(tmp_path / "other.safetensors") == [other]


@pytest.mark.slow
def test_a_write_killed_before_its_rename_leaves_a_temporary_the_next_write_removes(tmp_path):
    target = tmp_path / "x.json"
    script = textwrap.dedent(f"""
        import os, signal
        from fastmemit.utils import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == -9
    orphans = list(tmp_path.glob(".x.json.*.tmp"))
    assert len(orphans) == 1 and not target.exists()
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and not list(tmp_path.glob(".x.json.*.tmp"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama saved as a model folder, and a text corpus for its statistics."""
    root = tmp_path_factory.mktemp("tiny_folder")
    tok = gpt2_tokenizer()
    model = tiny_llm("llama", len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text(("the city of paris lies on the river and the river runs to the sea . " * 30 + "\n") * 60)
    return root / "model", corpus


@pytest.mark.slow
def test_two_processes_computing_the_same_statistics_compute_them_once(tiny_folder, tmp_path):
    model_dir, corpus = tiny_folder
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import json, os, time
        from fastmemit.models import load_model
        from fastmemit.stats import compute_layer_stats
        model, tok = load_model({str(model_dir)!r})
        open({str(tmp_path)!r} + f"/ready.{{os.getpid()}}", "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        st = compute_layer_stats(model, tok, [0, 1], {str(corpus)!r}, n_keys=1500, cache_dir={str(tmp_path / "cache")!r},
                                 show_progress=False)
        print(json.dumps([s.cache_hit for s in st.values()]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both models are loaded: start the two computations together
    hits = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(hits) == [[False, False], [True, True]]  # one process computed both layers, the other read them


def test_a_cache_entry_holding_nan_is_not_a_hit_and_is_rewritten(tiny_folder, tmp_path):
    model_dir, corpus = tiny_folder
    model, tok = load_model(str(model_dir))
    first = compute_layer_stats(model, tok, [0], str(corpus), n_keys=300, cache_dir=tmp_path, show_progress=False)[0]
    path = entry_path(stats_dir(tmp_path), first.key)
    tensors = load_file(str(path))
    tensors["sum_kk"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"key": json.dumps(first.key, sort_keys=True), "count": json.dumps(first.count)})
    again = compute_layer_stats(model, tok, [0], str(corpus), n_keys=300, cache_dir=tmp_path, show_progress=False)[0]
    assert not again.cache_hit and torch.equal(again.sum_kk, first.sum_kk)
    assert load_entry(path, first.key) is not None  # the rewritten entry is whole again


def test_an_unknown_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fastmemit.models import loading

    loading.hub_reachable.cache_clear()
    t0 = time.perf_counter()
    with pytest.raises(UnknownModelError, match="not reachable"):
        load_model("no-such-org/no-such-model-fastmemit")
    assert time.perf_counter() - t0 < 10
    loading.hub_reachable.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without a CUDA GPU")
def test_a_missing_gpu_is_a_clear_error_before_loading():
    with pytest.raises(ConfigurationError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigurationError, match="unknown device"):
        resolve_device("warp9")
    assert resolve_device("cpu").type == "cpu"
