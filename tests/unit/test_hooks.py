"""Hooks as context managers: what Trace records, that hooks always go away, StopForward, edits."""

from __future__ import annotations

import pytest
import torch

from fastmemit.hooks import StopForward, Trace, add_at_positions, edit_output
from fastmemit.models import get_arch, get_module
from tests.helpers import HIDDEN, INNER, N_LAYERS


def _batch(tokenizer, texts=("The river flows through the old city", "Music of the year")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _inputs(tokenizer) -> dict[str, torch.Tensor]:
    ids, mask = _batch(tokenizer)
    return {"input_ids": ids, "attention_mask": mask}


def _hook_counts(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tiny_model):
    m = tiny_model(request.param)
    assert _hook_counts(m) == 0
    yield m
    assert _hook_counts(m) == 0, "a hook outlived its context manager"


def test_trace_records_inputs_and_outputs_with_shapes(model, tokenizer):
    arch = get_arch(model)
    ids, mask = _batch(tokenizer)
    B, T = ids.shape
    names = [arch.site("mlp_down", 0), arch.site("block", 1), arch.site("final_norm")]
    with torch.no_grad(), Trace(model, names, retain_input=True, retain_output=True) as tr:
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert tr.inputs[names[0]].shape == (B, T, INNER)  # the keys
    assert tr.outputs[names[0]].shape == (B, T, HIDDEN)  # the values
    assert tr.outputs[names[1]].shape == (B, T, HIDDEN)  # block output (first tensor of a tuple if any)
    assert tr.inputs[names[2]].shape == (B, T, HIDDEN)
    # the recorded final-norm output is what the LM head sees
    head = get_module(model, arch.site("lm_head"))
    torch.testing.assert_close(head(tr.outputs[names[2]]), logits)
    assert not tr.inputs[names[0]].requires_grad


def test_trace_output_only_by_default(model, tokenizer):
    name = get_arch(model).site("mlp_down", 0)
    with torch.no_grad(), Trace(model, [name]) as tr:
        model(**_inputs(tokenizer))
    assert name in tr.outputs and tr.inputs == {}


def test_trace_detach_false_keeps_the_graph(model, tokenizer):
    name = get_arch(model).site("block", 0)
    with Trace(model, [name], detach=False) as tr:
        model(**_inputs(tokenizer))
    assert tr.outputs[name].requires_grad


def test_hooks_removed_after_exit(model, tokenizer):
    arch = get_arch(model)
    names = [arch.site("mlp_down", i) for i in range(N_LAYERS)]
    with Trace(model, names, retain_input=True, stop=True):
        assert _hook_counts(model) > 0
    assert _hook_counts(model) == 0
    for n in names:
        m = get_module(model, n)
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_hooks_removed_after_exception_in_body(model, tokenizer):
    arch = get_arch(model)
    names = [arch.site("mlp_down", 0), arch.site("block", 1)]
    with pytest.raises(RuntimeError, match="boom"), Trace(model, names, retain_input=True):
        model(**_inputs(tokenizer))
        raise RuntimeError("boom")
    assert _hook_counts(model) == 0


def test_hooks_removed_after_exception_inside_forward(model, tokenizer):
    name = get_arch(model).site("block", 0)
    with pytest.raises(ValueError, match="inside forward"), edit_output(model, name, _raise):
        with Trace(model, [get_arch(model).site("mlp_down", 0)], retain_input=True):
            model(**_inputs(tokenizer))
    assert _hook_counts(model) == 0


def _raise(_h: torch.Tensor) -> torch.Tensor:
    raise ValueError("inside forward")


def test_unknown_module_name_hooks_nothing(model):
    arch = get_arch(model)
    with pytest.raises(Exception, match="no_such_module"):
        with Trace(model, [arch.site("mlp_down", 0), "model.no_such_module"]):
            pass  # pragma: no cover
    assert _hook_counts(model) == 0


def test_stop_ends_forward_at_last_module_and_is_swallowed(model, tokenizer):
    arch = get_arch(model)
    first, last = arch.site("mlp_down", 0), arch.site("mlp_down", 1)
    fired: list[str] = []
    later = [get_module(model, arch.site("block", 2)), get_module(model, arch.site("final_norm")),
             get_module(model, last)]
    handles = [m.register_forward_hook(lambda *_a, i=i: fired.append(i)) for i, m in enumerate(later)]
    try:
        with torch.no_grad(), Trace(model, [first, last], retain_input=True, stop=True) as tr:
            out = model(**_inputs(tokenizer))
            pytest.fail(f"forward pass was not stopped (returned {type(out).__name__})")
    finally:
        for h in handles:
            h.remove()
    assert fired == []  # neither the stopped module itself nor anything after it ran
    assert tr.inputs[last].shape[-1] == INNER  # its input was still recorded
    assert first in tr.outputs and last not in tr.outputs


def test_stop_forward_is_what_stops_and_other_errors_propagate(model, tokenizer):
    name = get_arch(model).site("mlp_down", 0)
    with Trace(model, [name], stop=True):
        raise StopForward("manual")  # swallowed like the hook's own
    with pytest.raises(KeyError), Trace(model, [name], stop=True):
        raise KeyError("not swallowed")


def test_trace_needs_a_name(model):
    with pytest.raises(ValueError, match="at least one"):
        Trace(model, [])


def test_edit_output_changes_the_forward_and_is_undone(model, tokenizer):
    arch = get_arch(model)
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with edit_output(model, arch.site("mlp_down", 1), lambda v: v * 0):
            zeroed = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(base, zeroed)
    torch.testing.assert_close(base, again, rtol=0, atol=0)


def test_add_at_positions_changes_only_given_positions(model, tokenizer):
    arch = get_arch(model)
    ids, mask = _batch(tokenizer, ("one two three four five six", "seven eight nine ten", "the city"))
    B, T = ids.shape
    block = arch.site("block", 1)
    delta = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(0))  # (R, d), rows 0 and 1 only
    positions = torch.tensor([3, 1])  # (R,)
    with torch.no_grad():
        with Trace(model, [block]) as before:
            model(input_ids=ids, attention_mask=mask)
        with edit_output(model, block, add_at_positions(delta, positions)), Trace(model, [block]) as after:
            model(input_ids=ids, attention_mask=mask)
    # Trace hooks registered after the edit see the edited output
    diff = after.outputs[block] - before.outputs[block]  # (B, T, d)
    expected = torch.zeros(B, T, HIDDEN)
    expected[0, 3] = delta[0]
    expected[1, 1] = delta[1]
    torch.testing.assert_close(diff, expected, rtol=0, atol=1e-6)
    assert diff[2].abs().max() == 0  # row beyond R untouched


def test_add_at_positions_lets_gradients_reach_delta(model, tokenizer):
    arch = get_arch(model)
    ids, mask = _batch(tokenizer)
    delta = torch.zeros(1, HIDDEN, requires_grad=True)
    with edit_output(model, arch.site("block", 0), add_at_positions(delta, torch.tensor([2]))):
        loss = model(input_ids=ids, attention_mask=mask).logits[0, -1].logsumexp(-1)
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
