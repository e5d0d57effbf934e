"""The covariance engine against an independent computation, its cache, its errors, and the corpora."""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastmemit.errors import CorpusError
from fastmemit.models import get_arch, get_module
from fastmemit.stats import (
    FileCorpus,
    FolderCorpus,
    GensimWikiCorpus,
    compute_layer_stats,
    corpus_from_spec,
    engine,
    resolve_count,
)
from fastmemit.stats.cache import entry_path, load_entry
from fastmemit.stats.corpus import shuffled
from tests.helpers import INNER, REPO, tiny_llm

WORDS = ("the a of to in is was for on that with as by at from his her it an are were which this be or has "
         "had first one their its new after who they have two also been other but more city river music year "
         "born war state team album film school university history game Paris Anarchism 1984 ( ) , .").split()
SEQ_LEN = 64
BATCH = 4


def make_docs(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[str]:
    """``n`` documents of lo..hi words: with GPT-2's BPE each is shorter than SEQ_LEN tokens."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"title": f"doc {i}", "text": d}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", make_docs(60))


# ----------------------------------------------------------------------------- the reference


def reference_sum_kk(model, tok, rows: list[list[int]], layers: list[int], count: int, batch_size: int) -> dict[int, torch.Tensor]:
    """Σ k kᵀ over the first ``count`` non-pad keys, written without the engine.

    ``rows`` are the token-id rows in the order the engine should see them; they are right padded
    in groups of ``batch_size`` (the same batches, so the float32 keys are bitwise the same), the
    model runs in full, a plain pre-hook collects the keys, and one float64 product sums them.
    """
    arch = get_arch(model)
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    for layer in layers:
        module = get_module(model, arch.site("mlp_down", layer))
        handles.append(module.register_forward_pre_hook(lambda _m, args, layer=layer: collected[layer].append(args[0])))
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                group = rows[start : start + batch_size]
                T = max(len(r) for r in group)
                ids = torch.full((len(group), T), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(group), T), dtype=torch.long)
                for i, r in enumerate(group):
                    ids[i, : len(r)] = torch.tensor(r)
                    mask[i, : len(r)] = 1
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                for layer in layers:
                    collected[layer][-1] = collected[layer][-1][mask.bool()]  # (n_real, d_k), row-major order
                if sum(len(k) for k in collected[layers[0]]) >= count:
                    break
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer in layers:
        K = torch.cat(collected[layer]).to(torch.float64)  # (N, d_k)
        assert K.shape[0] >= count, "the test corpus is too short for the reference"
        K = K[:count]
        out[layer] = K.T @ K  # (d_k, d_k)
    return out


def doc_rows(tok, docs: list[str]) -> list[list[int]]:
    rows = [tok(d)["input_ids"] for d in docs if d.strip()]
    assert all(len(r) <= SEQ_LEN for r in rows), "reference assumes documents shorter than SEQ_LEN"
    return rows


def chunked_rows(tok, docs: list[str], seq_len: int) -> list[list[int]]:
    """Long documents cut into seq_len pieces; a 1-token tail piece is dropped (the engine's rule)."""
    rows = []
    for d in docs:
        ids = tok(d)["input_ids"]
        pieces = [ids[s : s + seq_len] for s in range(0, len(ids), seq_len)]
        rows += [p for i, p in enumerate(pieces) if len(p) > 1 or i == 0]
    return rows


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> None:
    assert a.dtype == b.dtype == torch.float64
    err = (a - b).norm() / b.norm()
    assert err <= rel, f"relative error {err:.3e} > {rel:g}"


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_matches_independent_computation(tiny_model, tokenizer, corpus_file, arch):
    model = tiny_model(arch)
    docs = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    count = math.ceil(1.5 * INNER)  # 192
    rows = doc_rows(tokenizer, docs)
    per_batch = [sum(len(r) for r in rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)]
    assert count not in itertools.accumulate(per_batch)  # the stream is cut inside a batch
    stats = compute_layer_stats(model, tokenizer, [0, 2], corpus_file, dynamic_multiplier=1.5, batch_size=BATCH,
                                seq_len=SEQ_LEN, seed=None, cache=False)
    ref = reference_sum_kk(model, tokenizer, rows, [0, 2], count, BATCH)
    for layer in (0, 2):
        st = stats[layer]
        assert st.count == count and st.layer == layer
        assert st.site == get_arch(model).site("mlp_down", layer)
        assert st.sum_kk.shape == (INNER, INNER) and st.sum_kk.dtype == torch.float64
        assert_rel_close(st.sum_kk, ref[layer])
        assert torch.equal(st.sum_kk, st.sum_kk.T)  # exactly symmetric
        torch.testing.assert_close(st.mom2, ref[layer] / count, rtol=1e-10, atol=0)
    assert not torch.allclose(stats[0].sum_kk, stats[2].sum_kk)


@pytest.mark.parametrize("edges", [[0, 64, 128], [0, 1, 50, 127, 128]])
def test_blocked_symmetric_accumulation_is_exact(monkeypatch, tiny_model, tokenizer, corpus_file, edges):
    """Σ k kᵀ summed on the upper block triangle only (as for large d_k) is still exact and symmetric."""
    monkeypatch.setattr(engine, "_block_edges", lambda d_k: edges)
    model = tiny_model("llama")
    docs = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    st = compute_layer_stats(model, tokenizer, [1], corpus_file, n_keys=250, batch_size=BATCH, seq_len=SEQ_LEN,
                             seed=None, cache=False)[1]
    ref = reference_sum_kk(model, tokenizer, doc_rows(tokenizer, docs), [1], 250, BATCH)
    assert_rel_close(st.sum_kk, ref[1])
    assert torch.equal(st.sum_kk, st.sum_kk.T)


def test_block_edges_cover_d_k():
    assert engine._block_edges(128) == [0, 128]
    assert engine._block_edges(1536) == [0, 384, 768, 1152, 1536]
    edges = engine._block_edges(16384)
    assert edges[0] == 0 and edges[-1] == 16384 and len(edges) == 9 and edges == sorted(edges)


def test_engine_matches_reference_for_long_documents_and_a_seed(tiny_model, tokenizer, tmp_path):
    """Documents longer than seq_len are cut in pieces; a seed shuffles documents (not pieces)."""
    model = tiny_model("gpt2")
    docs = make_docs(30, seed=1, lo=20, hi=90)
    path = write_jsonl(tmp_path / "long.jsonl", docs)
    seq_len, seed, n = 32, 5, 500
    stats = compute_layer_stats(model, tokenizer, [1], path, n_keys=n, batch_size=3, seq_len=seq_len, seed=seed, cache=False)
    order = list(shuffled(iter(docs), seed))
    assert sorted(order) == sorted(docs) and order != docs
    ref = reference_sum_kk(model, tokenizer, chunked_rows(tokenizer, order, seq_len), [1], n, 3)
    assert stats[1].count == n
    assert_rel_close(stats[1].sum_kk, ref[1])


def test_padding_is_dropped(tiny_model, tokenizer, corpus_file):
    """Batch size changes the padding, not the keys: results agree up to float32 rounding."""
    model = tiny_model("llama")
    kw = dict(n_keys=300, seq_len=SEQ_LEN, seed=None, cache=False)
    one = compute_layer_stats(model, tokenizer, [1], corpus_file, batch_size=1, **kw)[1].sum_kk
    many = compute_layer_stats(model, tokenizer, [1], corpus_file, batch_size=7, **kw)[1].sum_kk
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-8)


def test_multi_layer_single_pass_equals_per_layer_calls(tiny_model, tokenizer, corpus_file):
    model = tiny_model("llama")
    kw = dict(dynamic_multiplier=2, batch_size=BATCH, seq_len=SEQ_LEN, seed=3, cache=False)
    together = compute_layer_stats(model, tokenizer, [2, 0, 1], corpus_file, **kw)
    assert list(together) == [0, 1, 2]
    for layer in (0, 1, 2):
        alone = compute_layer_stats(model, tokenizer, [layer], corpus_file, **kw)[layer]
        assert alone.count == together[layer].count == 2 * INNER
        assert torch.equal(alone.sum_kk, together[layer].sum_kk)


def test_one_truncated_forward_stream_serves_all_layers(tiny_model, tokenizer, corpus_file):
    """The model is run once per batch for all layers, and never past the deepest requested key."""
    model = tiny_model("llama")
    arch = get_arch(model)
    calls = {"embed": 0, "late": 0}
    hooks = [
        get_module(model, arch.site("embed")).register_forward_hook(lambda *_: calls.__setitem__("embed", calls["embed"] + 1)),
        get_module(model, arch.site("mlp_down", 1)).register_forward_hook(lambda *_: calls.__setitem__("late", calls["late"] + 1)),
        get_module(model, arch.site("final_norm")).register_forward_hook(lambda *_: calls.__setitem__("late", calls["late"] + 1)),
    ]
    kw = dict(n_keys=400, batch_size=BATCH, seq_len=SEQ_LEN, seed=None, cache=False)
    try:
        compute_layer_stats(model, tokenizer, [0, 1], corpus_file, **kw)
        passes_two_layers = calls["embed"]
        calls["embed"] = 0
        compute_layer_stats(model, tokenizer, [1], corpus_file, **kw)
        passes_one_layer = calls["embed"]
    finally:
        for h in hooks:
            h.remove()
    assert passes_two_layers == passes_one_layer > 1
    assert calls["late"] == 0  # the deepest edited matrix and everything after it never ran


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(dynamic_multiplier=1), INNER),
    (dict(dynamic_multiplier=1.5), 192),
    (dict(dynamic_multiplier=1.01), math.ceil(1.01 * INNER)),
    (dict(n_keys=77), 77),
])
def test_exactly_the_requested_count(tiny_model, tokenizer, corpus_file, kwargs, expected):
    model = tiny_model("llama")
    st = compute_layer_stats(model, tokenizer, [1], corpus_file, batch_size=BATCH, seq_len=SEQ_LEN, cache=False, **kwargs)[1]
    assert st.count == expected
    assert st.summary()["count"] == expected


def test_resolve_count():
    assert resolve_count(1536, dynamic_multiplier=10) == 15360
    assert resolve_count(100, dynamic_multiplier=1.5) == 150
    assert resolve_count(101, dynamic_multiplier=1.5) == 152  # ceil, never a silent int() of a float
    assert resolve_count(100, n_keys=7) == 7
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dynamic_multiplier must be a positive number"):
            resolve_count(100, dynamic_multiplier=bad)
    with pytest.raises(ValueError, match="n_keys must be positive"):
        resolve_count(100, n_keys=0)


def test_deterministic_for_a_seed(tiny_model, tokenizer, corpus_file):
    model = tiny_model("gpt2")
    kw = dict(n_keys=250, batch_size=BATCH, seq_len=SEQ_LEN, cache=False)
    a = compute_layer_stats(model, tokenizer, [1], corpus_file, seed=11, **kw)[1]
    b = compute_layer_stats(model, tokenizer, [1], corpus_file, seed=11, **kw)[1]
    c = compute_layer_stats(model, tokenizer, [1], corpus_file, seed=12, **kw)[1]
    assert torch.equal(a.sum_kk, b.sum_kk)
    assert not torch.allclose(a.sum_kk, c.sum_kk)  # another seed reads other documents first


def test_float32_accumulation_option(tiny_model, tokenizer, corpus_file):
    model = tiny_model("llama")
    kw = dict(n_keys=300, batch_size=BATCH, seq_len=SEQ_LEN, seed=None, cache=False)
    f64 = compute_layer_stats(model, tokenizer, [0], corpus_file, **kw)[0]
    f32 = compute_layer_stats(model, tokenizer, [0], corpus_file, accumulate_dtype="float32", **kw)[0]
    assert f32.sum_kk.dtype == torch.float64  # returned in float64 either way
    torch.testing.assert_close(f32.sum_kk, f64.sum_kk, rtol=1e-4, atol=1e-6)


def test_summary_reports_the_spectrum(tiny_model, tokenizer, corpus_file):
    model = tiny_model("llama")
    st = compute_layer_stats(model, tokenizer, [0], corpus_file, dynamic_multiplier=2, batch_size=BATCH,
                             seq_len=SEQ_LEN, cache=False)[0]
    s = st.summary()
    eig = torch.linalg.eigvalsh(st.sum_kk / st.count)
    assert s["d_k"] == INNER and s["count"] == 2 * INNER and s["cache_hit"] is False
    assert s["min_eig"] == pytest.approx(float(eig[0])) and s["max_eig"] == pytest.approx(float(eig[-1]))
    assert s["trace"] == pytest.approx(float(torch.trace(st.sum_kk)) / st.count)


def test_infinite_stream_stops_at_the_count(tiny_model, tokenizer):
    """A corpus object is consumed lazily: an endless stream ends once the count is reached."""

    class Endless:
        identity = "endless-test-stream"

        def __iter__(self):
            for i in itertools.count():
                yield f"document number {i} about the river and the city"

    st = compute_layer_stats(tiny_model("llama"), tokenizer, [0], Endless(), n_keys=333, batch_size=BATCH,
                             seq_len=SEQ_LEN, seed=None, cache=False)[0]
    assert st.count == 333


# ----------------------------------------------------------------------------- cache


def test_second_identical_call_is_a_cache_hit(tiny_model, tokenizer, corpus_file, tmp_path):
    model = tiny_model("llama")
    kw = dict(dynamic_multiplier=1.5, batch_size=BATCH, seq_len=SEQ_LEN, seed=0, cache_dir=tmp_path / "cache")
    first = compute_layer_stats(model, tokenizer, [0, 2], corpus_file, **kw)
    second = compute_layer_stats(model, tokenizer, [0, 2], corpus_file, **kw)
    for layer in (0, 2):
        assert first[layer].cache_hit is False and second[layer].cache_hit is True
        assert first[layer].path == second[layer].path and second[layer].path.is_file()
        assert str(second[layer].path).startswith(str(tmp_path / "cache"))
        assert torch.equal(first[layer].sum_kk, second[layer].sum_kk)
        assert second[layer].count == first[layer].count == 192
        assert second[layer].key == first[layer].key

    # a cached layer is loaded, only the missing one is computed, and it equals a fresh computation
    mixed = compute_layer_stats(model, tokenizer, [1, 2], corpus_file, **kw)
    assert mixed[2].cache_hit and not mixed[1].cache_hit
    fresh = compute_layer_stats(model, tokenizer, [1], corpus_file, **{**kw, "cache_dir": None}, cache=False)
    assert torch.equal(mixed[1].sum_kk, fresh[1].sum_kk)


def test_cache_key_separates_settings(tiny_model, tokenizer, corpus_file, tmp_path):
    model = tiny_model("llama")
    kw = dict(dynamic_multiplier=1, batch_size=BATCH, seq_len=SEQ_LEN, seed=0, cache_dir=tmp_path / "c")
    compute_layer_stats(model, tokenizer, [0], corpus_file, **kw)
    assert compute_layer_stats(model, tokenizer, [0], corpus_file, **kw)[0].cache_hit
    for change in (dict(dynamic_multiplier=2), dict(seed=1), dict(seq_len=SEQ_LEN + 1), dict(accumulate_dtype="float32")):
        assert not compute_layer_stats(model, tokenizer, [0], corpus_file, **{**kw, **change})[0].cache_hit, change
    # another corpus content
    other = write_jsonl(tmp_path / "other.jsonl", make_docs(60, seed=9))
    assert not compute_layer_stats(model, tokenizer, [0], other, **kw)[0].cache_hit
    # an edited model (different weights, same config) does not reuse the statistics
    edited = tiny_llm("llama", len(tokenizer))
    with torch.no_grad():
        edited.model.layers[2].mlp.down_proj.weight.add_(0.01)
    assert not compute_layer_stats(edited, tokenizer, [0], corpus_file, **kw)[0].cache_hit
    # cache=False neither reads nor writes
    st = compute_layer_stats(model, tokenizer, [1], corpus_file, **kw, cache=False)[1]
    assert not st.cache_hit and st.path is None
    assert not compute_layer_stats(model, tokenizer, [1], corpus_file, **kw)[1].cache_hit


def test_corrupt_cache_entry_is_recomputed(tiny_model, tokenizer, corpus_file, tmp_path):
    model = tiny_model("llama")
    kw = dict(n_keys=150, batch_size=BATCH, seq_len=SEQ_LEN, seed=0, cache_dir=tmp_path / "c")
    good = compute_layer_stats(model, tokenizer, [0], corpus_file, **kw)[0]
    data = good.path.read_bytes()
    good.path.write_bytes(data[: len(data) // 2])
    again = compute_layer_stats(model, tokenizer, [0], corpus_file, **kw)[0]
    assert not again.cache_hit and torch.equal(again.sum_kk, good.sum_kk)
    assert compute_layer_stats(model, tokenizer, [0], corpus_file, **kw)[0].cache_hit


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from tests.helpers import gpt2_tokenizer, tiny_llm
    import fastmemit.stats.cache as cache_mod
    from fastmemit.stats import compute_layer_stats
    from safetensors.torch import save

    mode = {mode!r}
    calls = []

    def slow_save(tensors, filename, metadata=None):
        # the first entry is written normally; the second is written halfway, then we hang
        data = save(tensors, metadata=metadata)
        calls.append(filename)
        with open(filename, "wb") as f:
            if len(calls) == 1:
                f.write(data)
                return
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            print("WRITING", filename, flush=True)
            time.sleep(120)
            f.write(data[len(data) // 2 :])

    if mode == "halfway":
        cache_mod.save_file = slow_save
    tok = gpt2_tokenizer()
    model = tiny_llm("llama", len(tok))
    print("READY", flush=True)
    for seed in range(1000):  # 'random' mode: keep writing entries until killed
        compute_layer_stats(model, tok, [0, 2], {corpus!r}, dynamic_multiplier=1.5, batch_size={batch},
                            seq_len={seq_len}, seed=None if mode == "halfway" else seed, cache_dir={cache!r})
        print("ENTRY", flush=True)
    """)


def _run_and_kill(script: str, wait_for: str, log: Path, extra_delay: float = 0.0) -> None:
    """Run ``script`` in a fresh interpreter, SIGKILL it once it prints ``wait_for`` (+ a delay)."""
    lines: queue.Queue[str] = queue.Queue()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True)
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    if proc.poll() is not None:
                        pytest.fail(f"subprocess ended (rc={proc.returncode}) before {wait_for!r}:\n{log.read_text()[-3000:]}")
                    if time.monotonic() > deadline:
                        pytest.fail(f"subprocess never printed {wait_for!r}:\n{log.read_text()[-3000:]}")
                    continue
                if line.startswith(wait_for):
                    break
            time.sleep(extra_delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(timeout=5)
            proc.stdout.close()


def _assert_every_file_loads_or_is_tmp(cache: Path) -> list[Path]:
    """Every cache file is a complete entry for its own key, or a dot-.tmp file no reader opens."""
    entries = []
    for f in sorted(p for p in cache.rglob("*") if p.is_file()):
        if f.suffix == ".tmp":
            assert f.name.startswith("."), f
            continue
        if f.suffix == ".lock":  # an entry's lock: empty, never read as an entry
            assert f.name.startswith(".") and f.stat().st_size == 0, f
            continue
        assert f.suffix == ".safetensors", f
        tensors = load_file(str(f))
        with safe_open(str(f), framework="pt") as sf:
            key = json.loads(sf.metadata()["key"])
        assert entry_path(cache, key) == f  # the reader would look exactly here, for exactly this key
        assert load_entry(f, key) is not None
        assert tensors["sum_kk"].shape == (INNER, INNER) and torch.isfinite(tensors["sum_kk"]).all()
        entries.append(f)
    return entries


@pytest.mark.slow
def test_killed_while_writing_leaves_no_readable_partial_entry(tiny_model, tokenizer, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    script = _KILL_SCRIPT.format(repo=str(REPO), mode="halfway", corpus=str(corpus_file), batch=BATCH,
                                 seq_len=SEQ_LEN, cache=str(cache))
    _run_and_kill(script, "WRITING", tmp_path / "child.log")
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.suffix == ".tmp" for p in files), "the kill should have caught a write in progress"
    assert len(_assert_every_file_loads_or_is_tmp(cache)) == 1  # layer 0 was complete, layer 2 was not

    model = tiny_model("llama")  # same seed and config as the subprocess's model: same fingerprint
    kw = dict(dynamic_multiplier=1.5, batch_size=BATCH, seq_len=SEQ_LEN, seed=None)
    after = compute_layer_stats(model, tokenizer, [0, 2], corpus_file, cache_dir=cache, **kw)
    assert after[0].cache_hit is True  # the entry finished before the kill is served
    assert after[2].cache_hit is False  # the half-written one is not
    expected = compute_layer_stats(model, tokenizer, [0, 2], corpus_file, cache=False, **kw)
    for layer in (0, 2):
        assert torch.equal(after[layer].sum_kk, expected[layer].sum_kk)
    assert len(_assert_every_file_loads_or_is_tmp(cache)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_at_a_random_moment_leaves_a_consistent_cache(corpus_file, tmp_path, seed):
    """Killed at a seeded moment after the first pair of entries is complete (so there is always
    something to check): every file is a whole entry for its key or an unread temporary."""
    cache = tmp_path / "cache"
    script = _KILL_SCRIPT.format(repo=str(REPO), mode="random", corpus=str(corpus_file), batch=BATCH,
                                 seq_len=SEQ_LEN, cache=str(cache))
    _run_and_kill(script, "ENTRY", tmp_path / "child.log", extra_delay=random.Random(seed).uniform(0.0, 1.0))
    assert len(_assert_every_file_loads_or_is_tmp(cache)) >= 2  # the pair written before the kill was armed


# ----------------------------------------------------------------------------- bad inputs


def test_missing_corpus_path(tiny_model, tokenizer, tmp_path):
    with pytest.raises(CorpusError, match=r"corpus '.*nope\.jsonl' not found"):
        compute_layer_stats(tiny_model("llama"), tokenizer, [0], tmp_path / "nope.jsonl", n_keys=10, cache=False)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.txt", "\n  \n\n"), ("empty.json", "[]"),
                                          ("spaces.jsonl", '{"text": "   "}\n')])
def test_empty_corpus(tiny_model, tokenizer, tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CorpusError, match="yielded no tokens"):
        compute_layer_stats(tiny_model("llama"), tokenizer, [0], path, n_keys=10, cache=False)


def test_empty_folder_corpus(tiny_model, tokenizer, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "data.csv").write_text("not a text document\n")
    with pytest.raises(CorpusError, match="yielded no tokens"):
        compute_layer_stats(tiny_model("llama"), tokenizer, [0], tmp_path / "docs", n_keys=10, cache=False)


def test_malformed_jsonl_line_is_named(tiny_model, tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a fine first document"}\n\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl', line 3: invalid JSON"):
        compute_layer_stats(tiny_model("llama"), tokenizer, [0], path, n_keys=10, batch_size=1, cache=False)
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"line 2: expected a string or an object with a string 'text' field"):
        list(FileCorpus(path))


def test_layer_out_of_range(tiny_model, tokenizer, corpus_file):
    with pytest.raises(ValueError, match=r"layer\(s\) \[3, 7\] out of range: this model has 3 layers"):
        compute_layer_stats(tiny_model("llama"), tokenizer, [1, 3, 7], corpus_file, n_keys=10, cache=False)


def test_corpus_shorter_than_count_says_how_many_keys(tiny_model, tokenizer, tmp_path):
    docs = make_docs(3)
    path = write_jsonl(tmp_path / "short.jsonl", docs)
    available = sum(len(tokenizer(d)["input_ids"]) for d in docs)
    with pytest.raises(CorpusError, match=rf"has only {available} keys \(tokens\) but {10 * INNER} were requested"):
        compute_layer_stats(tiny_model("llama"), tokenizer, [0], path, dynamic_multiplier=10, seq_len=SEQ_LEN,
                            cache=False)


def test_count_given_both_ways_or_not_at_all(tiny_model, tokenizer, corpus_file):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="exactly one of n_keys and dynamic_multiplier"):
        compute_layer_stats(model, tokenizer, [0], corpus_file, n_keys=10, dynamic_multiplier=1, cache=False)
    with pytest.raises(ValueError, match="exactly one of n_keys and dynamic_multiplier"):
        compute_layer_stats(model, tokenizer, [0], corpus_file, cache=False)


def test_other_bad_settings(tiny_model, tokenizer, corpus_file):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="accumulate_dtype must be one of"):
        compute_layer_stats(model, tokenizer, [0], corpus_file, n_keys=10, accumulate_dtype="float16")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        compute_layer_stats(model, tokenizer, [0], corpus_file, n_keys=10, batch_size=0)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        compute_layer_stats(model, tokenizer, [0], corpus_file, n_keys=10, seq_len=1, cache=False)


# ----------------------------------------------------------------------------- corpora


def test_file_corpus_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "first", "title": "x"}\n\n"second as a bare string"\n{"text": "third"}\n')
    corpus = FileCorpus(path)
    assert list(corpus) == ["first", "second as a bare string", "third"]
    assert corpus.identity.startswith("file:c.jsonl:")
    path2 = tmp_path / "d.jsonl"
    path2.write_text('{"body": "b1"}\n{"body": "b2"}\n')
    assert list(FileCorpus(path2, text_field="body")) == ["b1", "b2"]


def test_file_corpus_json_and_txt(tmp_path):
    js = tmp_path / "c.json"
    js.write_text(json.dumps(["one", {"text": "two"}]))
    assert list(FileCorpus(js)) == ["one", "two"]
    js.write_text(json.dumps({"text": "not a list"}))
    with pytest.raises(CorpusError, match="expected a JSON list"):
        list(FileCorpus(js))
    js.write_text("[1, 2")
    with pytest.raises(CorpusError, match="invalid JSON"):
        list(FileCorpus(js))
    txt = tmp_path / "c.txt"
    txt.write_text("line one\n\n   \nline two\n")
    assert list(FileCorpus(txt)) == ["line one", "line two"]


def test_file_corpus_rejects_unknown_suffix_and_missing_file(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"unsupported suffix '\.csv'"):
        FileCorpus(csv)
    with pytest.raises(CorpusError, match="does not exist"):
        FileCorpus(tmp_path / "missing.txt")


def test_corpus_identity_follows_content(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("alpha\n")
    before = FileCorpus(path).identity
    assert FileCorpus(path).identity == before
    path.write_text("beta\n")
    assert FileCorpus(path).identity != before


def test_folder_corpus(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee")
    (root / "a.md").write_text("# ay")
    (root / "sub" / "c.txt").write_text("see")
    (root / "skip.json").write_text('["not read"]')
    corpus = FolderCorpus(root)
    assert list(corpus) == ["# ay", "bee", "see"]  # sorted path order, only .txt/.md
    ident = corpus.identity
    (root / "sub" / "c.txt").write_text("sea")
    assert FolderCorpus(root).identity != ident
    with pytest.raises(CorpusError, match="does not exist"):
        FolderCorpus(tmp_path / "nowhere")


def test_corpus_from_spec_dispatch(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("x\n")
    assert isinstance(corpus_from_spec(str(txt)), FileCorpus)
    assert isinstance(corpus_from_spec(tmp_path), FolderCorpus)
    assert isinstance(corpus_from_spec("gensim-wiki"), GensimWikiCorpus)
    assert isinstance(corpus_from_spec(None), GensimWikiCorpus)  # the offline default
    custom = FileCorpus(txt)
    assert corpus_from_spec(custom) is custom
    with pytest.raises(CorpusError, match="not found"):
        corpus_from_spec(str(tmp_path / "nothing-here"))


def test_shuffled_is_a_seeded_permutation():
    docs = [f"d{i}" for i in range(2500)]  # more than the 1000-document buffer
    a = list(shuffled(iter(docs), 1))
    assert sorted(a) == sorted(docs) and a != docs
    assert a == list(shuffled(iter(docs), 1))
    assert a != list(shuffled(iter(docs), 2))
    assert list(shuffled(iter(docs), None)) == docs


def test_gensim_wiki_corpus_yields_about_100_articles():
    pytest.importorskip("gensim")
    import bz2

    from gensim.corpora.wikicorpus import extract_pages

    corpus = GensimWikiCorpus()
    docs = list(corpus)
    assert 90 <= len(docs) <= 120, len(docs)
    assert docs[0].startswith("Anarchism")
    assert all(len(d) >= corpus.min_chars for d in docs)
    assert not any(d.lstrip().upper().startswith("#REDIRECT") for d in docs)
    assert not any("[[" in d or "{{" in d or "'''" in d for d in docs)  # markup stripped
    with bz2.open(corpus.path) as f:
        raw = [text for _title, text, _pid in extract_pages(f, filter_namespaces=("0",))]
    redirects = sum(t.lstrip().upper().startswith("#REDIRECT") for t in raw)
    assert redirects > 50 and len(docs) <= len(raw) - redirects  # the dump's redirects were skipped
    assert corpus.identity.startswith("gensim-wiki:")
