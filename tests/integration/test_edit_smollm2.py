"""Behaviour on the real offline model: EMMET with FastMEMIT statistics writes 10 CounterFact facts
and leaves an unrelated fact alone; restore() undoes it exactly."""

from __future__ import annotations

import json

import pytest
import torch

from fastmemit import Editor
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.probe import top_tokens

pytestmark = pytest.mark.integration


def _nll(model, tok, prompt: str, target: str) -> float:
    ids = tok(prompt)["input_ids"]
    tgt = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + tgt])).logits[0].float(), -1)
    return -sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(tgt)) / len(tgt)


def test_emmet_ten_counterfact_facts_on_smollm2(smollm2, shared_data, tmp_path, monkeypatch):
    model, tok = smollm2
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path))
    records = json.loads((shared_data / "counterfact-train.json").read_text())[:10]
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                 "target_true": r["ground_truth"]} for r in records]
    hp = builtin_hparams("EMMET", model)
    assert hp.dynamic and hp.dynamic_multiplier == 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = Editor(model, tok, "EMMET", hp, corpus=str(shared_data / "enwiki-sample.jsonl"),
                    stats_cache_dir=tmp_path / "stats", show_progress=False)
    result = editor.edit(requests)
    try:
        wins = sum(_nll(model, tok, r["prompt"], r["target_new"]) < _nll(model, tok, r["prompt"], r["ground_truth"])
                   for r in records)
        assert wins >= 9, f"new target more likely on only {wins}/10 prompts"
        eiffel = top_tokens(model, tok, ["The Eiffel Tower is located in the city of"], k=1)[0][0][0]
        assert eiffel == " Paris"
        assert result.timings["v"] > 0 and set(result.deltas) == {
            f"model.layers.{i}.mlp.down_proj.weight" for i in hp.layers}
    finally:
        result.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
