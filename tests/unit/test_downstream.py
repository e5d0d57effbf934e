"""Downstream few-shot checks: parsers, flags, metrics, data loading, prompt fitting, batched scoring
on tiny random models (batched == one at a time), a forced-answer model whose scores are known,
plots/records, the CLI, and one small run on the real smollm2-135m."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from fastmemit.downstream import (
    INVALID,
    DownstreamDataError,
    DownstreamError,
    Task,
    accuracy,
    append_jsonl,
    available_tasks,
    classification_metrics,
    context_length,
    evaluate_tasks,
    fit_prompts,
    generate_continuations,
    get_task,
    invalid_rate,
    letter_parser,
    load_records,
    load_task_data,
    mcc,
    option_logprobs,
    parse_task_flags,
    read_jsonl,
    register_task,
    results_to_records,
    split_prompt_option,
    weighted_f1,
    word_parser,
)
from fastmemit.downstream.base import is_str, one_of
from fastmemit.downstream.data import ENV_DATA, default_data_dir
from tests.helpers import tiny_llm

ALL_TASKS = ("sst2", "mrpc", "cola", "rte", "mmlu", "sentiment_analysis", "nli", "dialogue")


# ----------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("text, expected", [
    (" positive", 1), ("positive", 1), (" Positive.", 1), ("NEGATIVE!", 0), ("\n  negative\nReview", 0),
    (" positively", INVALID), (" nonnegative", INVALID), ("", INVALID), (" neutral\n", INVALID),
    (" negative, not positive", 0),  # the first label word wins
])
def test_sst2_parser_whole_words_any_case(text, expected):
    assert get_task("sst2").parse(text) == expected


@pytest.mark.parametrize("text, expected", [
    (" No", 0), (" no.", 0), ("NO\n", 0), (" Yes", 1), ("yes!", 1), ("  \tYes\nSentence", 1),
    (" not sure", INVALID), (" know", INVALID), (" none", INVALID), (" nothing", INVALID),
    (" yesterday", INVALID), (" eyes", INVALID), (" Nope", INVALID), ("", INVALID),
])
def test_yes_no_parser_not_is_not_no(text, expected):
    assert get_task("mrpc").parse(text) == expected
    assert get_task("cola").parse(text) == expected


@pytest.mark.parametrize("task", ["rte", "nli"])
@pytest.mark.parametrize("text, expected", [
    (" True", 0), (" true\n", 0), ("TRUE.", 0), (" False", 1), ("false", 1),
    (" entailment", 0), (" not_entailment", 1), (" Not_Entailment", 1), (" non-entailment", INVALID),
    (" untrue", INVALID), (" Truely", INVALID), (" falsehood", INVALID), (" maybe", INVALID),
])
def test_entailment_parser_not_entailment_is_not_entailment(task, text, expected):
    # class 0 = entailment ("True"), class 1 = not_entailment ("False") for both tasks
    assert get_task(task).parse(text) == expected


@pytest.mark.parametrize("task", ["mmlu", "dialogue"])
@pytest.mark.parametrize("text, expected", [
    (" A", 0), (" B\n", 1), ("C", 2), (" D.", 3), (" (B)", 1), (" C) because", 2), ("\n\nD\nQuestion", 3),
    (" b\n", 1), (" (c)", 2), (" d.", 3), (" a", 0), (" B is right", 1),
    (" a good guess", INVALID), (" E", INVALID), (" Answer: A", INVALID), (" Ab", INVALID),
    (" AB", INVALID), ("", INVALID), (" 1", INVALID),
])
def test_letter_parser_wants_a_leading_standalone_letter(task, text, expected):
    assert get_task(task).parse(text) == expected


def test_word_parser_rejects_multiword_answers():
    with pytest.raises(ValueError):
        word_parser({"very good": 1})
    assert letter_parser("AB")(" C") == INVALID


# ----------------------------------------------------------------------------- prompts and labels


def test_prompt_templates_are_the_research_codes():
    sst2 = get_task("sst2")
    r = {"sentence": "a fine film ", "label": 1}
    assert sst2.shot(r) == "Review : a fine film \nSentiment : positive\n"
    assert sst2.test(r) == "Review :a fine film \nSentiment :"  # no space after "Review :" (as there)
    cola = get_task("cola")
    assert cola.test({"sentence": "He left.", "label": 0}) == (
        "Is this sentence linguistically acceptable?\nSentence: He left.\nAnswer: ")
    mmlu = get_task("mmlu")
    q = {"question": "2+2?", "choices": ["1", "2", "3", "4"], "answer": 3}
    assert mmlu.shot(q) == "Question: 2+2?\n(A) 1\n(B) 2\n(C) 3\n(D) 4\nAnswer: D\n"
    assert mmlu.options == (" A", " B", " C", " D")
    dia = get_task("dialogue")
    d = {"article": "f : hi", "options": ["m : a", "m : b", "m : c", "m : d"], "answers": "C"}
    assert dia.test(d).endswith("(A)m : a\n(B)m : b\n(C)m : c\n(D)m : d\nAnswer:")
    assert dia.shot(d).endswith("Answer: C\n\n") and dia.label_of(d) == 2
    nli = get_task("nli")
    assert nli.test({"sentence1": "P.", "sentence2": "H.", "label": "entailment"}) == "P. entails the H. True or False? Answer:"


def test_rte_label_direction_is_fixed():
    rte = get_task("rte")
    entailed = {"sentence1": "A cat sat.", "sentence2": "A cat sat.", "label": 0}  # GLUE 0 = entailment
    not_entailed = {"sentence1": "A cat sat.", "sentence2": "A dog flew.", "label": 1}
    assert rte.shot(entailed).endswith("answer: True\n")
    assert rte.shot(not_entailed).endswith("answer: False\n")
    assert rte.labels[rte.label_of(entailed)] == "entailment"
    assert rte.options[rte.label_of(entailed)] == " True"
    assert rte.parse(" True") == rte.label_of(entailed)
    assert rte.parse(" False") == rte.label_of(not_entailed)


# ----------------------------------------------------------------------------- registry and flags


def test_registry_has_the_eight_tasks_and_the_sst_alias():
    assert set(ALL_TASKS) <= set(available_tasks())
    assert get_task("sst") is get_task("sst2") is get_task(" SST2 ")


def test_register_task_adds_one_and_refuses_name_clashes():
    t = Task(name="toy_yesno", filename="toy.jsonl", labels=("no", "yes"), verbalizers=("No", "Yes"),
             fields={"text": is_str, "label": one_of(0, 1)}, label_of=lambda r: r["label"],
             shot=lambda r: f"{r['text']} {('No', 'Yes')[r['label']]}\n", test=lambda r: r["text"],
             parse=word_parser({"no": 0, "yes": 1}), aliases=("toy",))
    register_task(t)
    register_task(t)  # idempotent for the same object
    assert get_task("toy") is t
    with pytest.raises(DownstreamError, match="already"):
        register_task(Task(**{**t.__dict__, "aliases": ()}))
    with pytest.raises(DownstreamError, match="already used"):
        register_task(Task(**{**t.__dict__, "name": "sst"}))


def test_parse_task_flags_accepts_the_research_codes_flags():
    f = parse_task_flags("sst,mmlu,RTE", "3, 3,0", 50)
    assert f.tasks == ["sst2", "mmlu", "rte"] and f.n_shots == [3, 3, 0] and f.n_tests == 50
    f = parse_task_flags("sst2,cola", None, None)
    assert f.n_shots == [0, 0] and f.n_tests is None


@pytest.mark.parametrize("tasks, shots, tests, message", [
    ("sst2,mmlu", "3", 10, "1 value"),
    ("sst2", "3,3", 10, "2 value"),
    ("sst2,glue9", "1,1", 10, "unknown downstream task 'glue9'"),
    ("sst,sst2", "1,1", 10, "listed twice"),
    ("sst2,,rte", "1,1,1", 10, "empty"),
    ("sst2", "11", 10, "0..10"),
    ("sst2", "-1", 10, "0..10"),
    ("sst2", "three", 10, "not an integer"),
    ("sst2", "1", 0, "positive integer"),
])
def test_parse_task_flags_errors_are_clear(tasks, shots, tests, message):
    with pytest.raises(DownstreamError, match=message):
        parse_task_flags(tasks, shots, tests)


def test_unknown_task_error_lists_known_tasks():
    with pytest.raises(DownstreamError) as e:
        get_task("mnli")
    assert "sst2" in str(e.value) and "dialogue" in str(e.value) and "sst=sst2" in str(e.value)


# ----------------------------------------------------------------------------- metrics


def test_metrics_binary_known_values():
    t, p = [0, 0, 1, 1], [0, 1, 1, 1]
    assert accuracy(t, p) == 0.75
    assert weighted_f1(t, p) == pytest.approx((2 / 3 * 2 + 4 / 5 * 2) / 4)
    assert mcc(t, p) == pytest.approx(2 / math.sqrt(12))  # (TP·TN − FP·FN)/√(...) = (2·1 − 1·0)/√(3·2·2·1)
    assert mcc([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert mcc([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)


def test_metrics_multiclass_known_values():
    t, p = [0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 1]
    assert accuracy(t, p) == pytest.approx(4 / 6)
    assert weighted_f1(t, p) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert mcc(t, p) == pytest.approx(0.5)  # (4·6 − 12)/√((36−12)(36−12))


def test_metrics_invalid_is_an_extra_class():
    t, p = [0, 1, 1, 0], [0, 1, INVALID, INVALID]
    m = classification_metrics(t, p)
    assert m["accuracy"] == 0.5 and m["invalid"] == 0.5 and m["invalid_count"] == 2 and m["correct"] == 2
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["mcc"] == pytest.approx(4 / math.sqrt(80))  # classes {-1, 0, 1}: cov 4, 8, 10
    assert invalid_rate([INVALID] * 3) == 1.0


def test_metrics_degenerate_single_class_cases():
    assert mcc([1, 1, 1], [1, 1, 1]) == 0.0  # labels one class: denominator 0 -> 0
    assert weighted_f1([1, 1, 1], [1, 1, 1]) == 1.0 and accuracy([1, 1, 1], [1, 1, 1]) == 1.0
    assert mcc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # predictions one class
    assert weighted_f1([0, 1, 0, 1], [1, 1, 1, 1]) == pytest.approx(0.5 * (2 / 3))
    assert mcc([0, 1], [INVALID, INVALID]) == 0.0 and weighted_f1([0, 1], [INVALID, INVALID]) == 0.0
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError):
        mcc([0, 1], [0])


# ----------------------------------------------------------------------------- data files


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _sst2_rows(labels):
    return [{"sentence": f"movie number {i} was shown ", "label": lab, "idx": i} for i, lab in enumerate(labels)]


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"label": 1}), "missing field 'sentence'"),
    (json.dumps({"sentence": "x", "label": "1"}), "field 'label'"),
    (json.dumps({"sentence": "x", "label": 2}), "field 'label'"),
    (json.dumps({"sentence": "x", "label": True}), "field 'label'"),
    (json.dumps({"sentence": 5, "label": 1}), "field 'sentence'"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, bad_line, message):
    rows = _sst2_rows([1, 0]) + [bad_line] + _sst2_rows([1] * 10)
    path = _write_jsonl(tmp_path / "sst2.jsonl", rows)
    with pytest.raises(DownstreamDataError, match=message) as e:
        load_records(get_task("sst2"), path)
    assert f"{path}:3:" in str(e.value)


def test_malformed_list_fields_and_missing_files(tmp_path):
    bad = {"question": "q", "choices": ["a", "b", "c"], "answer": 0}
    path = _write_jsonl(tmp_path / "mmlu.jsonl", [bad])
    with pytest.raises(DownstreamDataError, match=r"mmlu.jsonl:1: field 'choices': .*4 strings, got 3"):
        load_records(get_task("mmlu"), path)
    with pytest.raises(DownstreamDataError, match="does not exist"):
        load_records(get_task("mmlu"), tmp_path / "nope.jsonl")
    _write_jsonl(tmp_path / "sst2.jsonl", _sst2_rows([1, 0] * 5))  # 10 records: no tests
    with pytest.raises(DownstreamDataError, match="need more than 10"):
        load_task_data(get_task("sst2"), tmp_path)


def test_data_folder_env_and_per_task_files(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DATA, str(tmp_path / "missing"))
    with pytest.raises(DownstreamDataError, match=ENV_DATA):
        default_data_dir()
    monkeypatch.setenv(ENV_DATA, str(tmp_path))
    assert default_data_dir() == tmp_path
    other = _write_jsonl(tmp_path / "elsewhere.jsonl", _sst2_rows([1, 0] * 7))
    data = load_task_data(get_task("sst2"), data_files={"sst": other})
    assert data.path == other and len(data.pool) == 10 and len(data.tests) == 4
    assert data.shots(2) == data.pool[:2]
    with pytest.raises(DownstreamDataError, match="shots"):
        data.shots(11)


def test_real_files_load_and_split_as_the_research_code(shared_data):
    folder = shared_data / "downstream"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    counts = {"sst2": 856, "mrpc": 258, "cola": 644, "rte": 262, "mmlu": 1516, "nli": 2489,
              "sentiment_analysis": 872, "dialogue": 886}
    for name, n in counts.items():
        task = get_task(name)
        data = load_task_data(task, folder)
        assert len(data.pool) == 10 and len(data.tests) == n - 10
        labels = [task.label_of(r) for r in data.tests[:40]]
        assert set(labels) == set(range(task.n_classes))  # balanced heads: every class appears
    first_rte = load_task_data(get_task("rte"), folder).pool[0]
    assert first_rte["label_text"] == "not_entailment" and first_rte["reference_target"] == "True"
    assert get_task("rte").shot(first_rte).endswith("answer: False\n")  # fixed direction


# ----------------------------------------------------------------------------- prompt fitting, context


def test_fit_prompts_drops_shots_from_the_end(tokenizer):
    shots = ["one two three\n", "four five six seven eight nine\n", "ten eleven\n"]
    q_short, q_long = "Q: x?", "Q: " + "word " * 30 + "?"
    n = {s: len(tokenizer(s)["input_ids"]) for s in [*shots, q_short]}
    budget = n[shots[0]] + n[shots[1]] + n[q_short] + 1  # room for two shots with the short question
    out = fit_prompts(tokenizer, shots, [q_short, q_long], budget)
    assert out[0].n_shots == 2 and out[0].text == shots[0] + shots[1] + q_short
    assert out[0].n_tokens <= budget
    assert out[1].n_shots == 0 and out[1].text == q_long  # the long question keeps no shot
    full = fit_prompts(tokenizer, shots, [q_short], 10_000)[0]
    assert full.n_shots == 3 and full.text == "".join(shots) + q_short


def test_context_length_comes_from_the_config(tiny_model, tokenizer):
    assert context_length(tiny_model("llama")) == 256  # max_position_embeddings
    assert context_length(tiny_model("gpt2")) == 256  # n_positions

    class NoConfig(torch.nn.Module):
        config = None

    with pytest.raises(DownstreamError, match="max_length"):
        context_length(NoConfig(), None)


def test_evaluate_drops_shots_when_the_context_is_tiny(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "sst2.jsonl", _sst2_rows([1, 0] * 7))
    model = tiny_llm("llama", len(tokenizer))
    model.config.max_position_embeddings = 40  # each shot ~12 tokens, each question ~10
    res = evaluate_tasks(model, tokenizer, ["sst2"], [5], n_tests=4, data_dir=tmp_path, mode="loglik")["sst2"]
    assert res["n_shots"] == 5 and 0 < res["shots_used_min"] < 5


def test_split_prompt_option_keeps_the_research_codes_spacing(tokenizer):
    ctx, opt = split_prompt_option(tokenizer, "Answer: ", " Yes")  # cola: "Answer:  Yes"
    assert tokenizer.decode(ctx) == "Answer: " and tokenizer.decode(opt) == " Yes"
    ctx, opt = split_prompt_option(tokenizer, "Sentiment :", " positive")
    assert tokenizer.decode(ctx) == "Sentiment :" and tokenizer.decode(opt) == " positive" and len(opt) == 1


# ----------------------------------------------------------------------------- batched scoring


PROMPTS = ["The river flows through the old city. Answer:", "Music", "A longer prompt about the history of the "
           "university and its first school, which was", "Team album film:"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_batched_loglik_matches_one_at_a_time(arch, tiny_model, tokenizer):
    model = tiny_model(arch)
    options = [" yes", " no way", " the river flows"]  # multi-token options: real per-option forwards
    batched = option_logprobs(model, tokenizer, PROMPTS, options, batch_size=8)
    single = torch.stack([option_logprobs(model, tokenizer, [p], options, batch_size=1)[0] for p in PROMPTS])
    assert batched.shape == (4, 3) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    summed = option_logprobs(model, tokenizer, PROMPTS, options, reduction="sum")
    n_tok = torch.tensor([len(split_prompt_option(tokenizer, "x", o)[1]) for o in options], dtype=torch.float64)
    torch.testing.assert_close(summed, batched * n_tok, atol=1e-4, rtol=0)


def test_loglik_equals_a_plain_forward(tiny_model, tokenizer):
    model = tiny_model("llama")
    prompt, option = "The river flows", " through the city"
    ctx, cont = split_prompt_option(tokenizer, prompt, option)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0]  # (T, V)
    lp = torch.log_softmax(logits.double(), -1)
    expected = torch.stack([lp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)]).mean()
    got = option_logprobs(model, tokenizer, [prompt], [option])[0, 0]
    assert float(got) == pytest.approx(float(expected), abs=1e-4)


def _peaky_llama(tokenizer, seed=1, arch="llama"):
    """A tiny model whose logits are sharp enough that greedy decoding has no near-ties."""
    model = tiny_llm(arch, len(tokenizer), seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def test_batched_generation_matches_one_at_a_time(tokenizer):
    model = _peaky_llama(tokenizer)
    batched = generate_continuations(model, tokenizer, PROMPTS, gen_len=4, batch_size=4)
    single = [generate_continuations(model, tokenizer, [p], gen_len=4, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(t for t in batched)


SHOTS = "The river flows through the city. Answer: yes\n\nMusic of the year was new. Answer: no\n\n"
QUESTIONS = ["Q: team album film? Answer:", "Q: the first school of the university, which was built in the old "
             "city by the river? Answer:", "Q: war? Answer:"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2", "gemma3_text"])
def test_shared_prefix_cache_gives_the_same_scores(arch, tiny_model, tokenizer):
    from fastmemit.downstream import scoring

    # gemma2/gemma3 have a 16-token sliding window, shorter than the shots: the cache must not be used there
    model = tiny_model(arch)
    prompts = [SHOTS + q for q in QUESTIONS]
    options = [" yes", " no", " the river"]
    plan = scoring._plan_options(tokenizer, prompts, options, 256)
    prefix = scoring._shared_prefix(model, tokenizer, SHOTS, plan.seqs)
    if arch.startswith("gemma"):
        assert prefix is None
    else:  # the cache is used: it covers most of the shots and every input starts with it
        assert prefix is not None and len(prefix.tokens) >= 8 and all(prefix.starts(s) for s in plan.seqs)
    plain = option_logprobs(model, tokenizer, prompts, options, batch_size=2)
    shared = option_logprobs(model, tokenizer, prompts, options, batch_size=2, shared_prefix=SHOTS)
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=0)


def test_shared_prefix_check_catches_a_local_attention_window(tiny_model, tokenizer, monkeypatch, caplog):
    from fastmemit.downstream import scoring

    # pretend gemma2 had no sliding window: the batched check must still find the difference
    monkeypatch.setattr(scoring, "attention_window", lambda model: None)
    model = tiny_model("gemma2")
    seqs = scoring._token_ids(tokenizer, [SHOTS + q for q in QUESTIONS])
    assert scoring._shared_prefix(model, tokenizer, SHOTS, seqs) is None and "disagrees" in caplog.text


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_greedy_decoding_matches_hf_generate(arch, tokenizer):
    model = _peaky_llama(tokenizer, arch=arch)
    prompts = [SHOTS + q for q in QUESTIONS] + ["no shots here"]
    reference = generate_continuations(model, tokenizer, prompts, gen_len=4, use_generate=True)
    assert generate_continuations(model, tokenizer, prompts, gen_len=4, batch_size=3) == reference
    assert generate_continuations(model, tokenizer, prompts, gen_len=4, batch_size=3, shared_prefix=SHOTS) == reference


def test_shared_prefix_is_cut_where_tokens_part_and_checked(tiny_model, tokenizer, caplog):
    from fastmemit.downstream.scoring import _checked, _shared_prefix, _token_ids
    from fastmemit.lm import PrefixCache, pad_id

    model = tiny_model("llama")
    seqs = _token_ids(tokenizer, [SHOTS + q for q in QUESTIONS])
    prefix = _shared_prefix(model, tokenizer, SHOTS, seqs)
    shots = _token_ids(tokenizer, [SHOTS])[0]
    # "\n\n" + "Q" tokenizes differently from "\n\n" alone: the cached prefix stops before the merge
    assert prefix is not None and 0 < len(prefix.tokens) <= len(shots) and all(prefix.starts(s) for s in seqs)
    assert tuple(seqs[0][: len(prefix.tokens)]) == prefix.tokens
    assert prefix.verify(seqs, tol=1e-3) <= 1e-3
    # a cache that does not belong to the prefix is caught by the check and dropped
    bad = PrefixCache(model, [list(reversed(prefix.tokens))], pad_id(tokenizer), shared=True)
    bad.tokens = prefix.tokens
    assert bad.verify(seqs, tol=1e-3) > 1e-3 and _checked(bad, seqs, tol=1e-3) is None
    assert "disagrees" in caplog.text


def test_evaluation_leaves_the_model_and_tokenizer_as_they_were(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "sst2.jsonl", _sst2_rows([1, 0] * 7))
    model = tiny_llm("llama", len(tokenizer)).train()
    side = tokenizer.padding_side
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_tasks(model, tokenizer, "sst2", 2, n_tests=2, data_dir=tmp_path)
    assert model.training and tokenizer.padding_side == side
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- known answers


class _ForceToken:
    """Forward hook on the LM head adding +50 to one token's logit: the model always says that token."""

    def __init__(self, model, token_id):
        self.model, self.token_id = model, token_id

    def __enter__(self):
        def hook(_module, _inputs, out):
            out = out.clone()
            out[..., self.token_id] += 50.0
            return out

        self.handle = self.model.lm_head.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("forced, acc, f1", [
    ("positive", 0.75, 0.75 * (6 / 7)),  # labels 1,1,0,1: all predicted 1
    ("negative", 0.25, 0.25 * (2 / 5)),  # all predicted 0
])
def test_forced_answer_gives_known_scores_both_ways(tmp_path, tiny_model, tokenizer, forced, acc, f1):
    _write_jsonl(tmp_path / "sst2.jsonl", _sst2_rows([1, 0] * 5 + [1, 1, 0, 1]))
    model = tiny_model("llama")
    (token,) = tokenizer(" " + forced)["input_ids"]
    with _ForceToken(model, token):
        res = evaluate_tasks(model, tokenizer, ["sst"], [3], data_dir=tmp_path, batch_size=3,
                             return_predictions=True)["sst2"]
        unshared = evaluate_tasks(model, tokenizer, ["sst2"], [3], data_dir=tmp_path, mode="loglik",
                                  share_prefill=False, return_predictions=True)["sst2"]
    assert res["n_tests"] == 4 and res["shots_used_min"] == 3
    for mode in ("generate", "loglik"):
        m = res[mode]
        assert m["accuracy"] == pytest.approx(acc) and m["f1"] == pytest.approx(f1)
        assert m["mcc"] == 0.0 and m["invalid"] == 0.0 and m["n"] == 4
    assert all(c.split()[0] == forced for c in res["generate"]["continuations"])
    # the scores read from generation's first step equal those of separate forward passes
    torch.testing.assert_close(torch.tensor(res["loglik"]["scores"]), torch.tensor(unshared["loglik"]["scores"]),
                               atol=1e-4, rtol=0)


def test_unparsable_generation_is_invalid(tmp_path, tiny_model, tokenizer):
    _write_jsonl(tmp_path / "sst2.jsonl", _sst2_rows([1, 0] * 7))
    model = tiny_model("llama")
    (token,) = tokenizer(" neutral")["input_ids"]
    with _ForceToken(model, token):
        m = evaluate_tasks(model, tokenizer, ["sst2"], [1], data_dir=tmp_path, mode="generate")["sst2"]["generate"]
    assert m["invalid"] == 1.0 and m["accuracy"] == 0.0 and m["mcc"] == 0.0


def test_letter_task_loglik_picks_the_forced_letter(tmp_path, tiny_model, tokenizer):
    rows = [{"question": f"q{i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(18)]
    _write_jsonl(tmp_path / "mmlu.jsonl", rows)
    model = tiny_model("llama")
    (token,) = tokenizer(" C")["input_ids"]
    with _ForceToken(model, token):
        res = evaluate_tasks(model, tokenizer, ["mmlu"], [2], data_dir=tmp_path, return_predictions=True)["mmlu"]
    assert res["loglik"]["predictions"] == [2] * 8 and res["generate"]["predictions"] == [2] * 8
    assert res["loglik"]["accuracy"] == 0.25 and res["loglik"]["f1"] == pytest.approx(0.25 * 0.4)


# ----------------------------------------------------------------------------- records, plots, CLI


def test_append_jsonl_survives_a_torn_line(tmp_path):
    path = tmp_path / "runs" / "downstream.jsonl"
    append_jsonl(path, {"edits_so_far": 0, "task": "sst2", "accuracy": 0.5})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"edits_so_far": 10, "task": "ss')  # a crash mid-write
    append_jsonl(path, [{"edits_so_far": 20, "task": "sst2", "accuracy": 0.4}, {"edits_so_far": 20, "task": "mmlu"}])
    rows = read_jsonl(path)
    assert [r["edits_so_far"] for r in rows] == [0, 20, 20]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_plot_downstream_writes_png_csv_json(tmp_path):
    from fastmemit.downstream.plots import plot_downstream

    records = []
    for edits, acc in [(0, 0.8), (100, 0.7), (200, 0.5)]:
        for task in ("sst2", "mmlu"):
            for mode in ("generate", "loglik"):
                records.append({"edits_so_far": edits, "task": task, "mode": mode, "accuracy": acc,
                                "f1": acc - 0.1, "mcc": acc - 0.3})
    paths = plot_downstream(records, tmp_path / "plots" / "downstream.png")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].startswith("edits_so_far,task,mode,accuracy,f1,mcc") and len(lines) == 13
    assert len(json.loads(paths["json"].read_text())) == 12
    with pytest.raises(ValueError):
        plot_downstream([{"task": "sst2"}], tmp_path / "x.png")


def test_results_to_records_rows(tmp_path, tiny_model, tokenizer):
    _write_jsonl(tmp_path / "sst2.jsonl", _sst2_rows([1, 0] * 7))
    res = evaluate_tasks(tiny_model("llama"), tokenizer, "sst2", 0, data_dir=tmp_path, mode="loglik")
    rows = results_to_records(res, edits_so_far=0)
    assert len(rows) == 1 and rows[0]["mode"] == "loglik" and rows[0]["edits_so_far"] == 0 and rows[0]["n"] == 4


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llm("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_prints_a_table_and_writes_json(tmp_path, tiny_model_dir, capsys):
    from fastmemit.cli import main

    _write_jsonl(tmp_path / "sst2.jsonl", _sst2_rows([1, 0] * 7))
    rows = [{"question": f"q{i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(14)]
    mm = _write_jsonl(tmp_path / "other.jsonl", rows)
    out = tmp_path / "res.json"
    rc = main(["downstream", "--model", str(tiny_model_dir), "--tasks", "sst,mmlu", "--number_of_few_shots", "1,2",
               "--number_of_tests", "3", "--data-dir", str(tmp_path), "--data-file", f"mmlu={mm}", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:7] == ["task", "mode", "accuracy", "invalid", "F1", "MCC", "n"]
    assert [line.split()[:2] for line in table[1:]] == [["sst2", "generate"], ["sst2", "loglik"],
                                                        ["mmlu", "generate"], ["mmlu", "loglik"]]
    report = json.loads(out.read_text())
    assert report["results"]["mmlu"]["n_shots"] == 2 and report["results"]["mmlu"]["data"] == str(mm)


def test_cli_flag_errors_exit_2_before_loading(capsys):
    from fastmemit.cli import main

    rc = main(["downstream", "--model", "no-such-model", "--tasks", "sst2,rte", "--number_of_few_shots", "3"])
    assert rc == 2 and "1 value" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_smollm2_few_tests_per_task(smollm2, shared_data):
    if not (shared_data / "downstream").is_dir():
        pytest.skip("shared downstream data not found")
    model, tok = smollm2
    os.environ.setdefault("FASTMEMIT_PROGRESS", "0")
    res = evaluate_tasks(model, tok, ["sst2", "mmlu"], [1, 1], n_tests=4, data_dir=shared_data / "downstream",
                         return_predictions=True)
    for name in ("sst2", "mmlu"):
        for mode in ("generate", "loglik"):
            m = res[name][mode]
            assert m["n"] == 4 and 0.0 <= m["accuracy"] <= 1.0 and -1.0 <= m["mcc"] <= 1.0
        # the real model answers in the expected format after one shot
        assert res[name]["generate"]["invalid"] <= 0.5
