"""ENCORE's norm-constrained solve: the closed form, the method, and sequential edits on tiny models.

Linear algebra on random float64 data first: the factored (Woodbury) solve equals the direct
d_k×d_k reference, it minimizes the objective it states, λ_n = 0 is MEMIT bit for bit, and a
larger λ_n always gives a smaller update. Then the method on tiny random models: the anchor weight
is read in math orientation (GPT-2's Conv1D too), and ten sequential batches drift less from the
unedited weights than MEMIT's while every batch still reaches its targets. Last, PRUNE's restraint
(``prune_log_base``), which the Editor applies after any closed-form method's solve.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fastmemit.editing import Editor
from fastmemit.errors import EditError
from fastmemit.hparams_registry import builtin_hparams
from fastmemit.linalg import (
    FactoredCov,
    direct_norm_constrained_delta,
    norm_constrained_delta,
    restrain_spectrum,
    restrained_update,
    ridge_system_delta,
)
from fastmemit.methods import EditHparams, LayerState, get_method
from fastmemit.methods.encore import ENCOREHparams
from fastmemit.models.arch import as_math, get_arch, mlp_down_weight
from fastmemit.utils import read_json
from tests.helpers import SRC, small_hparams, tiny_llm, write_tiny_corpus

F64 = torch.float64
# (d, d_k, B): hidden size, key size, edits per batch
SHAPES = [(8, 16, 1), (8, 16, 5), (16, 32, 8), (24, 48, 30)]


def problem(d: int, d_k: int, B: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random W, W0 (d, d_k), C0 = K0 K0ᵀ / N0 from N0 = 4 d_k keys, edited keys K (d_k, B), residuals R (d, B)."""
    g = torch.Generator().manual_seed(seed)
    K0 = torch.randn(d_k, 4 * d_k, generator=g, dtype=F64)
    return {"W": torch.randn(d, d_k, generator=g, dtype=F64), "W0": torch.randn(d, d_k, generator=g, dtype=F64),
            "C0": K0 @ K0.T / K0.shape[1], "K": torch.randn(d_k, B, generator=g, dtype=F64),
            "R": 3 * torch.randn(d, B, generator=g, dtype=F64)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def objective(p: dict[str, torch.Tensor], lam: float, lam_n: float, delta: torch.Tensor) -> torch.Tensor:
    """λ‖Δ K0‖² (as tr(Δ λC0 Δᵀ)) + ‖Δ K − R‖² + λ_n‖W + Δ − W0‖², the stated least-squares objective."""
    preserve = torch.trace(delta @ (lam * p["C0"]) @ delta.T)
    memorize = (delta @ p["K"] - p["R"]).pow(2).sum()
    anchor = (p["W"] + delta - p["W0"]).pow(2).sum()
    return preserve + memorize + lam_n * anchor


# ----------------------------------------------------------------------------- the closed form


@pytest.mark.parametrize(("d", "d_k", "B"), SHAPES)
@pytest.mark.parametrize("mu", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("with_pull", [False, True])
def test_factored_solve_equals_the_direct_reference(d, d_k, B, mu, with_pull):
    p = problem(d, d_k, B, seed=d_k + B)
    lam_n = 2.5
    C = 40.0 * p["C0"] + lam_n * torch.eye(d_k, dtype=F64)
    pull = lam_n * (p["W0"] - p["W"]) if with_pull else None
    got = norm_constrained_delta(p["R"], p["K"], FactoredCov(C), mu, pull)
    assert got.shape == (d, d_k) and got.dtype == F64
    assert rel(got, direct_norm_constrained_delta(p["R"], p["K"], C, mu, pull)) < 1e-10


@pytest.mark.parametrize(("d", "d_k", "B"), SHAPES)
def test_the_solve_minimizes_its_stated_objective(d, d_k, B):
    p = problem(d, d_k, B, seed=3)
    lam, lam_n = 20.0, 1.5
    C = lam * p["C0"] + lam_n * torch.eye(d_k, dtype=F64)
    delta = norm_constrained_delta(p["R"], p["K"], FactoredCov(C), 1.0, lam_n * (p["W0"] - p["W"]))
    # gradient / 2 = Δ λC0 + (ΔK − R) Kᵀ + λ_n (W + Δ − W0) vanishes
    grad = delta @ (lam * p["C0"]) + (delta @ p["K"] - p["R"]) @ p["K"].T + lam_n * (p["W"] + delta - p["W0"])
    scale = (p["R"] @ p["K"].T).norm() + lam_n * (p["W0"] - p["W"]).norm()
    assert float(grad.norm() / scale) < 1e-10
    # and every perturbation costs (strictly convex)
    best = objective(p, lam, lam_n, delta)
    g = torch.Generator().manual_seed(4)
    for size in (1e-4, 1e-2, 1.0):
        E = torch.randn(d, d_k, generator=g, dtype=F64)
        assert objective(p, lam, lam_n, delta + size * E / E.norm()) > best


@pytest.mark.parametrize(("d", "d_k", "B"), SHAPES)
def test_equality_form_memorizes_exactly_and_is_optimal_among_exact_updates(d, d_k, B):
    p = problem(d, d_k, B, seed=5)
    lam, lam_n = 20.0, 1.5
    C = lam * p["C0"] + lam_n * torch.eye(d_k, dtype=F64)
    delta = norm_constrained_delta(p["R"], p["K"], FactoredCov(C), 0.0, lam_n * (p["W0"] - p["W"]))
    assert rel(delta @ p["K"], p["R"]) < 1e-9  # Ŵ K = V
    # perturbations that keep Ŵ K = V (rows orthogonal to the keys) only increase the objective
    Q, _ = torch.linalg.qr(p["K"], mode="complete")  # (d_k, d_k)
    null = Q[:, B:]  # (d_k, d_k − B), Kᵀ null = 0
    best = objective(p, lam, lam_n, delta)
    g = torch.Generator().manual_seed(6)
    for size in (1e-3, 1.0):
        E = torch.randn(d, d_k - B, generator=g, dtype=F64) @ null.T  # (d, d_k), E K = 0
        assert objective(p, lam, lam_n, delta + size * E / E.norm()) > best


def test_zero_norm_constraint_is_memit_and_emmet_bit_for_bit():
    p = problem(16, 32, 6, seed=7)
    C = 30.0 * p["C0"]
    F = FactoredCov(C)
    for mu in (1.0, 0.1, 0.0):
        assert torch.equal(norm_constrained_delta(p["R"], p["K"], F, mu, None), ridge_system_delta(p["R"], p["K"], F, mu))
    # through the method objects: λ_n = 0 gives MEMIT's C and no pull, whatever the anchor
    encore, memit = get_method("ENCORE"), get_method("MEMIT")
    hp_m = EditHparams(layers=[0], mom2_update_weight=30.0)
    state_m = LayerState(0, p["C0"], factor=FactoredCov(memit.preserved_matrix(hp_m, p["C0"])))
    expected = memit.layer_delta(hp_m, state_m, p["K"], p["R"], p["W"])
    for anchor in ("previous", "original"):
        hp = ENCOREHparams(layers=[0], mom2_update_weight=30.0, norm_constraint=0.0, norm_anchor=anchor,
                           add_prev_edits=False)
        state = LayerState(0, p["C0"], factor=FactoredCov(encore.preserved_matrix(hp, p["C0"])), w0=p["W0"])
        assert torch.equal(encore.layer_delta(hp, state, p["K"], p["R"], p["W"]), expected)


def test_previous_anchor_is_memit_with_the_same_ridge_on_c():
    """ENCORE's released code: the anchor is the weight before the batch, so λ_n only adds λ_n·I to λC0."""
    p = problem(16, 32, 6, seed=8)
    encore, memit = get_method("ENCORE"), get_method("MEMIT")
    hp = ENCOREHparams(layers=[0], mom2_update_weight=30.0, norm_constraint=4.0, add_prev_edits=False)
    hp_m = EditHparams(layers=[0], mom2_update_weight=30.0, update_norm_lambda=4.0)
    C, C_m = encore.preserved_matrix(hp, p["C0"]), memit.preserved_matrix(hp_m, p["C0"])
    assert torch.equal(C, C_m)
    got = encore.layer_delta(hp, LayerState(0, p["C0"], factor=FactoredCov(C)), p["K"], p["R"], p["W"])
    assert torch.equal(got, memit.layer_delta(hp_m, LayerState(0, p["C0"], factor=FactoredCov(C_m)), p["K"], p["R"], p["W"]))


@pytest.mark.parametrize("anchor", ["previous", "original"])
def test_larger_norm_constraint_always_gives_a_smaller_distance_to_the_anchor(anchor):
    p = problem(16, 32, 6, seed=9)
    lam = 30.0
    anchor_w = p["W0"] if anchor == "original" else p["W"]
    distances = []
    for lam_n in (0.0, 0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5):
        C = lam * p["C0"] + lam_n * torch.eye(32, dtype=F64)
        pull = lam_n * (p["W0"] - p["W"]) if anchor == "original" else None
        delta = norm_constrained_delta(p["R"], p["K"], FactoredCov(C), 1.0, pull)
        distances.append(float((p["W"] + delta - anchor_w).norm()))
    assert all(b < a for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[-1] < 1e-2 * distances[0]


def test_earlier_batches_keys_join_the_preserved_statistics():
    """add_prev_edits: batch t solves with C + Σ_{s<t} K_s K_sᵀ; commit never changes a tensor in place."""
    p = problem(12, 24, 4, seed=10)
    m = get_method("ENCORE")
    hp = ENCOREHparams(layers=[0], mom2_update_weight=30.0, norm_constraint=2.0)
    C = m.preserved_matrix(hp, p["C0"])
    state = LayerState(0, p["C0"], factor=FactoredCov(C))
    g = torch.Generator().manual_seed(11)
    seen = torch.zeros(24, 24, dtype=F64)
    for _ in range(3):
        K, R = torch.randn(24, 4, generator=g, dtype=F64), torch.randn(12, 4, generator=g, dtype=F64)
        got = m.layer_delta(hp, state, K, R, p["W"])
        assert rel(got, direct_norm_constrained_delta(R, K, C + seen, 1.0)) < 1e-10
        before = state.extra.get("KKp")
        kept = None if before is None else before.clone()
        m.commit(hp, state, K)
        seen = seen + K @ K.T
        assert torch.allclose(state.extra["KKp"], seen, rtol=1e-12, atol=0)
        if before is not None:
            assert torch.equal(before, kept)  # the Editor restores the old tensor after a failed batch
    off = ENCOREHparams(layers=[0], add_prev_edits=False)
    m.commit(off, fresh := LayerState(0, p["C0"]), p["K"])
    assert "KKp" not in fresh.extra


def test_original_anchor_without_the_unedited_weight_is_a_clear_error():
    p = problem(8, 16, 2)
    m = get_method("ENCORE")
    hp = ENCOREHparams(layers=[3], norm_anchor="original", add_prev_edits=False)
    state = LayerState(3, p["C0"], factor=FactoredCov(m.preserved_matrix(hp, p["C0"])))
    with pytest.raises(EditError, match="norm_anchor='original' needs the current and the unedited weight of layer 3"):
        m.layer_delta(hp, state, p["K"], p["R"], p["W"])


# ----------------------------------------------------------------------------- PRUNE's restraint


def test_restrain_spectrum_compresses_only_the_singular_values_above_the_cap():
    g = torch.Generator().manual_seed(12)
    U, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(20, 10, generator=g, dtype=F64))
    S = torch.tensor([50.0, 20.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.0], dtype=F64)
    D = (U * S) @ V.T  # (10, 20)
    cap = 4.0
    out = restrain_spectrum(D, cap)
    expected = torch.where(S > cap, cap + torch.log(S / cap), S)  # log_e(σ) − log_e(cap) + cap
    assert torch.allclose(torch.linalg.svdvals(out), expected, atol=1e-10)
    assert rel(out, (U * expected) @ V.T) < 1e-10  # same singular vectors
    assert rel(restrain_spectrum(D, 100.0), D) < 1e-12  # nothing above the cap: unchanged
    # base 2 compresses less than e; a small cap never enlarges a singular value
    assert torch.linalg.svdvals(restrain_spectrum(D, cap, base=2.0))[0] > torch.linalg.svdvals(out)[0]
    assert (torch.linalg.svdvals(restrain_spectrum(D, 0.2)) <= S + 1e-10).all()
    with pytest.raises(EditError, match="base > 1"):
        restrain_spectrum(D, cap, base=1.0)


def test_restrained_update_caps_the_accumulated_edit_and_leaves_small_ones_alone():
    p = problem(10, 20, 4, seed=13)
    cap = float(torch.linalg.matrix_norm(p["W0"], ord=2))
    big = 1e3 * torch.randn(10, 20, dtype=F64, generator=torch.Generator().manual_seed(1))  # far above W0's spectrum
    out = restrained_update(p["W"], p["W0"], big, cap, math.e)
    total = p["W"] + out - p["W0"]
    assert float(torch.linalg.svdvals(p["W"] + big - p["W0"])[0]) > 10 * cap
    assert rel(total, restrain_spectrum(p["W"] + big - p["W0"], cap)) < 1e-10
    small = 1e-3 * big
    assert restrained_update(p["W0"], p["W0"], small, 1e6, math.e) is small  # nothing above the cap: Δ as it was


# ----------------------------------------------------------------------------- hparams


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [({"norm_constraint": -1.0}, "norm_constraint must be non-negative"),
     ({"norm_anchor": "unedited"}, "norm_anchor must be one of previous, original"),
     ({"prune_log_base": 0.5}, "prune_log_base must be 0"),
     ({"norm_constraint": "ten"}, "'norm_constraint'"),
     ({"add_prev_edits": 1}, "'add_prev_edits'")],
)
def test_bad_encore_hparams_are_named(changes, pattern):
    with pytest.raises(EditError, match=pattern):
        ENCOREHparams.from_dict({"layers": [1], **changes})
    with pytest.raises(EditError, match="norm_constraint"):  # ENCORE's fields are unknown to the shared class
        EditHparams.from_dict({"norm_constraint": 1.0})


def test_builtin_smollm2_hparams_are_memits_plus_the_papers_norm_constraint():
    hp = builtin_hparams("ENCORE", "smollm2-135m")
    assert isinstance(hp, ENCOREHparams)
    memit = builtin_hparams("MEMIT", "smollm2-135m").to_dict()
    mine = hp.to_dict()
    assert {k: mine[k] for k in memit} == memit
    assert (hp.norm_constraint, hp.norm_anchor, hp.add_prev_edits) == (10.0, "previous", True)
    raw = read_json(SRC / "fastmemit/hparams/ENCORE/smollm2-135m.json", "hparams", EditError)
    assert "not tuned" in raw["_note"]


# ----------------------------------------------------------------------------- tiny models

NAMES = ("Anna Berg", "Carl Dunn", "Eva Frost", "Gil Hart", "Ida Jones", "Ken Lowe", "Mia North", "Oli Price",
         "Rae Stone", "Tom Upton", "Uma Vale", "Will Xu", "Yan Zell", "Abe Cole", "Bea Dart", "Cy Eames",
         "Dee Fox", "Ed Gray", "Flo Hale", "Gus Ives")
INSTRUMENTS = ("piano", "guitar", "violin", "drums", "flute", "harp", "cello", "organ", "trumpet", "banjo")
REQUESTS = [{"prompt": "{} plays the", "subject": n, "target_new": INSTRUMENTS[i % 10]} for i, n in enumerate(NAMES)]
# λ_n on the scale of the tiny models' keys (E‖k‖² ≈ 0.005 for the tiny llama, 0.4 for the tiny gpt2)
TINY_NORM = 1e-4




pytestmark = pytest.mark.usefixtures("private_cache")

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("encore")




@pytest.fixture(scope="module")
def corpus(workdir, tokenizer) -> Path:
    """Words plus decoded random token ids (enough distinct tokens for a full-rank E[k kᵀ])."""
    return write_tiny_corpus(workdir / "corpus.jsonl", tokenizer)


def editor(model, tok, corpus, workdir, method: str, **changes: Any) -> Editor:
    return Editor(model, tok, method, small_hparams(**changes), corpus=corpus, stats_cache_dir=workdir / "stats",
                  use_cache=False, show_progress=False)


class Recorder:
    """Wraps a method's layer_delta for one test: records (layer, K, R, W, w0, Δ) of every solve."""

    def __init__(self, method_name: str, monkeypatch) -> None:
        self.calls: list[dict[str, Any]] = []
        m = get_method(method_name)
        real = m.layer_delta

        def spy(hp, state, K, R, W):
            delta = real(hp, state, K, R, W)
            w0 = None if state.w0 is None else state.w0.clone()
            self.calls.append({"layer": state.layer, "K": K, "R": R, "W": W.clone(), "w0": w0, "delta": delta})
            return delta

        monkeypatch.setattr(m, "layer_delta", spy)


def math_weights(model, layers) -> dict[int, torch.Tensor]:
    fan = get_arch(model).fan_in_fan_out
    return {layer: as_math(mlp_down_weight(model, layer)[1].detach().double(), fan).clone() for layer in layers}


def test_zero_norm_constraint_edits_a_tiny_model_exactly_like_memit(tokenizer, corpus, workdir):
    a, b = tiny_llm("llama", len(tokenizer)), tiny_llm("llama", len(tokenizer))
    memit = editor(a, tokenizer, corpus, workdir, "MEMIT").edit(REQUESTS[:2])
    encore = editor(b, tokenizer, corpus, workdir, "ENCORE", norm_constraint=0.0, add_prev_edits=False,
                    norm_anchor="original").edit(REQUESTS[:2])
    assert memit.deltas.keys() == encore.deltas.keys()
    assert all(torch.equal(memit.deltas[n], encore.deltas[n]) for n in memit.deltas)


def test_original_anchor_reads_the_unedited_weight_in_math_orientation(tokenizer, corpus, workdir, monkeypatch):
    """gpt2_square: d == d_k, so a transposed Conv1D weight would not show in the shapes."""
    model = tiny_llm("gpt2_square", len(tokenizer))
    pristine = math_weights(model, [0, 1])
    rec = Recorder("ENCORE", monkeypatch)
    ed = editor(model, tokenizer, corpus, workdir, "ENCORE", norm_constraint=TINY_NORM, norm_anchor="original",
                add_prev_edits=False)
    ed.edit(REQUESTS[:2])
    after_first = math_weights(model, [0, 1])
    ed.edit(REQUESTS[2:4])
    second = rec.calls[2:]
    assert [c["layer"] for c in second] == [0, 1]
    for c in second:
        assert torch.equal(c["w0"].double(), pristine[c["layer"]]) and torch.equal(c["W"], after_first[c["layer"]])
        C = ed.states[c["layer"]].factor.C
        P = TINY_NORM * (pristine[c["layer"]] - after_first[c["layer"]])
        assert rel(c["delta"], direct_norm_constrained_delta(c["R"], c["K"], C, 1.0, P)) < 1e-8
    # the model holds W0 + the two batches' deltas
    now = math_weights(model, [0, 1])
    first = {c["layer"]: c["delta"] for c in rec.calls[:2]}
    for c in second:
        assert torch.allclose(now[c["layer"]], pristine[c["layer"]] + first[c["layer"]] + c["delta"], atol=1e-6)


def sequential_run(model, tok, corpus, workdir, monkeypatch, method: str, **changes: Any):
    """Ten batches of two requests on ``model``: per batch ‖W − W0‖_F over the edited layers and, at the last
    edited layer, the gap to z* left after the edit relative to the gap before it (‖ΔK − R‖ / ‖R‖)."""
    layers = small_hparams(**changes)["layers"]
    w0 = math_weights(model, layers)
    rec = Recorder(method, monkeypatch)
    ed = editor(model, tok, corpus, workdir, method, **changes)
    drift, gap = [], []
    for b in range(10):
        rec.calls.clear()
        ed.edit(REQUESTS[2 * b: 2 * b + 2])
        now = math_weights(model, layers)
        drift.append(math.sqrt(sum(float((now[layer] - w0[layer]).norm()) ** 2 for layer in layers)))
        last = rec.calls[-1]
        gap.append(float((last["delta"] @ last["K"] - last["R"]).norm() / last["R"].norm()))
    monkeypatch.undo()
    return drift, gap


@pytest.mark.parametrize("anchor", ["previous", "original"])
def test_ten_sequential_batches_drift_less_than_memit_and_still_reach_their_targets(tokenizer, corpus, workdir,
                                                                                    monkeypatch, anchor):
    base = tiny_llm("llama", len(tokenizer))
    memit_drift, memit_gap = sequential_run(copy.deepcopy(base), tokenizer, corpus, workdir, monkeypatch, "MEMIT")
    drift, gap = sequential_run(copy.deepcopy(base), tokenizer, corpus, workdir, monkeypatch, "ENCORE",
                                norm_constraint=TINY_NORM, norm_anchor=anchor)
    assert all(mine < theirs for mine, theirs in zip(drift, memit_drift, strict=True)), (drift, memit_drift)
    assert drift[-1] < 0.85 * memit_drift[-1]
    # the edits still take: the last layer closes most of its gap to z*, nearly as much as MEMIT's
    assert max(gap) < 0.5, gap
    assert max(g - m for g, m in zip(gap, memit_gap, strict=True)) < 0.15, (gap, memit_gap)
    if anchor == "original":  # the pull back to W0 bounds the drift: the last five batches add little
        assert drift[-1] - drift[4] < 0.5 * (memit_drift[-1] - memit_drift[4])


# large edits on a tiny model (big δ, weak preservation): the accumulated edits' top singular values (4–25)
# are far above σ_max(W0) ≈ 0.33 + ln(σ / σ_max(W0)), so PRUNE's logarithmic map changes them
BIG_EDITS = {"clamp_norm_factor": 4.0, "v_lr": 1.0, "mom2_update_weight": 1e-3}
PRUNE_CASES = {"EMMET": {}, "MEMIT": {}, "AlphaEdit": {"L2": 1e-3}, "ENCORE": {"norm_constraint": TINY_NORM}}


@pytest.mark.parametrize("method", list(PRUNE_CASES))
def test_prune_restrains_every_closed_form_methods_accumulated_edit(tokenizer, corpus, workdir, monkeypatch, method):
    """prune_log_base is a projection after any method's solve: after each of two sequential batches, every
    edited layer holds W0 + PRUNE(W + Δ − W0) with Δ the method's own solve and cap σ_max(W0)."""
    model = tiny_llm("llama", len(tokenizer))
    layers = small_hparams()["layers"]
    w0 = math_weights(model, layers)
    cap = {layer: float(torch.linalg.matrix_norm(w0[layer], ord=2)) for layer in layers}
    rec = Recorder(method, monkeypatch)
    ed = editor(model, tokenizer, corpus, workdir, method, prune_log_base=math.e, **BIG_EDITS, **PRUNE_CASES[method])
    for b in range(2):
        rec.calls.clear()
        ed.edit(REQUESTS[2 * b : 2 * b + 2])
        now = math_weights(model, layers)
        assert [c["layer"] for c in rec.calls] == layers
        for c in rec.calls:
            raw = c["W"] + c["delta"] - w0[c["layer"]]  # (d, d_k) the accumulated edit the solve alone would give
            top_raw = float(torch.linalg.svdvals(raw)[0])
            tamed = cap[c["layer"]] + math.log(top_raw / cap[c["layer"]])
            assert top_raw > tamed + 0.5  # PRUNE's map changes this edit
            want = w0[c["layer"]] + restrain_spectrum(raw, cap[c["layer"]])
            assert rel(now[c["layer"]], want) < 1e-5, (method, b, c["layer"])
            assert float(torch.linalg.svdvals(now[c["layer"]] - w0[c["layer"]])[0]) <= tamed + 1e-4


def test_prune_is_refused_for_ft_before_any_work(tokenizer, corpus, workdir):
    model = tiny_llm("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EditError, match="prune_log_base: FT fits its weights"):
        Editor(model, tokenizer, "FT", {"layers": [0], "prune_log_base": math.e}, show_progress=False).edit(REQUESTS[:1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failed_batch_leaves_the_carried_keys_as_they_were_and_checkpoints_carry_them(tokenizer, corpus,
                                                                                       workdir, monkeypatch):
    model = tiny_llm("llama", len(tokenizer))
    ed = editor(model, tokenizer, corpus, workdir, "ENCORE", norm_constraint=TINY_NORM)
    ed.edit(REQUESTS[:2])
    kept = {layer: st.extra["KKp"].clone() for layer, st in ed.states.items()}
    saved = ed.state_dict()
    assert sorted(saved) == ["0/KKp", "1/KKp"]
    m = get_method("ENCORE")
    real = m.layer_delta
    calls = []

    def flaky(hp, state, K, R, W):
        calls.append(state.layer)
        if len(calls) == 2:
            raise RuntimeError("boom on the second layer")
        return real(hp, state, K, R, W)

    monkeypatch.setattr(m, "layer_delta", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        ed.edit(REQUESTS[2:4])
    assert all(torch.equal(ed.states[layer].extra["KKp"], kept[layer]) for layer in kept)
