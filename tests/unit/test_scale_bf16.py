"""Half precision in the parts the scale work touches: statistics in float64 from a bfloat16 model,
Δ accumulated in float64 and written back once in the weight's dtype, restore bit-exact.

(v* in half precision is tested with v*; here it only has to run.)
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from fastmemit import editing
from fastmemit.editing import apply_deltas, edit, write_weights
from fastmemit.models import mlp_down_weight
from fastmemit.stats import compute_layer_stats
from tests.helpers import tiny_llm
from tests.unit.test_stats import (
    SEQ_LEN,
    assert_rel_close,
    doc_rows,
    make_docs,
    reference_sum_kk,
    write_jsonl,
)

BF16 = torch.bfloat16
REQS = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
        {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread."""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> Path:
    rng = random.Random(0)
    words = "the a of to in is was city river music year born war state team album film".split()
    path = tmp_path_factory.mktemp("bf16") / "corpus.jsonl"
    with path.open("w") as f:
        for _ in range(60):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
            text += " " + tokenizer.decode([rng.randrange(300, 30000) for _ in range(rng.randint(10, 40))])
            f.write(json.dumps({"text": text}) + "\n")
    return path


def bf16_model(arch: str, tok) -> torch.nn.Module:
    return tiny_llm(arch, len(tok)).to(BF16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_statistics_of_a_bf16_model_are_float64_sums_of_its_keys(arch, tokenizer, tmp_path):
    model = bf16_model(arch, tokenizer)
    docs = make_docs(40)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    stats = compute_layer_stats(model, tokenizer, [0, 2], path, n_keys=500, batch_size=4, seq_len=SEQ_LEN, seed=None,
                                cache=True, cache_dir=tmp_path / "stats", show_progress=False)
    ref = reference_sum_kk(model, tokenizer, doc_rows(tokenizer, docs), [0, 2], 500, 4)  # bf16 keys, float64 sum
    for layer in (0, 2):
        st = stats[layer]
        assert st.sum_kk.dtype == torch.float64 and st.count == 500
        assert st.key["model_dtype"] == "bfloat16" and st.key["dtype"] == "float64"
        assert_rel_close(st.sum_kk, ref[layer], 1e-12)


@pytest.mark.parametrize("arch, method, layers", [("llama", "ROME", [1]), ("gpt2", "ROME", [1]),
                                                   ("llama", "MEMIT", [0, 1])])
def test_bf16_deltas_accumulate_in_float64_and_are_written_once(arch, method, layers, tokenizer, corpus, tmp_path,
                                                                monkeypatch):
    """ROME edits the two requests one after the other: the two Δ of a layer are summed in float64 and the
    weight is set to W0 + bf16(Δ1 + Δ2), not to W0 + bf16(Δ1) + bf16(Δ2); restore and re-apply are bit-exact."""
    model = bf16_model(arch, tokenizer)
    pristine = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    added: dict[int, list[torch.Tensor]] = {}
    real_add = editing._Batch.add

    def spy(self, model_, layer, delta, fan_in_fan_out):
        added.setdefault(layer, []).append(delta.clone())
        return real_add(self, model_, layer, delta, fan_in_fan_out)

    monkeypatch.setattr(editing._Batch, "add", spy)
    hp = dict(layers=layers, v_num_grad_steps=3, context_template_length_params=[[3, 1]], dynamic=True,
              dynamic_multiplier=2, mom2_update_weight=100, stats_seq_len=64, stats_batch_size=4)
    result = edit(model, tokenizer, REQS, method, hp, corpus=corpus, stats_cache_dir=tmp_path / "stats",
                  use_cache=False, show_progress=False)
    fan = arch == "gpt2"
    differs = False
    for layer in layers:
        name, p = mlp_down_weight(model, layer)
        assert p.dtype == BF16 and result.deltas[name].dtype == BF16
        parts = [d.T if fan else d for d in added[layer]]  # stored orientation, float64
        assert all(d.dtype == torch.float64 for d in parts) and len(parts) == (2 if method == "ROME" else 1)
        total = sum(parts)  # (stored shape) float64
        assert torch.equal(result.deltas[name], total.to(BF16)), "Δ was not accumulated in float64"
        assert torch.equal(p.detach(), before[name] + total.to(BF16))  # W0 + Δ in bf16, written once
        differs |= not torch.equal(sum(d.to(BF16) for d in parts), total.to(BF16))
    if method == "ROME":
        assert differs, "the bf16 sum of the parts equals their float64 sum: the test shows nothing"
    result.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "restore is not bit-exact"
    path = result.save(tmp_path / "d.safetensors")
    again = apply_deltas(pristine, path)
    result.apply()
    assert all(torch.equal(p, q) for p, q in zip(pristine.parameters(), model.parameters()))
    again.restore()
    assert all(torch.equal(p, before[n]) for n, p in pristine.named_parameters())


def test_write_weights_adds_in_the_wider_dtype_and_casts_once():
    """A float64 Δ against a bf16 weight: W = bf16(W0 + Δ) computed in float64 (a checkpoint's exact form);
    a bf16 Δ: W = W0 + Δ in bf16 (the saved-deltas form)."""
    model = torch.nn.Linear(4, 3, bias=False).to(BF16)
    w0 = model.weight.detach().clone()
    d = torch.full((3, 4), 1e-3, dtype=torch.float64)
    write_weights(model, {"weight": w0}, {"weight": d})
    assert torch.equal(model.weight.detach(), (w0.double() + d).to(BF16))
    write_weights(model, {"weight": w0}, {"weight": d.to(BF16)})
    assert torch.equal(model.weight.detach(), w0 + d.to(BF16))
    write_weights(model, {"weight": w0})
    assert torch.equal(model.weight.detach(), w0)
