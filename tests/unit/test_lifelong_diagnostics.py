"""Per-batch diagnostics (``Editor(diagnostics=True)``, :mod:`fastmemit.diagnostics`) on a tiny Llama:
every value equals a direct computation from the model's weights, keys and targets, and switching them on
changes no edit.

The direct computations take other routes than the module: distances from weight snapshots, the
preservation RMS from explicit keys (C0 = K0 K0ᵀ / N) or through C0's Cholesky factor, kᵀC⁻¹k by a
dense solve, the keys and targets recomputed on the model as it was at each layer's solve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fastmemit.diagnostics import LAYER_KEYS, preservation_rms
from fastmemit.editing import Editor, TargetCache, write_weights
from fastmemit.keys_values import keys_and_outputs, rewrite_rows
from fastmemit.models.arch import as_math, get_arch, mlp_down_weight
from fastmemit.requests import EditRequest
from tests.helpers import tiny_llm, write_tiny_corpus

F64 = torch.float64
REQS = [
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano", "target_true": "guitar"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French"},
    {"prompt": "{} is located in", "subject": "Edwin of Northumbria", "target_new": "Paris", "target_true": "London"},
]
MORE = [{"prompt": "{} was made by", "subject": "Honda Civic", "target_new": "Apple", "target_true": "Toyota"},
        {"prompt": "{} speaks", "subject": "Michel Denisot", "target_new": "English", "target_true": "French"}]


def hparams(**changes: Any) -> dict[str, Any]:
    hp: dict[str, Any] = dict(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[3, 2]],
                              dynamic=True, dynamic_multiplier=2, mom2_update_weight=100, stats_seq_len=64,
                              stats_batch_size=4)
    hp.update(changes)
    return hp


pytestmark = pytest.mark.usefixtures("private_cache")

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diagnostics")



@pytest.fixture(scope="module")
def corpus(workdir, tokenizer) -> Path:
    return write_tiny_corpus(workdir / "corpus.jsonl", tokenizer)


def editor(model, tok, corpus, workdir, method="EMMET", **kw: Any) -> Editor:
    return Editor(model, tok, method, hparams(), corpus=corpus, stats_cache_dir=workdir / "stats",
                  show_progress=False, use_cache=False, **kw)


def math_weights(model) -> dict[int, torch.Tensor]:
    """Edited layers' weights, math orientation, float64 copies."""
    fifo = get_arch(model).fan_in_fan_out
    return {layer: as_math(mlp_down_weight(model, layer)[1].detach(), fifo).to(F64).clone() for layer in (0, 1)}


def test_preservation_rms_is_the_root_mean_square_of_the_output_change_on_the_keys():
    g = torch.Generator().manual_seed(0)
    K0 = torch.randn(12, 500, generator=g, dtype=F64)  # (d_k, N) explicit preserved keys
    D = torch.randn(5, 12, generator=g, dtype=F64)  # (d, d_k)
    direct = torch.sqrt(torch.mean(torch.sum((D @ K0) ** 2, dim=0)))  # sqrt(mean_k ‖D k‖²)
    assert preservation_rms(D, K0 @ K0.T / K0.shape[1]) == pytest.approx(float(direct), rel=1e-12)
    assert preservation_rms(D, None) is None


@pytest.mark.parametrize("method", ["EMMET", "AlphaEdit"])
def test_diagnostics_equal_direct_computations_over_two_sequential_batches(method, tokenizer, corpus, workdir):
    model = tiny_llm("llama", len(tokenizer))
    cache = TargetCache()  # z* of every request, to recompute the memorization terms
    ed = editor(model, tokenizer, corpus, workdir, method, diagnostics=True, target_cache=cache)
    w0 = math_weights(model)
    for reqs in (REQS, MORE):
        before = math_weights(model)
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        res = ed.edit(reqs)
        after = math_weights(model)
        rows = res.info["diagnostics"]
        assert [r["layer"] for r in rows] == [0, 1] and all(set(LAYER_KEYS) <= r.keys() for r in rows)
        assert res.timings["diagnostics"] > 0
        for r in rows:
            L = r["layer"]
            D, E = after[L] - before[L], after[L] - w0[L]
            assert r["delta_norm"] == pytest.approx(float(torch.linalg.norm(D)), rel=1e-12)
            assert r["original_weights_norm"] == pytest.approx(float(torch.linalg.norm(before[L])), rel=1e-12)
            assert r["new_weights_norm"] == pytest.approx(float(torch.linalg.norm(after[L])), rel=1e-12)
            assert r["w0_norm"] == pytest.approx(float(torch.linalg.norm(w0[L])), rel=1e-12)
            assert r["distance_w0"] == pytest.approx(float(torch.linalg.norm(E)), rel=1e-12)
            assert r["relative_distance_w0"] == pytest.approx(float(torch.linalg.norm(E) / torch.linalg.norm(w0[L])),
                                                              rel=1e-12)
            # preservation through C0's Cholesky factor: tr(D C0 Dᵀ) = ‖D L‖²
            Lc = torch.linalg.cholesky(ed.states[L].mom2.to(F64))
            assert r["preservation_rms"] == pytest.approx(float(torch.linalg.norm(D @ Lc)), rel=1e-9)
            assert r["preservation_rms_w0"] == pytest.approx(float(torch.linalg.norm(E @ Lc)), rel=1e-9)
            check_key_terms(r, ed, model, tokenizer, reqs, snapshot, cache, before, after)
        assert rows[1]["distance_w0"] > 0


def check_key_terms(row, ed, model, tok, reqs, snapshot, cache, before, after) -> None:
    """new/old edit distance, unmet fraction and max kᵀC⁻¹k of one layer, recomputed on the model as it
    was at that layer's solve (earlier layers of the batch written, this one not)."""
    L, layers = row["layer"], [0, 1]
    edited = dict(model.named_parameters())
    current = {n: p.detach().clone() for n, p in edited.items()}
    at_solve = {n: (current[n] if any(f"layers.{m}." in n for m in layers if m < L) else snapshot[n]) for n in snapshot}
    write_weights(model, at_solve)
    try:
        templates = ed.templates()
        rows = rewrite_rows(tok, [EditRequest.from_any(r) for r in reqs], templates, ed.hp.fact_token)
        K, H = keys_and_outputs(model, rows, len(reqs), len(templates), L, layers[-1])  # (d_k, B), (B, d)
    finally:
        write_weights(model, current)
    z = torch.stack([v[0] for v in cache.store.values()][-len(reqs):]).to(F64)  # (B, d): this batch's z*
    R = (z - H).T / (len(layers) - layers.index(L))  # (d, B)
    W, Wn = before[L], after[L]
    old = torch.linalg.vector_norm(W @ K - z.T, dim=0).mean()
    new = torch.linalg.vector_norm(Wn @ K - z.T, dim=0).mean()
    assert row["old_edit_distance"] == pytest.approx(float(old), rel=1e-6)
    assert row["new_edit_distance"] == pytest.approx(float(new), rel=1e-6)
    unmet = torch.linalg.norm((Wn - W) @ K - R) / torch.linalg.norm(R)
    assert row["unmet_fraction"] == pytest.approx(float(unmet), rel=1e-5, abs=1e-7)
    C = ed.method.preserved_matrix(ed.hp, ed.states[L].mom2)  # the method's C (AlphaEdit: the base λC0 + εI)
    kck = torch.diag(K.T @ torch.linalg.solve(C, K)).max()
    assert row["max_kCk"] == pytest.approx(float(kck), rel=1e-8)


def test_diagnostics_change_no_edit_and_are_off_by_default(tokenizer, corpus, workdir):
    a, b = tiny_llm("llama", len(tokenizer)), tiny_llm("llama", len(tokenizer))
    ra = editor(a, tokenizer, corpus, workdir).edit(REQS)
    rb = editor(b, tokenizer, corpus, workdir, diagnostics=True).edit(REQS)
    assert "diagnostics" not in ra.info and "diagnostics" not in ra.timings
    assert all(torch.equal(ra.deltas[n], rb.deltas[n]) for n in ra.deltas)
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(a.parameters(), b.parameters()))
    # EMMET with a small ridge meets its layer's target almost exactly; MEMIT's least squares leaves more
    assert rb.info["diagnostics"][-1]["unmet_fraction"] < 0.5
