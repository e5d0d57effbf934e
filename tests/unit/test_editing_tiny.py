"""End-to-end edits on tiny random models: what changes, exact undo, saved deltas, errors, sequences.

Every edit here runs the real pipeline (statistics from a small corpus file, model-generated
context templates, batched v*, the closed-form solve), with small hparams so that an edit takes a
fraction of a second. Nothing is written outside pytest's temporary folders: ``use_cache=False``,
statistics in a temporary folder, and ``FASTMEMIT_CACHE`` pointed at a temporary folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from fastmemit import editing
from fastmemit.editing import Editor, EditResult, TargetCache, apply_deltas, edit
from fastmemit.errors import DeltaMismatchError, EditError, StatisticsError
from fastmemit.keys_values import keys_and_outputs, rewrite_rows
from fastmemit.methods import EditHparams, get_method
from fastmemit.models.arch import as_math, get_arch, mlp_down_weight
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.requests import EditRequest
from fastmemit.stats import provider
from tests.helpers import ALL_VARIANTS, HIDDEN, INNER, small_hparams, tiny_llm, write_tiny_corpus

REQ = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
       "target_true": "French"}
# the research code's record form, with nested {"str": ...} targets
REQ_CF = {"case_id": 7, "requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda",
                                              "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}}}




pytestmark = pytest.mark.usefixtures("private_cache")

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("editing")




@pytest.fixture(scope="module")
def corpus(workdir, tokenizer) -> Path:
    """60 documents of words and decoded random token ids.

    The random tokens matter: in parallel blocks (GPT-J, NeoX) layer 0's keys depend on the token
    alone, so E[k kᵀ] from 2·d_k keys is full rank only if they hold more than d_k distinct tokens.
    """
    return write_tiny_corpus(workdir / "corpus.jsonl", tokenizer)


@pytest.fixture
def run(tokenizer, corpus, workdir):
    """``run(model, requests, method, hparams)``: edit() with the test corpus and no user cache."""

    def go(model, requests, method="EMMET", hparams=None, **kw) -> EditResult:
        hp = small_hparams() if hparams is None else hparams
        return edit(model, tokenizer, requests, method, hp, corpus=corpus, stats_cache_dir=workdir / "stats",
                    use_cache=False, show_progress=False, **kw)

    return go


def make_editor(model, tok, corpus, workdir, method="EMMET", hparams=None) -> Editor:
    return Editor(model, tok, method, small_hparams() if hparams is None else hparams, corpus=corpus,
                  stats_cache_dir=workdir / "stats", use_cache=False, show_progress=False)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(model, snap: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == snap.keys()
    different = [n for n, p in params.items() if not torch.equal(p.detach(), snap[n])]
    assert not different, f"parameters changed: {different}"


def edited_names(model, layers) -> list[str]:
    return [mlp_down_weight(model, layer)[0] for layer in layers]


# ----------------------------------------------------------------------------- one edit, inspected


class Case:
    """One EMMET edit of two requests on a fresh tiny model, with everything needed to inspect it."""

    def __init__(self, arch: str, tok: Any, run) -> None:
        self.arch = arch
        self.model = tiny_llm(arch, len(tok))
        self.pristine = copy.deepcopy(self.model)
        self.before = snapshot(self.model)
        self.requests = [dict(REQ), copy.deepcopy(REQ_CF)]
        self.requests_copy = copy.deepcopy(self.requests)
        self.hp = EditHparams.from_dict(small_hparams())
        self.hp_copy = copy.deepcopy(self.hp)
        self.names = edited_names(self.model, self.hp.layers)
        self.result = run(self.model, self.requests, "EMMET", self.hp)
        self.after = snapshot(self.model)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request, tokenizer, corpus, workdir) -> Case:
    def go(model, requests, method, hp):
        return edit(model, tokenizer, requests, method, hp, corpus=corpus, stats_cache_dir=workdir / "stats",
                    use_cache=False, show_progress=False)

    return Case(request.param, tokenizer, go)


def test_edit_changes_exactly_the_edited_weights(case):
    assert sorted(case.result.deltas) == sorted(case.names)
    for name, before in case.before.items():
        if name in case.names:
            delta = case.result.deltas[name]
            assert delta.shape == before.shape and delta.dtype == before.dtype  # stored orientation (Conv1D too)
            assert not torch.equal(case.after[name], before), f"{name} was not edited"
            assert torch.equal(case.after[name], before + delta)
        else:
            assert torch.equal(case.after[name], before), f"{name} changed but is not an edited weight"


def test_restore_returns_every_parameter_bit_exactly(case):
    case.result.restore()
    assert_params_equal(case.model, case.before)


def test_saved_deltas_reapply_bit_exactly_on_a_fresh_copy(case, tmp_path):
    path = case.result.save(tmp_path / "d.safetensors")
    fresh = copy.deepcopy(case.pristine)
    applied = apply_deltas(fresh, path)
    assert_params_equal(fresh, case.after)
    assert applied.method == "EMMET" and applied.fingerprint == case.result.fingerprint
    applied.restore()  # the result of apply_deltas undoes too
    assert_params_equal(fresh, case.before)


def test_saved_file_metadata_has_method_hparams_requests_fingerprint(case, tmp_path):
    path = case.result.save(tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(case.names)
    assert meta["format"] == "fastmemit-deltas"
    assert meta["method"] == "EMMET"
    assert json.loads(meta["hparams"]) == case.hp.to_dict()
    reqs = json.loads(meta["requests"])
    assert [EditRequest.from_any(r) for r in reqs] == [EditRequest.from_any(r) for r in case.requests_copy]
    assert reqs[1]["target_new"] == "piano" and reqs[1]["case_id"] == 7
    assert meta["fingerprint"] == model_fingerprint(case.pristine)


def test_apply_deltas_refuses_a_different_model(case, tmp_path, tokenizer):
    path = case.result.save(tmp_path / "d.safetensors")
    other = tiny_llm(case.arch, len(tokenizer), seed=1)
    before = snapshot(other)
    with pytest.raises(DeltaMismatchError, match="were made on model"):
        apply_deltas(other, path)
    assert_params_equal(other, before)


def test_edit_does_not_mutate_the_callers_requests_or_hparams(case):
    assert case.requests == case.requests_copy
    assert case.hp == case.hp_copy
    assert case.result.hparams == case.hp.to_dict()
    # the result holds its own copy: changing it (a nested list too) leaves the caller's hparams alone
    case.result.hparams["layers"].append(99)
    try:
        assert case.hp == case.hp_copy
    finally:
        case.result.hparams["layers"].pop()


# ----------------------------------------------------------------------------- the constraint, at model level


@pytest.mark.parametrize("arch", ["llama", "gpt2_square"])
def test_emmet_without_ridge_maps_each_k_star_to_its_intended_value(arch, tokenizer, corpus, workdir, monkeypatch):
    """(W+Δ) k* = W k* + (z* − h) for every request, with k* and h recomputed on the original model.

    gpt2_square (d == d_k) is the case where a transposed Conv1D update would go unnoticed by shapes.
    """
    model = tiny_llm(arch, len(tokenizer))
    original = copy.deepcopy(model)
    targets = []
    real = editing.optimize_targets

    def spy(*args, **kwargs):
        targets.append(real(*args, **kwargs))
        return targets[-1]

    monkeypatch.setattr(editing, "optimize_targets", spy)
    editor = make_editor(model, tokenizer, corpus, workdir, hparams=small_hparams(layers=[1], emmet_lambda=0.0))
    reqs = [EditRequest.from_any(r) for r in (REQ, REQ_CF)]
    editor.edit(reqs)
    assert len(targets) == 1
    templates = editor.templates()
    rows = rewrite_rows(tokenizer, reqs, templates, "subject_last")
    K, H = keys_and_outputs(original, rows, len(reqs), len(templates), 1, 1)  # (d_k, B), (B, d)
    R = (targets[0].z - H).T  # (d, B)
    fan = get_arch(model).fan_in_fan_out
    W_old = as_math(mlp_down_weight(original, 1)[1].detach().double(), fan)  # (d, d_k)
    W_new = as_math(mlp_down_weight(model, 1)[1].detach().double(), fan)
    assert float(R.norm()) > 0
    err = (W_new @ K - (W_old @ K + R)).norm(dim=0) / R.norm(dim=0)  # (B,) relative to each change
    assert float(err.max()) < 1e-4, err


# ----------------------------------------------------------------------------- bad inputs


BAD = [
    pytest.param([{"prompt": "The mother tongue of Marie Curie is", "subject": "Danielle Darrieux", "target_new": "English"}],
                 "EMMET", {}, EditError, "subject 'Danielle Darrieux' not found in prompt", id="subject-not-in-prompt"),
    pytest.param([{**REQ, "target_new": "  "}], "EMMET", {}, EditError, "empty target_new", id="empty-target"),
    pytest.param([{k: v for k, v in REQ.items() if k != "target_new"}], "EMMET", {}, EditError,
                 r"missing field\(s\) \['target_new'\]", id="missing-target"),
    pytest.param([], "EMMET", {}, EditError, "no edit requests", id="no-requests"),
    pytest.param([REQ], "NoSuchMethod", {}, EditError, "unknown method 'NoSuchMethod'", id="unknown-method"),
    pytest.param([REQ], "EMMET", {"bogus_field": 1}, EditError, "unknown field.*bogus_field", id="unknown-field"),
    pytest.param([REQ], "EMMET", {"v_lr": "fast"}, EditError, "'v_lr'", id="wrong-type-v_lr"),
    pytest.param([REQ], "EMMET", {"layers": "1"}, EditError, "'layers'", id="wrong-type-layers"),
    pytest.param([REQ], "EMMET", {"dynamic": 1}, EditError, "'dynamic'", id="wrong-type-dynamic"),
    pytest.param([REQ], "EMMET", {"layers": [1, 3]}, EditError, r"layer\(s\) \[3\] out of range.*3 layers",
                 id="layer-out-of-range"),
    pytest.param([REQ], "ROME", {"layers": [0, 1]}, EditError, "exactly one layer", id="rome-two-layers"),
]


@pytest.mark.parametrize(("requests", "method", "changes", "error", "pattern"), BAD)
def test_bad_inputs_raise_clear_errors_and_leave_the_model_unchanged(run, tiny_model, requests, method, changes,
                                                                     error, pattern):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        run(model, requests, method, small_hparams(**changes))
    assert_params_equal(model, before)


def test_hparams_object_of_the_wrong_class_is_refused(run, tiny_model):
    with pytest.raises(EditError, match="AlphaEdit needs AlphaEditHparams"):
        run(tiny_model("llama"), [REQ], "AlphaEdit", EditHparams(layers=[1]))


@pytest.mark.parametrize("method", ["EMMET", "AlphaEdit"])
def test_nan_in_statistics_is_a_statistics_error_and_leaves_the_model_unchanged(run, tokenizer, method, monkeypatch):
    real = provider.compute_layer_stats

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        for st in stats.values():
            st.sum_kk = st.sum_kk.clone()
            st.sum_kk[3, 5] = float("nan")  # upper triangle only: eigh (AlphaEdit) reads the lower one
        return stats

    monkeypatch.setattr(provider, "compute_layer_stats", poisoned)
    model = tiny_llm("llama", len(tokenizer))
    before = snapshot(model)
    with pytest.raises(StatisticsError, match="layer 0.* statistics contains? NaN"):
        run(model, [REQ], method)
    assert_params_equal(model, before)


@pytest.mark.parametrize("method", ["EMMET", "AlphaEdit"])
def test_an_exception_midway_restores_the_model_and_the_method_state(tokenizer, corpus, workdir, method, monkeypatch):
    model = tiny_llm("llama", len(tokenizer))
    before = snapshot(model)
    m = get_method(method)
    real = m.layer_delta
    calls: list[int] = []

    def flaky(hp, state, K, R, W):
        calls.append(state.layer)
        if len(calls) == 2:
            raise RuntimeError("solver exploded on the second layer")
        return real(hp, state, K, R, W)

    monkeypatch.setattr(m, "layer_delta", flaky)
    editor = make_editor(model, tokenizer, corpus, workdir, method)
    with pytest.raises(RuntimeError, match="second layer"):
        editor.edit([REQ])
    assert calls == [0, 1]
    assert_params_equal(model, before)
    # the failed batch leaves no trace in the per-layer method state (AlphaEdit's earlier keys)
    assert all("Kp" not in st.extra for st in editor.states.values())
    # and the editor still works afterwards
    monkeypatch.setattr(m, "layer_delta", real)
    result = editor.edit([REQ])
    assert sorted(result.deltas) == sorted(edited_names(model, [0, 1]))
    result.restore()
    assert_params_equal(model, before)


# ----------------------------------------------------------------------------- sequences and batches


def test_sequential_edits_accumulate_and_restore_one_step_at_a_time(tokenizer, corpus, workdir):
    model = tiny_llm("gpt2", len(tokenizer))
    pristine = snapshot(model)
    editor = make_editor(model, tokenizer, corpus, workdir)
    first = editor.edit([REQ])
    after_first = snapshot(model)
    second = editor.edit([REQ_CF])
    after_second = snapshot(model)
    for name in edited_names(model, [0, 1]):
        assert not torch.equal(after_second[name], after_first[name])
        assert torch.equal(after_second[name], after_first[name] + second.deltas[name])  # on top of the first
    assert second.fingerprint == model_fingerprint_of(after_first, model)
    assert first.fingerprint != second.fingerprint
    second.restore()
    assert_params_equal(model, after_first)
    first.restore()
    assert_params_equal(model, pristine)


def model_fingerprint_of(params: dict[str, torch.Tensor], model) -> str:
    """Fingerprint of ``model`` with ``params`` loaded (model left as it was)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(params[n])
    return model_fingerprint(twin)


def test_rome_edits_the_requests_of_a_batch_one_after_another(tokenizer, corpus, workdir, monkeypatch):
    model = tiny_llm("llama", len(tokenizer))
    before = snapshot(model)
    m = get_method("ROME")
    real_delta, real_targets = m.layer_delta, editing.optimize_targets
    batch_sizes: list[tuple[str, int]] = []

    def delta_spy(hp, state, K, R, W):
        batch_sizes.append(("solve", K.shape[1]))
        return real_delta(hp, state, K, R, W)

    def targets_spy(model_, tok, requests, *args, **kwargs):
        batch_sizes.append(("v*", len(requests)))
        return real_targets(model_, tok, requests, *args, **kwargs)

    monkeypatch.setattr(m, "layer_delta", delta_spy)
    monkeypatch.setattr(editing, "optimize_targets", targets_spy)
    editor = make_editor(model, tokenizer, corpus, workdir, "ROME", small_hparams(layers=[1]))
    result = editor.edit([REQ, REQ_CF])
    assert batch_sizes == [("v*", 1), ("solve", 1), ("v*", 1), ("solve", 1)]
    (name,) = result.deltas
    assert name == edited_names(model, [1])[0]
    # two rank-one updates, the second on top of the first
    assert int(torch.linalg.matrix_rank(result.deltas[name].double(), rtol=1e-5)) == 2
    assert len(result.info["v_steps"]) == 2
    result.restore()
    assert_params_equal(model, before)


def test_batched_methods_solve_all_requests_together(tokenizer, corpus, workdir, monkeypatch):
    m = get_method("MEMIT")
    real = m.layer_delta
    seen: list[tuple[int, int]] = []

    def spy(hp, state, K, R, W):
        seen.append((state.layer, K.shape[1]))
        return real(hp, state, K, R, W)

    monkeypatch.setattr(m, "layer_delta", spy)
    model = tiny_llm("llama", len(tokenizer))
    make_editor(model, tokenizer, corpus, workdir, "MEMIT").edit([REQ, REQ_CF])
    assert seen == [(0, 2), (1, 2)]


# ----------------------------------------------------------------------------- every architecture

_METHODS = ("EMMET", "MEMIT", "ROME", "AlphaEdit")
# every architecture once; the methods rotate so that each also runs on several families
SMOKE = [(arch, _METHODS[i % len(_METHODS)]) for i, arch in enumerate(ALL_VARIANTS)]


@pytest.mark.parametrize(("arch", "method"), SMOKE, ids=[f"{a}-{m}" for a, m in SMOKE])
def test_smoke_every_architecture(arch, method, tokenizer, run):
    model = tiny_llm(arch, len(tokenizer))
    before = snapshot(model)
    layers = [1] if method == "ROME" else [0, 1]
    result = run(model, [REQ, REQ_CF], method, small_hparams(layers=layers, v_num_grad_steps=2))
    assert sorted(result.deltas) == sorted(edited_names(model, layers))
    params = dict(model.named_parameters())
    for name, delta in result.deltas.items():
        assert delta.shape == params[name].shape and torch.isfinite(delta).all()
        assert float(delta.abs().max()) > 0
        assert torch.equal(params[name].detach(), before[name] + delta)
    assert all(torch.isfinite(torch.tensor(result.info["v_nll"])))
    result.restore()
    assert_params_equal(model, before)


# ----------------------------------------------------------------------------- statistics and factors


def test_rome_without_statistics_then_memit_in_the_same_cache_dir_gives_memit_alone(tokenizer, corpus, tmp_path):
    """ROME's C without statistics is I, MEMIT's is λI: a factor cached for one must not serve the other."""

    def run_in(cache_dir: Path, method: str, hp: dict[str, Any]) -> EditResult:
        return edit(tiny_llm("llama", len(tokenizer)), tokenizer, [REQ, REQ_CF], method, hp, corpus=corpus,
                    stats_cache_dir=cache_dir, use_cache=True, show_progress=False)

    memit_hp = small_hparams(mom2_adjustment=False)
    alone = run_in(tmp_path / "alone", "MEMIT", memit_hp)
    run_in(tmp_path / "shared", "ROME", small_hparams(layers=[1], mom2_adjustment=False))
    after_rome = run_in(tmp_path / "shared", "MEMIT", memit_hp)
    assert sorted(after_rome.deltas) == sorted(alone.deltas)
    for name, delta in alone.deltas.items():
        assert torch.equal(after_rome.deltas[name], delta), name


def test_cached_factors_reproduce_the_uncached_edit(tokenizer, corpus, tmp_path):
    """A second Editor on the same cache folder reads statistics and factors and edits identically."""
    results = []
    for use_cache in (False, True, True):
        model = tiny_llm("gpt2", len(tokenizer))
        results.append(edit(model, tokenizer, [REQ, REQ_CF], "EMMET", small_hparams(update_norm_lambda=0.5),
                            corpus=corpus, stats_cache_dir=tmp_path, use_cache=use_cache, show_progress=False))
    assert len(list(tmp_path.rglob("*.chol.*.safetensors"))) == 2  # one factor per layer, written once
    for r in results[1:]:
        assert all(torch.equal(r.deltas[n], d) for n, d in results[0].deltas.items())


def _count_stats_passes(monkeypatch) -> list[list[int]]:
    passes: list[list[int]] = []
    real = provider.compute_layer_stats

    def spy(model, tok, layers, *args, **kwargs):
        passes.append(list(layers))
        return real(model, tok, layers, *args, **kwargs)

    monkeypatch.setattr(provider, "compute_layer_stats", spy)
    return passes


@pytest.mark.parametrize("method", ["EMMET", "ROME"])
def test_no_statistics_pass_when_the_method_does_not_read_them(method, tokenizer, workdir, monkeypatch, tmp_path):
    passes = _count_stats_passes(monkeypatch)
    model = tiny_llm("llama", len(tokenizer))
    before = snapshot(model)
    layers = [1] if method == "ROME" else [0, 1]
    hp = small_hparams(layers=layers, mom2_adjustment=False, recompute_stats=True)
    editor = Editor(model, tokenizer, method, hp, corpus=tmp_path / "no-such-corpus.jsonl",
                    stats_cache_dir=workdir / "stats", use_cache=False, show_progress=False)
    first = editor.edit([REQ])
    second = editor.edit([REQ_CF])
    assert passes == []
    assert all(st.mom2 is None and st.factor is not None for st in editor.states.values())
    second.restore()
    first.restore()
    assert_params_equal(model, before)


@pytest.mark.parametrize(("method", "changes", "expected"), [
    ("EMMET", {}, [[0, 1]]),
    ("EMMET", {"recompute_stats": True}, [[0, 1], [0, 1]]),
    ("AlphaEdit", {"mom2_adjustment": False}, [[0, 1]]),  # the projector reads E[k kᵀ] regardless
])
def test_one_statistics_pass_serves_every_edited_layer(method, changes, expected, tokenizer, corpus, workdir,
                                                       monkeypatch):
    passes = _count_stats_passes(monkeypatch)
    editor = make_editor(tiny_llm("llama", len(tokenizer)), tokenizer, corpus, workdir, method, small_hparams(**changes))
    editor.edit([REQ])
    editor.edit([REQ_CF])
    assert passes == expected


# ----------------------------------------------------------------------------- what the solve sees


def test_the_solve_sees_the_current_weight_and_the_weight_before_the_first_edit(tokenizer, corpus, workdir,
                                                                              monkeypatch):
    model = tiny_llm("gpt2", len(tokenizer))  # Conv1D: stored (d_k, d), so math orientation is a transpose
    fan = get_arch(model).fan_in_fan_out

    def weight(layer: int) -> torch.Tensor:
        return as_math(mlp_down_weight(model, layer)[1].detach(), fan)  # (d, d_k)

    original = {layer: weight(layer).clone() for layer in (0, 1)}
    m = get_method("MEMIT")
    real = m.layer_delta
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def spy(hp, state, K, R, W):
        seen.append((state.layer, W.clone(), state.w0, weight(state.layer).double()))
        return real(hp, state, K, R, W)

    monkeypatch.setattr(m, "layer_delta", spy)
    editor = make_editor(model, tokenizer, corpus, workdir, "MEMIT", small_hparams(recompute_stats=True))
    editor.edit([REQ])
    editor.edit([REQ_CF])  # new statistics, new LayerStates: w0 stays the weight before the first edit
    assert [s[0] for s in seen] == [0, 1, 0, 1]
    for layer, W, w0, now in seen:
        assert W.dtype == torch.float64 and W.shape == (HIDDEN, INNER) and torch.equal(W, now)
        assert w0.dtype == torch.float32 and w0.shape == (HIDDEN, INNER) and torch.equal(w0, original[layer])
        assert w0.device == mlp_down_weight(model, layer)[1].device
    assert torch.equal(seen[0][1], original[0].double())
    assert not torch.equal(seen[2][1], original[0].double())  # the second batch sees the first one's edit


# ----------------------------------------------------------------------------- z* cache, tokenization, state


def test_target_cache_serves_later_editors_and_accepts_a_plain_dict(tokenizer, corpus, workdir, monkeypatch):
    optimized: list[int] = []
    real = editing.optimize_targets

    def spy(model_, tok, requests, *args, **kwargs):
        optimized.append(len(requests))
        return real(model_, tok, requests, *args, **kwargs)

    monkeypatch.setattr(editing, "optimize_targets", spy)
    store: dict[Any, Any] = {}

    def run_with(cache, requests, **changes) -> tuple[Editor, EditResult]:
        editor = Editor(tiny_llm("llama", len(tokenizer)), tokenizer, "MEMIT", small_hparams(**changes), corpus=corpus,
                        stats_cache_dir=workdir / "stats", use_cache=False, show_progress=False, target_cache=cache)
        return editor, editor.edit(requests)

    first_editor, first = run_with(store, [REQ, REQ_CF])  # a plain dict: the storage of a TargetCache
    assert isinstance(first_editor.target_cache, TargetCache) and first_editor.target_cache.store is store
    _, second = run_with(TargetCache(store), [REQ_CF, REQ])
    assert optimized == [2] and len(store) == 2  # both z* from the cache, in the new order
    assert all(torch.equal(second.deltas[n], d) for n, d in first.deltas.items())  # same edit, same Δ
    assert second.info["v_nll"] == first.info["v_nll"][::-1] and second.timings["v"] == 0.0
    editor, _ = run_with(store, [REQ, {**REQ, "target_new": "German"}])
    assert optimized == [2, 1]  # only the new request is optimized
    unedited = tiny_llm("llama", len(tokenizer))  # the key names the weights z* was optimized on
    assert set(TargetCache.keys(unedited, [EditRequest.from_any(REQ)], editor.templates(), 1, editor.hp)) <= set(store)
    run_with(store, [REQ], v_lr=0.3)  # another v* setting: another key
    assert optimized == [2, 1, 1]


@pytest.mark.parametrize("method", ["EMMET", "ROME"])
def test_prompt_rows_are_tokenized_once_per_edit(method, tokenizer, corpus, workdir, monkeypatch):
    calls: list[int] = []
    real = editing.rewrite_rows

    def spy(tok, requests, *args, **kwargs):
        calls.append(len(requests))
        return real(tok, requests, *args, **kwargs)

    monkeypatch.setattr(editing, "rewrite_rows", spy)
    hp = small_hparams(layers=[1]) if method == "ROME" else small_hparams()
    make_editor(tiny_llm("llama", len(tokenizer)), tokenizer, corpus, workdir, method, hp).edit([REQ, REQ_CF])
    assert calls == [2]


def test_editor_state_dict_is_the_methods_memory_keyed_by_layer(tokenizer, corpus, workdir):
    model = tiny_llm("llama", len(tokenizer))
    editor = make_editor(model, tokenizer, corpus, workdir, "AlphaEdit")
    editor.edit([REQ])
    sd = editor.state_dict()
    assert sorted(sd) == ["0/Kp", "1/Kp"] and all(v.device.type == "cpu" for v in sd.values())
    resumed = make_editor(model, tokenizer, corpus, workdir, "AlphaEdit")
    resumed.load_state_dict(sd)
    assert all(torch.equal(resumed.states[layer].extra["Kp"], sd[f"{layer}/Kp"]) for layer in (0, 1))
    go_on = editor.edit([REQ_CF])
    go_on.restore()
    again = resumed.edit([REQ_CF])  # the same next batch from the restored memory: the same Δ
    assert all(torch.equal(again.deltas[n], d) for n, d in go_on.deltas.items())
    kept = resumed.states[0].extra["Kp"]
    with pytest.raises(EditError, match="'1/P'"):  # refused as a whole: layer 0's entry is not loaded either
        resumed.load_state_dict({"0/Kp": sd["1/Kp"], "1/P": torch.eye(INNER, dtype=torch.float64)})
    assert resumed.states[0].extra["Kp"] is kept
    with pytest.raises(EditError, match="'7/Kp'"):
        resumed.load_state_dict({"7/Kp": sd["0/Kp"]})
    assert make_editor(model, tokenizer, corpus, workdir, "MEMIT").state_dict() == {}


def test_a_huge_v_lr_is_clamped_not_zeroed(tokenizer):
    """v_lr = 1e30 overflows the float32 norm of δ; the clamp must still scale δ to its bound instead
    of multiplying it by max_norm / inf = 0 (an edit that silently changed nothing)."""
    model = tiny_llm("llama", len(tokenizer))
    hp = EditHparams(layers=[0], v_lr=1e30, v_num_grad_steps=2, context_template_length_params=[],
                     mom2_adjustment=False, emmet_lambda=0.0)  # exact: Δ k* = R, zero only if δ was zeroed
    result = edit(model, tokenizer, [REQ], method="EMMET", hparams=hp, show_progress=False)
    # δ at its clamp bound (0.75 ‖h0‖) gives an update of order 0.1 here; a zeroed δ one of 1e-8
    assert all(torch.isfinite(d).all() and d.abs().max() > 1e-3 for d in result.deltas.values())
