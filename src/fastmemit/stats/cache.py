"""On-disk cache for statistics: one safetensors file per (model, site, layer, corpus, count, ...).

Files are written to a temporary name and renamed into place (see :func:`fastmemit.utils.atomic_path`),
so a run killed mid-write leaves at most a ``.tmp`` file that no reader ever opens.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fastmemit.utils import atomic_path, cache_dir, logger


def stats_dir(root: str | Path | None = None) -> Path:
    return Path(root).expanduser() if root is not None else cache_dir() / "stats"


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def entry_path(root: Path, key: dict[str, Any], kind: str = "mom2") -> Path:
    """Path of a cache entry: ``root/<model_fp>/<site>.<kind>.<digest>.safetensors``."""
    return root / str(key["model"]) / f"{key['site']}.{kind}.{key_digest(key)}.safetensors"


@contextlib.contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """Exclusive lock of one cache entry across processes (``.<entry>.lock`` beside it): the second
    process computing the same statistics waits, then finds the first one's entry. The lock file is
    an empty dot file that no reader opens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def save_entry(path: Path, tensors: dict[str, torch.Tensor], key: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    meta = {"key": json.dumps(key, sort_keys=True), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_entry(path: Path, key: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Tensors and metadata of a cache entry, or None when absent, unreadable, or for another key."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        logger.warning("ignoring unreadable cache entry %s (%s)", path, e)
        return None
    if meta.get("key") != json.dumps(key, sort_keys=True):
        return None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a corrupt entry is no hit: drop it so that it is recomputed and rewritten
        logger.warning("removing cache entry %s: %s contain NaN or inf", path, ", ".join(bad))
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    extra = {k: json.loads(v) for k, v in meta.items() if k != "key"}
    return tensors, extra
