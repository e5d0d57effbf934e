"""``fastmemit edit`` / ``evaluate`` under torchrun: rank 0 runs the command, the other ranks serve its
statistics passes (see :mod:`fastmemit.stats.distributed`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fastmemit.errors import FastMemitError
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.stats.distributed import Shard, leading, next_call
from fastmemit.stats.engine import compute_layer_stats
from fastmemit.utils import logger


def serve_statistics(model: nn.Module, tok: Any, shard: Shard) -> int:
    """On ranks other than 0: join every statistics pass rank 0 announces until it says stop.
    Returns the number of passes served. A pass's error (the same on every rank) does not stop it."""
    served = 0
    while (call := next_call(shard)) is not None:
        try:
            compute_layer_stats(model, tok, **call, show_progress=False, distributed=True)
        except FastMemitError as e:  # rank 0 raised the same error
            logger.info("rank %d: statistics pass failed as on rank 0: %s", shard.rank, e)
        served += 1
    return served


def lead_or_serve(model: nn.Module, tok: Any, shard: Shard | None, main: Callable[[], int]) -> int:
    """Run ``main`` on rank 0 while the other ranks serve its statistics passes; without a shard, ``main()``.

    Rank 0 tells the others to stop when ``main`` ends, also when it raises. Returns ``main``'s
    result on rank 0 and 0 on the other ranks.
    """
    if shard is None:
        return main()
    if shard.rank != 0:
        serve_statistics(model, tok, shard)
        return 0
    with leading(shard, model_fingerprint(model)):
        return main()
