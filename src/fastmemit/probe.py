"""Small read-only probes of a model: top next tokens and greedy generations (batched)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastmemit.lm import eos_ids, greedy_generate, model_device, pad_id, pad_left


@torch.no_grad()
def top_tokens(model: nn.Module, tok: Any, prompts: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """The k most likely next tokens (text, probability) after each prompt; one padded forward."""
    device = model_device(model)
    ids, mask, pos = pad_left([tok(p)["input_ids"] for p in prompts], pad_id(tok))
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (N, V)
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, k, dim=-1)
    return [[(tok.decode([int(i)]), float(p)) for p, i in zip(vals, idx)] for vals, idx in zip(top.values, top.indices)]


def generate(model: nn.Module, tok: Any, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations (text after the prompt, up to the end-of-sequence token) of each prompt."""
    if not prompts:
        return []
    rows = [tok(p)["input_ids"] for p in prompts]
    out = greedy_generate(model, rows, max_new_tokens, pad=pad_id(tok), eos=eos_ids(model, tok), batch_size=len(rows))
    return [tok.decode(t) for t in out.tokens]
