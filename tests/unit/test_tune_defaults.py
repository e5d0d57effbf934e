"""Hparams for models without built-ins: the automatic default (layers by the depth rule, λ = d_k,
a one-line warning naming `fastmemit tune`), and built-ins matched by identity, never by shape."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from torch import nn

from fastmemit import Editor
from fastmemit.errors import EditError
from fastmemit.hparams_registry import (
    KNOWN_MODELS,
    automatic_hparams,
    automatic_layers,
    builtin_hparams,
    builtin_name,
    embedding_probe,
    model_key,
)
from fastmemit.methods import available_methods, get_method
from fastmemit.models.arch import key_dim
from tests.helpers import tiny_llm

pytestmark = pytest.mark.usefixtures("one_thread_module")

# (layers, published or swept last edited layer): the rule's evidence, docs/tune.md
PUBLISHED_LAST = {24: 8, 36: 12, 48: 17, 28: 8, 32: 8, 30: 8}


@pytest.mark.parametrize("depth", sorted(PUBLISHED_LAST))
def test_depth_rule_ends_within_three_layers_of_the_published_windows(depth):
    layers = automatic_layers(depth)
    assert layers == list(range(layers[-1] - 4, layers[-1] + 1))  # five consecutive layers
    assert abs(layers[-1] - PUBLISHED_LAST[depth]) <= 3
    assert layers[-1] == int(0.3 * depth + 0.5)


@pytest.mark.parametrize(("depth", "expected"), [(2, [0]), (3, [0, 1]), (6, [0, 1, 2]), (18, [1, 2, 3, 4, 5])])
def test_depth_rule_on_shallow_models_never_edits_the_final_layer(depth, expected):
    assert automatic_layers(depth) == expected
    assert automatic_layers(depth, single=True) == expected[-1:]
    assert max(expected) <= depth - 2


def test_a_one_layer_model_cannot_get_automatic_layers():
    with pytest.raises(EditError, match="at least 2 layers"):
        automatic_layers(1)


@pytest.mark.parametrize("method", available_methods())
def test_model_without_builtin_gets_automatic_defaults_with_a_warning_naming_tune(tokenizer, caplog, method):
    model = tiny_llm("llama", len(tokenizer))
    assert model_key(model) is None
    with caplog.at_level(logging.WARNING, logger="fastmemit"):
        hp = builtin_hparams(method, model)
    m = get_method(method)
    assert hp.layers == automatic_layers(3, single=m.single_layer)
    assert hp.mom2_update_weight == key_dim(model) == 128
    assert hp.dynamic and hp.dynamic_multiplier == 10 and hp.context_template_length_params == [[10, 5]]
    (rec,) = [r for r in caplog.records if "fastmemit tune" in r.getMessage()]
    msg = rec.getMessage()
    assert "\n" not in msg and f"--method {m.name}" in msg and "λ = d_k = 128" in msg
    assert type(hp) is m.hparams_cls


def test_editor_without_hparams_edits_a_tiny_model_with_the_automatic_default(tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(tokenizer.decode([i]) for i in range(300, 3000)) * 2)
    model = tiny_llm("llama", len(tokenizer))
    with caplog.at_level(logging.WARNING, logger="fastmemit"):
        editor = Editor(model, tokenizer, "EMMET", None, corpus=str(corpus), show_progress=False)
    assert editor.hp.layers == [0, 1] and any("fastmemit tune" in r.getMessage() for r in caplog.records)
    result = editor.edit([{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}])
    assert sorted(result.deltas) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    result.restore()


def test_a_name_with_no_builtin_is_still_an_error():
    with pytest.raises(EditError, match="no built-in EMMET hparams for 'no-such-model'"):
        builtin_hparams("EMMET", "no-such-model")
    with pytest.raises(EditError, match="no model"):
        builtin_hparams("EMMET", None)


# ----------------------------------------------------------------------------- identity, not shape


def _random_smollm2_shaped() -> nn.Module:
    """A random llama with smollm2-135m's config, named like the converted smollm2 folder."""
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    cfg._name_or_path = "/root/.cache/fastmemit/models/smollm2-135m-float32"
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def smollm2_shaped() -> nn.Module:
    return _random_smollm2_shaped()


def test_a_random_model_with_smollm2s_config_does_not_get_smollm2s_builtins(smollm2_shaped, caplog):
    builtin = builtin_hparams("EMMET", "smollm2-135m")
    assert model_key(smollm2_shaped) is None
    with caplog.at_level(logging.WARNING, logger="fastmemit"):
        hp = builtin_hparams("EMMET", smollm2_shaped)
    assert hp.layers == automatic_layers(30) != builtin.layers
    assert hp.mom2_update_weight == 1536 != builtin.mom2_update_weight
    # the warning names the model as it was loaded (the alias of fastmemit's converted copy)
    assert any("fastmemit tune --model smollm2-135m --method EMMET" in r.getMessage() for r in caplog.records)


def test_smollm2s_weights_are_its_identity_whatever_the_name(smollm2_shaped):
    known = next(k for k in KNOWN_MODELS if k.name == "smollm2-135m")
    model = _random_smollm2_shaped()
    model.config._name_or_path = "/somewhere/my-model"
    flat = model.get_input_embeddings().weight.data.view(-1)
    step = flat.numel() // len(known.probe)
    with torch.no_grad():
        flat[::step][: len(known.probe)] = torch.tensor(known.probe)
    assert model_key(model) == "smollm2-135m"
    assert builtin_hparams("EMMET", model).to_dict() == builtin_hparams("EMMET", "smollm2-135m").to_dict()
    assert builtin_name("EMMET", model) == "smollm2-135m" and builtin_name("EMMET", smollm2_shaped) is None
    with torch.no_grad():  # in bfloat16 too (the probe tolerates its rounding)
        assert model_key(model.to(torch.bfloat16)) == "smollm2-135m"
    probe = embedding_probe(smollm2_shaped)
    assert probe is not None and probe[0] == known.probe_numel


class _Named(nn.Module):
    """A stand-in with only a config: hub models are recognized by their id (their weights are not shipped)."""

    def __init__(self, name: str, shape: tuple[str, int, int, int]) -> None:
        super().__init__()
        mt, hidden, layers, inner = shape
        self.config = tf.PretrainedConfig(name_or_path=name)
        self.config.model_type = mt
        self.config.n_embd, self.config.n_layer, self.config.n_inner = hidden, layers, inner


@pytest.mark.parametrize(("name", "expected"), [
    ("openai-community/gpt2-xl", "gpt2-xl"),
    ("/data/hub/models--openai-community--gpt2-xl/snapshots/abc123", "gpt2-xl"),
    ("/models/gpt2-xl", "gpt2-xl"),
    ("someone/finetuned-gpt2", None),
    ("", None),
])
def test_hub_models_are_matched_by_their_id_and_shape(name, expected):
    assert model_key(_Named(name, ("gpt2", 1600, 48, 6400))) == expected
    assert model_key(_Named(name, ("gpt2", 1600, 47, 6400))) is None  # the id with another shape: not that model


def test_automatic_hparams_can_be_asked_for_directly_without_a_warning(tokenizer, caplog):
    model = tiny_llm("gpt2", len(tokenizer))
    with caplog.at_level(logging.WARNING, logger="fastmemit"):
        hp = automatic_hparams("MEMIT", model)
    assert hp.layers == [0, 1] and hp.mom2_update_weight == 128 and not caplog.records
