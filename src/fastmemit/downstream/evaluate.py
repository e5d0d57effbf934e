"""Running downstream checks: flag validation and :func:`evaluate_tasks`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmemit.downstream.base import FEW_SHOT_POOL, DownstreamError
from fastmemit.downstream.data import PathLike, load_task_data
from fastmemit.downstream.metrics import classification_metrics
from fastmemit.downstream.registry import get_task, resolve_task_name
from fastmemit.downstream.scoring import (
    context_length,
    eval_mode,
    fit_prompts,
    score_prompts,
    split_prompt_option,
)
from fastmemit.lm import model_device
from fastmemit.utils import progress

logger = logging.getLogger("fastmemit.downstream")

MODES = ("generate", "loglik")


@dataclass(frozen=True)
class TaskFlags:
    """Validated downstream flags: canonical task names, shots per task, tests per task (None = all)."""

    tasks: list[str]
    n_shots: list[int]
    n_tests: int | None


def parse_task_flags(tasks: str, number_of_few_shots: str | None = None, number_of_tests: int | None = None) -> TaskFlags:
    """Check the research code's flags: ``tasks`` "sst2,mmlu"; ``number_of_few_shots`` "3,3" (same length
    as tasks; None → 0 for every task); ``number_of_tests`` a positive int or None (all tests).

    Names are case-insensitive, aliases are resolved (``sst`` → ``sst2``), duplicates are refused.
    """
    names = [t.strip() for t in (tasks or "").split(",")]
    if not tasks or any(not n for n in names):
        raise DownstreamError(f"--tasks must be a comma-separated list of task names without empty entries, got {tasks!r}")
    canonical = [resolve_task_name(n) for n in names]
    seen: dict[str, str] = {}
    for raw, c in zip(names, canonical):
        if c in seen:
            raise DownstreamError(f"task {c!r} is listed twice in --tasks ({seen[c]!r} and {raw!r})")
        seen[c] = raw
    if number_of_few_shots is None or str(number_of_few_shots).strip() == "":
        shots = [0] * len(canonical)
    else:
        parts = [p.strip() for p in str(number_of_few_shots).split(",")]
        if len(parts) != len(canonical):
            raise DownstreamError(
                f"--number_of_few_shots has {len(parts)} value(s) ({number_of_few_shots!r}) but --tasks names "
                f"{len(canonical)} task(s) ({tasks!r}): give one shot count per task, in the same order"
            )
        shots = []
        for name, p in zip(canonical, parts):
            try:
                k = int(p)
            except ValueError:
                raise DownstreamError(f"--number_of_few_shots: {p!r} (for {name}) is not an integer") from None
            if not 0 <= k <= FEW_SHOT_POOL:
                raise DownstreamError(f"--number_of_few_shots: {k} shots for {name}; the shot pool has 0..{FEW_SHOT_POOL}")
            shots.append(k)
    if number_of_tests is not None:
        if isinstance(number_of_tests, bool) or not isinstance(number_of_tests, int) or number_of_tests < 1:
            raise DownstreamError(f"--number_of_tests must be a positive integer (or omitted for all), got {number_of_tests!r}")
    return TaskFlags(canonical, shots, number_of_tests)


def _modes(mode: str) -> tuple[str, ...]:
    if mode == "both":
        return MODES
    if mode in MODES:
        return (mode,)
    raise DownstreamError(f"mode must be 'both', 'generate' or 'loglik', got {mode!r}")


def evaluate_tasks(
    model: nn.Module,
    tok: Any,
    tasks: Sequence[str] | str = ("sst2",),
    n_shots: Sequence[int] | int = 0,
    n_tests: int | None = None,
    mode: str = "both",
    data_dir: PathLike | None = None,
    seed: int = 0,
    batch_size: int = 8,
    *,
    data_files: Mapping[str, PathLike] | None = None,
    max_length: int | None = None,
    gen_len: int | None = None,
    reduction: str = "mean",
    return_predictions: bool = False,
    share_prefill: bool = True,
    share_prefix: bool = True,
) -> dict[str, dict[str, Any]]:
    """Few-shot downstream checks of ``model`` on each task; the model is not modified.

    Returns ``{task: {"n_shots", "shots_used_min", "n_tests", "data", "generate": metrics,
    "loglik": metrics}}`` where metrics = accuracy, invalid (rate), f1 (weighted), mcc, n,
    correct, invalid_count, seconds (and predictions/continuations/scores with
    ``return_predictions``). Only the requested modes appear.

    - ``tasks``: names or aliases (a list, or a comma string); ``n_shots``: one int for all, or one
      per task (0..10, the first k records of the file); ``n_tests``: the first n test records
      (the records after the 10-record shot pool), None for all.
    - ``mode``: "generate" (greedy ``gen_len`` tokens — the task's, 3 by default — then parse),
      "loglik" (rank the options by ``reduction`` log-probability), or "both".
    - ``data_dir``: folder of ``<task>.jsonl`` (default: see :func:`default_data_dir`);
      ``data_files``: ``{task: path}`` overriding single tasks.
    - ``max_length``: context window (default: from the model config); shots are dropped from the
      end for items whose prompt would not fit with the answer's room.
    - ``share_prefill``: in "both" mode, read single-token option log-probs from generation's first
      step instead of running the prompt again (same numbers, about half the time); the generate
      timing then includes that shared prefill.
    - ``share_prefix``: run the shots once per task and reuse their KV cache for every item
      (verified against a plain forward on first use; same numbers, several times faster).
    - ``seed``: scoring is deterministic (greedy decoding, first-n tests, as in the research
      code); the seed only fixes torch's RNG inside a forked RNG state, for models with stochastic
      parts. Device and dtype come from the model; it is put in eval mode and restored.
    """
    task_names = [t for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    canonical = [resolve_task_name(t) for t in task_names]
    if len(set(canonical)) != len(canonical):
        raise DownstreamError(f"a task is listed twice: {task_names}")
    shots = [int(n_shots)] * len(canonical) if isinstance(n_shots, int) else [int(k) for k in n_shots]
    if len(shots) != len(canonical):
        raise DownstreamError(f"n_shots has {len(shots)} values for {len(canonical)} tasks")
    if n_tests is not None and n_tests < 1:
        raise DownstreamError(f"n_tests must be ≥ 1 or None, got {n_tests}")
    modes = _modes(mode)
    window = max_length or context_length(model, tok)

    results: dict[str, dict[str, Any]] = {}
    device = model_device(model)
    devices = [device] if device.type == "cuda" else []  # fork only the RNGs in use
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, k in progress(list(zip(canonical, shots)), desc="downstream", unit="task"):
            task = get_task(name)
            data = load_task_data(task, data_dir, data_files)
            shot_records = data.shots(k)
            tests = data.tests if n_tests is None else data.tests[:n_tests]
            labels = [task.label_of(r) for r in tests]
            questions = [task.test(r) for r in tests]
            g = task.gen_len if gen_len is None else gen_len
            # room for the answer: generated tokens and/or the longest option (+1 for a boundary merge)
            room = 0
            if "generate" in modes:
                room = max(room, g)
            if "loglik" in modes:
                room = max(room, 1 + max(len(split_prompt_option(tok, "x", o)[1]) for o in task.options))
            long = next((i for i, q in enumerate(questions) if len(tok(q)["input_ids"]) > window - room), None)
            if long is not None:  # not even without shots: scoring it would mean cutting the question
                raise DownstreamError(
                    f"{name}: test item {long + 1}'s prompt does not fit the context of {window} tokens with room "
                    f"for the answer ({room}); raise max_length (--max-length) or drop the task")
            shot_texts = [task.shot(r) for r in shot_records]
            fitted = fit_prompts(tok, shot_texts, questions, window - room)
            prompts = [f.text for f in fitted]
            res: dict[str, Any] = {
                "n_shots": k,
                "shots_used_min": min(f.n_shots for f in fitted),
                "n_tests": len(tests),
                "data": str(data.path),
            }
            if res["shots_used_min"] < k:
                dropped = sum(f.n_shots < k for f in fitted)
                logger.warning("%s: %d of %d prompts did not fit %d tokens with %d shots; shots dropped from the end "
                               "(as few as %d kept)", name, dropped, len(fitted), window, k, res["shots_used_min"])
            scored = score_prompts(model, tok, prompts, task.options, task.parse, generate="generate" in modes,
                                   loglik="loglik" in modes, gen_len=g, batch_size=batch_size,
                                   reduction=reduction, max_length=window, share_prefill=share_prefill,
                                   shared_prefix="".join(shot_texts) if share_prefix else None)
            for m in modes:
                if m == "generate":
                    preds, seconds = scored.generate_predictions, scored.generate_seconds
                    extra: dict[str, Any] = {"continuations": scored.continuations}
                else:
                    preds, seconds = scored.loglik_predictions, scored.loglik_seconds
                    extra = {"scores": scored.scores.tolist()}
                assert preds is not None
                metrics: dict[str, Any] = classification_metrics(labels, preds)
                metrics["seconds"] = seconds
                if return_predictions:
                    metrics.update(predictions=preds, labels=labels, **extra)
                res[m] = metrics
                logger.info("%s %s: accuracy %.3f, invalid %.3f, F1 %.3f, MCC %.3f (n=%d, %.1fs)", name, m,
                            metrics["accuracy"], metrics["invalid"], metrics["f1"], metrics["mcc"], metrics["n"],
                            seconds)
            results[name] = res
    return results


def results_to_records(results: Mapping[str, Mapping[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    """Flatten :func:`evaluate_tasks` output to one row per (task, mode), plus ``extra`` fields
    (e.g. ``edits_so_far=100``): the form :func:`~fastmemit.downstream.plots.plot_downstream` and
    :func:`~fastmemit.downstream.records.append_jsonl` take."""
    rows = []
    for task, res in results.items():
        for m in MODES:
            if m in res:
                met = res[m]
                rows.append({**extra, "task": task, "mode": m, "accuracy": met["accuracy"], "invalid": met["invalid"],
                             "f1": met["f1"], "mcc": met["mcc"], "n": met["n"], "n_shots": res["n_shots"],
                             "seconds": met["seconds"]})
    return rows
