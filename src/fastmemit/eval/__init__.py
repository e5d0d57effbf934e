"""Evaluation: datasets (CounterFact, multi-CounterFact, zsRE) and metrics (ES/PS/NS, zsRE accuracies)."""

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
from fastmemit.eval.metrics import (
    evaluate_counterfact_case,
    evaluate_counterfact_cases,
    evaluate_zsre_cases,
    score_targets,
    summarize,
)

__all__ = [
    "CounterFactCase",
    "DatasetError",
    "ZsreCase",
    "download_dataset",
    "evaluate_counterfact_case",
    "evaluate_counterfact_cases",
    "evaluate_zsre_cases",
    "load_counterfact",
    "load_dataset",
    "load_seed_ordering",
    "load_zsre",
    "order_cases",
    "score_targets",
    "summarize",
]
