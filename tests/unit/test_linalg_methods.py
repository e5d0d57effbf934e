"""The methods' closed forms against independent computations, on random float64 data.

Pure linear algebra, no model: EMMET's equality constraints hold, MEMIT is the least-squares
solution of its objective, the factored (Woodbury) solves equal the direct d_k×d_k references,
ROME is rank one and EMMET at B = 1, AlphaEdit leaves the preserved subspace alone; the error
paths name the problem; every built-in hparams file loads and bad hparams are refused.
"""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from fastmemit.errors import EditError, StatisticsError
from fastmemit.linalg import FactoredCov, direct_emmet_delta, direct_memit_delta, ridge_system_delta
from fastmemit.methods import AlphaEditHparams, EditHparams, LayerState, get_method
from fastmemit.methods.alphaedit import null_space_projector

F64 = torch.float64
# (d, d_k, B): hidden size, key size, edits per batch
SHAPES = [(8, 16, 1), (8, 16, 5), (16, 32, 8), (32, 64, 12), (24, 48, 30)]


def problem(d: int, d_k: int, B: int, seed: int = 0, n0: int | None = None) -> dict[str, torch.Tensor]:
    """Random W (d, d_k), preserved keys K0 (d_k, N0 > d_k), C0 = K0 K0ᵀ / N0, edited keys and values."""
    g = torch.Generator().manual_seed(seed)
    n0 = n0 if n0 is not None else 4 * d_k
    W = torch.randn(d, d_k, generator=g, dtype=F64)
    K0 = torch.randn(d_k, n0, generator=g, dtype=F64)
    K = torch.randn(d_k, B, generator=g, dtype=F64)
    V = torch.randn(d, B, generator=g, dtype=F64) * 3
    return {"W": W, "K0": K0, "C0": K0 @ K0.T / n0, "K": K, "V": V, "R": V - W @ K}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- EMMET / MEMIT


@pytest.mark.parametrize(("d", "d_k", "B"), SHAPES)
def test_emmet_with_mu_zero_maps_every_edited_key_to_its_value(d, d_k, B):
    p = problem(d, d_k, B)
    lam = 100.0
    delta = ridge_system_delta(p["R"], p["K"], FactoredCov(lam * p["C0"]), mu=0.0)  # (d, d_k)
    assert delta.shape == (d, d_k) and delta.dtype == F64
    assert rel((p["W"] + delta) @ p["K"], p["V"]) < 1e-6
    for i in range(B):  # each key on its own
        assert rel((p["W"] + delta) @ p["K"][:, i], p["V"][:, i]) < 1e-6


@pytest.mark.parametrize(("d", "d_k", "B"), SHAPES)
def test_emmet_factored_solve_equals_direct_reference(d, d_k, B):
    p = problem(d, d_k, B, seed=1)
    C = 50.0 * p["C0"]
    for mu in (0.0, 0.1, 3.0):
        got = ridge_system_delta(p["R"], p["K"], FactoredCov(C), mu=mu)
        assert rel(got, direct_emmet_delta(p["R"], p["K"], C, mu)) < 1e-8


@pytest.mark.parametrize(("d", "d_k", "B"), SHAPES)
def test_memit_is_the_least_squares_solution_of_its_objective(d, d_k, B):
    """argmin_Δ λ‖Δ K0‖² + ‖(W+Δ) K_E − V_E‖², solved as one stacked least-squares problem."""
    p = problem(d, d_k, B, seed=2)
    lam = 7.0
    # ‖Δ [√λ K0, K_E] − [0, R]‖²  ⇔  [√λ K0ᵀ; K_Eᵀ] Δᵀ ≈ [0; Rᵀ]
    A = torch.cat([lam**0.5 * p["K0"].T, p["K"].T])  # (N0 + B, d_k)
    b = torch.cat([torch.zeros(p["K0"].shape[1], d, dtype=F64), p["R"].T])  # (N0 + B, d)
    expected = torch.linalg.lstsq(A, b, driver="gelsd").solution.T  # (d, d_k)

    C = lam * p["K0"] @ p["K0"].T  # λ C0 with C0 = K0 K0ᵀ (un-normalized)
    got = ridge_system_delta(p["R"], p["K"], FactoredCov(C), mu=1.0)
    assert rel(got, expected) < 1e-8
    assert rel(direct_memit_delta(p["R"], p["K"], C), expected) < 1e-8
    # the method object computes the same
    state = LayerState(0, p["C0"], factor=FactoredCov(C))
    assert rel(get_method("MEMIT").layer_delta(EditHparams(layers=[0]), state, p["K"], p["R"], p["W"]), expected) < 1e-8


def test_memit_does_not_memorize_exactly_but_emmet_does():
    p = problem(16, 32, 6, seed=3)
    F = FactoredCov(1000.0 * p["C0"])  # heavy preservation: least squares trades memorization away
    memit = ridge_system_delta(p["R"], p["K"], F, mu=1.0)
    emmet = ridge_system_delta(p["R"], p["K"], F, mu=0.0)
    assert rel((p["W"] + memit) @ p["K"], p["V"]) > 1e-3
    assert rel((p["W"] + emmet) @ p["K"], p["V"]) < 1e-8


def test_solvers_accept_float32_inputs_and_compute_in_float64():
    p = problem(8, 16, 3, seed=4)
    F = FactoredCov((10.0 * p["C0"]).float())
    got = ridge_system_delta(p["R"].float(), p["K"].float(), F, mu=0.0)
    assert got.dtype == F64 and F.L.dtype == F64


# ----------------------------------------------------------------------------- ROME


@pytest.mark.parametrize(("d", "d_k"), [(8, 16), (16, 32), (32, 64)])
def test_rome_is_rank_one_and_equals_emmet_at_batch_one(d, d_k):
    p = problem(d, d_k, 1, seed=5)
    C0 = p["C0"]
    k, r = p["K"], p["R"]  # (d_k, 1), (d, 1)
    # ROME's preserved matrix: λC0 (λ cancels for B = 1); EMMET's: λC0 as well
    hp_rome = EditHparams(layers=[0], mom2_update_weight=123.0)
    hp_emmet = EditHparams(layers=[0], mom2_update_weight=123.0, emmet_lambda=0.0)
    rome, emmet = get_method("ROME"), get_method("EMMET")
    s_rome = LayerState(0, C0, factor=FactoredCov(rome.preserved_matrix(hp_rome, C0)))
    s_emmet = LayerState(0, C0, factor=FactoredCov(emmet.preserved_matrix(hp_emmet, C0)))
    d_rome = rome.layer_delta(hp_rome, s_rome, k, r, p["W"])
    d_emmet = emmet.layer_delta(hp_emmet, s_emmet, k, r, p["W"])
    assert int(torch.linalg.matrix_rank(d_rome)) == 1
    assert rel(d_rome, d_emmet) < 1e-8
    # the published formula: Δ = (v* − W k*) (C0⁻¹ k*)ᵀ / (k*ᵀ C0⁻¹ k*)
    ck = torch.linalg.solve(C0, k)  # (d_k, 1)
    assert rel(d_rome, r @ ck.T / float(k.T @ ck)) < 1e-8
    assert rel((p["W"] + d_rome) @ k, p["V"]) < 1e-8


# ----------------------------------------------------------------------------- AlphaEdit


def known_spectrum(d_k: int, n_big: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[k kᵀ] = Q diag(1.0 × n_big, 1e-4 × rest) Qᵀ: (mom2, U_big (d_k, n_big), U_small)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d_k, d_k, generator=g, dtype=F64))
    evals = torch.full((d_k,), 1e-4, dtype=F64)
    evals[:n_big] = 1.0
    return Q @ torch.diag(evals) @ Q.T, Q[:, :n_big], Q[:, n_big:]


@pytest.mark.parametrize(("d", "d_k", "n_big", "B"), [(8, 16, 10, 3), (16, 32, 20, 5), (32, 64, 40, 8)])
def test_alphaedit_update_vanishes_on_the_preserved_subspace(d, d_k, n_big, B):
    mom2, U_big, U_small = known_spectrum(d_k, n_big, seed=d)
    p = problem(d, d_k, B, seed=d)
    hp = AlphaEditHparams(layers=[0], nullspace_threshold=2e-2, L2=10.0)
    state = LayerState(0, mom2)
    delta = get_method("AlphaEdit").layer_delta(hp, state, p["K"], p["R"], p["W"])  # (d, d_k)
    assert delta.shape == (d, d_k)
    scale = float(delta.norm())
    assert scale > 1e-3  # a real update ...
    assert float((delta @ U_big).norm()) < 1e-10 * scale  # ... with Δ u = 0 for eigenvalue-1.0 directions
    g = torch.Generator().manual_seed(1)
    K0 = U_big @ torch.randn(n_big, 50, generator=g, dtype=F64)  # preserved keys in that subspace
    assert float((delta @ K0).norm()) < 1e-10 * scale * float(K0.norm())
    # the projector is exactly the span of the small-eigenvalue directions
    P = null_space_projector(mom2, 2e-2)
    assert torch.allclose(P, U_small @ U_small.T, atol=1e-10)


def test_alphaedit_commit_accumulates_earlier_keys_and_uses_them():
    d, d_k = 8, 16
    mom2, _, _ = known_spectrum(d_k, 6)
    hp = AlphaEditHparams(layers=[0], nullspace_threshold=2e-2, L2=10.0)
    m = get_method("AlphaEdit")
    state = LayerState(0, mom2)
    a, b, c = problem(d, d_k, 2, seed=1), problem(d, d_k, 3, seed=2), problem(d, d_k, 4, seed=3)
    m.commit(hp, state, a["K"])
    assert torch.equal(state.extra["Kp"], a["K"])
    m.commit(hp, state, b["K"].float())
    assert state.extra["Kp"].shape == (d_k, 5) and state.extra["Kp"].dtype == F64
    assert torch.equal(state.extra["Kp"], torch.cat([a["K"], b["K"].float().double()], dim=1))
    # the next update solves with the earlier keys: Δᵀ = (P (K Kᵀ + Kp Kpᵀ) + α I)⁻¹ P K Rᵀ
    P = null_space_projector(mom2, 2e-2)
    Kp = state.extra["Kp"]
    A = P @ (c["K"] @ c["K"].T + Kp @ Kp.T) + 10.0 * torch.eye(d_k, dtype=F64)
    expected = torch.linalg.solve(A, P @ c["K"] @ c["R"].T).T
    assert rel(m.layer_delta(hp, state, c["K"], c["R"], c["W"]), expected) < 1e-8
    without = m.layer_delta(hp, LayerState(0, mom2), c["K"], c["R"], c["W"])
    assert rel(without, expected) > 1e-6  # the earlier keys do change the answer


def test_alphaedit_with_an_empty_null_space_says_so():
    mom2, _, _ = known_spectrum(16, 16)  # every eigenvalue 1.0
    p = problem(8, 16, 2)
    with pytest.raises(EditError, match="null space is empty"):
        get_method("AlphaEdit").layer_delta(AlphaEditHparams(layers=[0]), LayerState(0, mom2), p["K"], p["R"], p["W"])


# ----------------------------------------------------------------------------- error paths


def test_factored_cov_rejects_a_singular_matrix_with_advice():
    p = problem(8, 32, 1, n0=10)  # 10 keys for d_k = 32: C0 has rank 10
    with pytest.raises(StatisticsError, match=r"singular or not positive definite.*dynamic_multiplier"):
        FactoredCov(p["C0"], name="layer 3 statistics")
    with pytest.raises(StatisticsError, match="layer 3 statistics"):
        FactoredCov(torch.zeros(4, 4, dtype=F64), name="layer 3 statistics")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_factored_cov_rejects_non_finite_matrices(bad):
    C = torch.eye(6, dtype=F64)
    C[2, 3] = C[3, 2] = bad
    with pytest.raises(StatisticsError, match="NaN or inf"):
        FactoredCov(C, name="C0")


def test_factored_cov_rejects_a_non_square_matrix():
    with pytest.raises(StatisticsError, match="must be square"):
        FactoredCov(torch.ones(3, 4, dtype=F64))


def test_duplicated_keys_with_exact_constraints_are_an_edit_error():
    p = problem(8, 16, 3)
    K = torch.cat([p["K"], p["K"][:, :1]], dim=1)  # key 0 twice
    R = torch.cat([p["R"], p["R"][:, :1] + 1.0], dim=1)  # ... with two different targets
    F = FactoredCov(p["C0"])
    with pytest.raises(EditError, match="linearly dependent"):
        ridge_system_delta(R, K, F, mu=0.0)
    assert torch.isfinite(ridge_system_delta(R, K, F, mu=0.1)).all()  # the ridge makes it solvable


def test_statistics_nearly_singular_along_the_keys_name_the_statistics_even_with_a_ridge():
    # C0 with one eigenvalue 1e-16 along a direction the keys share: Kᵀ C⁻¹ K ~ 1e16 swamps μ = 0.1
    p = problem(8, 16, 3)
    u = torch.zeros(16, dtype=F64)
    u[0] = 1.0
    C = p["C0"] - (p["C0"][0, 0] - 1e-16) * torch.outer(u, u)
    C[0, 1:] = 0.0
    C[1:, 0] = 0.0
    K = p["K"].clone()
    K[0] = 1.0  # every key along the nearly null direction
    with pytest.raises(EditError, match=r"numerically singular.*statistics C are nearly singular.*dynamic_multiplier"):
        ridge_system_delta(p["R"], K, FactoredCov(C), mu=0.1)
    assert torch.isfinite(ridge_system_delta(p["R"], K, FactoredCov(p["C0"]), mu=0.1)).all()  # well-posed C0: fine


def test_ridge_system_delta_checks_shapes():
    p = problem(8, 16, 3)
    F = FactoredCov(p["C0"])
    with pytest.raises(EditError, match="keys have dimension 15"):
        ridge_system_delta(p["R"], p["K"][:15], F, mu=0.0)
    with pytest.raises(EditError, match="2 residuals for 3 keys"):
        ridge_system_delta(p["R"][:, :2], p["K"], F, mu=0.0)


def test_emmet_refuses_more_edits_than_the_key_dimension():
    p = problem(8, 16, 17)
    state = LayerState(0, p["C0"], factor=FactoredCov(p["C0"]))
    with pytest.raises(EditError, match=r"17 equality constraints with d_k = 16"):
        get_method("EMMET").layer_delta(EditHparams(layers=[0], emmet_lambda=0.0), state, p["K"], p["R"], p["W"])


# ----------------------------------------------------------------------------- hparams

_FOLDER_METHOD = {"FastEMMET": "EMMET", "FastMEMIT": "MEMIT"}


def _builtin_files() -> list[tuple[str, str]]:
    root = resources.files("fastmemit") / "hparams"
    return sorted((d.name, f.name) for d in root.iterdir() if d.is_dir() for f in d.iterdir() if f.name.endswith(".json"))


def test_there_are_builtin_hparams_for_every_method():
    folders = {folder for folder, _ in _builtin_files()}
    assert {"ROME", "MEMIT", "EMMET", "AlphaEdit", "FastEMMET", "FastMEMIT"} <= folders


@pytest.mark.parametrize(("folder", "name"), _builtin_files(), ids=lambda v: v)
def test_every_builtin_hparams_file_loads(folder, name):
    method = get_method(_FOLDER_METHOD.get(folder, folder))
    path = resources.files("fastmemit") / "hparams" / folder / name
    hp = method.hparams_cls.from_json(str(path))
    assert type(hp) is method.hparams_cls
    assert hp.layers and all(isinstance(layer, int) for layer in hp.layers)
    assert hp.fact_token in ("subject_last", "subject_first", "last")
    if folder.startswith("Fast"):
        assert hp.dynamic is True  # FastMEMIT / FastEMMET: the reduced statistics
    if folder == "ROME":
        assert len(hp.layers) == 1


def test_hparams_unknown_field_is_named():
    with pytest.raises(EditError, match="unknown field.*'bogus_field'"):
        EditHparams.from_dict({"layers": [1], "bogus_field": 3})
    # AlphaEdit's own fields are unknown to the shared class
    with pytest.raises(EditError, match="nullspace_threshold"):
        EditHparams.from_dict({"nullspace_threshold": 0.02})
    assert AlphaEditHparams.from_dict({"nullspace_threshold": 0.02}).nullspace_threshold == 0.02
    # underscore fields are comments
    assert EditHparams.from_dict({"_note": "x", "layers": [2]}).layers == [2]


@pytest.mark.parametrize(
    ("field", "value"),
    [("layers", "5"), ("layers", [1.5]), ("layers", [True]), ("v_lr", "fast"), ("dynamic", 1),
     ("mom2_adjustment", "false"), ("v_num_grad_steps", 2.5), ("mom2_update_weight", True),
     ("context_template_length_params", [5, 1]), ("fact_token", 3)],
)
def test_hparams_wrong_type_is_named(field, value):
    with pytest.raises(EditError, match=f"'{field}"):
        EditHparams.from_dict({field: value})


def test_hparams_accept_ints_for_floats_and_integral_floats_for_ints():
    hp = EditHparams.from_dict({"v_lr": 1, "mom2_update_weight": 15000, "v_num_grad_steps": 5.0, "layers": [3.0]})
    assert hp.v_lr == 1.0 and isinstance(hp.v_lr, float)
    assert isinstance(hp.mom2_update_weight, float)
    assert hp.v_num_grad_steps == 5 and isinstance(hp.v_num_grad_steps, int)
    assert hp.layers == [3] and isinstance(hp.layers[0], int)


def test_hparams_fact_token_research_names_accepted_and_bad_ones_rejected():
    assert EditHparams.from_dict({"fact_token": "subject_subseq_last"}).fact_token == "subject_last"
    assert EditHparams.from_dict({"fact_token": "subject_subseq_first"}).fact_token == "subject_first"
    with pytest.raises(EditError, match="fact_token"):
        EditHparams.from_dict({"fact_token": "subject_middle"})


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [({"layers": []}, "layers is empty"), ({"layers": [-1]}, "non-negative"), ({"v_lr": 0}, "v_lr"),
     ({"emmet_lambda": -0.1}, "emmet_lambda"), ({"context_template_length_params": [[0, 2]]}, "context_template"),
     ({"skill_preservation": True}, "skill_preservation")],
)
def test_hparams_bad_values_are_named(changes, pattern):
    with pytest.raises(EditError, match=pattern):
        EditHparams.from_dict(changes)


def test_hparams_json_errors_name_the_file(tmp_path):
    with pytest.raises(EditError, match="does not exist"):
        EditHparams.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": [1],')
    with pytest.raises(EditError, match="bad.json.*invalid JSON"):
        EditHparams.from_json(bad)
    (tmp_path / "typo.json").write_text('{"v_lr": "fast"}')
    with pytest.raises(EditError, match="typo.json.*'v_lr'"):
        EditHparams.from_json(tmp_path / "typo.json")


def test_hparams_round_trip_and_replace_do_not_share_state():
    hp = EditHparams(layers=[1, 2])
    again = EditHparams.from_dict(hp.to_dict())
    assert again == hp
    other = hp.replace(layers=[4])
    assert other.layers == [4] and hp.layers == [1, 2]
    with pytest.raises(EditError, match="'v_lr'"):
        hp.replace(v_lr="fast")
