"""Model loading (one device or a device map), the architecture table, device lookups and model fingerprints."""

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
from fastmemit.models.devices import check_resident, execution_device, input_device, offloaded_parameters
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.models.loading import (
    DEFAULT_MODEL,
    GGUF_ALIASES,
    load_model,
    prepare_tokenizer,
    resolve_device,
    resolve_device_map,
)

__all__ = [
    "OPTIONAL_SITES",
    "SITES",
    "ArchSpec",
    "DEFAULT_MODEL",
    "GGUF_ALIASES",
    "as_math",
    "check_layers",
    "check_resident",
    "execution_device",
    "get_arch",
    "get_module",
    "input_device",
    "key_dim",
    "load_model",
    "mlp_down_weight",
    "model_fingerprint",
    "num_layers",
    "offloaded_parameters",
    "prepare_tokenizer",
    "register_architecture",
    "registered_architectures",
    "resolve_device",
    "resolve_device_map",
]
