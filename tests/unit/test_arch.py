"""The architecture table: canonical sites resolve on tiny models of every supported family."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import fastmemit
from fastmemit.errors import UnsupportedArchitectureError
from fastmemit.models import (
    SITES,
    ArchSpec,
    as_math,
    check_layers,
    get_arch,
    get_module,
    key_dim,
    mlp_down_weight,
    num_layers,
    register_architecture,
    registered_architectures,
)
from fastmemit.models import arch as arch_module
from tests.helpers import ALL_VARIANTS, ARCHS, HIDDEN, INNER, N_LAYERS


def _d_k(variant: str) -> int:
    return HIDDEN if variant == "gpt2_square" else INNER


def test_every_listed_architecture_is_registered():
    assert set(ARCHS) <= set(registered_architectures())


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_all_canonical_sites_resolve_with_expected_shapes(tiny_model, tokenizer, variant):
    model = tiny_model(variant)
    arch = get_arch(model)
    d, d_k, vocab = HIDDEN, _d_k(variant), len(tokenizer)
    assert num_layers(model) == N_LAYERS
    assert key_dim(model) == d_k
    layers = get_module(model, arch.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == N_LAYERS

    for layer in range(N_LAYERS):
        name, w = mlp_down_weight(model, layer)
        assert name == arch.site("mlp_down", layer) + ".weight"
        assert as_math(w, arch.fan_in_fan_out).shape == (d, d_k)  # math orientation: W k = v
        assert key_dim(model, layer) == d_k
        block = get_module(model, arch.site("block", layer))
        assert block is layers[layer]
        # the edited matrix lives inside its block
        assert get_module(model, arch.site("mlp_down", layer)) in list(block.modules())

    norm = get_module(model, arch.site("final_norm"))
    assert norm.weight.shape == (d,)
    head = get_module(model, arch.site("lm_head"))
    assert head.weight.shape == (vocab, d)
    assert head is model.get_output_embeddings()
    embed = get_module(model, arch.site("embed"))
    assert embed.weight.shape == (vocab, d)
    assert embed is model.get_input_embeddings()


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_fan_in_fan_out_only_for_gpt2(tiny_model, variant):
    assert get_arch(tiny_model(variant)).fan_in_fan_out is variant.startswith("gpt2")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_math_orientation_maps_keys_to_values(tiny_model, variant):
    """as_math(W) k (+ bias) equals the module's output: orientation comes from the flag, not shapes.

    gpt2_square (d == d_k) is the case where the transposed matrix has the same shape.
    """
    model = tiny_model(variant)
    arch = get_arch(model)
    module = get_module(model, arch.site("mlp_down", 1))
    _, w = mlp_down_weight(model, 1)
    W = as_math(w, arch.fan_in_fan_out)  # (d, d_k)
    k = torch.randn(5, W.shape[1], generator=torch.Generator().manual_seed(1))  # (n, d_k)
    bias = getattr(module, "bias", None)
    expected = k @ W.T + (bias if bias is not None else 0)  # (n, d)
    with torch.no_grad():
        torch.testing.assert_close(module(k), expected, rtol=1e-5, atol=1e-6)
        if variant == "gpt2_square":  # the wrong orientation would give a different answer
            assert not torch.allclose(module(k), k @ W + (bias if bias is not None else 0), atol=1e-4)


def test_unknown_model_type_names_it():
    config = types.SimpleNamespace(model_type="not_a_real_family")
    with pytest.raises(UnsupportedArchitectureError, match="not_a_real_family") as info:
        get_arch(config)
    assert "register_architecture" in str(info.value)
    model = nn.Linear(2, 2)
    model.config = config  # a model is looked up through its config
    with pytest.raises(UnsupportedArchitectureError, match="not_a_real_family"):
        get_arch(model)


def test_object_without_model_type_is_rejected():
    with pytest.raises(UnsupportedArchitectureError, match="no config.model_type"):
        get_arch(nn.Linear(2, 2))


def test_site_names_and_layer_requirements():
    spec = get_arch(types.SimpleNamespace(model_type="llama"))
    assert spec.site("mlp_down", 3) == "model.layers.3.mlp.down_proj"
    assert spec.site("block", 3) == "model.layers.3"
    assert spec.site("final_norm") == "model.norm"
    with pytest.raises(UnsupportedArchitectureError, match="per-layer"):
        spec.site("mlp_down")
    with pytest.raises(UnsupportedArchitectureError, match="unknown site 'attn'"):
        spec.site("attn", 0)
    assert set(SITES) == {"mlp_down", "block", "final_norm", "lm_head", "embed"}


class _ToyBlock(nn.Module):
    def __init__(self, d: int, d_k: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, d_k)
        self.out = nn.Linear(d_k, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.out(torch.relu(self.up(h)))


class _ToyLM(nn.Module):
    """A model family no table entry knows: ``backbone.{tok,blocks,norm}`` and ``head``."""

    def __init__(self, d: int = 8, d_k: int = 12, n: int = 2, vocab: int = 20) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy_fastmemit_test")
        self.backbone = nn.Module()
        self.backbone.tok = nn.Embedding(vocab, d)
        self.backbone.blocks = nn.ModuleList(_ToyBlock(d, d_k) for _ in range(n))
        self.backbone.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def _toy_spec(mlp_down: str = "backbone.blocks.{}.out") -> ArchSpec:
    return ArchSpec(model_types=("toy_fastmemit_test",), layers="backbone.blocks", mlp_down=mlp_down,
                    final_norm="backbone.norm", lm_head="head", embed="backbone.tok")


def _use_private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arch_module, "_REGISTRY", dict(arch_module._REGISTRY))


@pytest.fixture
def private_registry(monkeypatch):
    """A copy of the registry, so registrations in a test do not leak into the others."""
    _use_private_registry(monkeypatch)


def test_register_custom_architecture(private_registry):
    model = _ToyLM()
    spec = _toy_spec()
    fastmemit.register_architecture(spec)
    assert get_arch(model) is spec
    assert "toy_fastmemit_test" in registered_architectures()
    assert spec.block == "backbone.blocks.{}"  # default derived from layers
    assert num_layers(model) == 2
    assert key_dim(model) == 12
    name, w = mlp_down_weight(model, 1)
    assert name == "backbone.blocks.1.out.weight" and as_math(w, spec.fan_in_fan_out).shape == (8, 12)
    assert get_module(model, spec.site("block", 0)) is model.backbone.blocks[0]
    assert check_layers(model, [1, 0]) == [0, 1]


def test_duplicate_registration_errors_unless_overwrite(private_registry):
    with pytest.raises(ValueError, match="'llama' is already registered"):
        register_architecture(ArchSpec(model_types=("llama",), **arch_module._LLAMA_LIKE))
    register_architecture(_toy_spec())
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(_toy_spec())
    replacement = _toy_spec()
    register_architecture(replacement, overwrite=True)
    assert get_arch(_ToyLM()) is replacement


def test_private_registry_keeps_a_registration_inside_the_test(monkeypatch):
    """What the fixture above promises, checked in one test (independent of test order)."""
    before = dict(arch_module._REGISTRY)
    with monkeypatch.context() as m:
        _use_private_registry(m)
        register_architecture(_toy_spec())
        assert "toy_fastmemit_test" in registered_architectures()
    assert "toy_fastmemit_test" not in registered_architectures()
    assert arch_module._REGISTRY == before


def test_spec_pointing_at_missing_module_names_the_path(private_registry):
    register_architecture(_toy_spec(mlp_down="backbone.blocks.{}.ffn.out"))  # no such module
    with pytest.raises(UnsupportedArchitectureError, match=r"backbone\.blocks\.0\.ffn\.out"):
        mlp_down_weight(_ToyLM(), 0)


def test_spec_validation():
    with pytest.raises(ValueError, match="model_types"):
        ArchSpec(model_types=(), layers="a", mlp_down="a.{}.b", final_norm="n", lm_head="h", embed="e")
    with pytest.raises(ValueError, match="mlp_down must contain"):
        ArchSpec(model_types=("x",), layers="a", mlp_down="a.0.b", final_norm="n", lm_head="h", embed="e")
    with pytest.raises(ValueError, match="block must contain"):
        ArchSpec(model_types=("x",), layers="a", mlp_down="a.{}.b", final_norm="n", lm_head="h", embed="e", block="a.0")


def test_check_layers_range_and_normalization(tiny_model):
    model = tiny_model("llama")
    assert check_layers(model, [2, 0, 2]) == [0, 2]
    with pytest.raises(ValueError, match=r"layer\(s\) \[3\] out of range: this model has 3 layers \(0\.\.2\)"):
        check_layers(model, [1, 3])
    with pytest.raises(ValueError, match=r"\[-1\] out of range"):
        check_layers(model, [-1])
    with pytest.raises(ValueError, match="no layers given"):
        check_layers(model, [])
