"""v* options: the research code's early-stopping rule ('loss'), the value site of each method (ROME's
regularizers relative to the MLP output, ``v_site``), and the z* cache keeping sites apart."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from fastmemit import editing, keys_values
from fastmemit.editing import Editor, TargetCache
from fastmemit.errors import EditError
from fastmemit.keys_values import _stops, optimize_targets, read_layer, rewrite_rows
from fastmemit.methods import EditHparams, get_method
from fastmemit.requests import EditRequest
from tests.helpers import tiny_llm

REQS = [EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
        EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano"),
        EditRequest(prompt="{} was born in", subject="Albert Einstein", target_new="the old city of London")]
TEMPLATES = ["{}", "The river flows. {}"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def peaky(tokenizer) -> torch.nn.Module:
    """A tiny llama with a sharp LM head (δ moves the target NLL by several nats)."""
    model = tiny_llm("llama", len(tokenizer))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("vstar") / "corpus.jsonl"
    with path.open("w") as f:
        for i in range(60):
            noise = tokenizer.decode([rng.randrange(300, 30000) for _ in range(rng.randint(10, 40))])
            f.write(json.dumps({"title": f"doc {i}", "text": f"the city of music {noise}"}) + "\n")
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path / "user-cache"))


# ----------------------------------------------------------------------------- early stopping


def test_stop_rules_read_the_nll_the_total_loss_or_the_argmax():
    loss, nll, hit = [0.04, 0.06, 0.2], [0.01, 0.04, 0.2], [False, True, True]
    assert _stops("nll", 0.05, loss, nll, hit) == [True, True, False]
    assert _stops("loss", 0.05, loss, nll, hit) == [True, False, False]  # the research code's `if loss < 5e-2`
    assert _stops("mpes", 0.05, loss, nll, hit) == hit


def _record_losses(monkeypatch) -> list[tuple[list[int], list[float], list[float]]]:
    seen: list[tuple[list[int], list[float], list[float]]] = []
    real = keys_values._VBatch.losses

    def spy(self, *args, **kwargs):
        loss, nll, hit = real(self, *args, **kwargs)
        seen.append((list(self.active), loss.detach().tolist(), nll.detach().tolist()))
        return loss, nll, hit

    monkeypatch.setattr(keys_values._VBatch, "losses", spy)
    return seen


@pytest.mark.parametrize("rule", ["loss", "nll"])
def test_each_request_stops_at_the_first_step_its_rule_holds(rule, peaky, tokenizer, monkeypatch):
    """Steps per request = 1 + the first step whose recorded loss (rule 'loss') or NLL (rule 'nll') is below
    the threshold; a request that never gets there runs every step."""
    hp = EditHparams(layers=[0], v_num_grad_steps=12, fact_token="last", v_early_stop_nll=3.0, v_early_stop=rule,
                     context_template_length_params=[], v_weight_decay=0.03)
    seen = _record_losses(monkeypatch)
    res = optimize_targets(peaky, tokenizer, REQS, TEMPLATES, 0, hp, show_progress=False)
    first: dict[int, int] = {}
    for step, (active, loss, nll) in enumerate(seen):  # one forward per step (one micro-batch)
        for b, x in zip(active, loss if rule == "loss" else nll):
            if x < hp.v_early_stop_nll and b not in first:
                first[b] = step
    assert res.steps == [first.get(b, hp.v_num_grad_steps - 1) + 1 for b in range(len(REQS))]
    assert len(first) >= 1  # the rule fired for some request


def test_the_loss_rule_runs_longer_than_the_nll_rule_when_the_regularizers_weigh(peaky, tokenizer):
    hp = EditHparams(layers=[0], v_num_grad_steps=12, fact_token="last", v_early_stop_nll=3.0,
                     context_template_length_params=[], v_weight_decay=0.03)
    by_nll = optimize_targets(peaky, tokenizer, REQS, TEMPLATES, 0, hp, show_progress=False)
    by_loss = optimize_targets(peaky, tokenizer, REQS, TEMPLATES, 0, hp.replace(v_early_stop="loss"),
                               show_progress=False)
    assert all(a >= b for a, b in zip(by_loss.steps, by_nll.steps))
    assert by_loss.steps != by_nll.steps and min(by_nll.steps) < hp.v_num_grad_steps


# ----------------------------------------------------------------------------- value sites


def _editor(model, tok, corpus, tmp_path, method: str, **changes: Any) -> Editor:
    hp: dict[str, Any] = dict(layers=[1], v_num_grad_steps=6, context_template_length_params=[],
                              clamp_norm_factor=0.05, dynamic=True, dynamic_multiplier=2, mom2_update_weight=100,
                              stats_seq_len=64, stats_batch_size=4)
    hp.update(changes)
    return Editor(model, tok, method, hp, corpus=corpus, stats_cache_dir=tmp_path / "stats", use_cache=False,
                  show_progress=False)


@pytest.mark.parametrize(("method", "v_site", "site"), [("ROME", "auto", "matrix"), ("ROME", "block", "block"),
                                                        ("EMMET", "auto", "block"), ("EMMET", "matrix", "matrix")])
def test_clamp_is_relative_to_the_value_at_the_methods_site(method, v_site, site, tokenizer, corpus, tmp_path,
                                                            monkeypatch):
    """ROME's δ is clamped relative to the MLP output (the research code's compute_v), EMMET's to the block
    output (compute_z); ``v_site`` overrides either. With a tight clamp δ ends on the clamp's sphere."""
    assert get_method(method).value_site == ("matrix" if method == "ROME" else "block")
    model = tiny_llm("llama", len(tokenizer))
    calls = []
    real = editing.optimize_targets

    def spy(*args, **kwargs):
        calls.append((kwargs["site"], real(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(editing, "optimize_targets", spy)
    req = REQS[:1]
    _editor(model, tokenizer, corpus, tmp_path, method, v_site=v_site).edit(req)
    (got_site, t), = calls
    assert got_site == site and (t.m is not None) is (site == "matrix")
    model_before = tiny_llm("llama", len(tokenizer))
    reads = read_layer(model_before, rewrite_rows(tokenizer, req, ["{}"], "subject_last"), 1, 1, 1, 1)
    ref = reads.M if site == "matrix" else reads.H  # (1, d)
    torch.testing.assert_close(t.delta.norm(dim=1), 0.05 * ref.norm(dim=1), rtol=1e-4, atol=0)


def test_z_cache_keeps_the_value_sites_apart(tokenizer, corpus, tmp_path):
    model = tiny_llm("llama", len(tokenizer))
    store: dict = {}
    rome = _editor(model, tokenizer, corpus, tmp_path, "ROME")
    rome.target_cache = TargetCache(store)
    rome.edit(REQS[:1]).restore()
    keys_block = TargetCache.keys(model, REQS[:1], rome.templates(), 1, rome.hp)  # site 'block' by default
    keys_matrix = TargetCache.keys(model, REQS[:1], rome.templates(), 1, rome.hp, "matrix")
    assert set(keys_matrix) <= set(store) and not set(keys_block) & set(store)
    (value,) = [store[k] for k in keys_matrix]
    assert value[4] is not None and value[4].shape == value[0].shape  # m* kept beside z*


def test_block_site_is_refused_on_a_family_with_a_norm_after_the_mlp(tokenizer, corpus, tmp_path):
    model = tiny_llm("gemma3_text", len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(EditError, match="v_site 'block' cannot be used on 'gemma3_text' models"):
        _editor(model, tokenizer, corpus, tmp_path, "EMMET", v_site="block").edit(REQS[:1])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- compute dtype


@pytest.mark.parametrize("site", ["block", "matrix"])
def test_a_reduced_compute_dtype_still_reads_h_and_z_in_the_models_dtype(site, peaky, tokenizer):
    """With one step δ stays 0: z* (and m*) are then the float32 model's values at the plain prompt, to float32
    precision, whether v* ran under bfloat16 autocast or not (bfloat16 alone is ~1e-2 off); with more steps
    the bfloat16 path still lowers every request's NLL."""
    hp = EditHparams(layers=[0], v_num_grad_steps=1, fact_token="last", context_template_length_params=[])
    ref = optimize_targets(peaky, tokenizer, REQS, TEMPLATES, 0, hp, show_progress=False, site=site)
    low = optimize_targets(peaky, tokenizer, REQS, TEMPLATES, 0, hp.replace(v_compute_dtype="bfloat16"),
                           show_progress=False, site=site)
    assert float(low.delta.abs().max()) == 0.0
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert rel(low.z, ref.z) < 1e-6
    micro = optimize_targets(peaky, tokenizer, REQS, TEMPLATES, 0, hp.replace(v_compute_dtype="bfloat16", v_max_rows=3),
                             show_progress=False, site=site)  # one request a micro-batch
    assert rel(micro.z, ref.z) < 1e-6
    if site == "matrix":
        assert rel(low.m, ref.m) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # what a z* read under autocast would be off by
        ids = torch.tensor([tokenizer(REQS[0].text)["input_ids"]])
        h = peaky(ids, output_hidden_states=True).hidden_states[1][0, -1].double()
    assert rel(h, ref.z[0]) > 1e-4
    steps = hp.replace(v_num_grad_steps=8, v_compute_dtype="bfloat16", v_early_stop_nll=0.0)
    moved = optimize_targets(peaky, tokenizer, REQS, TEMPLATES, 0, steps, show_progress=False, site=site)
    assert all(a < b for a, b in zip(moved.nll, ref.nll))
    if site == "block":  # z* = h + δ with h the float32 value
        assert rel(moved.z - moved.delta, ref.z) < 1e-6


def test_compute_dtype_is_validated_and_keys_the_z_cache(tokenizer):
    with pytest.raises(EditError, match=r"hparams.v_compute_dtype must be null, 'bfloat16' or 'float16', got 'int8'"):
        EditHparams(layers=[0], v_compute_dtype="int8")
    model = tiny_llm("llama", len(tokenizer))
    hp = EditHparams(layers=[0])
    a = TargetCache.keys(model, REQS[:1], TEMPLATES, 0, hp)
    b = TargetCache.keys(model, REQS[:1], TEMPLATES, 0, hp.replace(v_compute_dtype="bfloat16"))
    assert a != b


@pytest.mark.parametrize("native", [True, False])
def test_a_reduced_dtype_the_cpu_only_emulates_is_warned_about_once(native, peaky, tokenizer, monkeypatch, caplog):
    """bfloat16 autocast on a CPU without bfloat16 instructions (AVX2) is ≈8× slower than float32: say so."""
    monkeypatch.setattr(keys_values, "cpu_has_native", lambda dtype: native)
    keys_values._warn_emulated.cache_clear()
    hp = EditHparams(layers=[0], v_num_grad_steps=1, fact_token="last", context_template_length_params=[],
                     v_compute_dtype="bfloat16")
    with caplog.at_level(logging.WARNING, logger="fastmemit"):
        for _ in range(2):
            optimize_targets(peaky, tokenizer, REQS, TEMPLATES, 0, hp, show_progress=False)
    slow = [r for r in caplog.records if "no bfloat16 instructions" in r.getMessage()]
    assert len(slow) == (0 if native else 1)
    keys_values._warn_emulated.cache_clear()

