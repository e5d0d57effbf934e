"""Value targets on families with a norm after the MLP (Gemma 2/3), and on every other family.

- the architecture table declares the norm exactly where the model applies it;
- the norm's maps (formula, damped pseudo-inverse of its Jacobian, preimage) against autograd and
  the module itself, in float64;
- a single-layer EMMET edit (emmet_lambda 0, no context templates) on a tiny model of EVERY family
  makes the edited matrix produce the optimized value m* and the block produce z* for every request
  (relative error < 1e-4 of the change), and the model's own made-up fact becomes its top-1 answer,
  with one edited layer and with two (tiny models as in vstar_helpers.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fastmemit.errors import EditError, UnsupportedArchitectureError
from fastmemit.hooks import Trace
from fastmemit.keys_values import optimize_targets, read_layer, rewrite_rows, value_site
from fastmemit.methods import EditHparams
from fastmemit.models.arch import get_arch, get_module
from fastmemit.postnorm import PostNorm
from tests.helpers import ARCHS
from tests.unit.vstar_helpers import (
    POST_NORM,
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
    return tmp_path_factory.mktemp("postnorm")


@pytest.fixture(autouse=True)
def private_cache(workdir, monkeypatch):
    monkeypatch.setenv("FASTMEMIT_CACHE", str(workdir / "user-cache"))


@pytest.fixture(scope="module")
def corpus(workdir, tokenizer) -> Path:
    return write_corpus(workdir / "corpus.jsonl", tokenizer)


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("arch", ARCHS)
def test_post_mlp_norm_is_declared_exactly_where_the_model_normalizes_the_mlp_output(arch, tiny_model, tokenizer):
    model = tiny_model(arch)
    spec = get_arch(model)
    assert spec.has("post_mlp_norm") is (arch in POST_NORM)
    if arch not in POST_NORM:
        assert PostNorm.of(model, 1) is None
        with pytest.raises(UnsupportedArchitectureError, match="no 'post_mlp_norm' site"):
            spec.site("post_mlp_norm", 1)
        return
    down, norm = spec.site("mlp_down", 1), spec.site("post_mlp_norm", 1)
    assert get_module(model, norm) in list(get_module(model, spec.site("block", 1)).modules())
    ids = torch.tensor([tokenizer("The mother tongue of Danielle Darrieux is")["input_ids"]])
    with Trace(model, [down, norm], retain_input=True) as tr:
        model(ids)
    assert torch.equal(tr.inputs[norm], tr.outputs[down])  # the norm reads the edited matrix's output as it is


# ----------------------------------------------------------------------------- the norm's maps


@pytest.mark.parametrize("arch", POST_NORM)
def test_norm_formula_matches_the_module_and_a_wrong_offset_is_refused(arch, tokenizer):
    model = editable_model(arch, len(tokenizer))
    norm = PostNorm.of(model, 1)
    assert norm is not None and norm.eps == model.config.rms_norm_eps
    x = torch.randn(5, model.config.hidden_size, dtype=torch.float64)
    norm.check(model, x)
    module = get_module(model, norm.name)
    torch.testing.assert_close(norm(x), module(x.float()).double(), rtol=1e-5, atol=1e-5)
    wrong = PostNorm(norm.gain - 1.0, norm.eps, norm.name)  # a Llama-style gain read on a Gemma norm
    with pytest.raises(UnsupportedArchitectureError, match="norm_weight_offset"):
        wrong.check(model, x)


def _norm(d: int, seed: int = 0) -> PostNorm:
    g = torch.Generator().manual_seed(seed)
    gain = (torch.randn(d, generator=g, dtype=torch.float64) * 5 + 3).abs() + 0.5
    return PostNorm(gain, 1e-6, "norm")


def test_tangent_solve_is_the_pseudo_inverse_of_the_jacobian_on_the_tangent_space():
    d, B = 16, 3
    norm = _norm(d)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    e = torch.randn(B, d, generator=gen, dtype=torch.float64)
    dx = norm.tangent_solve(x, e, damping=0.0)  # (B, d)
    for b in range(B):
        J = torch.autograd.functional.jacobian(lambda v: norm(v[None])[0], x[b])  # (d, d)
        u = x[b] / x[b].norm()
        basis = torch.linalg.svd(torch.eye(d, dtype=torch.float64) - torch.outer(u, u)).U[:, : d - 1]  # (d, d-1) of x^⊥
        ref = basis @ torch.linalg.pinv(J @ basis) @ e[b]  # min-norm least squares within x^⊥
        torch.testing.assert_close(dx[b], ref, rtol=1e-9, atol=1e-10)
        assert abs(float(dx[b] @ u)) < 1e-10 * float(dx[b].norm())
    # damping shrinks the step most where the gain is small
    damped = norm.tangent_solve(x, e, damping=1.0)
    assert float(damped.norm()) < float(dx.norm())


def test_preimage_returns_a_reachable_targets_own_point_and_fits_a_nearby_one():
    d = 16
    norm = _norm(d, seed=2)
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(2, d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(norm.preimage(norm(t), start=t), t, rtol=0, atol=1e-12)  # m* itself
    other = t + 0.2 * torch.randn(2, d, generator=gen, dtype=torch.float64)
    x = norm.preimage(norm(other), start=t, damping=0.0)
    rel = (norm(x) - norm(other)).norm(dim=1) / (norm(other) - norm(t)).norm(dim=1)
    assert float(rel.max()) < 1e-6  # a point of the norm's image is reached, at the scale of the start
    torch.testing.assert_close(x.norm(dim=1), t.norm(dim=1), rtol=0.1, atol=0)


# ----------------------------------------------------------------------------- v* site


def test_value_site_is_the_matrix_output_exactly_where_there_is_a_post_mlp_norm(tiny_model):
    for arch in ARCHS:
        model = tiny_model(arch)
        assert value_site(model, None) == ("matrix" if arch in POST_NORM else "block")
        assert value_site(model, "matrix") == "matrix"
        assert value_site(model, None, default="matrix") == "matrix"
        if arch in POST_NORM:
            with pytest.raises(EditError, match="v_site 'block' cannot be used"):
                value_site(model, "block")
        else:
            assert value_site(model, "block") == "block"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_block_and_matrix_sites_are_the_same_perturbation_without_a_post_mlp_norm(arch, tokenizer):
    """δ added at the MLP output or at the block output changes the model the same way there: with the
    regularizers off and the same clamp scale, both sites optimize the same δ and reach the same z*."""
    model = editable_model(arch, len(tokenizer))
    reqs = made_up_requests(model, tokenizer)
    hp = EditHparams(layers=[1], v_num_grad_steps=6, fact_token="last", context_template_length_params=[],
                     v_weight_decay=0.0, kl_factor=0.0, clamp_norm_factor=1e6)
    block = optimize_targets(model, tokenizer, reqs, ["{}"], 1, hp, show_progress=False, site="block")
    matrix = optimize_targets(model, tokenizer, reqs, ["{}"], 1, hp, show_progress=False, site="matrix")
    assert block.m is None and matrix.m is not None
    torch.testing.assert_close(matrix.delta, block.delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(matrix.z, block.z, rtol=1e-4, atol=1e-5)
    rows = rewrite_rows(tokenizer, reqs, ["{}"], "last")
    reads = read_layer(model, rows, len(reqs), 1, 1, 1)
    torch.testing.assert_close(matrix.m, reads.M + matrix.delta, rtol=1e-5, atol=1e-6)  # m* = m + δ


# ----------------------------------------------------------------------------- edits on every family


def _edit(arch: str, layers: list[int], tokenizer, corpus, workdir, monkeypatch):
    model = editable_model(arch, len(tokenizer))
    original = copy.deepcopy(model)
    reqs = made_up_requests(model, tokenizer)
    result, t = edit_with_targets(model, tokenizer, reqs, edit_hparams(layers, arch), corpus, workdir / "stats",
                                  monkeypatch)
    return model, original, reqs, t, result


@pytest.mark.parametrize("arch", ARCHS)
def test_single_layer_edit_makes_the_edited_site_produce_the_optimized_value(arch, tokenizer, corpus, workdir,
                                                                             monkeypatch):
    model, original, reqs, t, result = _edit(arch, [1], tokenizer, corpus, workdir, monkeypatch)
    assert (t.m is not None) is (arch in POST_NORM)
    rows = rewrite_rows(tokenizer, reqs, ["{}"], "last")
    before = read_layer(original, rows, len(reqs), 1, 1, 1)
    after = read_layer(model, rows, len(reqs), 1, 1, 1)
    m_star = t.m if t.m is not None else before.M + t.delta  # without a norm after the MLP: δ adds to both
    change = (m_star - before.M).norm(dim=1)  # (B,)
    assert float(change.min()) > 0
    err_m = (after.M - m_star).norm(dim=1) / change
    err_z = (after.H - t.z).norm(dim=1) / (t.z - before.H).norm(dim=1)
    assert float(err_m.max()) < 1e-4, err_m
    assert float(err_z.max()) < 1e-4, err_z
    assert max(t.nll) < 0.3
    assert [rank_of_target(model, tokenizer, r) for r in reqs] == [0] * len(reqs)
    assert all(rank_of_target(original, tokenizer, r) >= 20 for r in reqs)
    result.restore()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original.parameters()))


@pytest.mark.parametrize("arch", ARCHS)
def test_two_layer_edit_makes_the_made_up_fact_the_top_answer(arch, tokenizer, corpus, workdir, monkeypatch):
    model, original, reqs, t, result = _edit(arch, [0, 1], tokenizer, corpus, workdir, monkeypatch)
    rows = rewrite_rows(tokenizer, reqs, ["{}"], "last")
    before = read_layer(original, rows, len(reqs), 1, 1, 1)
    after = read_layer(model, rows, len(reqs), 1, 1, 1)
    err_z = (after.H - t.z).norm(dim=1) / (t.z - before.H).norm(dim=1)
    # exact where the matrix output adds to the block output; through the norm, the last layer reaches the
    # point of the norm's image closest to z* (what earlier layers left off that image stays)
    assert float(err_z.max()) < (0.1 if arch in POST_NORM else 1e-4), err_z
    assert [rank_of_target(model, tokenizer, r) for r in reqs] == [0] * len(reqs)
    result.restore()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original.parameters()))
