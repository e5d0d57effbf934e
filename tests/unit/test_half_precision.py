"""Half-precision models (bf16, fp16) edit correctly and restore bit-exactly.

v* keeps δ and its losses in float32 (h + δ summed in float32, rounded once to the model's dtype;
the LM head in float32), keys and values are read in float64 for the solve, deltas accumulate in
float64 and are written in the weight's dtype. On tiny models of every family in bf16 (CPU): the
model's own made-up fact becomes its top answer, the edited matrix produces the optimized value to
bf16 precision, the deltas are bf16, restore and re-applying saved deltas are bit-exact. The smollm2
10-fact check runs in bf16 too (integration).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from fastmemit import keys_values
from fastmemit.editing import Editor, apply_deltas
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.keys_values import optimize_targets, read_layer, rewrite_rows
from fastmemit.lm import lm_head
from fastmemit.methods import EditHparams
from fastmemit.probe import top_tokens
from tests.helpers import ARCHS
from tests.unit.vstar_helpers import (
    edit_hparams,
    edit_with_targets,
    editable_model,
    made_up_requests,
    rank_of_target,
    write_corpus,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("half")


@pytest.fixture(autouse=True)
def private_cache(workdir, monkeypatch):
    monkeypatch.setenv("FASTMEMIT_CACHE", str(workdir / "user-cache"))


@pytest.fixture(scope="module")
def corpus(workdir, tokenizer) -> Path:
    return write_corpus(workdir / "corpus.jsonl", tokenizer)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("layers", [[1], [0, 1]], ids=["one-layer", "two-layers"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_edit_takes_and_restores_bit_exactly(arch, layers, tokenizer, corpus, workdir, monkeypatch, tmp_path):
    model = editable_model(arch, len(tokenizer), torch.bfloat16)
    pristine = copy.deepcopy(model)
    before = _params(model)
    reqs = made_up_requests(model, tokenizer)
    result, t = edit_with_targets(model, tokenizer, reqs, edit_hparams(layers, arch), corpus, workdir / "stats",
                                  monkeypatch)
    assert t.delta.dtype == torch.float64 and max(t.nll) < 0.3  # v* converged in float32 on a bf16 model
    assert [rank_of_target(model, tokenizer, r) for r in reqs] == [0] * len(reqs)
    assert all(d.dtype == torch.bfloat16 for d in result.deltas.values())
    after = _params(model)
    if layers == [1]:  # the edited matrix produces m* (value site 'matrix') or m + δ, to bf16 precision
        rows = rewrite_rows(tokenizer, reqs, ["{}"], "last")
        m0 = read_layer(pristine, rows, len(reqs), 1, 1, 1).M
        m1 = read_layer(model, rows, len(reqs), 1, 1, 1).M
        m_star = t.m if t.m is not None else m0 + t.delta
        err = (m1 - m_star).norm(dim=1) / (m_star - m0).norm(dim=1)
        # what is left is mostly the preservation term's pull (λC0), not bf16 rounding: the same weights read in
        # float64 miss m* by as much (0.088 vs 0.090 for Gemma 3's second request on an AVX2 CPU); an edit that
        # did not land would miss by ~1
        assert float(err.max()) < 0.15, err
    path = result.save(tmp_path / "d.safetensors")
    result.restore()
    assert _same(model, before)
    applied = apply_deltas(pristine, path)  # saved bf16 deltas reproduce the edited weights bit for bit
    assert _same(pristine, after)
    applied.restore()
    assert _same(pristine, before)


def test_fp16_edit_takes_and_restores_bit_exactly(tokenizer, corpus, workdir, monkeypatch):
    model = editable_model("llama", len(tokenizer), torch.float16)
    before = _params(model)
    reqs = made_up_requests(model, tokenizer)
    result, _ = edit_with_targets(model, tokenizer, reqs, edit_hparams([0, 1], "llama"), corpus, workdir / "stats",
                                  monkeypatch)
    assert [rank_of_target(model, tokenizer, r) for r in reqs] == [0] * len(reqs)
    assert all(d.dtype == torch.float16 for d in result.deltas.values())
    result.restore()
    assert _same(model, before)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_vstar_keeps_delta_and_losses_in_float32_on_a_bf16_model(arch, tokenizer, monkeypatch):
    model = editable_model(arch, len(tokenizer), torch.bfloat16)
    reqs = made_up_requests(model, tokenizer)
    seen = []
    real = keys_values._VBatch.losses

    def spy(self, model_, site, v, hp, n_t):
        out = real(self, model_, site, v, hp, n_t)
        seen.append((v.delta.dtype, v.h0.dtype, *(x.dtype for x in out[:2])))
        return out

    monkeypatch.setattr(keys_values._VBatch, "losses", spy)
    hp = EditHparams(**{**edit_hparams([1], arch), "v_num_grad_steps": 3})
    res = optimize_targets(model, tokenizer, reqs, ["{}"], 1, hp, show_progress=False)
    assert seen and all(s == (torch.float32,) * 4 for s in seen)
    assert res.z.dtype == res.delta.dtype == torch.float64
    hidden = torch.randn(3, model.config.hidden_size).to(torch.bfloat16)
    head = model.get_output_embeddings()
    want = hidden.float() @ head.weight.float().T  # (3, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    want = torch.tanh(want / cap) * cap if cap else want
    torch.testing.assert_close(lm_head(model, hidden), want, rtol=1e-5, atol=1e-5)  # float32 head, not bf16


def test_bf16_and_float32_reach_the_same_value_targets(tokenizer):
    """δ optimized on the bf16 copy is the float32 model's δ to bf16 precision."""
    model = editable_model("llama", len(tokenizer))
    reqs = made_up_requests(model, tokenizer)
    hp = EditHparams(**{**edit_hparams([1], "llama"), "v_num_grad_steps": 8, "v_early_stop_nll": 0.0})
    full = optimize_targets(model, tokenizer, reqs, ["{}"], 1, hp, show_progress=False)
    half = optimize_targets(copy.deepcopy(model).to(torch.bfloat16), tokenizer, reqs, ["{}"], 1, hp,
                            show_progress=False)
    rel = (half.delta - full.delta).norm(dim=1) / full.delta.norm(dim=1)
    assert float(rel.max()) < 0.1, rel


@pytest.mark.integration
def test_emmet_counterfact_facts_on_smollm2_in_bf16(smollm2, shared_data, tmp_path, monkeypatch):
    """test_edit_smollm2's check on a bf16 copy of the model, on 5 facts (a CPU without bfloat16 instructions
    emulates every op: 10 facts took 19 min of a 31-min CI run on an AVX2 EPYC): ≥ 4/5 take, Paris stays,
    restore exact."""
    model32, tok = smollm2
    model = copy.deepcopy(model32).to(torch.bfloat16)
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path))
    records = json.loads((shared_data / "counterfact-train.json").read_text())[:5]
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                 "target_true": r["ground_truth"]} for r in records]
    before = _params(model)
    editor = Editor(model, tok, "EMMET", builtin_hparams("EMMET", model), corpus=str(shared_data / "enwiki-sample.jsonl"),
                    stats_cache_dir=tmp_path / "stats", show_progress=False)
    result = editor.edit(requests)
    try:
        assert all(d.dtype == torch.bfloat16 for d in result.deltas.values())
        wins = sum(_nll(model, tok, r["prompt"], r["target_new"]) < _nll(model, tok, r["prompt"], r["ground_truth"])
                   for r in records)
        assert wins >= 4, f"new target more likely on only {wins}/5 prompts"
        assert top_tokens(model, tok, ["The Eiffel Tower is located in the city of"], k=1)[0][0][0] == " Paris"
    finally:
        result.restore()
    assert _same(model, before)


def _nll(model, tok, prompt: str, target: str) -> float:
    ids = tok(prompt)["input_ids"]
    tgt = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + tgt])).logits[0].float(), -1)
    return -sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(tgt)) / len(tgt)
