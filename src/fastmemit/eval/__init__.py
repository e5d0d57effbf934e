"""Evaluation: datasets (CounterFact, multi-CounterFact, zsRE), metrics (ES/PS/NS, zsRE accuracies),
and resumable evaluation runs (:func:`run_evaluation` with a :class:`RunConfig`)."""

from fastmemit.eval.config import RunConfig
from fastmemit.eval.datasets import (
    CounterFactCase,
    DatasetError,
    ZsreCase,
    download_dataset,
    load_counterfact,
    load_dataset,
    load_seed_ordering,
    load_zsre,
    order_cases,
)
from fastmemit.eval.loop import BatchRecord, edit_batches
from fastmemit.eval.metrics import (
    evaluate_counterfact_case,
    evaluate_counterfact_cases,
    evaluate_zsre_cases,
    score_targets,
    summarize,
)
from fastmemit.eval.runner import RunResult, run_evaluation

__all__ = [
    "BatchRecord",
    "CounterFactCase",
    "DatasetError",
    "RunConfig",
    "RunResult",
    "ZsreCase",
    "download_dataset",
    "edit_batches",
    "evaluate_counterfact_case",
    "evaluate_counterfact_cases",
    "evaluate_zsre_cases",
    "load_counterfact",
    "load_dataset",
    "load_seed_ordering",
    "load_zsre",
    "order_cases",
    "run_evaluation",
    "score_targets",
    "summarize",
]
