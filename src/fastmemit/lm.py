"""The language-model layer: how fastmemit runs a causal LM on token ids.

One implementation of each thing the editing, evaluation and downstream code need from a model:

- **ids**: :func:`model_device`, :func:`pad_id`, :func:`eos_ids`;
- **padding**: :func:`pad_left` / :func:`pad_right` give ``(ids, attention_mask, position_ids)``,
  positions counted from each row's first real token;
- **the target's tokens after a prompt**: :func:`split_continuation` / :func:`target_ids` — the one
  rule v*, the CounterFact/zsRE metrics and the downstream scorer all use;
- **a shared-prefix runner**: :class:`PrefixCache` runs prefixes once into a key/value cache (one
  prefix per row, as v* does up to the fact token, or one prefix shared by every row, as the
  downstream shots) and each batch's suffixes on a copy of it; :meth:`PrefixCache.verify`
  compares it with a plain forward pass;
- **teacher-forced scoring**: :func:`score_continuations`, log-probabilities (and argmax hits) of
  given continuation ids after given contexts;
- **greedy generation**: :func:`greedy_generate`, KV-cached, the same tokens as ``model.generate``
  (``greedy_generate(..., reference=True)``, kept as the reference and for models whose forward takes no cache).

Padding never changes what a real token computes: padded positions are masked out, so their ids
and positions do not matter. Batching does change the last bits of float results (the shapes of
the matrix products), so callers that keep recorded numbers keep their batching (``layout``).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmemit.errors import EditError
from fastmemit.models.devices import input_device
from fastmemit.utils import logger, progress

Ids = Sequence[int]

# ----------------------------------------------------------------------------- devices and special ids


def model_device(model: nn.Module) -> torch.device:
    """The device input ids go to: the input embedding's (its execution device in a device-mapped
    model, :func:`fastmemit.models.devices.input_device`), else the first parameter's (CPU for a
    parameterless module)."""
    return input_device(model)


def pad_id(tok: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0 (padding is masked anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, name, None)
        if isinstance(v, int):
            return v
    return 0


def eos_ids(model: nn.Module, tok: Any) -> frozenset[int]:
    """End-of-sequence ids: the model's generation config's, else the tokenizer's (as ``generate`` does)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in eos) if isinstance(eos, (list, tuple, set)) else frozenset({int(eos)})


# ----------------------------------------------------------------------------- padding


def pad_left(rows: Sequence[Ids], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention_mask, position_ids), each (N, T) long; every row ends in column T-1."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(rows), t), dtype=torch.long)  # (N, T)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, t - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, t - len(r):] = 1
    return ids, mask, positions(mask)


def pad_right(rows: Sequence[Ids], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask, position_ids), each (N, T) long; every row starts in column 0,
    so its positions are the column indices (as a model computes them without position ids)."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(rows), t), dtype=torch.long)  # (N, T)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids, mask, torch.arange(t).unsqueeze(0).expand(len(rows), t)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (N, T) from an attention mask (N, T): real tokens count 0, 1, ...; padding gets
    the previous real token's position (masked, so never read)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- the target's tokens


def split_continuation(tok: Any, prompt: str, continuation: str, prompt_ids: Ids | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + continuation`` as the model reads the whole text, split into
    (context, continuation ids) — THE rule for "the tokens of a target after a prompt".

    The whole text is tokenized once (special tokens as the tokenizer adds them; a trailing EOS is
    not part of the continuation). The context is the prompt's own tokenization (``prompt_ids``
    when given) whenever that is a prefix of the whole's — always at a space for byte-level BPE and
    for SentencePiece with a Metaspace pre-tokenizer (Llama-2). When a token straddles the
    boundary (SentencePiece without pre-tokenizer merges spaces: Gemma reads "Answer: " + " Yes"
    as ``[..., ":", "▁▁", "Yes"]``), that token belongs to the continuation: the context is the
    tokens that end inside the prompt (character offsets; slow tokenizers without offsets
    tokenize the continuation alone).
    """
    own = list(prompt_ids) if prompt_ids is not None else list(tok(prompt)["input_ids"])
    fast = getattr(tok, "is_fast", False)
    enc = tok(prompt + continuation, return_offsets_mapping=fast, return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    while ids and special[len(ids) - 1] and len(ids) > len(own):  # an appended EOS is not the continuation's
        ids.pop()
    if ids[: len(own)] == own and len(ids) > len(own):
        return own, ids[len(own):]
    if not fast:
        return own, list(tok(continuation, add_special_tokens=False)["input_ids"])
    offsets, cut = enc["offset_mapping"], len(prompt)
    n_ctx = next((i for i in range(len(ids)) if not special[i] and offsets[i][1] > cut), len(ids))
    return ids[:n_ctx], ids[n_ctx:]


def target_ids(tok: Any, prompt: str, target: str, prompt_ids: Ids | None = None) -> tuple[list[int], list[int]]:
    """(context ids, ids of ``" " + target``) after ``prompt`` by :func:`split_continuation`; the target
    is stripped first, so it follows the prompt after exactly one space. Used by v*, the
    CounterFact and zsRE metrics and (through ``" " + verbalizer``) the downstream options."""
    target = " " + target.strip()
    ctx, ids = split_continuation(tok, prompt, target, prompt_ids)
    if not ids or target == " ":
        raise EditError(f"target {target!r} tokenizes to nothing after {prompt!r}")
    if not ctx:
        raise EditError(f"prompt {prompt!r} leaves no token before the target {target!r}")
    return ctx, ids


# ----------------------------------------------------------------------------- one forward pass


def lm_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) float32 from final hidden states (..., d), with Gemma-style soft-capping, on
    ``hidden``'s device (a device-mapped model may hold its LM head on another device).

    A half-precision model's head runs in float32 (its weight upcast for the call): the logits feed
    v*'s losses and a bf16 logit of ~20 is only known to ±0.06."""
    head = model.get_output_embeddings()
    if hidden.dtype in (torch.float16, torch.bfloat16) and isinstance(head, nn.Linear):
        bias = None if head.bias is None else head.bias.float()
        x = hidden.to(head.weight.device).float()
        logits = nn.functional.linear(x, head.weight.float(), bias).to(hidden.device)  # (..., V)
    else:
        logits = head(hidden).float().to(hidden.device)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _accepted(module: nn.Module) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def output_cache(out: Any) -> Any:
    """The key/value cache a forward pass returned (``cache`` or, in older transformers, ``past_key_values``)."""
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


class Forward:
    """Calls one model with the arguments its forward accepts (``position_ids``, ``logits_to_keep``,
    the cache under its name in this transformers version)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = model_device(model)
        self.accepted = _accepted(model)
        self.cache_arg = next((a for a in ("cache", "past_key_values") if a in self.accepted), None)

    @property
    def can_cache(self) -> bool:
        """Whether the forward takes a KV cache and position ids (needed after a prefix and to decode)."""
        return self.cache_arg is not None and "position_ids" in self.accepted

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None = None, *, keep: int | None = None,
                 cache: Any = None, use_cache: bool = False, body: bool = False) -> Any:
        """``model(...)``, or with ``body`` the model without its LM head (``last_hidden_state``)."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if pos is not None and "position_ids" in self.accepted:
            kwargs["position_ids"] = pos
        if keep is not None and not body and "logits_to_keep" in self.accepted:
            kwargs["logits_to_keep"] = keep
        if cache is not None:
            kwargs[self.cache_arg] = cache  # type: ignore[index]
        if "use_cache" in self.accepted:
            kwargs["use_cache"] = use_cache
        return (self.model.base_model if body else self.model)(**kwargs)


# ----------------------------------------------------------------------------- shared-prefix runner


@dataclass
class Batch:
    """Suffix rows padded after their prefixes: ids (B, S), mask (B, P + S) over prefix and suffix
    columns, positions (B, S) continuing after each row's prefix."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor


class PrefixCache:
    """A key/value cache of token prefixes, run once without gradient; suffixes run on a copy of it.

    - ``PrefixCache(model, prefixes, pad)``: one prefix per row, left padded so every row's prefix
      ends in the same column (v*: each prompt up to its fact token; tokens before the fact token
      never see δ, so they run once).
    - ``PrefixCache(model, [prefix], pad, shared=True)``: one prefix every row of a batch starts with
      (the downstream shots), its cache repeated to the batch's rows.
    - ``PrefixCache(model, [], pad, shared=True)``: no prefix, a plain padded forward.
    - ``hold=False``: the prefixes' cache is not held between calls; every :meth:`run` recomputes it
      (the same forward, so the same numbers) and drops it after, so memory does not grow with the
      number of caches alive at once (v*'s micro-batches); :meth:`release` turns a held cache into
      such a one, and :attr:`nbytes` is what a held cache takes. A caller whose run happens inside hooks
      that must not see the prefix takes :meth:`fresh_cache` before entering them.

    :meth:`batch` pads suffixes on the right (every row's first suffix token in column 0) or on the
    left (every row's last token in the last column, where scoring and decoding read); positions
    continue after each row's prefix. Left-padded suffixes put padding between prefix and suffix,
    which a local attention window counts: :func:`attention_window` says when not to do that.
    """

    def __init__(self, model: nn.Module, prefixes: Sequence[Ids], pad: int, *, shared: bool = False,
                 hold: bool = True) -> None:
        if shared and len(prefixes) > 1:
            raise EditError(f"a shared prefix is one token sequence, got {len(prefixes)}")
        self.fwd = Forward(model)
        self.pad = pad
        self.shared = shared
        self.tokens: tuple[int, ...] = tuple(prefixes[0]) if shared and prefixes else ()
        rows = [self.tokens] if shared else [list(p) for p in prefixes]
        self.length = max((len(p) for p in rows), default=0)  # P
        self.cache: Any = None
        self.mask = torch.zeros((len(rows), 0), dtype=torch.long, device=self.fwd.device)  # (R, P)
        self._ids: torch.Tensor | None = None  # (R, P) the prefixes: what a cache not held is recomputed from
        self._pos: torch.Tensor | None = None  # (R, P)
        if self.length:
            if not self.fwd.can_cache:
                raise EditError(f"{type(model).__name__}'s forward takes no KV cache: a prefix cannot be kept")
            ids, mask, pos = pad_left(rows, pad)  # (R, P) each
            self.mask = mask.to(self.fwd.device)
            self._ids, self._pos = ids.to(self.fwd.device), pos.to(self.fwd.device)
            if hold:
                self.cache = self._compute()

    @torch.no_grad()
    def _compute(self) -> Any:
        """The prefixes' key/value cache: one forward without gradient."""
        out = self.fwd(self._ids, self.mask, self._pos, keep=1, use_cache=True)
        cache = output_cache(out)
        if cache is None or (self.shared and not hasattr(cache, "batch_repeat_interleave")):
            raise EditError(f"{type(self.fwd.model).__name__} returns no KV cache that can be shared by a batch")
        return cache

    def starts(self, seq: Ids) -> bool:
        """Whether ``seq`` starts with the shared prefix and goes on after it."""
        n = len(self.tokens)
        return n > 0 and len(seq) > n and tuple(seq[:n]) == self.tokens

    def batch(self, suffixes: Sequence[Ids], *, side: str = "left") -> Batch:
        """Pad ``suffixes`` (one per prefix row; any number with a shared prefix) after the prefixes."""
        if side not in ("left", "right"):
            raise EditError(f"side must be 'left' or 'right', got {side!r}")
        if not self.shared and len(suffixes) != self.mask.shape[0]:
            raise EditError(f"{len(suffixes)} suffixes for {self.mask.shape[0]} prefixes")
        s_ids, s_mask, _ = (pad_left if side == "left" else pad_right)(suffixes, self.pad)  # (B, S)
        s_ids, s_mask = s_ids.to(self.fwd.device), s_mask.to(self.fwd.device)
        p_mask = self.mask.expand(len(suffixes), -1) if self.shared else self.mask  # (B, P)
        mask = torch.cat([p_mask, s_mask], dim=1)  # (B, P + S)
        return Batch(s_ids, mask, positions(mask)[:, self.length:])

    @property
    def nbytes(self) -> int:
        """Bytes of the held cache's tensors (0 when none is held)."""
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in getattr(self.cache, "layers", [])
                   for t in vars(layer).values() if isinstance(t, torch.Tensor))

    def release(self) -> None:
        """Stop holding the cache: every later :meth:`run` recomputes it (the same numbers)."""
        self.cache = None

    def fresh_cache(self) -> Any:
        """The prefixes' cache for one :meth:`run`: a copy of the held one, or computed now (``hold=False``).

        The copy shares the held key/value tensors: a run appends its suffix by concatenation (a new
        tensor bound to the copy's layer), never writing into them, so no per-run copy of the prefix is
        made. A cache without per-layer objects is deep-copied."""
        if self.cache is None:
            return self._compute() if self._ids is not None else None
        layers = getattr(self.cache, "layers", None)
        if not isinstance(layers, list):
            return copy.deepcopy(self.cache)
        out = copy.copy(self.cache)
        out.layers = [copy.copy(layer) for layer in layers]
        return out

    def run(self, batch: Batch, *, keep: int | None = None, body: bool = False, use_cache: bool = False,
            cache: Any = None) -> Any:
        """The model's output on ``batch`` after the prefixes (logits of the last ``keep`` columns, or
        with ``body`` the hidden states); gradients flow through the suffix only. ``cache``: a
        :meth:`fresh_cache` taken earlier (default: taken now)."""
        cache = cache if cache is not None else self.fresh_cache()
        if cache is not None:
            if self.shared:
                cache.batch_repeat_interleave(batch.ids.shape[0])  # (1, ...) -> (B, ...)
        return self.fwd(batch.ids, batch.mask, batch.pos, keep=keep, cache=cache,
                        use_cache=use_cache or cache is not None, body=body)

    @torch.no_grad()
    def verify(self, seqs: Sequence[Ids], tol: float) -> float:
        """Largest |Δ log p| of the next token between this shared prefix (the longest and the shortest
        of ``seqs`` starting with it, one left-padded batch) and plain forwards of each alone."""
        users = sorted((s for s in seqs if self.starts(s)), key=len)
        if not users:
            return 0.0
        probe = [users[-1], users[0]] if len(users) > 1 else [users[0]]
        n = len(self.tokens)
        a = self.run(self.batch([s[n:] for s in probe]), keep=1).logits[:, -1]  # (≤2, V)
        plain = PrefixCache(self.fwd.model, [], self.pad, shared=True)
        b = torch.cat([plain.run(plain.batch([s]), keep=1).logits[:, -1] for s in probe])  # (≤2, V)
        return float((torch.log_softmax(a.float(), -1) - torch.log_softmax(b.float(), -1)).abs().max())


def attention_window(model: nn.Module) -> int | None:
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


def _groups(order: Sequence[int], after_prefix: Sequence[bool], batch_size: int) -> Iterator[tuple[list[int], bool]]:
    """Batches of indices in ``order``: those that run after the shared prefix first, then the rest;
    a batch never mixes the two."""
    if batch_size < 1:
        raise EditError(f"batch_size must be ≥ 1, got {batch_size}")
    for flag in (True, False):
        group = [i for i in order if after_prefix[i] == flag]
        for s in range(0, len(group), batch_size):
            yield group[s : s + batch_size], flag


# ----------------------------------------------------------------------------- teacher-forced scoring


@dataclass(frozen=True)
class ContinuationScore:
    """Teacher-forced result of one (context, continuation) pair."""

    logprobs: torch.Tensor  # (n,) float32: log p(token j | context, tokens before j)
    argmax: torch.Tensor  # (n,) bool: token j is the most likely next token there


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    pairs: Sequence[tuple[Ids, Ids]],
    *,
    pad: int,
    batch_size: int = 32,
    layout: str = "left",
    prefix: PrefixCache | None = None,
) -> list[ContinuationScore]:
    """Log-probabilities of each pair's continuation ids after its context ids, one forward per batch.

    Identical inputs run once; batches hold the longest inputs first (little padding).
    ``layout="left"`` runs ``context + continuation[:-1]`` left padded (after ``prefix``, a shared
    :class:`PrefixCache`, for the inputs starting with it) and the LM head on the last columns only;
    ``layout="right"`` runs ``context + continuation`` right padded with every position's logits
    (the CounterFact/zsRE metrics' layout, whose recorded numbers depend on it to the last bit).
    """
    if layout not in ("left", "right"):
        raise EditError(f"layout must be 'left' or 'right', got {layout!r}")
    if layout == "right" and prefix is not None:
        raise EditError("a shared prefix needs layout='left'")
    for i, (c, t) in enumerate(pairs):
        if not c or not t:
            raise EditError(f"pair {i}: context and continuation need at least one token each")
    if model.training:
        logger.warning("scoring a model in training mode (dropout active); call model.eval() first")
    last = 0 if layout == "right" else 1  # the last continuation token is an input only in the right layout
    inputs: dict[tuple[int, ...], list[int]] = {}  # input ids -> the pairs reading it
    for k, (c, t) in enumerate(pairs):
        inputs.setdefault(tuple(c) + tuple(t[: len(t) - last]), []).append(k)
    seqs, readers = list(inputs), list(inputs.values())
    order = sorted(range(len(seqs)), key=lambda u: -len(seqs[u]))
    n_pre = len(prefix.tokens) if prefix is not None else 0
    after = [prefix is not None and prefix.starts(s) and all(len(pairs[k][0]) > n_pre for k in r)
             for s, r in zip(seqs, readers)]  # the first continuation token is predicted after the prefix
    plain = PrefixCache(model, [], pad, shared=True)
    out: list[ContinuationScore | None] = [None] * len(pairs)
    for idx, flag in progress(list(_groups(order, after, batch_size)), desc="scoring", unit="batch"):
        runner = prefix if flag and prefix is not None else plain
        skip = len(runner.tokens)
        rows = [seqs[u][skip:] for u in idx]
        T = max(len(r) for r in rows)
        keep = None if layout == "right" else max(len(pairs[k][1]) for u in idx for k in readers[u])
        logits = runner.run(runner.batch(rows, side=layout), keep=keep).logits  # (B, T or ≥ keep, V)
        first = logits.shape[1] - T  # column of a full-length row's first token (≤ 0 when only the last are kept)
        r_ix, c_ix, tgt, spans = [], [], [], []
        for b, u in enumerate(idx):
            start = first + (T - len(rows[b]) if layout == "left" else 0) - skip  # column of seqs[u][0]
            for k in readers[u]:
                c, t = pairs[k]
                spans.append((k, len(tgt), len(t)))
                r_ix += [b] * len(t)
                c_ix += range(start + len(c) - 1, start + len(c) - 1 + len(t))  # token j is predicted a column earlier
                tgt += list(t)
        picked = logits[torch.tensor(r_ix, device=logits.device), torch.tensor(c_ix, device=logits.device)]  # (N, V)
        tgt_t = torch.tensor(tgt, device=logits.device)  # (N,)
        logp = torch.log_softmax(picked.float(), dim=-1).gather(1, tgt_t.unsqueeze(1)).squeeze(1).cpu()  # (N,)
        hit = (picked.argmax(dim=-1) == tgt_t).cpu()  # (N,)
        for k, s, n in spans:
            out[k] = ContinuationScore(logp[s : s + n], hit[s : s + n])
    return [s for s in out if s is not None]


# ----------------------------------------------------------------------------- greedy generation


@dataclass
class Generated:
    """Greedy continuations: new tokens per row (up to, not including, the first end-of-sequence
    token) and the log-probabilities of ``first_tokens`` as the first new token (N, k) float64."""

    tokens: list[list[int]]
    first_logprobs: torch.Tensor


def _cut(toks: Sequence[int], eos: frozenset[int]) -> list[int]:
    return list(toks[: next((k for k, x in enumerate(toks) if x in eos), len(toks))])


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    rows: Sequence[Ids],
    max_new_tokens: int,
    *,
    pad: int,
    eos: frozenset[int] = frozenset(),
    batch_size: int = 16,
    prefix: PrefixCache | None = None,
    first_tokens: Sequence[int] = (),
    reference: bool = False,
) -> Generated:
    """Greedy decoding of token-id prompts with a KV cache: the tokens ``model.generate`` gives.

    Rows run in the given order in left-padded batches (rows starting with a shared ``prefix``
    first, after its cache); a batch stops when every row has produced an EOS or after
    ``max_new_tokens``. ``reference``: through ``model.generate`` instead (:func:`_generate_reference`,
    the reference this is tested against; ``prefix`` unused), as models whose forward takes no cache do.
    """
    fwd = Forward(model)
    if reference or not fwd.can_cache:
        return _generate_reference(model, rows, max_new_tokens, pad, eos, batch_size, first_tokens)
    tokens: list[list[int]] = [[] for _ in rows]
    first = torch.empty((len(rows), len(first_tokens)), dtype=torch.float64)
    wanted = torch.tensor(list(first_tokens), dtype=torch.long, device=fwd.device)
    plain = PrefixCache(model, [], pad, shared=True)
    after = [prefix is not None and prefix.starts(r) for r in rows]
    for idx, flag in progress(list(_groups(range(len(rows)), after, batch_size)), desc="generating", unit="batch"):
        runner = prefix if flag and prefix is not None else plain
        batch = runner.batch([rows[i][len(runner.tokens):] for i in idx])
        out = runner.run(batch, keep=1, use_cache=True)
        logits, cache = out.logits[:, -1, :], output_cache(out)  # (B, V)
        mask, pos = batch.mask, batch.pos[:, -1:]  # (B, P + T), (B, 1)
        if first_tokens:
            first[idx] = torch.log_softmax(logits.float(), dim=-1)[:, wanted].double().cpu()
        new = []
        done = torch.zeros(len(idx), dtype=torch.bool)
        for step in range(max_new_tokens):
            nxt = logits.argmax(dim=-1)  # (B,)
            new.append(nxt.cpu())
            done |= torch.tensor([int(x) in eos for x in new[-1]], dtype=torch.bool)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, P + T + step + 1)
            pos = pos + 1  # (B, 1)
            out = fwd(nxt[:, None], mask, pos, keep=1, cache=cache, use_cache=True)
            logits, cache = out.logits[:, -1, :], output_cache(out)
        gen = torch.stack(new, dim=1).tolist() if new else [[] for _ in idx]  # (B, ≤ max_new_tokens)
        for b, i in enumerate(idx):
            tokens[i] = _cut(gen[b], eos)
    return Generated(tokens, first)


@torch.no_grad()
def _generate_reference(model: nn.Module, rows: Sequence[Ids], max_new_tokens: int, pad: int, eos: frozenset[int],
                        batch_size: int, first_tokens: Sequence[int]) -> Generated:
    """:func:`greedy_generate` through ``model.generate`` (``reference=True``: what it is tested against)."""
    from transformers import GenerationConfig  # heavy; only this reference path needs it

    device = model_device(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=sorted(eos) or None, output_logits=bool(first_tokens),
                              return_dict_in_generate=True)
    tokens: list[list[int]] = [[] for _ in rows]
    first = torch.empty((len(rows), len(first_tokens)), dtype=torch.float64)
    wanted = torch.tensor(list(first_tokens), dtype=torch.long, device=device)
    for idx, _ in _groups(range(len(rows)), [False] * len(rows), batch_size):
        ids, mask, _ = pad_left([rows[i] for i in idx], pad)  # (B, T)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        if first_tokens:  # output_logits are each step's raw logits; step 0 follows the prompt
            first[idx] = torch.log_softmax(out.logits[0].float(), dim=-1)[:, wanted].double().cpu()
        for b, i in enumerate(idx):
            tokens[i] = _cut(out.sequences[b, ids.shape[1]:].tolist(), eos)
    return Generated(tokens, first)


CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length", "max_seq_len")


def model_context(model: nn.Module, tok: Any = None) -> int | None:
    """The model's context window in tokens, read from its config (max_position_embeddings,
    n_positions, ...), else the tokenizer's ``model_max_length``; None when neither tells."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        for attr in CONTEXT_ATTRS:
            v = getattr(c, attr, None) if c is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    v = getattr(tok, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**7:  # tokenizers without a limit report ~1e30
        return v
    return None
