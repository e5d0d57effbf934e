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
run once; each batch then runs only its items' remaining tokens against a copy of that cache,
with a mask ``[prefix | left padding | item]`` and positions continuing after the prefix. A
sequence whose tokens do not start exactly with the prefix's tokens takes the plain path. The
first use is checked against a plain forward pass and the cache is abandoned (with a warning)
if they disagree, so an architecture with unusual caching degrades to slower, never to wrong.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmemit.downstream.base import INVALID, DownstreamError
from fastmemit.keys_values import pad_left

logger = logging.getLogger("fastmemit.downstream")

_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length", "max_seq_len")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def context_length(model: nn.Module, tok: Any = None) -> int:
    """The model's context window, read from its config (max_position_embeddings, n_positions, ...).

    Falls back to the tokenizer's ``model_max_length`` when the config names none.
    """
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        for attr in _CONTEXT_ATTRS:
            v = getattr(c, attr, None) if c is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    v = getattr(tok, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**7:  # tokenizers without a limit report ~1e30
        return v
    raise DownstreamError(
        f"cannot tell the context length of {type(model).__name__}: its config has none of "
        f"{', '.join(_CONTEXT_ATTRS)}; pass max_length=..."
    )


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


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a (B, T) id tensor and its (B, T) attention mask (the editing code's padding)."""
    ids, mask, _ = pad_left(seqs, pad_id)
    return ids.to(device), mask.to(device)


def _pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return 0  # masked out anyway


def _eos_ids(model: nn.Module, tok: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple, set)) else {int(eos)}


def _forward_kwargs(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _keep_last(ids: list[int], limit: int, what: str) -> list[int]:
    if len(ids) <= limit:
        return ids
    logger.warning("%s has %d tokens, more than the %d that fit: keeping the last %d", what, len(ids), limit, limit)
    return ids[len(ids) - limit:]


@dataclass
class _State:
    """What continuing a batch needs: its mask over all columns so far, last positions, KV cache."""

    mask: torch.Tensor  # (B, P + T)
    last_pos: torch.Tensor  # (B, 1)
    cache: Any


class _Runner:
    """Runs left-padded batches of token sequences, optionally after a shared, cached prefix."""

    def __init__(self, model: nn.Module, tok: Any, prefix_ids: Sequence[int] = ()) -> None:
        self.model = model
        self.device = model_device(model)
        self.pad = _pad_id(tok)
        accepted = _forward_kwargs(model)
        self.accepted = accepted
        self.cache_arg = next((a for a in ("cache", "past_key_values") if a in accepted), None)
        self.prefix: tuple[int, ...] = ()
        self._prefix_cache: Any = None
        if prefix_ids and self.cache_arg is not None and "position_ids" in accepted:
            self._set_prefix(tuple(prefix_ids))

    @property
    def can_step(self) -> bool:
        """Whether token-by-token decoding with a KV cache is available (else use HF generate)."""
        return self.cache_arg is not None and "position_ids" in self.accepted

    @torch.no_grad()
    def _set_prefix(self, prefix: tuple[int, ...]) -> None:
        x = torch.tensor([prefix], device=self.device)  # (1, P)
        out = self._call(x, torch.ones_like(x), None, keep=1, cache=None, use_cache=True)
        cache = _output_cache(out)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            logger.info("shared prefix not used: %s returns no expandable KV cache", type(self.model).__name__)
            return
        self.prefix, self._prefix_cache = prefix, cache

    def drop_prefix(self) -> None:
        self.prefix, self._prefix_cache = (), None

    def uses_prefix(self, seq: Sequence[int]) -> bool:
        n = len(self.prefix)
        return n > 0 and len(seq) > n and tuple(seq[:n]) == self.prefix

    def _call(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None, *, keep: int, cache: Any,
              use_cache: bool) -> Any:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if pos is not None and "position_ids" in self.accepted:
            kwargs["position_ids"] = pos
        if "logits_to_keep" in self.accepted:
            kwargs["logits_to_keep"] = keep
        if cache is not None:
            kwargs[self.cache_arg] = cache  # type: ignore[index]
        if "use_cache" in self.accepted:
            kwargs["use_cache"] = use_cache
        return self.model(**kwargs)

    @torch.no_grad()
    def forward(self, seqs: Sequence[Sequence[int]], keep: int, use_cache: bool = False,
                with_prefix: bool = False) -> tuple[torch.Tensor, _State]:
        """Logits of the last ``keep`` columns, (B, keep, V); with_prefix: every seq starts with the prefix."""
        n = len(self.prefix) if with_prefix else 0
        ids, mask = _left_pad([s[n:] for s in seqs], self.pad, self.device)  # (B, T) after the prefix
        pos = n + (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): counted from the first real token
        cache = None
        if n:
            cache = copy.deepcopy(self._prefix_cache)
            cache.batch_repeat_interleave(len(seqs))  # (1, ...) -> (B, ...)
            mask = torch.cat([torch.ones((len(seqs), n), dtype=mask.dtype, device=self.device), mask], dim=1)
        out = self._call(ids, mask, pos, keep=keep, cache=cache, use_cache=use_cache or bool(n))
        logits = out.logits[:, -keep:, :]  # (B, keep, V)
        return logits, _State(mask, pos[:, -1:], _output_cache(out) if use_cache else None)

    @torch.no_grad()
    def step(self, state: _State, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) after ``state``; returns next-token logits (B, V), updates state."""
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)  # (B, P + T + 1)
        state.last_pos = state.last_pos + 1  # (B, 1)
        out = self._call(tokens[:, None], state.mask, state.last_pos, keep=1, cache=state.cache, use_cache=True)
        state.cache = _output_cache(out)
        return out.logits[:, -1, :]

    @torch.no_grad()
    def verify_prefix(self, seqs: Sequence[Sequence[int]], tol: float) -> bool:
        """Run the longest and the shortest prefixed sequences as one padded batch through the cache and
        each alone without it; drop the prefix (and say so) if their next-token log-probs differ."""
        users = sorted((s for s in seqs if self.uses_prefix(s)), key=len)
        if not users:
            return True
        probe = [users[-1], users[0]] if len(users) > 1 else [users[0]]
        a, _ = self.forward(probe, keep=1, with_prefix=True)  # (≤2, 1, V)
        b = torch.cat([self.forward([s], keep=1, with_prefix=False)[0] for s in probe])  # (≤2, 1, V)
        diff = float((torch.log_softmax(a.float(), -1) - torch.log_softmax(b.float(), -1)).abs().max())
        if not diff <= tol:
            logger.warning("shared-prefix KV cache disagrees with a plain forward (max |Δ log p| = %.3g > %.3g) "
                           "for %s: scoring without it", diff, tol, type(self.model).__name__)
            self.drop_prefix()
            return False
        return True


def _attention_window(model: nn.Module) -> int | None:
    """The smallest local-attention window of the model's config, if any (sliding or chunked attention)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    windows = []
    sw = getattr(cfg, "sliding_window", None)
    if isinstance(sw, int) and sw > 0 and getattr(cfg, "use_sliding_window", True) is not False:
        windows.append(sw)
    chunk = getattr(cfg, "attention_chunk_size", None)
    if isinstance(chunk, int) and chunk > 0:
        windows.append(chunk)
    return min(windows) if windows else None


def _output_cache(out: Any) -> Any:
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


def _tolerance(model: nn.Module) -> float:
    dtype = next(model.parameters()).dtype
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _batches(runner: _Runner, order: Sequence[int], seqs: Sequence[Sequence[int]],
             batch_size: int) -> Iterator[tuple[list[int], bool]]:
    """Batches of indices (longest first), never mixing prefix and plain sequences."""
    with_p = [i for i in order if runner.uses_prefix(seqs[i])]
    plain = [i for i in order if not runner.uses_prefix(seqs[i])]
    for group, flag in ((with_p, True), (plain, False)):
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size], flag


# ----------------------------------------------------------------------------- generation


def _generate(
    runner: _Runner,
    tok: Any,
    encoded: Sequence[list[int]],
    gen_len: int,
    batch_size: int,
    first_tokens: Sequence[int] = (),
) -> tuple[list[str], torch.Tensor]:
    """Greedy decoding of token-id prompts; also the log-probs of ``first_tokens`` as the first new token.

    Returns (texts, (N, len(first_tokens)) float64 log-probs) — the latter is what log-likelihood
    ranking of single-token options needs, so the "both" mode shares one prefill. Decodes step by
    step with the KV cache (needed for the shared prefix) when the model allows it, else with
    ``model.generate``.
    """
    if batch_size < 1:
        raise DownstreamError("batch_size must be ≥ 1")
    if not runner.can_step:
        return _hf_generate(runner.model, tok, encoded, gen_len, batch_size, first_tokens)
    eos = _eos_ids(runner.model, tok)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # little padding per batch
    texts: list[str] = [""] * len(encoded)
    first = torch.empty((len(encoded), len(first_tokens)), dtype=torch.float64)
    wanted = torch.tensor(list(first_tokens), dtype=torch.long, device=runner.device)
    for idx, with_prefix in _batches(runner, order, encoded, batch_size):
        logits, state = runner.forward([encoded[i] for i in idx], keep=1, use_cache=True, with_prefix=with_prefix)
        step_logits = logits[:, -1, :]  # (B, V)
        if first_tokens:
            first[idx] = torch.log_softmax(step_logits.float(), dim=-1)[:, wanted].double().cpu()
        new = []
        done = torch.zeros(len(idx), dtype=torch.bool)
        for t in range(gen_len):
            nxt = step_logits.argmax(dim=-1)  # (B,) greedy
            new.append(nxt.cpu())
            done |= torch.tensor([int(x) in eos for x in new[-1]], dtype=torch.bool)
            if t == gen_len - 1 or bool(done.all()):
                break
            step_logits = runner.step(state, nxt)
        gen = torch.stack(new, dim=1).tolist()  # (B, ≤ gen_len)
        for row, i in enumerate(idx):
            toks = gen[row]
            cut = next((k for k, x in enumerate(toks) if x in eos), len(toks))  # stop at EOS, as generate does
            texts[i] = tok.decode(toks[:cut], skip_special_tokens=True)
    return texts, first


def _hf_generate(
    model: nn.Module,
    tok: Any,
    encoded: Sequence[list[int]],
    gen_len: int,
    batch_size: int,
    first_tokens: Sequence[int] = (),
) -> tuple[list[str], torch.Tensor]:
    """The same as :func:`_generate` through ``model.generate`` (models whose forward takes no cache)."""
    from transformers import GenerationConfig

    device = model_device(model)
    pad = _pad_id(tok)
    eos = sorted(_eos_ids(model, tok)) or None
    config = GenerationConfig(max_new_tokens=gen_len, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=eos, output_logits=bool(first_tokens), return_dict_in_generate=True)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    first = torch.empty((len(encoded), len(first_tokens)), dtype=torch.float64)
    wanted = torch.tensor(list(first_tokens), dtype=torch.long, device=device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = _left_pad([encoded[i] for i in idx], pad, device)  # (B, T)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        new = out.sequences[:, ids.shape[1]:]  # (B, ≤ gen_len)
        if first_tokens:
            # output_logits are the raw (unprocessed) logits of each step; step 0 follows the prompt
            first[idx] = torch.log_softmax(out.logits[0].float(), dim=-1)[:, wanted].double().cpu()
        for row, i in enumerate(idx):
            texts[i] = tok.decode(new[row].tolist(), skip_special_tokens=True)
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
        return _hf_generate(model, tok, encoded, gen_len, batch_size)[0]
    runner = _make_runner(model, tok, shared_prefix, encoded)
    return _generate(runner, tok, encoded, gen_len, batch_size)[0]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _make_runner(model: nn.Module, tok: Any, shared_prefix: str | None, seqs: Sequence[Sequence[int]]) -> _Runner:
    """A runner whose cached prefix is the longest run of the shots' tokens that the sequences share.

    The shots' last token may merge with the question's first (e.g. "\n\n" + "Q"), so the prefix
    is cut where the sequences' tokens part from the shots' own; sequences that keep less than
    half of it (prompts whose shots were dropped) take the plain path.
    """
    prefix_ids: list[int] = []
    if shared_prefix and seqs:
        shots = _token_ids(tok, [shared_prefix])[0]
        shared = [k for k in (_common_prefix_len(shots, s) for s in seqs) if 2 * k >= len(shots)]
        cut = min(shared, default=0)
        window = _attention_window(model)
        if window is not None and window < max(len(s) for s in seqs) + 16:
            # padding between the cached prefix and an item shifts what a local window sees
            logger.info("shared prefix not used: local attention window %d is shorter than the prompts", window)
        elif cut >= 8 and cut >= len(shots) // 2:  # long enough to pay off
            prefix_ids = shots[:cut]
    runner = _Runner(model, tok, prefix_ids)
    if runner.prefix:
        runner.verify_prefix(seqs, _tolerance(model))
    return runner


# ----------------------------------------------------------------------------- log-likelihood


def split_prompt_option(tok: Any, prompt: str, option: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + option`` split into (context, option tokens).

    With a fast tokenizer, a token belongs to the option when it ends past the prompt's last
    character (so a token straddling the boundary is scored as part of the option). Otherwise
    the prompt's own tokenization is used when it is a prefix, else option tokens are encoded on
    their own.
    """
    text = prompt + option
    cut = len(prompt)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids, offsets, special = list(enc["input_ids"]), enc["offset_mapping"], enc["special_tokens_mask"]
        while ids and special[len(ids) - 1]:  # an appended EOS is not part of the option
            ids.pop()
        n_ctx = next((i for i in range(len(ids)) if not special[i] and offsets[i][1] > cut), len(ids))
        return ids[:n_ctx], ids[n_ctx:]
    prompt_ids = list(tok(prompt)["input_ids"])
    full = list(tok(text)["input_ids"])
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return prompt_ids, full[len(prompt_ids):]
    return prompt_ids, list(tok(option, add_special_tokens=False)["input_ids"])


@dataclass
class _OptionPlan:
    """Which sequences to run for option ranking: unique inputs and, per input, who reads it."""

    seqs: list[tuple[int, ...]]
    users: list[list[tuple[int, int, list[int]]]]  # per input: (item, option, option tokens)


def _plan_options(tok: Any, prompts: Sequence[str], options: Sequence[str], limit: int) -> _OptionPlan:
    inputs: dict[tuple[int, ...], int] = {}
    users: list[list[tuple[int, int, list[int]]]] = []
    for i, prompt in enumerate(prompts):
        for j, opt in enumerate(options):
            ctx, cont = split_prompt_option(tok, prompt, opt)
            if not cont:
                raise DownstreamError(f"option {opt!r} has no tokens after the prompt")
            if not ctx:
                raise DownstreamError("empty prompt: log-likelihood needs at least one context token")
            # the last option token is never an input: its logits are not needed
            seq = tuple(_keep_last(ctx + cont[:-1], limit, "a prompt with its option"))
            u = inputs.setdefault(seq, len(inputs))
            if u == len(users):
                users.append([])
            users[u].append((i, j, cont))
    return _OptionPlan(list(inputs), users)


def _reduce(token_lp: torch.Tensor, reduction: str) -> float:
    return float(token_lp.mean() if reduction == "mean" else token_lp.sum())


def _score_options(
    runner: _Runner,
    plan: _OptionPlan,
    n_items: int,
    n_options: int,
    *,
    batch_size: int,
    reduction: str,
    known: Mapping[tuple[int, ...], Mapping[int, float]] | None = None,
) -> torch.Tensor:
    """Run the plan's inputs (those not already in ``known``) and reduce option log-probs to scores.

    ``known[seq][token]`` is the log-probability of ``token`` right after ``seq`` (from generation's
    first step); inputs all of whose readers need just that are not run again.
    """
    if reduction not in ("mean", "sum"):
        raise DownstreamError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if batch_size < 1:
        raise DownstreamError("batch_size must be ≥ 1")
    scores = torch.full((n_items, n_options), float("nan"), dtype=torch.float64)
    todo = []
    for u, seq in enumerate(plan.seqs):
        hit = known.get(seq) if known else None
        if hit is not None and all(len(c) == 1 and c[0] in hit for _, _, c in plan.users[u]):
            for i, j, cont in plan.users[u]:
                scores[i, j] = hit[cont[0]]  # one token: mean = sum = its log-prob
        else:
            todo.append(u)
    todo.sort(key=lambda u: -len(plan.seqs[u]))  # little padding per batch
    for idx, with_prefix in _batches(runner, todo, plan.seqs, batch_size):
        keep = max(len(cont) for u in idx for _, _, cont in plan.users[u])  # option tokens sit in the last columns
        logits, _ = runner.forward([plan.seqs[u] for u in idx], keep=keep, with_prefix=with_prefix)  # (B, keep, V)
        lp = torch.log_softmax(logits.float(), dim=-1)  # (B, keep, V)
        for row, u in enumerate(idx):
            for i, j, cont in plan.users[u]:
                n = len(cont)  # the last n columns predict cont[0], ..., cont[-1]
                target = torch.tensor(cont, device=lp.device)[:, None]  # (n, 1)
                scores[i, j] = _reduce(lp[row, keep - n:, :].gather(-1, target).double().flatten(), reduction)
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
    runner = _make_runner(model, tok, shared_prefix, plan.seqs)
    return _score_options(runner, plan, len(prompts), len(options), batch_size=batch_size, reduction=reduction)


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
    runner = _make_runner(model, tok, shared_prefix, encoded or (plan.seqs if plan else []))
    prefix_seconds = time.perf_counter() - t0  # charged to the first mode run
    known: dict[tuple[int, ...], dict[int, float]] | None = None
    if generate:
        t0 = time.perf_counter()
        first_tokens: list[int] = []
        if plan is not None and share_prefill:
            first_tokens = sorted({c[0] for us in plan.users for _, _, c in us if len(c) == 1})
        texts, first = _generate(runner, tok, encoded, gen_len, batch_size, first_tokens)
        if first_tokens:
            known = {tuple(e): dict(zip(first_tokens, row.tolist())) for e, row in zip(encoded, first)}
        out.continuations = texts
        out.generate_predictions = [parse(t) for t in texts]
        out.generate_seconds = time.perf_counter() - t0 + prefix_seconds
        prefix_seconds = 0.0
    if plan is not None:
        t0 = time.perf_counter()
        out.scores = _score_options(runner, plan, len(prompts), len(options), batch_size=batch_size,
                                    reduction=reduction, known=known)
        out.loglik_predictions = argmax_or_invalid(out.scores)
        out.loglik_seconds = time.perf_counter() - t0 + prefix_seconds + setup_seconds
    return out
