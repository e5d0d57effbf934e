"""Covariance statistics on ``torch.distributed``: the corpus split by rank, sums all-reduced in float64.

How the work is split, so that N processes give one process's result (same keys, same count,
float64 sums that differ only in the order of additions, ~1e-16 relative): every rank reads the
same corpus in the same seeded order and cuts it into the same padded batches, so every rank
knows how many keys each batch holds without running the model. Batch ``i`` is run by rank
``i mod N``, which adds exactly the keys of that batch the single-process engine would take
(the first ``count − seen`` of them, ``seen`` counted over all earlier batches by every rank).
The ranks then check that they read the same stream (key count and a checksum of the token ids),
all-reduce Σ k kᵀ and the count in float64, and rank 0 writes the cache while the others wait.

Two ways to run it:

- **every rank calls** :func:`~fastmemit.stats.engine.compute_layer_stats` with the same arguments
  (``torchrun --nproc_per_node N -m fastmemit stats ...``, or a user's own script after
  ``torch.distributed.init_process_group``): used whenever a process group with more than one rank
  is initialized (``distributed=None``, the default);
- **rank 0 leads** (``fastmemit edit`` / ``evaluate`` under torchrun,
  :func:`fastmemit.stats.service.lead_or_serve`): rank 0
  runs the command; the other ranks wait in :func:`~fastmemit.stats.service.serve_statistics` and join every statistics pass
  rank 0 makes on the unedited model, then leave when rank 0 is done. Passes on an edited model
  (``recompute_stats``) run on rank 0 alone, since the other ranks hold the unedited weights.

Backends: gloo on the CPU, NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``); tensors on another
device than the backend's are reduced in row chunks through it, so statistics kept on the CPU
(``stats_device="cpu"``) need only a chunk of GPU memory for the reduction.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastmemit.errors import ConfigurationError
from fastmemit.utils import logger

_CHUNK_BYTES = 1 << 28  # 256 MiB per chunk when a tensor is reduced through another device
STOP = "stop"  # what the leading rank broadcasts when its command ends
_MIX = (1 << 61) - 1  # modulus of the stream checksum (a Mersenne prime)


@dataclass(frozen=True)
class Shard:
    """This process's place in an initialized process group: batch ``i`` belongs to rank ``i mod world``."""

    rank: int
    world: int
    backend: str

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    @property
    def comm_device(self) -> torch.device:
        """Where the backend reduces: the current GPU for NCCL, the CPU for gloo."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _through(self, t: torch.Tensor, op: Callable[[torch.Tensor], None]) -> None:
        """Apply a collective ``op`` to ``t`` in place, in row chunks through the comm device if ``t`` is elsewhere."""
        dev = self.comm_device
        if t.device == dev:
            op(t)
            return
        flat = t.view(-1, t.shape[-1]) if t.ndim > 1 else t.view(1, -1)  # (rows, cols)
        rows = max(1, _CHUNK_BYTES // max(1, flat.shape[1] * flat.element_size()))
        for a in range(0, flat.shape[0], rows):
            buf = flat[a : a + rows].to(dev)  # (≤ rows, cols)
            op(buf)
            flat[a : a + rows].copy_(buf)

    def all_reduce_(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Σ over ranks (or ``op``: MIN, MAX) of ``t``, in place on every rank."""
        reduce_op = dist.ReduceOp.SUM if op is None else op
        self._through(t, lambda b: dist.all_reduce(b, op=reduce_op))
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` into ``t`` on every rank (same shape and dtype everywhere)."""
        self._through(t, lambda b: dist.broadcast(b, src=src))
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s (picklable) ``obj`` on every rank."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.comm_device)
        return box[0]

    def agree(self, values: list[int]) -> bool:
        """Whether every rank holds the same integers ``values`` (one MIN and one MAX reduction)."""
        lo = torch.tensor(values, dtype=torch.int64, device=self.comm_device)
        hi = lo.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def current_shard(required: bool = False) -> Shard | None:
    """The shard of this process when a process group with more than one rank is initialized, else None
    (``required``: a ConfigurationError instead of None)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Shard(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
    if required:
        raise ConfigurationError("distributed statistics need an initialized torch.distributed process group "
                                 "with more than one rank (launch with torchrun --nproc_per_node N)")
    return None


def stream_checksum(previous: int, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """A running checksum of the padded batches a rank read: ranks that read different streams disagree."""
    return (previous * 1_000_003 + int((ids * mask).sum()) * 31 + int(mask.sum())) % _MIX


# ----------------------------------------------------------------------------- launching


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1 in the environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def rank_device(device: str | None) -> str:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    dev = device or "cpu"
    if dev == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return dev


@contextlib.contextmanager
def session(device: str | None) -> Iterator[Shard | None]:
    """Under torchrun, initialize the process group (NCCL for a CUDA ``device``, gloo otherwise) and
    destroy it on exit; yields this process's :class:`Shard`, or None when not launched by torchrun."""
    if not launched_by_torchrun():
        yield None
        return
    created = False
    if not dist.is_initialized():
        dev = torch.device(rank_device(device))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        created = True
    try:
        shard = current_shard(required=True)
        logger.info("statistics on torch.distributed: rank %d of %d (%s)", shard.rank, shard.world, shard.backend)
        yield shard
    finally:
        if created:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- rank 0 leads, the others serve


@dataclass
class _Leader:
    shard: Shard
    fingerprint: str  # of the model the serving ranks hold (unedited)


_LEADER: contextvars.ContextVar[_Leader | None] = contextvars.ContextVar("fastmemit_stats_leader", default=None)


def announce(model_fp: str, call: dict[str, Any]) -> Shard | None:
    """On the leading rank: ask the serving ranks to join this statistics pass (``call``: the keyword
    arguments of ``compute_layer_stats``). Returns the shard to compute with, or None to compute
    alone (no serving ranks, or a model edited since they loaded theirs)."""
    leader = _LEADER.get()
    if leader is None:
        return None
    if model_fp != leader.fingerprint:
        logger.info("statistics of an edited model: computed on rank 0 alone")
        return None
    try:
        pickle.dumps(call)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise ConfigurationError(f"a statistics pass shared by torchrun ranks needs a picklable corpus spec ({e})") from e
    leader.shard.broadcast_object(call)
    return leader.shard


@contextlib.contextmanager
def leading(shard: Shard, model_fp: str) -> Iterator[None]:
    """Rank 0 leads the serving ranks (which hold a model of fingerprint ``model_fp``) inside this block,
    and tells them to stop when it ends, also on an exception."""
    token = _LEADER.set(_Leader(shard, model_fp))
    try:
        yield
    finally:
        _LEADER.reset(token)
        shard.broadcast_object(STOP)


def next_call(shard: Shard) -> dict[str, Any] | None:
    """On a serving rank: the keyword arguments of the next pass rank 0 announces, or None when it says stop."""
    call = shard.broadcast_object(None)
    return None if call == STOP else call
