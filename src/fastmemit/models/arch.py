"""Architecture table: canonical edit sites mapped to concrete module paths.

Every method talks about *sites* (``mlp_down``, ``block``, ``final_norm``, ``lm_head``, ``embed``)
and layer numbers; this table turns them into dotted module names for one model family. GPT-2
stores its MLP matrices as ``Conv1D`` (weight shape ``(in, out)``) which is recorded as an explicit
``fan_in_fan_out`` flag, never guessed from shapes (guessing fails when d == d_k).

Users add a family with :func:`register_architecture`::

    register_architecture(ArchSpec(
        model_types=("my_model",),
        layers="backbone.blocks",
        mlp_down="backbone.blocks.{}.ffn.out",
        final_norm="backbone.norm",
        lm_head="head",
        embed="backbone.tok",
    ))

A family that normalizes the MLP output before it joins the residual stream (Gemma 2/3:
``post_feedforward_layernorm``) declares that norm as the optional site ``post_mlp_norm``; value
targets are then computed at the edited matrix's output, where the edit is linear (docs/postnorm.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastmemit.errors import ConfigurationError, UnsupportedArchitectureError

SITES = ("mlp_down", "block", "final_norm", "lm_head", "embed")
# sites a family may lack (None in its spec): the RMSNorm applied to the MLP output before the residual add
OPTIONAL_SITES = ("post_mlp_norm",)


@dataclass(frozen=True)
class ArchSpec:
    """Where the canonical sites live in one model family.

    ``layers`` is the ``nn.ModuleList`` of decoder blocks; ``mlp_down`` is a template with ``{}``
    for the layer number. ``block`` defaults to ``f"{layers}.{{}}"``. ``post_mlp_norm`` (a template,
    or None when the MLP output is added to the residual stream as it is) names an RMSNorm
    ``x · rsqrt(mean(x²) + eps) · (norm_weight_offset + weight)`` between the MLP and the residual add;
    Gemma's norms scale by ``1 + weight`` (offset 1), Llama-style ones by ``weight`` (offset 0).
    """

    model_types: tuple[str, ...]
    layers: str
    mlp_down: str
    final_norm: str
    lm_head: str
    embed: str
    block: str = ""
    fan_in_fan_out: bool = False  # True: weight stored (d_k, d) as in GPT-2's Conv1D
    post_mlp_norm: str | None = None
    norm_weight_offset: float = 0.0

    def __post_init__(self) -> None:
        if not self.model_types:
            raise UnsupportedArchitectureError("ArchSpec.model_types must name at least one model_type")
        if "{}" not in self.mlp_down:
            raise UnsupportedArchitectureError(f"ArchSpec.mlp_down must contain '{{}}' for the layer number, got {self.mlp_down!r}")
        if not self.block:
            object.__setattr__(self, "block", f"{self.layers}.{{}}")
        elif "{}" not in self.block:
            raise UnsupportedArchitectureError(f"ArchSpec.block must contain '{{}}' for the layer number, got {self.block!r}")
        if self.post_mlp_norm is not None and "{}" not in self.post_mlp_norm:
            raise UnsupportedArchitectureError(
                f"ArchSpec.post_mlp_norm must contain '{{}}' for the layer number, got {self.post_mlp_norm!r}")

    def has(self, name: str) -> bool:
        """Whether this family has the (optional) site ``name``."""
        return name in SITES or (name in OPTIONAL_SITES and getattr(self, name) is not None)

    def site(self, name: str, layer: int | None = None) -> str:
        """Dotted module name of a canonical site (layer needed for per-layer sites)."""
        if name not in SITES + OPTIONAL_SITES:
            raise UnsupportedArchitectureError(f"unknown site {name!r}; known sites: {', '.join(SITES + OPTIONAL_SITES)}")
        template: str | None = getattr(self, name)
        if template is None:
            raise UnsupportedArchitectureError(f"{self.model_types[0]!r} models have no {name!r} site")
        if "{}" in template:
            if layer is None:
                raise UnsupportedArchitectureError(f"site {name!r} is per-layer: give a layer number")
            return template.format(layer)
        return template


_LLAMA_LIKE = dict(
    layers="model.layers",
    mlp_down="model.layers.{}.mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)

_REGISTRY: dict[str, ArchSpec] = {}


def _neox_lm_head() -> str:
    # transformers 5 renamed GPTNeoXForCausalLM.embed_out to lm_head (read the version, not the package)
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return "lm_head"
    return "lm_head" if major >= 5 else "embed_out"


def register_architecture(spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Add (or with ``overwrite=True`` replace) the spec for each of ``spec.model_types``."""
    for mt in spec.model_types:
        if mt in _REGISTRY and not overwrite:
            raise UnsupportedArchitectureError(f"architecture {mt!r} is already registered; pass overwrite=True to replace it")
    for mt in spec.model_types:
        _REGISTRY[mt] = spec


def registered_architectures() -> list[str]:
    return sorted(_REGISTRY)


for _spec in (
    ArchSpec(
        model_types=("gpt2",),
        layers="transformer.h",
        mlp_down="transformer.h.{}.mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        fan_in_fan_out=True,
    ),
    ArchSpec(
        model_types=("gptj",),
        layers="transformer.h",
        mlp_down="transformer.h.{}.mlp.fc_out",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
    ),
    ArchSpec(
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        mlp_down="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head=_neox_lm_head(),
        embed="gpt_neox.embed_in",
    ),
    ArchSpec(model_types=("llama", "mistral", "qwen2", "qwen3"), **_LLAMA_LIKE),
    ArchSpec(model_types=("gemma",), **_LLAMA_LIKE),  # Gemma 1: no norm after the MLP
    ArchSpec(model_types=("gemma2", "gemma3_text"), **_LLAMA_LIKE,
             post_mlp_norm="model.layers.{}.post_feedforward_layernorm", norm_weight_offset=1.0),
):
    register_architecture(_spec)


def _model_type(model_or_config: nn.Module | object) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if mt is None:
        raise UnsupportedArchitectureError(f"object of type {type(model_or_config).__name__} has no config.model_type")
    return str(mt)


def get_arch(model_or_config: nn.Module | object) -> ArchSpec:
    """The :class:`ArchSpec` of a model (or its config); clear error for unsupported families."""
    mt = _model_type(model_or_config)
    if mt not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {mt!r} is not supported; supported: {', '.join(registered_architectures())}. "
            "Add it with fastmemit.register_architecture(ArchSpec(...))."
        )
    return _REGISTRY[mt]


def num_layers(model: nn.Module) -> int:
    return len(get_module(model, get_arch(model).layers))


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Module at a dotted path, with an error naming the path when it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise UnsupportedArchitectureError(
            f"module {name!r} not found in {type(model).__name__}; the architecture table entry does not match this model"
        ) from e


def check_layers(model: nn.Module, layers: list[int] | tuple[int, ...]) -> list[int]:
    """Validate layer numbers against the model's depth and return them as a sorted list."""
    n = num_layers(model)
    if not layers:
        raise ConfigurationError("no layers given")
    bad = [layer for layer in layers if not (0 <= int(layer) < n)]
    if bad:
        raise ConfigurationError(f"layer(s) {bad} out of range: this model has {n} layers (0..{n - 1})")
    return sorted({int(layer) for layer in layers})


def mlp_down_weight(model: nn.Module, layer: int) -> tuple[str, nn.Parameter]:
    """Name and parameter of the edited matrix of ``layer``."""
    arch = get_arch(model)
    name = arch.site("mlp_down", layer)
    module = get_module(model, name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise UnsupportedArchitectureError(f"module {name!r} has no weight parameter")
    return f"{name}.weight", weight


def as_math(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """View a stored weight in math orientation ``W`` of shape (d, d_k), so that W k = v."""
    return weight.T if fan_in_fan_out else weight


def key_dim(model: nn.Module, layer: int = 0) -> int:
    """d_k: the width of the edited matrix's input (the MLP inner dimension)."""
    arch = get_arch(model)
    _, w = mlp_down_weight(model, layer)
    return int(as_math(w, arch.fan_in_fan_out).shape[1])
