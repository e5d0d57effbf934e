"""Model loading, the architecture table and model fingerprints."""

from fastmemit.models.arch import (
    OPTIONAL_SITES,
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
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.models.loading import DEFAULT_MODEL, GGUF_ALIASES, load_model, prepare_tokenizer

__all__ = [
    "OPTIONAL_SITES",
    "SITES",
    "ArchSpec",
    "DEFAULT_MODEL",
    "GGUF_ALIASES",
    "as_math",
    "check_layers",
    "get_arch",
    "get_module",
    "key_dim",
    "load_model",
    "mlp_down_weight",
    "model_fingerprint",
    "num_layers",
    "prepare_tokenizer",
    "register_architecture",
    "registered_architectures",
]
