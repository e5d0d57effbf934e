"""Where a model's modules compute: one lookup for plain models and device-mapped ones.

A model loaded with ``device_map`` (or passed through ``accelerate.dispatch_model``) is spread over
devices, each block with an accelerate ``AlignDevicesHook`` that moves its inputs to the block's
*execution device*. fastmemit never assumes one device for a model: input ids go to the input
embedding's device (:func:`input_device`), keys and values are read on the device of the module
that produced them, and weights are written on their own device (:func:`execution_device`).

Offloaded weights (accelerate's ``"disk"`` entries, or ``"cpu"`` entries next to a GPU) live on the
``meta`` device between forward passes; fastmemit reads and writes the edited weights and samples
every weight for the model fingerprint, so it refuses them with a :class:`ConfigurationError`
(:func:`check_resident`).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from fastmemit.errors import ConfigurationError


def _hook_device(hook: Any) -> torch.device | None:
    """The execution device of an accelerate hook (or of the first hook of a SequentialHook that has one)."""
    for h in getattr(hook, "hooks", (hook,)):
        dev = getattr(h, "execution_device", None)
        if dev is None:
            continue
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device when it has one,
    else the device of its first resident parameter or buffer, else the CPU."""
    hook = getattr(module, "_hf_hook", None)
    dev = _hook_device(hook) if hook is not None else None
    if dev is not None:
        return dev
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's execution device (the first block of a device-mapped
    model), else the first parameter's device (CPU for a parameterless module)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except NotImplementedError:
            emb = None
    return execution_device(emb if isinstance(emb, nn.Module) else model)


def offloaded_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that are not resident (on the ``meta`` device: offloaded by accelerate)."""
    return [name for name, p in model.named_parameters() if p.device.type == "meta"]


def check_resident(model: nn.Module, names: list[str] | None = None, what: str = "fastmemit") -> None:
    """Refuse offloaded weights (all parameters, or only ``names``) with a ConfigurationError that says what to do."""
    off = offloaded_parameters(model)
    if names is not None:
        off = [n for n in off if n in set(names)]
    if off:
        shown = ", ".join(off[:3]) + (f" and {len(off) - 3} more" if len(off) > 3 else "")
        raise ConfigurationError(
            f"{what} needs resident weights, but {len(off)} parameter(s) are offloaded by the device map "
            f"(on the meta device: {shown}); use a device map without 'disk' entries (and without 'cpu' "
            "entries when a GPU is used), e.g. more GPUs or a larger max_memory"
        )


def devices_of(model: nn.Module) -> list[torch.device]:
    """The distinct devices holding the model's resident parameters, in parameter order."""
    seen: dict[str, torch.device] = {}
    for p in model.parameters():
        if p.device.type != "meta":
            seen.setdefault(str(p.device), p.device)
    return list(seen.values())
