"""Few-shot downstream ("GLUE-style") checks of a language model, before and after editing.

Eight tasks from the research code (sst2, mrpc, cola, rte, mmlu, sentiment_analysis, nli,
dialogue), each a module in :mod:`fastmemit.downstream.tasks`, scored two ways: greedy generation
with whole-word answer parsing, and ranking the answer options by log-likelihood. See
``docs/downstream.md``.

>>> from fastmemit.downstream import evaluate_tasks
>>> res = evaluate_tasks(model, tok, tasks=["sst2", "mmlu"], n_shots=[3, 3], n_tests=50)
>>> res["sst2"]["loglik"]["accuracy"]

Plots live in :mod:`fastmemit.downstream.plots` (imports matplotlib when called).
"""

from fastmemit.downstream.base import (
    FEW_SHOT_POOL,
    INVALID,
    DownstreamDataError,
    DownstreamError,
    Task,
    letter_parser,
    word_parser,
)
from fastmemit.downstream.data import TaskData, default_data_dir, load_records, load_task_data
from fastmemit.downstream.evaluate import TaskFlags, evaluate_tasks, parse_task_flags, results_to_records
from fastmemit.downstream.metrics import accuracy, classification_metrics, invalid_rate, mcc, weighted_f1
from fastmemit.downstream.records import append_jsonl, read_jsonl
from fastmemit.downstream.registry import available_tasks, get_task, register_task, resolve_task_name
from fastmemit.downstream.scoring import (
    context_length,
    fit_prompts,
    generate_continuations,
    option_logprobs,
    split_prompt_option,
)

__all__ = [
    "FEW_SHOT_POOL",
    "INVALID",
    "DownstreamDataError",
    "DownstreamError",
    "Task",
    "TaskData",
    "TaskFlags",
    "accuracy",
    "append_jsonl",
    "available_tasks",
    "classification_metrics",
    "context_length",
    "default_data_dir",
    "evaluate_tasks",
    "fit_prompts",
    "generate_continuations",
    "get_task",
    "invalid_rate",
    "letter_parser",
    "load_records",
    "load_task_data",
    "mcc",
    "option_logprobs",
    "parse_task_flags",
    "read_jsonl",
    "register_task",
    "resolve_task_name",
    "results_to_records",
    "split_prompt_option",
    "weighted_f1",
    "word_parser",
]
