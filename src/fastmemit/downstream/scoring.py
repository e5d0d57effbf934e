"""Model-side scoring: prompt fitting, batched greedy generation, batched option log-likelihoods.

Both paths pad on the **left** with an explicit attention mask (and position ids counted from the
first real token), so every sequence ends at the same column: generation appends there, and the
option tokens of every row sit in the last columns, so only those columns' logits are computed
(``logits_to_keep``) — the LM head over the whole vocabulary is the expensive part otherwise.
The tokenizer is never modified (its padding side, pad token, ... are left alone).

Log-likelihood ranking scores ``prompt + option`` (option = " " + verbalizer) as the **mean**
log-probability of the option's tokens given everything before them — the research code's mean
token NLL, so numbers stay comparable, and the choice that does not favour options with fewer
tokens (``reduction="sum"`` is available). The prompt/option token boundary is found by
tokenizing the whole string and reading character offsets, so a BPE merge across the boundary
cannot shift it. Sequences are fed without their last option token (its logits are never
needed); identical inputs are run once — for single-token options every option of an item shares
one input, so a 4-way question costs one forward pass, not four.

Shared few-shot prefix: every prompt of a task starts with the same shots, typically 3/4 of its
tokens. When ``shared_prefix`` is given (and the model's forward takes a KV cache), the prefix is
run once (:class:`fastmemit.lm.PrefixCache`); each batch then runs only its items' remaining
tokens against a copy of that cache, with a mask ``[prefix | left padding | item]`` and positions
continuing after the prefix. A sequence whose tokens do not start exactly with the prefix's tokens
takes the plain path. The first use is checked against a plain forward pass and the cache is
abandoned (with a warning) if they disagree, so an architecture with unusual caching degrades to
slower, never to wrong.

The model is run through :mod:`fastmemit.lm`: its padding, its greedy generation, its
teacher-forced scorer and its rule for the tokens of an option after a prompt (the one v* and
the CounterFact metrics use).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmemit.downstream.base import INVALID, DownstreamError
from fastmemit.errors import EditError
from fastmemit.lm import (
    CONTEXT_ATTRS,
    PrefixCache,
    attention_window,
    eos_ids,
    greedy_generate,
    model_context,
    pad_id,
    score_continuations,
    split_continuation,
)

logger = logging.getLogger("fastmemit.downstream")

def context_length(model: nn.Module, tok: Any = None) -> int:
    """The model's context window (:func:`fastmemit.lm.model_context`); an error when unknown."""
    n = model_context(model, tok)
    if n is None:
        raise DownstreamError(
            f"cannot tell the context length of {type(model).__name__}: its config has none of "
            f"{', '.join(CONTEXT_ATTRS)}; pass max_length=..."
        )
    return n


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, restoring each module's previous training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was in flags:
            m.training = was


def _token_ids(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tok(list(texts))["input_ids"]]


# ----------------------------------------------------------------------------- prompt fitting


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    n_shots: int  # shots kept (the first n_shots of those offered)
    n_tokens: int


def fit_prompts(
    tok: Any, shot_texts: Sequence[str], questions: Sequence[str], budget: int
) -> list[FittedPrompt]:
    """``shots + question`` per question, dropping shots **from the end** until it fits ``budget`` tokens.

    ``budget`` is the context length minus the room kept for the answer. Token counts are of the
    joined text (what the model will see), not sums of separately tokenized pieces. A question
    that does not fit even alone is returned without shots (the scorers then keep its last tokens).
    """
    if budget < 1:
        raise DownstreamError(f"no room for a prompt: token budget {budget}")
    shot_texts = list(shot_texts)
    prefixes = ["".join(shot_texts[:k]) for k in range(len(shot_texts) + 1)]
    full = [prefixes[-1] + q for q in questions]
    lengths = [len(ids) for ids in _token_ids(tok, full)]  # one batched call; most prompts fit
    out: list[FittedPrompt] = []
    for q, text, n in zip(questions, full, lengths):
        k = len(shot_texts)
        while n > budget and k > 0:
            k -= 1
            text = prefixes[k] + q
            n = len(_token_ids(tok, [text])[0])
        out.append(FittedPrompt(text, k, n))
    return out


# ----------------------------------------------------------------------------- running the model


def _keep_last(ids: list[int], limit: int, what: str) -> list[int]:
    if len(ids) <= limit:
        return ids
    logger.warning("%s has %d tokens, more than the %d that fit: keeping the last %d", what, len(ids), limit, limit)
    return ids[len(ids) - limit:]


def _tolerance(model: nn.Module) -> float:
    dtype = next(model.parameters()).dtype
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _checked(prefix: PrefixCache, seqs: Sequence[Sequence[int]], tol: float) -> PrefixCache | None:
    """``prefix`` if a batch through its cache gives the next-token log-probs of plain forwards, else
    None (and a warning): scoring then runs without it."""
    diff = prefix.verify(seqs, tol)
    if not diff <= tol:
        logger.warning("shared-prefix KV cache disagrees with a plain forward (max |Δ log p| = %.3g > %.3g) "
                       "for %s: scoring without it", diff, tol, type(prefix.fwd.model).__name__)
        return None
    return prefix


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _shared_prefix(model: nn.Module, tok: Any, shared_prefix: str | None,
                   seqs: Sequence[Sequence[int]]) -> PrefixCache | None:
    """A verified cache of the longest run of the shots' tokens that the sequences share, or None.

    The shots' last token may merge with the question's first (e.g. "\n\n" + "Q"), so the prefix
    is cut where the sequences' tokens part from the shots' own; sequences that keep less than
    half of it (prompts whose shots were dropped) take the plain path.
    """
    if not shared_prefix or not seqs:
        return None
    shots = _token_ids(tok, [shared_prefix])[0]
    shared = [k for k in (_common_prefix_len(shots, s) for s in seqs) if 2 * k >= len(shots)]
    cut = min(shared, default=0)
    window = attention_window(model)
    if window is not None and window < max(len(s) for s in seqs) + 16:
        # padding between the cached prefix and an item shifts what a local window sees
        logger.info("shared prefix not used: local attention window %d is shorter than the prompts", window)
        return None
    if cut < 8 or cut < len(shots) // 2:  # too short to pay off
        return None
    try:
        prefix = PrefixCache(model, [shots[:cut]], pad_id(tok), shared=True)
    except EditError as e:
        logger.info("shared prefix not used: %s", e)
        return None
    return _checked(prefix, seqs, _tolerance(model))


# ----------------------------------------------------------------------------- generation


def _generate(
    model: nn.Module,
    tok: Any,
    encoded: Sequence[list[int]],
    gen_len: int,
    batch_size: int,
    prefix: PrefixCache | None = None,
    first_tokens: Sequence[int] = (),
    *,
    reference: bool = False,
) -> tuple[list[str], torch.Tensor]:
    """Greedy decoding of token-id prompts, longest first (little padding per batch); also the
    log-probs of ``first_tokens`` as the first new token.

    Returns (texts, (N, len(first_tokens)) float64 log-probs) — the latter is what log-likelihood
    ranking of single-token options needs, so the "both" mode shares one prefill. ``reference``:
    through ``model.generate`` (:func:`fastmemit.lm.greedy_generate` with ``reference``).
    """
    if batch_size < 1:
        raise DownstreamError("batch_size must be ≥ 1")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    rows = [encoded[i] for i in order]
    kwargs = dict(pad=pad_id(tok), eos=eos_ids(model, tok), batch_size=batch_size, first_tokens=first_tokens)
    out = greedy_generate(model, rows, gen_len, prefix=prefix, reference=reference, **kwargs)
    texts: list[str] = [""] * len(encoded)
    first = torch.empty((len(encoded), len(first_tokens)), dtype=torch.float64)
    for j, i in enumerate(order):
        texts[i] = tok.decode(out.tokens[j], skip_special_tokens=True)
        first[i] = out.first_logprobs[j]
    return texts, first


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    *,
    gen_len: int = 3,
    batch_size: int = 8,
    max_length: int | None = None,
    shared_prefix: str | None = None,
    use_generate: bool = False,
) -> list[str]:
    """Greedy continuation (``gen_len`` new tokens, fewer at EOS) of each prompt, decoded without specials.

    Batched with left padding; prompts are sorted by length so a batch wastes little padding.
    ``shared_prefix``: text every prompt starts with (the shots), run once. ``use_generate``:
    decode through ``model.generate`` instead (a reference for tests).
    """
    limit = (max_length or context_length(model, tok)) - gen_len
    encoded = [_keep_last(ids, limit, "a prompt") for ids in _token_ids(tok, prompts)]
    if use_generate:
        return _generate(model, tok, encoded, gen_len, batch_size, reference=True)[0]
    return _generate(model, tok, encoded, gen_len, batch_size, _shared_prefix(model, tok, shared_prefix, encoded))[0]


# ----------------------------------------------------------------------------- log-likelihood


def split_prompt_option(tok: Any, prompt: str, option: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + option`` split into (context, option tokens) by the one rule
    :func:`fastmemit.lm.split_continuation` (a token straddling the boundary belongs to the option)."""
    return split_continuation(tok, prompt, option)


@dataclass
class _OptionPlan:
    """The (context, option tokens) pair of every (item, option), item-major; contexts cut to fit."""

    pairs: list[tuple[list[int], list[int]]]
    n_items: int
    n_options: int

    @property
    def seqs(self) -> list[tuple[int, ...]]:
        """The distinct inputs: context + option tokens but the last (whose logits are not needed)."""
        return list(dict.fromkeys(_option_input(c, t) for c, t in self.pairs))


def _option_input(ctx: Sequence[int], cont: Sequence[int]) -> tuple[int, ...]:
    return tuple(ctx) + tuple(cont[:-1])


def _plan_options(tok: Any, prompts: Sequence[str], options: Sequence[str], limit: int) -> _OptionPlan:
    pairs = []
    for prompt in prompts:
        for opt in options:
            ctx, cont = split_prompt_option(tok, prompt, opt)
            if not cont:
                raise DownstreamError(f"option {opt!r} has no tokens after the prompt")
            if not ctx:
                raise DownstreamError("empty prompt: log-likelihood needs at least one context token")
            seq = _keep_last(ctx + cont[:-1], limit, "a prompt with its option")
            pairs.append((seq[: len(seq) - (len(cont) - 1)], cont))
    return _OptionPlan(pairs, len(prompts), len(options))


def _reduce(token_lp: torch.Tensor, reduction: str) -> float:
    return float(token_lp.mean() if reduction == "mean" else token_lp.sum())


def _score_options(
    model: nn.Module,
    tok: Any,
    plan: _OptionPlan,
    prefix: PrefixCache | None,
    *,
    batch_size: int,
    reduction: str,
    known: Mapping[tuple[int, ...], Mapping[int, float]] | None = None,
) -> torch.Tensor:
    """(items, options) float64: the plan's option log-probs reduced to scores
    (:func:`fastmemit.lm.score_continuations`, for the inputs not already in ``known``).

    ``known[seq][token]`` is the log-probability of ``token`` right after ``seq`` (from generation's
    first step); inputs all of whose readers need just that are not run again.
    """
    if reduction not in ("mean", "sum"):
        raise DownstreamError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if batch_size < 1:
        raise DownstreamError("batch_size must be ≥ 1")
    scores = torch.full((plan.n_items, plan.n_options), float("nan"), dtype=torch.float64)
    readers: dict[tuple[int, ...], list[int]] = {}
    for k, (c, t) in enumerate(plan.pairs):
        readers.setdefault(_option_input(c, t), []).append(k)
    run: list[int] = []
    for seq, ks in readers.items():
        hit = known.get(seq) if known else None
        if hit is not None and all(len(plan.pairs[k][1]) == 1 and plan.pairs[k][1][0] in hit for k in ks):
            for k in ks:
                scores[divmod(k, plan.n_options)] = hit[plan.pairs[k][1][0]]  # one token: mean = sum = its log-prob
        else:
            run += ks
    got = score_continuations(model, [plan.pairs[k] for k in run], pad=pad_id(tok), batch_size=batch_size,
                              prefix=prefix)
    for k, s in zip(run, got):
        scores[divmod(k, plan.n_options)] = _reduce(s.logprobs.double(), reduction)
    return scores


@torch.no_grad()
def option_logprobs(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    options: Sequence[str],
    *,
    batch_size: int = 8,
    reduction: str = "mean",
    max_length: int | None = None,
    shared_prefix: str | None = None,
) -> torch.Tensor:
    """(N, n_options) float64: mean (or sum) log-probability of each option's tokens after each prompt.

    ``shared_prefix``: text every prompt starts with (the shots), run once.
    """
    limit = max_length or context_length(model, tok)
    plan = _plan_options(tok, prompts, options, limit)
    prefix = _shared_prefix(model, tok, shared_prefix, plan.seqs)
    return _score_options(model, tok, plan, prefix, batch_size=batch_size, reduction=reduction)


def argmax_or_invalid(scores: torch.Tensor) -> list[int]:
    """Row-wise argmax; an exact tie for the best score (or a NaN) gives INVALID."""
    out: list[int] = []
    for row in scores:
        best = row.max()
        winners = (row == best).nonzero().flatten().tolist()
        out.append(winners[0] if len(winners) == 1 and torch.isfinite(best) else INVALID)
    return out


@dataclass
class Scored:
    """What :func:`score_prompts` found; fields of a mode not run are None."""

    continuations: list[str] | None = None
    generate_predictions: list[int] | None = None
    scores: torch.Tensor | None = None  # (N, n_options) float64
    loglik_predictions: list[int] | None = None
    generate_seconds: float = 0.0  # includes the prefill shared with log-likelihood ranking
    loglik_seconds: float = 0.0  # tokenization and whatever forward passes were not shared


@torch.no_grad()
def score_prompts(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    options: Sequence[str],
    parse: Callable[[str], int],
    *,
    generate: bool = True,
    loglik: bool = True,
    gen_len: int = 3,
    batch_size: int = 8,
    reduction: str = "mean",
    max_length: int | None = None,
    shared_prefix: str | None = None,
    share_prefill: bool = True,
) -> Scored:
    """Score prompts by generation + ``parse`` and/or by option log-likelihood.

    ``shared_prefix``: text every prompt starts with (the shots); its KV cache is computed once.
    When both modes run, generation's first step already holds the next-token distribution after
    each prompt, so single-token options whose context is exactly the generation prompt are read
    from there (``share_prefill``) and only the other options need forward passes.
    """
    limit = max_length or context_length(model, tok)
    out = Scored()
    t0 = time.perf_counter()
    plan = _plan_options(tok, prompts, options, limit) if loglik else None
    encoded = [_keep_last(ids, limit - gen_len, "a prompt") for ids in _token_ids(tok, prompts)] if generate else []
    setup_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefix = _shared_prefix(model, tok, shared_prefix, encoded or (plan.seqs if plan else []))
    prefix_seconds = time.perf_counter() - t0  # charged to the first mode run
    known: dict[tuple[int, ...], dict[int, float]] | None = None
    if generate:
        t0 = time.perf_counter()
        first_tokens: list[int] = []
        if plan is not None and share_prefill:
            first_tokens = sorted({c[0] for _, c in plan.pairs if len(c) == 1})
        texts, first = _generate(model, tok, encoded, gen_len, batch_size, prefix, first_tokens)
        if first_tokens:
            known = {tuple(e): dict(zip(first_tokens, row.tolist())) for e, row in zip(encoded, first)}
        out.continuations = texts
        out.generate_predictions = [parse(t) for t in texts]
        out.generate_seconds = time.perf_counter() - t0 + prefix_seconds
        prefix_seconds = 0.0
    if plan is not None:
        t0 = time.perf_counter()
        out.scores = _score_options(model, tok, plan, prefix, batch_size=batch_size, reduction=reduction, known=known)
        out.loglik_predictions = argmax_or_invalid(out.scores)
        out.loglik_seconds = time.perf_counter() - t0 + prefix_seconds + setup_seconds
    return out
