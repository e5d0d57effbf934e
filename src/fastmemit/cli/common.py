"""Argument helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
from typing import Any


def parse_layers(spec: str) -> list[int]:
    """'3-7' -> [3,4,5,6,7]; '3,5,8' -> [3,5,8]; '2-4,9' -> [2,3,4,9]."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid layer list {spec!r}: use e.g. '3-7' or '3,5,8'") from None
    if not out:
        raise argparse.ArgumentTypeError("empty layer list")
    return out


def parse_bool(s: str) -> bool:
    """Parse a boolean flag value properly ('false' is False, unlike argparse's type=bool)."""
    v = str(s).strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model_name", dest="model", default="smollm2-135m",
                   help="built-in alias (smollm2-135m, gemma3-270m), local folder or Hugging Face id (default: smollm2-135m)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 (default: float32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as a dict; VALUE is read as JSON, else kept as a string."""
    from fastmemit.errors import EditError

    out: dict[str, Any] = {}
    for s in items:
        if "=" not in s:
            raise EditError(f"--set expects FIELD=VALUE, got {s!r}")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out
