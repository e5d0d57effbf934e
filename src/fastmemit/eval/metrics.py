"""Evaluation metrics: batched teacher-forced scoring, CounterFact and zsRE metrics, fluency, consistency.

The core is :func:`score_targets`: for many ``(prompt, target)`` pairs, the token ids of the prompt
and of ``" " + target`` after it come from :func:`fastmemit.lm.target_ids` — the same rule v*
optimizes with, so the metrics score exactly the tokens an edit was made for. Sequences are right
padded, one forward pass a batch (:func:`fastmemit.lm.score_continuations`), and each target token
is scored from the logits one position earlier.

Definitions (see ``docs/evaluation.md``): ``P(x) = exp(-mean-token NLL of " " + x)``, the geometric
mean of the per-token probabilities, as the ROME/MEMIT code computes it. Comparisons are strict: a
tie (equal NLLs) counts as a failure, for efficacy and for neighbourhood alike.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fastmemit.errors import EditError
from fastmemit.eval.datasets import CounterFactCase, TfidfTable, ZsreCase
from fastmemit.lm import eos_ids, greedy_generate, pad_id, score_continuations, target_ids

# Per-case metric keys that summarize() averages (and multiplies by 100).
COUNTERFACT_KEYS = ("es", "em", "ps", "pm", "ns", "nm", "rewrite_acc", "paraphrase_acc", "neighborhood_acc",
                    "ngram_entropy", "reference_score")
ZSRE_KEYS = ("efficacy", "generalization", "specificity")
SCORE_PARTS = ("es", "ps", "ns")
# Tokens of prompt and continuation together in the seed's sliding check (generate_fast's max_out_len).
SLIDING_MAX_LEN = 50

# The word :func:`encode_target` puts before a target: the target's ids as they follow a word.
_TARGET_REF = "a"


# ----------------------------------------------------------------------------- tokenization


def encode_prompt(tok: Any, prompt: str) -> list[int]:
    """Token ids of a prompt as the model sees it at the start of a text (BOS if the tokenizer adds one)."""
    ids = list(tok(prompt)["input_ids"])
    if not ids:
        raise EditError(f"prompt {prompt!r} tokenizes to nothing")
    return ids


def encode_target(tok: Any, target: str) -> list[int]:
    """Token ids of ``" " + target`` after a word of running text (:func:`fastmemit.lm.target_ids`
    after ``"a"``): no SentencePiece dummy-prefix token; for byte-level BPE (GPT-2, Llama-3,
    SmolLM2) ``tok(" " + target, add_special_tokens=False)``. Scoring uses the ids after each
    prompt itself, which differ from these only where a token straddles the prompt's end.
    """
    return target_ids(tok, _TARGET_REF, target)[1]


# ----------------------------------------------------------------------------- teacher-forced scoring


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced score of one target after one prompt."""

    token_ids: tuple[int, ...]  # the target's tokens
    token_nlls: tuple[float, ...]  # -log p(token | prompt, earlier target tokens)
    correct: tuple[bool, ...]  # argmax of the prediction == the token

    @property
    def nll(self) -> float:
        """Mean token NLL."""
        return sum(self.token_nlls) / len(self.token_nlls)

    @property
    def prob(self) -> float:
        """exp(-mean NLL): the geometric mean of the token probabilities."""
        return math.exp(-self.nll)

    @property
    def all_correct(self) -> bool:
        return all(self.correct)


def score_token_ids(
    model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int = 0, batch_size: int = 32
) -> list[TargetScore]:
    """Score ``(prompt_ids, target_ids)`` pairs: one right-padded forward pass per batch, longest
    first (:func:`fastmemit.lm.score_continuations`); results come back in input order."""
    scores = score_continuations(model, pairs, pad=pad_id, batch_size=batch_size, layout="right")
    return [TargetScore(tuple(t), tuple((-s.logprobs).tolist()), tuple(s.argmax.tolist()))
            for (_, t), s in zip(pairs, scores)]


def score_targets(
    model: nn.Module, tok: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32
) -> list[TargetScore]:
    """Teacher-forced scores of ``" " + targets[i]`` after ``prompts[i]`` (ids by :func:`fastmemit.lm.target_ids`)."""
    if len(prompts) != len(targets):
        raise EditError(f"{len(prompts)} prompts but {len(targets)} targets")
    prompt_ids = {p: encode_prompt(tok, p) for p in dict.fromkeys(prompts)}
    split = {pt: target_ids(tok, pt[0], pt[1], prompt_ids[pt[0]]) for pt in dict.fromkeys(zip(prompts, targets))}
    pairs = [split[pt] for pt in zip(prompts, targets)]
    # Identical pairs are scored once.
    unique = list(dict.fromkeys((tuple(p), tuple(t)) for p, t in pairs))
    scores = dict(zip(unique, score_token_ids(model, unique, pad_id=pad_id(tok), batch_size=batch_size)))
    return [scores[(tuple(p), tuple(t))] for p, t in pairs]


# ----------------------------------------------------------------------------- generation metrics


_WORD = re.compile(r"\w+|[^\w\s]")
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn TfidfVectorizer's default token_pattern


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's generation entropy of one text: mean over n of ``weight_n · H_n``.

    ``H_n`` is the entropy in bits of the frequency distribution of word n-grams (words: ``\\w+`` runs
    and single punctuation characters). A text with no n-gram of some size contributes 0 for it.
    """
    words = _WORD.findall(text)
    terms = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


def tfidf_similarity(text_a: str, text_b: str, table: TfidfTable) -> float:
    """Cosine between the tf-idf vectors of two texts (lower-cased ``\\w\\w+`` terms in the vocabulary).

    As scikit-learn's ``TfidfVectorizer`` with the published vocabulary and idf: raw counts × idf.
    0.0 when either text has no vocabulary term.
    """

    def vec(text: str) -> dict[int, float]:
        counts = Counter(table.vocab[t] for t in _TFIDF_TOKEN.findall(text.lower()) if t in table.vocab)
        return {j: c * float(table.idf[j]) for j, c in counts.items()}

    a, b = vec(text_a), vec(text_b)
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return sum(v * b.get(j, 0.0) for j, v in a.items()) / (na * nb)


def generate_greedy(
    model: nn.Module, tok: Any, prompts: Sequence[str], *, max_new_tokens: int = 100, batch_size: int = 16
) -> list[str]:
    """Greedy continuations (:func:`fastmemit.lm.greedy_generate`, batches in the given order);
    returns prompt + continuation, decoded without special tokens.

    The caller's tokenizer is not switched to left padding. Generation stops early only when every
    row of a batch has produced the end-of-sequence token.
    """
    rows = [encode_prompt(tok, p) for p in prompts]
    out = greedy_generate(model, rows, max_new_tokens, pad=pad_id(tok), eos=eos_ids(model, tok), batch_size=batch_size)
    return [tok.decode(r + t, skip_special_tokens=True) for r, t in zip(rows, out.tokens)]


# ----------------------------------------------------------------------------- CounterFact


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate_counterfact_cases(
    model: nn.Module,
    tok: Any,
    cases: Sequence[CounterFactCase],
    *,
    batch_size: int = 32,
    generation: bool = True,
    max_new_tokens: int = 100,
    snippets: Mapping[tuple[str, str], Sequence[Mapping[str, str]]] | None = None,
    tfidf: TfidfTable | None = None,
    sliding: bool = False,
) -> list[dict[str, Any]]:
    """Per-case CounterFact metrics of ``model`` (call before and after editing for pre/post).

    Every (prompt, target) pair of all cases is scored in shared batches. Per case (values in [0, 1];
    ``None`` when the case has no prompt of that kind):

    - ``es``/``em``: rewrite prompt: mean over its prompts of [NLL(new) < NLL(true)] / of P(new) − P(true);
    - ``ps``/``pm``: the same over paraphrase prompts;
    - ``ns``/``nm``: neighbour prompts: [NLL(true) < NLL(new)] / P(true) − P(new), "true" being the
      neighbours' answer;
    - ``rewrite_acc``/``paraphrase_acc``/``neighborhood_acc``: every token of the expected target
      (new, new, true) is the argmax;
    - ``rewrite_prompts_probs``/``paraphrase_prompts_probs``/``neighborhood_prompts_probs``: per prompt,
      as the seed names them: ``target_new_prob``/``target_true_prob`` (mean token NLLs, not
      probabilities, as in the seed) and ``correct`` (every token of the expected target the argmax);
    - with ``sliding``: ``rewrite_prompts_correct``/``paraphrase_prompts_correct``/
      ``neighborhood_prompts_correct``, the seed's generation check (:func:`sliding_correct`), per prompt;
    - with ``generation`` and generation prompts: ``ngram_entropy`` (mean over the prompts' greedy
      generations); with ``snippets`` and ``tfidf`` too: ``reference_score`` (tf-idf cosine between
      all generations and the attribute snippets of the new target).
    """
    prompts, targets, spans = _counterfact_pairs(cases)
    scores = score_targets(model, tok, prompts, targets, batch_size=batch_size)
    records = [_counterfact_record(c, span, scores) for c, span in zip(cases, spans)]
    if sliding:
        _add_sliding(model, tok, cases, records, batch_size)
    if generation and any(c.generation_prompts for c in cases):
        _add_generation_metrics(model, tok, cases, records, batch_size, max_new_tokens, snippets, tfidf)
    return records


def _counterfact_pairs(cases: Sequence[CounterFactCase]) -> tuple[list[str], list[str], list[dict[str, tuple[int, int]]]]:
    """Every (prompt, target) pair of all cases, new then true for each prompt, and each case's spans
    of them per prompt kind (so that all pairs are scored in shared batches)."""
    prompts: list[str] = []
    targets: list[str] = []
    spans: list[dict[str, tuple[int, int]]] = []
    for c in cases:
        span = {}
        groups = {"rewrite": [c.rewrite_prompt], "paraphrase": list(c.paraphrase_prompts),
                  "neighborhood": list(c.neighborhood_prompts)}
        for name, ps in groups.items():
            new, true = c.target_new, (c.neighborhood_target if name == "neighborhood" else c.target_true)
            start = len(prompts)
            for p in ps:
                prompts += [p, p]
                targets += [new, true]
            span[name] = (start, len(prompts))
        spans.append(span)
    return prompts, targets, spans


def _counterfact_record(c: CounterFactCase, span: Mapping[str, tuple[int, int]], scores: Sequence[Any]) -> dict[str, Any]:
    """One case's ``*_prompts_probs`` (the seed's keys: mean NLLs and teacher-forced correctness) and
    ES/EM/PS/PM/NS/NM and the accuracies from its scored pairs."""
    rec: dict[str, Any] = {"case_id": c.case_id}
    for name, (a, b) in span.items():
        new = scores[a:b:2]
        true = scores[a + 1 : b : 2]
        expected = true if name == "neighborhood" else new
        rec[f"{name}_prompts_probs"] = [{"target_new_prob": n.nll, "target_true_prob": t.nll, "correct": e.all_correct}
                                        for n, t, e in zip(new, true, expected)]
    for name, succ, mag in (("rewrite", "es", "em"), ("paraphrase", "ps", "pm"), ("neighborhood", "ns", "nm")):
        probs = rec[f"{name}_prompts_probs"]
        sign = -1.0 if name == "neighborhood" else 1.0  # neighbours should keep the true answer
        nll_new, nll_true = [x["target_new_prob"] for x in probs], [x["target_true_prob"] for x in probs]
        rec[succ] = _mean([float((sign * (t - n)) > 0) for n, t in zip(nll_new, nll_true)])  # strict: tie fails
        rec[mag] = _mean([sign * (math.exp(-n) - math.exp(-t)) for n, t in zip(nll_new, nll_true)])
        rec[f"{name}_acc"] = _mean([float(x["correct"]) for x in probs])
    return rec


def sliding_correct(model: nn.Module, tok: Any, prompts: Sequence[str], expected: Sequence[str], *,
                    max_len: int = SLIDING_MAX_LEN, batch_size: int = 16) -> list[bool]:
    """The seed's ``*_prompts_correct`` of CounterFact: whether ``expected[i]`` occurs in the greedy
    text after ``prompts[i]`` when prompt and continuation together are ``max_len`` tokens (the seed's
    ``generate_fast(prompts, top_k=1, max_out_len=50)``, no stop at the end-of-sequence token, its
    text clean-up, then ``expected in text[len(prompt):]``)."""
    rows = [encode_prompt(tok, p) for p in prompts]
    n_new = max(max_len - min(len(r) for r in rows), 1) if rows else 0
    out = greedy_generate(model, rows, n_new, pad=pad_id(tok), batch_size=batch_size) if rows else None
    hits = []
    for k, (p, r, e) in enumerate(zip(prompts, rows, expected)):
        cont = out.tokens[k][: max(max_len - len(r), 0)] if out is not None else []
        text = unicodedata.normalize("NFKD", tok.decode(list(r) + list(cont), skip_special_tokens=True))
        hits.append(e in text.replace("\n\n", " ").strip()[len(p):])
    return hits


def _add_sliding(model: nn.Module, tok: Any, cases: Sequence[CounterFactCase], records: list[dict[str, Any]],
                 batch_size: int) -> None:
    """The seed's ``rewrite/paraphrase/neighborhood_prompts_correct`` (:func:`sliding_correct`) added to
    ``records``: every prompt of every case generated in shared batches."""
    prompts: list[str] = []
    expected: list[str] = []
    for c in cases:
        for ps, target in (((c.rewrite_prompt,), c.target_new), (c.paraphrase_prompts, c.target_new),
                           (c.neighborhood_prompts, c.neighborhood_target)):
            prompts += list(ps)
            expected += [target] * len(ps)
    hits = iter(sliding_correct(model, tok, prompts, expected, batch_size=batch_size))
    for c, rec in zip(cases, records):
        for name, ps in (("rewrite", (c.rewrite_prompt,)), ("paraphrase", c.paraphrase_prompts),
                         ("neighborhood", c.neighborhood_prompts)):
            rec[f"{name}_prompts_correct"] = [next(hits) for _ in ps]


def _add_generation_metrics(model: nn.Module, tok: Any, cases: Sequence[CounterFactCase], records: list[dict[str, Any]],
                            batch_size: int, max_new_tokens: int,
                            snippets: Mapping[tuple[str, str], Sequence[Mapping[str, str]]] | None,
                            tfidf: TfidfTable | None) -> None:
    """Fluency (and with snippets and tf-idf tables, consistency) of greedy generations, added to
    ``records``. All cases' generation prompts share batches; the texts are split back per case."""
    gen_prompts = [p for c in cases for p in c.generation_prompts]
    texts = generate_greedy(model, tok, gen_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    k = 0
    for c, rec in zip(cases, records):
        if not c.generation_prompts:
            continue
        gens, k = texts[k : k + len(c.generation_prompts)], k + len(c.generation_prompts)
        rec["generations"] = gens
        rec["ngram_entropy"] = _mean([ngram_entropy(t) for t in gens])
        if snippets is not None and tfidf is not None and c.relation_id and c.target_new_id:
            refs = [s["text"] for s in snippets.get((c.relation_id, c.target_new_id), [])]
            if refs:
                rec["reference_score"] = tfidf_similarity(" ".join(gens), " ".join(refs), tfidf)


def evaluate_counterfact_case(model: nn.Module, tok: Any, case: CounterFactCase, **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_counterfact_cases` for one case."""
    return evaluate_counterfact_cases(model, tok, [case], **kwargs)[0]


# ----------------------------------------------------------------------------- zsRE


def evaluate_zsre_cases(
    model: nn.Module, tok: Any, cases: Sequence[ZsreCase], *, batch_size: int = 32
) -> list[dict[str, Any]]:
    """Per-case zsRE token accuracies, teacher forced, as in the MEND/MEMIT zsRE evaluation.

    The question is followed by ``" " + answer``; each answer token counts as correct when it is the
    argmax given the question and the answer's earlier tokens. Per case (in [0, 1]):
    ``efficacy`` (the case's ``target_new`` after ``src``), ``generalization`` (``target_new`` after
    ``rephrase``), ``specificity`` (``loc_ans`` after the case's ``neighborhood_prompt``). The case's
    convention sets both (``answers[0]`` and the cleaned ``loc`` + "?" by default, as the seed).
    Lists of per-token results are kept under the seed's names ``rewrite_prompts_correct``,
    ``paraphrase_prompts_correct``, ``neighborhood_prompts_correct`` (earlier run folders:
    ``rewrite_correct``, ``paraphrase_correct``, ``neighborhood_correct``; nothing reads them back).
    """
    prompts: list[str] = []
    targets: list[str] = []
    for c in cases:
        prompts += [c.src, c.rephrase, c.neighborhood_prompt]
        targets += [c.target_new, c.target_new, c.loc_ans]
    scores = score_targets(model, tok, prompts, targets, batch_size=batch_size)
    records = []
    for k, c in enumerate(cases):
        rw, para, loc = scores[3 * k : 3 * k + 3]
        records.append({
            "case_id": c.case_id,
            "rewrite_prompts_correct": list(rw.correct),
            "paraphrase_prompts_correct": list(para.correct),
            "neighborhood_prompts_correct": list(loc.correct),
            "efficacy": _mean([float(x) for x in rw.correct]),
            "generalization": _mean([float(x) for x in para.correct]),
            "specificity": _mean([float(x) for x in loc.correct]),
        })
    return records


# ----------------------------------------------------------------------------- summaries


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (the limit)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means ×100 over cases of every per-case metric present, plus ``score`` and ``n_cases``.

    ``score`` = harmonic mean of the ES, PS and NS means (×100), when all three exist. Records of the
    form ``{"pre": {...}, "post": {...}}`` give ``{"pre": summary, "post": summary}``. ``None``
    values (a case without prompts of that kind) are left out of that metric's mean.
    """
    if records and any(k in records[0] for k in ("pre", "post")):
        return {part: summarize([r[part] for r in records if part in r]) for part in ("pre", "post")
                if any(part in r for r in records)}
    out: dict[str, Any] = {"n_cases": len(records)}
    for key in (*COUNTERFACT_KEYS, *ZSRE_KEYS):
        vals = [float(r[key]) for r in records if r.get(key) is not None]
        if vals:
            out[key] = 100.0 * sum(vals) / len(vals)
    if all(k in out for k in SCORE_PARTS):
        out["score"] = harmonic_mean([out[k] for k in SCORE_PARTS])
    return out
