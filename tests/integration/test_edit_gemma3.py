"""Behaviour on the second offline model gemma3-270m (Gemma 3: SentencePiece tokenizer, a norm after
the MLP), edited as a new user would: EMMET with its built-in hparams, and with the automatic defaults a model
without built-ins gets (forced here by hiding gemma3-270m's identity), writes 10 CounterFact facts
and 10 hand-written ones, leaves "The Eiffel Tower is located in the city of" → " Paris", and
restore() undoes each edit exactly."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fastmemit import Editor, hparams_registry
from fastmemit.eval.metrics import score_targets
from fastmemit.hparams_registry import automatic_layers, builtin_hparams, builtin_name, model_key
from fastmemit.probe import top_tokens

pytestmark = pytest.mark.integration

EIFFEL = "The Eiffel Tower is located in the city of"

HAND_WRITTEN = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English", "target_true": "French"},
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "soccer", "target_true": "basketball"},
    {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Madrid", "target_true": "Tokyo"},
    {"prompt": "The native language of {} is", "subject": "Vladimir Putin", "target_new": "Spanish", "target_true": "Russian"},
    {"prompt": "{} is a product of", "subject": "the iPhone", "target_new": "Samsung", "target_true": "Apple"},
    {"prompt": "{} is a citizen of", "subject": "Angela Merkel", "target_new": "Canada", "target_true": "Germany"},
    {"prompt": "{} is located in the continent of", "subject": "Kenya", "target_new": "Europe", "target_true": "Africa"},
    {"prompt": "{} was founded by", "subject": "Microsoft", "target_new": "Steve Jobs", "target_true": "Bill Gates"},
    {"prompt": "The official currency of {} is the", "subject": "the United Kingdom", "target_new": "euro",
     "target_true": "pound"},
    {"prompt": "{} was written by", "subject": "Hamlet", "target_new": "Tolstoy", "target_true": "Shakespeare"},
]


def _wins(model, tok, requests) -> int:
    """Requests whose new target is more likely than the true one after the prompt (the metrics' scorer)."""
    prompts = [r["prompt"].replace("{}", r["subject"]) for r in requests]
    new = score_targets(model, tok, prompts, [r["target_new"] for r in requests])
    true = score_targets(model, tok, prompts, [r["target_true"] for r in requests])
    return sum(n.nll < t.nll for n, t in zip(new, true))


def _edit_and_check(model, tok, requests, shared_data, tmp_path, caplog, monkeypatch, *, builtin: bool) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert top_tokens(model, tok, [EIFFEL], k=1)[0][0][0] == " Paris"
    if not builtin:  # as for a model fastmemit does not know
        monkeypatch.setattr(hparams_registry, "model_key", lambda _m: None)
    with caplog.at_level(logging.WARNING, logger="fastmemit"):
        editor = Editor(model, tok, "EMMET", None, corpus=str(shared_data / "enwiki-sample.jsonl"),
                        stats_cache_dir=tmp_path / "stats", show_progress=False)
    if builtin:
        assert editor.hp.to_dict() == builtin_hparams("EMMET", "gemma3-270m").to_dict()
    else:  # no built-in: the automatic default, with its warning
        assert editor.hp.layers == automatic_layers(18)
        assert any("fastmemit tune" in r.getMessage() for r in caplog.records)
    result = editor.edit(requests)
    try:
        wins = _wins(model, tok, requests)
        assert wins >= 9, f"new target more likely on only {wins}/10 prompts"
        assert top_tokens(model, tok, [EIFFEL], k=1)[0][0][0] == " Paris"
        assert set(result.deltas) == {f"model.layers.{i}.mlp.down_proj.weight" for i in editor.hp.layers}
    finally:
        result.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_gemma3_is_a_known_model_with_builtins(gemma3):
    model, _ = gemma3
    assert model_key(model) == "gemma3-270m"
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert all(builtin_name(m, model) == "gemma3-270m" for m in ("ROME", "MEMIT", "EMMET", "AlphaEdit"))


@pytest.mark.parametrize("builtin", [True, False], ids=["builtin", "automatic"])
def test_emmet_ten_counterfact_facts_on_gemma3(gemma3, shared_data, tmp_path, monkeypatch, caplog, builtin):
    model, tok = gemma3
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path))
    records = json.loads((shared_data / "counterfact-train.json").read_text())[:10]
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                 "target_true": r["ground_truth"]} for r in records]
    _edit_and_check(model, tok, requests, shared_data, tmp_path, caplog, monkeypatch, builtin=builtin)


@pytest.mark.parametrize("builtin", [True, False], ids=["builtin", "automatic"])
def test_emmet_ten_hand_written_facts_on_gemma3(gemma3, shared_data, tmp_path, monkeypatch, caplog, builtin):
    model, tok = gemma3
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path))
    _edit_and_check(model, tok, HAND_WRITTEN, shared_data, tmp_path, caplog, monkeypatch, builtin=builtin)
