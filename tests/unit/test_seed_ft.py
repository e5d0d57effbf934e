"""FT (the seed's constrained fine-tuning baseline) through the Editor: the ‖ΔW‖∞ bound holds, undo is
bit-exact, saved deltas re-apply exactly, sequential batches are bounded around each batch's start,
the maths equal the seed's loop (Adam on W with weight decay, clipped around W_before), and MEND is
refused by name."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from fastmemit.editing import Editor, apply_deltas
from fastmemit.errors import EditError
from fastmemit.lm import target_ids
from fastmemit.methods import FTHparams, get_method
from fastmemit.methods.ft import _rows
from fastmemit.models.arch import mlp_down_weight
from fastmemit.requests import EditRequest
from tests.helpers import tiny_llm

REQS = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
        {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"},
        {"prompt": "{} is located in", "subject": "Edwin of Northumbria", "target_new": "Paris"}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread."""


def ft_hparams(**changes: Any) -> dict[str, Any]:
    return {"layers": [1], "num_steps": 6, "lr": 5e-3, "norm_constraint": 2e-3, **changes}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), snap[n])]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ft_edits_only_the_down_projection_within_the_bound_and_undoes_bit_exactly(arch, tokenizer):
    model = tiny_llm(arch, len(tokenizer))
    before = snapshot(model)
    name, _ = mlp_down_weight(model, 1)
    result = Editor(model, tokenizer, "FT", ft_hparams(), show_progress=False).edit(REQS)
    assert changed(model, before) == [name]
    step = model.get_parameter(name).detach() - before[name]
    assert float(step.abs().max()) <= 2e-3 * (1 + 1e-5)  # ‖ΔW‖∞ ≤ norm_constraint (float32 rounding aside)
    assert float(step.abs().max()) > 1e-3  # the bound is reached: the fit moved the weights
    assert set(result.deltas) == {name} and result.method == "FT"
    assert result.info["ft_loss"][-1] < result.info["ft_loss"][0]
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # nothing left on the model
    edited = snapshot(model)
    result.restore()
    assert changed(model, before) == []  # bit-exact undo
    result.apply()
    assert changed(model, edited) == []


def test_ft_deltas_save_and_reapply_exactly(tokenizer, tmp_path):
    model = tiny_llm("gpt2", len(tokenizer))
    result = Editor(model, tokenizer, "FT", ft_hparams(layers=[0, 2]), show_progress=False).edit(REQS[:2])
    edited = snapshot(model)
    result.save(tmp_path / "ft.safetensors")
    fresh = tiny_llm("gpt2", len(tokenizer))
    apply_deltas(fresh, tmp_path / "ft.safetensors")
    assert changed(fresh, edited) == []


def test_sequential_ft_bounds_each_batch_around_the_weights_it_started_from(tokenizer):
    model = tiny_llm("llama", len(tokenizer))
    name, _ = mlp_down_weight(model, 1)
    editor = Editor(model, tokenizer, "FT", ft_hparams(), show_progress=False)
    w0 = model.get_parameter(name).detach().clone()
    editor.edit(REQS[:1])
    w1 = model.get_parameter(name).detach().clone()
    second = editor.edit(REQS[1:])
    w2 = model.get_parameter(name).detach().clone()
    assert float((w2 - w1).abs().max()) <= 2e-3 * (1 + 1e-5)
    assert float((w2 - w0).abs().max()) > 2e-3  # two batches may move a weight twice the bound, as in the seed
    second.restore()
    assert torch.equal(model.get_parameter(name).detach(), w1)


def test_unconstrained_ft_may_leave_the_bound(tokenizer):
    model = tiny_llm("llama", len(tokenizer))
    before = snapshot(model)
    Editor(model, tokenizer, "FT", ft_hparams(norm_constraint=False, num_steps=8), show_progress=False).edit(REQS)
    name, _ = mlp_down_weight(model, 1)
    assert float((model.get_parameter(name).detach() - before[name]).abs().max()) > 2e-3


def _seed_loop(model: torch.nn.Module, tok: Any, hp: FTHparams, name: str) -> None:
    """The seed's execute_ft on one weight: Adam on W itself (weight decay in Adam), the loss as fastmemit
    tokenizes it, clipped to W_before ± norm_constraint after every chunk."""
    W = model.get_parameter(name)
    w_before = W.detach().clone()
    for p in model.parameters():
        p.requires_grad_(p is W)
    opt = torch.optim.Adam([W], lr=hp.lr, weight_decay=hp.weight_decay)
    rows = _rows(tok, [EditRequest.from_any(r) for r in REQS], hp.ft_loss)
    for _ in range(hp.num_steps):
        total = 0.0
        for i in range(0, len(rows), hp.batch_size):
            chunk = rows[i:i + hp.batch_size]
            opt.zero_grad()
            losses = []
            for r in chunk:  # one row at a time: no padding in the reference
                logp = torch.log_softmax(model(input_ids=torch.tensor([r.ids])).logits[0].float(), -1)
                losses.append(-logp[r.at, r.target].mean())
            loss = torch.stack(losses).mean()
            total += float(loss.detach()) * len(chunk)
            if float(loss.detach()) >= 1e-2:
                loss.backward()
                opt.step()
            with torch.no_grad():
                W.copy_(torch.clamp(W, w_before - hp.norm_constraint, w_before + hp.norm_constraint))
        if total / len(rows) < 1e-2:
            break


@pytest.mark.parametrize("loss", ["teacher_forced", "next_token"])
def test_ft_is_the_seeds_loop_adam_on_w_with_weight_decay_clipped_around_w_before(loss, tokenizer):
    hp = FTHparams(**ft_hparams(weight_decay=0.3, batch_size=2, ft_loss=loss))
    model = tiny_llm("gpt2", len(tokenizer))
    reference = copy.deepcopy(model)
    name, _ = mlp_down_weight(model, 1)
    Editor(model, tokenizer, "FT", hp, show_progress=False).edit(REQS)
    _seed_loop(reference, tokenizer, hp, name)
    ours, seeds = model.get_parameter(name).detach(), reference.get_parameter(name).detach()
    assert torch.allclose(ours, seeds, rtol=0, atol=2e-6)
    assert not torch.equal(ours, tiny_llm("gpt2", len(tokenizer)).get_parameter(name).detach())


def test_the_two_losses_agree_on_one_token_targets_and_differ_on_longer_ones(tokenizer):
    one = next(t for t in ("English", "piano", "Paris", "the", "a")
               if len(target_ids(tokenizer, "The mother tongue of Danielle Darrieux is", t)[1]) == 1)
    req = [{**REQS[0], "target_new": one}]
    results = {}
    for loss in ("teacher_forced", "next_token"):
        model = tiny_llm("llama", len(tokenizer))
        results[loss] = Editor(model, tokenizer, "FT", ft_hparams(ft_loss=loss), show_progress=False).edit(req)
    a, b = (next(iter(r.deltas.values())) for r in results.values())
    assert torch.equal(a, b)
    rows = {loss: _rows(tokenizer, [EditRequest.from_any({**REQS[1], "target_new": "grand piano player"})], loss)[0]
            for loss in ("teacher_forced", "next_token")}
    assert len(set(rows["next_token"].at)) == 1 and len(set(rows["teacher_forced"].at)) == len(rows["teacher_forced"].target) > 1


def test_ft_hparams_fields_and_refusals():
    hp = FTHparams.from_dict({"weight_decay": False, "norm_constraint": 0, "wd_power_law": [-0.8, 0.1]})
    assert (hp.weight_decay, hp.norm_constraint, hp.wd_power_law) == (0.0, False, [-0.8, 0.1])
    with pytest.raises(EditError, match="norm_constraint must be a bound > 0 or false"):
        FTHparams.from_dict({"norm_constraint": True})
    with pytest.raises(EditError, match="ft_loss must be one of teacher_forced, next_token"):
        FTHparams.from_dict({"ft_loss": "kl"})
    assert get_method("FT").fits_weights and not get_method("FT").needs_mom2(hp)


def test_mend_is_refused_by_name(tokenizer):
    with pytest.raises(EditError, match="method 'MEND' is not supported: MEND edits through a hypernetwork"):
        Editor(tiny_llm("llama", len(tokenizer)), tokenizer, "MEND", {"layers": [1]})
