"""The edit → score → keep or restore loop shared by the evaluation runner and the benchmarks.

:func:`edit_batches` edits one batch with an :class:`~fastmemit.Editor`, scores it on the edited
model, and yields a :class:`BatchRecord`. *Sequential*: the edits stay in the model and accumulate.
*Batched*: the batch is undone with :meth:`EditResult.restore` once the caller has finished with
the record (when it asks for the next one, or when it closes the generator, e.g. on an exception),
so that whatever the caller does with a record (write it, checkpoint, save the model, a downstream
check) sees the edited model::

    with contextlib.closing(edit_batches(editor, batches, score, sequential=False)) as records:
        for rec in records:
            write(rec.post)

In sequential mode nothing is undone on an exception (the edits of earlier batches stay; an
interrupted edit itself is undone by the Editor): restore ``rec.result`` of the records in reverse,
or write the original weights back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from fastmemit.editing import Editor, EditResult
from fastmemit.requests import EditRequest

C = TypeVar("C")  # one case of a batch, as the caller knows it (a dataset case, an index ...)


@dataclass
class BatchRecord(Generic[C]):
    """One edited and scored batch."""

    index: int  # the batch's number
    cases: Sequence[C]
    result: EditResult  # the edit (its deltas, v* losses, and how to undo it)
    post: list[dict[str, Any]]  # score(cases) on the edited model
    timings: dict[str, float]  # the edit's (stats, v, solve), plus "edit" and "eval" seconds


def edit_batches(
    editor: Editor,
    batches: Sequence[Sequence[C]],
    score: Callable[[Sequence[C]], list[dict[str, Any]]],
    *,
    request: Callable[[C], EditRequest | Mapping[str, Any]],
    sequential: bool,
    start: int = 0,
    seed: int | None = None,
) -> Iterator[BatchRecord[C]]:
    """Edit ``batches[start:]`` one after the other, yielding one record per batch.

    ``request(case)`` is the edit request of a case; ``score(cases)`` scores cases on the model as
    it is. ``seed``: torch's RNG is seeded with ``seed + index`` before each batch's edit, so that a
    run resumed at ``start`` draws the same numbers. ``sequential`` False: each batch is restored
    after its record (see the module's docstring).
    """
    for b in range(start, len(batches)):
        cases = batches[b]
        if seed is not None:
            torch.manual_seed(seed + b)
        t0 = time.perf_counter()
        result = editor.edit([request(c) for c in cases])
        t_edit = time.perf_counter() - t0
        try:
            t1 = time.perf_counter()
            post = score(cases)
            t_eval = time.perf_counter() - t1
            timings = {**{k: float(v) for k, v in result.timings.items()}, "edit": t_edit, "eval": t_eval}
            yield BatchRecord(b, cases, result, post, timings)
        finally:
            if not sequential:
                result.restore()
