"""A cheap, content-sensitive fingerprint of a model's weights.

Hashing every byte of a 7B model takes tens of seconds; instead each parameter contributes its
name, shape, dtype and an evenly strided sample of up to 4096 of its values. Any closed-form edit
(a dense low-rank delta) changes almost every entry of the edited matrix, so it changes the
fingerprint; the config and the model class are hashed too.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from fastmemit.models.devices import check_resident

_SAMPLE = 4096


def _tensor_sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].to(device="cpu", dtype=torch.float64)
    return sample.numpy().tobytes()


def model_fingerprint(model: nn.Module, prefix_modules: tuple[str, ...] | None = None) -> str:
    """Hex digest identifying the model's config and weights (16 hex chars).

    ``prefix_modules`` restricts the weight sample to parameters whose names start with one of the
    prefixes (e.g. only the layers a statistic depends on); the config is always included.
    """
    check_resident(model, what="the model fingerprint")  # offloaded weights cannot be sampled
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
            cfg.pop(k, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode())
    for name, p in model.named_parameters():
        if prefix_modules is not None and not name.startswith(prefix_modules):
            continue
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(_tensor_sample(p))
    return h.hexdigest()[:16]
