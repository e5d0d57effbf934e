"""Device-mapped models (accelerate dispatch hooks in the forward path), device maps at load time, the
device lookups, offloaded weights refused, and the statistics / solve device options.

A CPU-only machine has one device, so the dispatch here maps every block to "cpu" with
``force_hooks=True``: accelerate's AlignDevicesHook then sits on every block exactly as with a map
over GPUs, and every input, key, δ and weight write goes through it. The same checks across a
CPU + CUDA split run in tests/test_scale_gpu.py when a GPU is present.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from accelerate import dispatch_model
from torch import nn

from fastmemit import editing
from fastmemit.editing import Editor, edit, write_weights
from fastmemit.errors import ConfigurationError, EditError
from fastmemit.lm import model_device
from fastmemit.models import (
    execution_device,
    get_arch,
    get_module,
    input_device,
    load_model,
    model_fingerprint,
    offloaded_parameters,
    resolve_device_map,
)
from fastmemit.stats import compute_layer_stats
from tests.helpers import small_hparams, tiny_llm, write_tiny_corpus

REQS = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
        {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}]




@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("devices")


@pytest.fixture(autouse=True)
def private_cache(workdir, monkeypatch):
    monkeypatch.setenv("FASTMEMIT_CACHE", str(workdir / "user-cache"))


@pytest.fixture(scope="module")
def corpus(workdir, tokenizer) -> Path:
    """Words and decoded random token ids (so that 2·d_k keys give a full-rank E[k kᵀ])."""
    return write_tiny_corpus(workdir / "corpus.jsonl", tokenizer)


def spread_map(model: nn.Module, device: str = "cpu") -> dict[str, str]:
    """One device-map entry per block and per other child of the base model, plus the LM head."""
    base = model.base_model_prefix
    out = {}
    for name, child in model.base_model.named_children():
        if isinstance(child, nn.ModuleList):
            out.update({f"{base}.{name}.{i}": device for i in range(len(child))})
        else:
            out[f"{base}.{name}"] = device
    out["lm_head"] = device
    return out


def dispatched(model: nn.Module) -> nn.Module:
    """``model`` with accelerate's dispatch hooks on every block (all on the CPU)."""
    m = dispatch_model(model, spread_map(model), force_hooks=True,
                       skip_keys=getattr(model, "_skip_keys_device_placement", None))  # as from_pretrained does
    arch = get_arch(m)
    assert hasattr(get_module(m, arch.site("block", 0)), "_hf_hook"), "no AlignDevicesHook attached"
    return m


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- edits through dispatch hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["EMMET", "AlphaEdit"])
def test_device_mapped_model_edits_like_the_plain_one_and_restores_exactly(arch, method, tokenizer, corpus, workdir):
    plain = tiny_llm(arch, len(tokenizer))
    mapped = dispatched(copy.deepcopy(plain))
    before = snapshot(mapped)
    hp = small_hparams(**({"nullspace_threshold": 0.5, "L2": 1.0} if method == "AlphaEdit" else {}))
    kw = dict(corpus=corpus, stats_cache_dir=workdir / "stats", use_cache=False, show_progress=False)
    a = edit(plain, tokenizer, REQS, method, hp, **kw)
    b = edit(mapped, tokenizer, REQS, method, hp, **kw)
    assert a.deltas.keys() == b.deltas.keys()
    for name in a.deltas:
        torch.testing.assert_close(b.deltas[name], a.deltas[name], rtol=1e-6, atol=1e-9)
    assert a.info["v_steps"] == b.info["v_steps"]
    b.restore()
    params = dict(mapped.named_parameters())
    assert all(torch.equal(params[n], before[n]) for n in before), "restore is not bit-exact"
    with torch.no_grad():  # the hooks still run the restored model as the plain unedited one
        a.restore()
        ids = torch.tensor([tokenizer("The river flows")["input_ids"]])
        torch.testing.assert_close(mapped(ids).logits, plain(ids).logits)


def test_statistics_of_a_device_mapped_model_equal_the_plain_ones(tokenizer, corpus, tiny_model):
    plain = tiny_model("llama")
    mapped = dispatched(copy.deepcopy(plain))
    kw = dict(n_keys=300, batch_size=4, seq_len=64, cache=False, show_progress=False)
    a = compute_layer_stats(plain, tokenizer, [0, 2], corpus, **kw)
    b = compute_layer_stats(mapped, tokenizer, [0, 2], corpus, **kw)
    for layer in (0, 2):
        assert b[layer].count == a[layer].count == 300
        assert torch.equal(b[layer].sum_kk, a[layer].sum_kk)


# ----------------------------------------------------------------------------- device lookups


def test_input_ids_go_to_the_embeddings_execution_device(tokenizer):
    model = tiny_llm("llama", len(tokenizer))
    emb = model.get_input_embeddings()
    assert input_device(model) == model_device(model) == torch.device("cpu")
    emb._hf_hook = SimpleNamespace(execution_device=1)  # accelerate's form for cuda:1
    try:
        assert input_device(model) == torch.device("cuda", 1)
        assert model_device(model) == torch.device("cuda", 1)  # what lm.py and v* send the ids to
        emb._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(), SimpleNamespace(execution_device="cuda:2")])
        assert execution_device(emb) == torch.device("cuda", 2)  # a SequentialHook's first device
    finally:
        del emb._hf_hook
    assert execution_device(nn.ReLU()) == torch.device("cpu")  # nothing to go by


# ----------------------------------------------------------------------------- load_model(device_map=...)


@pytest.fixture(scope="module")
def saved_tiny(workdir, tokenizer) -> Path:
    folder = workdir / "tiny-llama"
    tiny_llm("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_model_with_a_device_map_from_a_json_file_and_auto(saved_tiny, tmp_path, tiny_model, monkeypatch):
    reference = model_fingerprint(load_model(str(saved_tiny))[0])  # the same weights loaded plainly
    dmap = spread_map(tiny_model("llama"))
    file = tmp_path / "map.json"
    file.write_text(json.dumps(dmap))
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # a single-device map sets no hf_device_map: look at what was asked for
        seen.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    for spec in (str(file), "auto"):
        model, tok = load_model(str(saved_tiny), device_map=spec)
        assert model_fingerprint(model) == reference and tok.pad_token_id is not None
        assert not model.training and not offloaded_parameters(model)
    assert seen[-2:] == [dmap, "auto"]


def test_resolve_device_map_forms_and_refusals(tmp_path):
    assert resolve_device_map("auto") == "auto"
    assert resolve_device_map({"model.layers.0": "cpu", "lm_head": torch.device("cpu")}) == {
        "model.layers.0": "cpu", "lm_head": "cpu"}
    f = tmp_path / "m.json"
    f.write_text('{"": "cpu"}')
    assert resolve_device_map(f) == {"": "cpu"}
    bad = [{"model.layers.0": "disk"}, {}, {"x": True}, str(tmp_path / "missing.json")]
    if not torch.cuda.is_available():
        bad += [{"model.layers.0": "cuda:0"}, {"model.layers.0": 0}]
    for spec in bad:
        with pytest.raises(ConfigurationError):
            resolve_device_map(spec)
    f.write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="non-empty"):
        resolve_device_map(f)


def test_device_and_device_map_together_are_refused(saved_tiny):
    with pytest.raises(ConfigurationError, match="not both"):
        load_model(str(saved_tiny), device="cuda", device_map="auto")


# ----------------------------------------------------------------------------- offloaded weights


def test_offloaded_weights_are_refused_with_a_clear_error(tokenizer, corpus, workdir, tmp_path):
    model = tiny_llm("llama", len(tokenizer))
    dmap = spread_map(model)
    dmap["model.layers.1"] = "disk"
    model = dispatch_model(model, dmap, offload_dir=str(tmp_path / "offload"))
    off = offloaded_parameters(model)
    assert off and all(n.startswith("model.layers.1.") for n in off)
    with pytest.raises(ConfigurationError, match="offloaded"):
        model_fingerprint(model)
    with pytest.raises(ConfigurationError, match="offloaded"):
        Editor(model, tokenizer, "EMMET", small_hparams(), corpus=corpus, use_cache=False, show_progress=False)
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(EditError, match="offloaded"):
        write_weights(model, {name: torch.zeros(32, 128)})


# ----------------------------------------------------------------------------- statistics and solve devices


def test_stats_and_solve_device_options_give_the_default_edit(tokenizer, corpus, workdir):
    """On the CPU the options name the default devices: the same edit bit for bit, with everything
    kept where the options say (the GPU test moves them for real)."""
    kw = dict(corpus=corpus, stats_cache_dir=workdir / "stats", use_cache=False, show_progress=False)
    results, editors = [], []
    for opts in ({}, {"stats_device": "cpu", "solve_device": "cpu"}):
        model = tiny_llm("llama", len(tokenizer))
        ed = Editor(model, tokenizer, "AlphaEdit", small_hparams(nullspace_threshold=0.5, L2=1.0), **kw, **opts)
        results.append([ed.edit(REQS[:1]), ed.edit(REQS[1:])])  # sequential: Kp carried
        editors.append(ed)
    for a, b in zip(*results):
        assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    ed = editors[1]
    assert ed.solve_device == ed.stats.storage_device == torch.device("cpu")
    for st in ed.states.values():
        assert st.mom2.device == st.extra["P"].device == st.extra["Kp"].device == torch.device("cpu")
        assert st.extra["Kp"].shape[1] == 2


def test_an_unknown_stats_device_is_a_configuration_error(tokenizer, corpus):
    model = tiny_llm("llama", len(tokenizer))
    for bad in ("gpu", "cuda:9" if not torch.cuda.is_available() else "cuda:99"):
        with pytest.raises(ConfigurationError):
            Editor(model, tokenizer, "EMMET", small_hparams(), corpus=corpus, stats_device=bad, show_progress=False)


def test_method_memory_is_moved_back_to_the_storage_device(monkeypatch):
    """The Editor's generic step after commit: a method that leaves memory on the solve device gets it
    moved beside the statistics (here to 'meta', a device every machine has, to observe the move)."""
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    assert editing._moved(tensors, torch.device("cpu")) is tensors  # nothing to move: the same dict
    moved = editing._moved(tensors, torch.device("meta"))
    assert moved is not tensors and all(t.device.type == "meta" for t in moved.values())
    assert all(t.device.type == "cpu" for t in tensors.values())  # the caller's dict is left alone
