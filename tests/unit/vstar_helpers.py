"""Helpers of the v* tests (test_postnorm.py, test_half_precision.py): tiny models whose made-up facts
an edit can make their top answer, and an edit that also returns what v* optimized.

The tiny models get a sharp LM head (an untied copy × 40) so that a target can become the argmax,
and the Gemma ones random norm gains, large after the MLP (as in gemma3-270m, whose post-MLP gains
reach ~1600), with some close to 0, so that the norm's maps are exercised on anisotropic gains.
v* uses the last prompt token as the fact token: in a random 3-layer model attention carries little
from the subject to the last position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fastmemit import editing
from fastmemit.editing import Editor, EditResult
from fastmemit.keys_values import TargetResult
from fastmemit.requests import EditRequest
from tests.helpers import tiny_llm, write_tiny_corpus

POST_NORM = ("gemma2", "gemma3_text")
PROMPTS = [("The mother tongue of {} is", "Danielle Darrieux"), ("{} plays the", "Toko Yasuda")]
WORDS = ("the a of to in is was for on that with as by at from his her it an are were which city river music "
         "year born war state team album film school university history game").split()


def write_corpus(path: Path, tok: Any) -> Path:
    """Words and decoded random token ids (enough distinct keys for a full-rank E[k kᵀ])."""
    return write_tiny_corpus(path, tok, WORDS)


def editable_model(arch: str, vocab: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny model whose LM head is sharp and, for Gemma, whose norm gains are random (see module doc)."""
    model = tiny_llm(arch, vocab)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if arch.startswith("gemma"):
            for name, p in model.named_parameters():
                if "norm" in name:
                    noise = torch.randn(p.shape, generator=gen) * 0.5  # gain 1 + w
                    p.copy_(noise * 8 + 8 if "post_feedforward" in name else noise)
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone() * 40.0)  # untied: the input embeddings stay
    return model.to(dtype)


def made_up_requests(model: torch.nn.Module, tok: Any, rank: int = 20) -> list[EditRequest]:
    """For each prompt, a new target the model ranks ``rank``-th or lower: a one-token word."""
    out = []
    for template, subject in PROMPTS:
        ids = tok(template.format(subject))["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()  # (V,)
        for t in logits.argsort(descending=True).tolist()[rank:]:
            word = tok.decode([t])
            if word.startswith(" ") and word[1:].isalpha() and tok(word, add_special_tokens=False)["input_ids"] == [t]:
                out.append(EditRequest(prompt=template, subject=subject, target_new=word.strip()))
                break
    return out


def rank_of_target(model: torch.nn.Module, tok: Any, req: EditRequest) -> int:
    """How many tokens the model ranks above the request's (one-token) target after its prompt."""
    ids = tok(req.prompt.format(req.subject))["input_ids"]
    (tid,) = tok(" " + req.target_new, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()  # (V,)
    return int((logits > logits[tid]).sum())


def edit_hparams(layers: list[int], arch: str, **changes: Any) -> dict[str, Any]:
    """EMMET without ridge and without context templates; v*'s step at the matrix output (~1e-2 in the
    tiny models) scaled to it."""
    hp: dict[str, Any] = dict(layers=layers, v_num_grad_steps=40, v_lr=0.005 if arch in POST_NORM else 0.5,
                              clamp_norm_factor=4.0, v_weight_decay=1e-3, kl_factor=0.0, fact_token="last",
                              context_template_length_params=[], emmet_lambda=0.0, dynamic=True,
                              dynamic_multiplier=2, mom2_update_weight=100, stats_seq_len=64, stats_batch_size=4)
    hp.update(changes)
    return hp


def edit_with_targets(model: torch.nn.Module, tok: Any, reqs: list[EditRequest], hp: dict[str, Any], corpus: Path,
                      stats_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[EditResult, TargetResult]:
    """An EMMET edit, and the v* result it used."""
    targets: list[TargetResult] = []
    real = editing.optimize_targets

    def spy(*args: Any, **kwargs: Any) -> TargetResult:
        targets.append(real(*args, **kwargs))
        return targets[-1]

    monkeypatch.setattr(editing, "optimize_targets", spy)
    editor = Editor(model, tok, "EMMET", hp, corpus=corpus, stats_cache_dir=stats_dir, use_cache=False,
                    show_progress=False)
    result = editor.edit(reqs)
    assert len(targets) == 1
    return result, targets[0]
