"""Argument helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, NoReturn

from fastmemit import models
from fastmemit.errors import ConfigurationError
from fastmemit.stats.distributed import Shard, rank_device


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


def _number(kind: type, s: str) -> float:
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _int_at_least(s: str, low: int, must: str) -> int:
    """``s`` as an integer ≥ ``low``; else the argparse error "must be ``must``"."""
    v = int(_number(int, s))
    if v < low:
        raise argparse.ArgumentTypeError(f"must be {must}, got {s!r}")
    return v


def positive_int(s: str) -> int:
    """argparse type: an integer ≥ 1."""
    return _int_at_least(s, 1, "a positive integer")


def non_negative_int(s: str) -> int:
    """argparse type: an integer ≥ 0."""
    return _int_at_least(s, 0, "a non-negative integer")


def positive_float(s: str) -> float:
    """argparse type: a finite number > 0 (NaN and inf refused)."""
    v = float(_number(float, s))
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s!r}")
    return v


def key_count(s: str) -> int:
    """argparse type: a number of keys ≥ 1, or -1 / 'all' for the whole corpus."""
    if s.strip().lower() == "all":
        return -1
    v = int(_number(int, s))
    if v < 1 and v != -1:
        raise argparse.ArgumentTypeError(f"must be a positive number of keys, or -1 / 'all' for the whole corpus, got {s!r}")
    return v


def seq_len(s: str) -> int:
    """argparse type: tokens per row, at least 2 (a key needs a token after the first)."""
    return _int_at_least(s, 2, "at least 2 tokens")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``fastmemit edit: error: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_bool(s: str) -> bool:
    """Parse a boolean flag value properly ('false' is False, unlike argparse's type=bool)."""
    v = str(s).strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


DEVICE_MAP_HELP = ("spread the model over devices with accelerate instead of --device: auto (or balanced, "
                   "balanced_low_0, sequential) or a JSON file {module name: device} (docs/scale.md)")
STATS_DEVICE_HELP = ("where the float64 statistics accumulate and are kept with the factors and the method's memory "
                     "(default: accumulated on each layer's device, kept on the CPU); cpu bounds GPU memory")
SOLVE_DEVICE_HELP = "where each layer's factorization and solve run, one layer at a time (default: the statistics' device)"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model_name", dest="model", default="smollm2-135m",
                   help="built-in alias (smollm2-135m, gemma3-270m), local folder or Hugging Face id (default: smollm2-135m)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default: cpu); under "
                                                   "torchrun, cuda means each rank's cuda:LOCAL_RANK")
    p.add_argument("--device-map", "--device_map", dest="device_map", default=None, metavar="auto|FILE.json",
                   help=DEVICE_MAP_HELP)
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 (default: float32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """``--stats-device`` and ``--solve-device`` (Editor's ``stats_device`` / ``solve_device``)."""
    p.add_argument("--stats-device", "--stats_device", dest="stats_device", default=None, help=STATS_DEVICE_HELP)
    p.add_argument("--solve-device", "--solve_device", dest="solve_device", default=None, help=SOLVE_DEVICE_HELP)


def load_cli_model(args: argparse.Namespace, shard: Shard | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` as ``--model/--device/--device-map/--dtype`` say, on this rank's device under
    torchrun (``shard``), where every rank holds a whole model and a device map is refused."""
    device_map = getattr(args, "device_map", None)
    if shard is not None and device_map is not None:
        raise ConfigurationError("--device-map cannot be combined with torchrun: every rank holds a whole model "
                                 "(one GPU per rank); use one or the other")
    placement = {} if device_map is None else {"device_map": device_map}
    # looked up at call time (models.load_model), so that tests can replace it
    return models.load_model(args.model, device=rank_device(args.device), dtype=args.dtype,
                             trust_remote_code=getattr(args, "trust_remote_code", False), **placement)


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as a dict; VALUE is read as JSON, else kept as a string."""
    out: dict[str, Any] = {}
    for s in items:
        if "=" not in s:
            raise ConfigurationError(f"--set expects FIELD=VALUE, got {s!r}")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out
