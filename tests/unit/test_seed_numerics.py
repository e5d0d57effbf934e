"""The seed's numerics for research-code files: EMMET's ridge only for B > 1 (one request is ROME's
closed form), the six context templates MEMIT/EMMET hard-code, and recompute_stats 'layer' (the seed's
``dynamic: true``: C0 recomputed for every layer on the model with the batch's earlier layers written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fastmemit.editing import Editor
from fastmemit.linalg import FactoredCov
from fastmemit.methods import EditHparams, LayerState, get_method
from fastmemit.models.arch import mlp_down_weight
from fastmemit.stats import provider
from tests.helpers import TESTS, tiny_llm, write_tiny_corpus

F64 = torch.float64
DATA = TESTS / "data" / "seed_hparams"
REQS = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
        {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}]
WORDS = "the a of to in is was for on that with as by at from city river music year born war state team".split()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread."""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("seed-numerics") / "corpus.jsonl", tokenizer, WORDS)


def _problem(d: int, d_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_k, 4 * d_k, generator=g, dtype=F64)
    C0 = X @ X.T / X.shape[1]  # (d_k, d_k), well conditioned
    return C0, torch.randn(d_k, 1, generator=g, dtype=F64), torch.randn(d, 1, generator=g, dtype=F64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emmet_with_one_request_is_romes_closed_form_without_ridge(seed):
    C0, k, r = _problem(12, 40, seed)  # (d_k, d_k), (d_k, 1), (d, 1)
    hp = EditHparams.from_json(DATA / "EMMET/fast-gpt2.json")  # a research file: the seed's rule
    assert hp.emmet_ridge_one_edit is False and hp.emmet_lambda == 0.1
    emmet, rome = get_method("EMMET"), get_method("ROME")
    delta = emmet.layer_delta(hp, LayerState(0, C0, FactoredCov(emmet.preserved_matrix(hp, C0))), k, r, None)
    u = torch.linalg.solve(C0, k)  # C0⁻¹ k*: (d_k, 1)
    closed = r @ u.T / (k.T @ u)  # ROME: (v* − W k*) (C0⁻¹k*)ᵀ / (k*ᵀ C0⁻¹ k*), (d, d_k)
    assert torch.allclose(delta, closed, rtol=0, atol=1e-10 * float(closed.abs().max()))
    via_rome = rome.layer_delta(hp, LayerState(0, C0, FactoredCov(rome.preserved_matrix(hp, C0))), k, r, None)
    assert torch.allclose(delta, via_rome, rtol=0, atol=1e-10 * float(closed.abs().max()))
    # fastmemit's rule (the default of files that are ours) keeps the ridge for one request too: a smaller step
    ridged = emmet.layer_delta(hp.replace(emmet_ridge_one_edit=True),
                               LayerState(0, C0, FactoredCov(emmet.preserved_matrix(hp, C0))), k, r, None)
    assert float((ridged - closed).abs().max()) > 1e-6 * float(closed.abs().max())


def test_emmet_keeps_the_ridge_for_more_than_one_request():
    C0, _, _ = _problem(12, 40, 3)
    g = torch.Generator().manual_seed(4)
    K, R = torch.randn(40, 3, generator=g, dtype=F64), torch.randn(12, 3, generator=g, dtype=F64)
    hp = EditHparams(emmet_ridge_one_edit=False, emmet_lambda=0.5, mom2_update_weight=2.0)
    emmet = get_method("EMMET")
    delta = emmet.layer_delta(hp, LayerState(0, C0, FactoredCov(emmet.preserved_matrix(hp, C0))), K, R, None)
    C = 2.0 * C0
    Y = torch.linalg.solve(C, K)  # C⁻¹K: (d_k, B)
    expected = R @ torch.linalg.solve(K.T @ Y + 0.5 * torch.eye(3, dtype=F64), Y.T)  # (d, d_k)
    assert torch.allclose(delta, expected, rtol=1e-9, atol=1e-12)


def test_a_research_emmet_file_gets_the_six_seed_context_templates(tokenizer, corpus, tmp_path):
    data = {**json.loads((DATA / "EMMET/fast-gpt2.json").read_text()), "layers": [1]}
    path = tmp_path / "seed-emmet.json"
    path.write_text(json.dumps(data))
    model = tiny_llm("gpt2", len(tokenizer))
    editor = Editor(model, tokenizer, "EMMET", str(path), corpus=corpus, use_cache=False, show_progress=False)
    templates = editor.templates()
    assert len(templates) == 6 and templates[0] == "{}"
    starts = ["The", "Therefore", "Because", "I", "You"]
    assert [t.startswith(s) and t.endswith(". {}") for t, s in zip(templates[1:], starts)] == [True] * 5


def _spy_stats(monkeypatch, model) -> list[tuple[list[int], torch.Tensor]]:
    """Every statistics pass: its layers and layer 0's edited weight at that moment."""
    calls: list[tuple[list[int], torch.Tensor]] = []
    real = provider.compute_layer_stats

    def spy(m, tok, layers, *args: Any, **kwargs: Any):
        calls.append((list(layers), mlp_down_weight(model, 0)[1].detach().clone()))
        return real(m, tok, layers, *args, **kwargs)

    monkeypatch.setattr(provider, "compute_layer_stats", spy)
    return calls


def _hparams(**changes: Any) -> dict[str, Any]:
    return dict(layers=[0, 1], v_num_grad_steps=2, context_template_length_params=[[3, 1]], dynamic=True,
                dynamic_multiplier=2, mom2_update_weight=100, stats_seq_len=64, stats_batch_size=4, **changes)


def test_recompute_stats_layer_recomputes_c0_per_layer_after_the_batchs_earlier_layers(tokenizer, corpus, tmp_path,
                                                                                      monkeypatch):
    model = tiny_llm("llama", len(tokenizer))
    w0 = mlp_down_weight(model, 0)[1].detach().clone()
    calls = _spy_stats(monkeypatch, model)
    editor = Editor(model, tokenizer, "EMMET", _hparams(recompute_stats="layer"), corpus=corpus,
                    stats_cache_dir=tmp_path / "stats", use_cache=False, show_progress=False)
    first = editor.edit(REQS[:1])
    after_first = mlp_down_weight(model, 0)[1].detach().clone()
    editor.edit(REQS[1:])
    assert [layers for layers, _ in calls] == [[0], [1], [0], [1]]
    assert torch.equal(calls[0][1], w0)  # batch 1, layer 0: the unedited model
    assert not torch.equal(calls[1][1], w0)  # batch 1, layer 1: layer 0 of this batch already written
    assert torch.equal(calls[2][1], after_first)  # batch 2, layer 0: the model the first batch left
    assert first.timings["stats"] > 0


def test_recompute_stats_true_recomputes_once_before_each_later_batch(tokenizer, corpus, tmp_path, monkeypatch):
    model = tiny_llm("llama", len(tokenizer))
    calls = _spy_stats(monkeypatch, model)
    editor = Editor(model, tokenizer, "EMMET", _hparams(recompute_stats=True), corpus=corpus,
                    stats_cache_dir=tmp_path / "stats", use_cache=False, show_progress=False)
    editor.edit(REQS[:1])
    editor.edit(REQS[1:])
    assert [layers for layers, _ in calls] == [[0, 1], [0, 1]]
