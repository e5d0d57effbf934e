"""Small read-only probes of a model: top next tokens and greedy generations (batched)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastmemit.keys_values import pad_left


@torch.no_grad()
def top_tokens(model: nn.Module, tok: Any, prompts: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """The k most likely next tokens (text, probability) after each prompt; one padded forward."""
    device = next(model.parameters()).device
    ids, mask, pos = pad_left([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (N, V)
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, k, dim=-1)
    return [[(tok.decode([int(i)]), float(p)) for p, i in zip(vals, idx)] for vals, idx in zip(top.values, top.indices)]


@torch.no_grad()
def generate(model: nn.Module, tok: Any, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations (text after the prompt) of each prompt, batched with left padding."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    rows = [tok(p)["input_ids"] for p in prompts]
    new: list[list[int]] = [[] for _ in rows]
    eos = tok.eos_token_id
    finished = [False] * len(rows)
    for _ in range(max_new_tokens):
        ids, mask, pos = pad_left([r + n for r, n in zip(rows, new)], tok.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       use_cache=False, logits_to_keep=1).logits[:, -1]
        nxt = logits.argmax(-1).tolist()
        for i, t in enumerate(nxt):
            if not finished[i]:
                new[i].append(int(t))
                finished[i] = t == eos
        if all(finished):
            break
    return [tok.decode([t for t in n if t != eos]) for n in new]
