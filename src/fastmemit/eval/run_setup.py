"""What an evaluation run needs, prepared before its folder is touched: the cases in run order, the
model, the hparams (through :func:`fastmemit.editing.resolve_hparams`, the library's one resolution),
the consistency tables, and the batches and chunks (:class:`RunSetup`, made by :func:`prepare_run`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import fastmemit
from fastmemit.downstream import TaskFlags, get_task, load_task_data, parse_task_flags
from fastmemit.editing import Editor, resolve_hparams
from fastmemit.errors import EditError, FastMemitError, RunError
from fastmemit.eval.config import RunConfig, stored_config
from fastmemit.eval.datasets import (
    EVAL_DATASETS,
    CounterFactCase,
    DatasetError,
    TfidfTable,
    ZsreCase,
    default_data_dir,
    load_attribute_snippets,
    load_dataset,
    load_seed_ordering,
    load_tfidf,
    order_cases,
)
from fastmemit.eval.loop import BatchRecord
from fastmemit.eval.run_folder import RunFolder
from fastmemit.eval.summary import hparams_label
from fastmemit.hparams_registry import model_key
from fastmemit.methods import EditHparams, EditMethod, get_method
from fastmemit.models import load_model
from fastmemit.models.arch import check_layers
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.requests import EditRequest

__all__ = ["Case", "RunSetup", "case_request", "load_cases", "prepare_run", "resolve_run_hparams", "seed_samples_file"]

Case = CounterFactCase | ZsreCase

# ----------------------------------------------------------------------------- cases and hparams


def seed_samples_file(cfg: RunConfig, data_path: Path | None) -> Path:
    """The seed-ordering file for ``cfg.dataset``: ``cfg.seed_samples`` (file or folder), else
    ``seed-samples/`` beside the dataset file, the dataset's folder, or ``<cache>/data/seed-samples``."""
    fname = EVAL_DATASETS[cfg.dataset].ordering
    if cfg.seed_samples is not None:
        p = Path(cfg.seed_samples).expanduser()
        cands = [p / fname, p] if p.is_dir() else [p]
    else:
        cands = []
        if data_path is not None:
            cands += [data_path.parent / "seed-samples" / fname, data_path.parent / fname]
        cands += [default_data_dir() / "seed-samples" / fname, default_data_dir() / fname]
    for c in cands:
        if c.is_file():
            return c
    raise DatasetError(f"--sample_num {cfg.sample_num}: seed-ordering file {fname} not found (looked at "
                       f"{', '.join(map(str, cands))}); pass --seed_samples FILE_OR_FOLDER (the seed "
                       f"repository's data/{fname}), or --sample_num none for the dataset file's own order")


def load_cases(cfg: RunConfig) -> list[Case]:
    """The run's cases in run order: ordering ``sample_num`` when given (else file order), at most
    ``dataset_size_limit``."""
    loader = EVAL_DATASETS[cfg.dataset].loader
    data_path = Path(cfg.data).expanduser() if cfg.data is not None else None
    # without an ordering the first N records are the first N cases (zsRE: skipped records aside)
    head = cfg.dataset_size_limit if cfg.sample_num is None and loader != "zsre" else None
    cases = list(load_dataset(loader, data_path, dataset_size_limit=head, download=cfg.download,
                              zsre_convention=cfg.zsre_convention))
    if not cases:
        raise DatasetError(f"{cfg.data or cfg.dataset}: no cases")
    if cfg.sample_num is not None:
        path = seed_samples_file(cfg, data_path)
        ordering = load_seed_ordering(path, cfg.sample_num)
        picked = order_cases(cases, ordering, limit=cfg.dataset_size_limit)
        if not picked:
            raise DatasetError(f"ordering {cfg.sample_num} of {path.name} names none of the {len(cases)} case ids "
                               "in the dataset file")
        return picked
    return cases[: cfg.dataset_size_limit] if cfg.dataset_size_limit is not None else cases


def case_request(case: Case) -> EditRequest:
    return EditRequest.from_any(case.requested_rewrite)


def resolve_run_hparams(method: EditMethod, cfg: RunConfig, model: nn.Module) -> tuple[EditHparams, str]:
    """(hparams, source) through :func:`~fastmemit.editing.resolve_hparams`, the library's one resolution
    (``load_hparams`` for a name or file, ``builtin_hparams`` for the model): ``cfg.hparams`` (an existing
    file by its absolute path, else a built-in name), else the built-in for the model; then
    ``cfg.hparams_overrides``."""
    spec = cfg.hparams
    is_file = spec is not None and Path(spec).expanduser().exists()
    if is_file:  # the file, even where a built-in has its name
        spec = str(Path(spec).expanduser().resolve())
    hp = resolve_hparams(method, spec, model)
    if spec is None:
        source = f"built-in {method.name}/{model_key(model)}"
    else:
        source = spec if is_file else f"built-in {spec}"
    if cfg.hparams_overrides:
        hp = hp.replace(**cfg.hparams_overrides)
    return hp, source


def _consistency_tables(cfg: RunConfig, cases: Sequence[Case]) -> tuple[Any, TfidfTable | None]:
    """(attribute snippets, tf-idf table) for the consistency metric, when their files are found."""
    if isinstance(cases[0], ZsreCase) or cfg.skip_generation_tests:
        return None, None
    folder = Path(cfg.consistency_dir).expanduser() if cfg.consistency_dir else (
        Path(cfg.data).expanduser().parent if cfg.data else None)
    if folder is None or not any(c.generation_prompts for c in cases):
        return None, None
    files = [folder / "attribute_snippets.json", folder / "idf.npy", folder / "tfidf_vocab.json"]
    if all(f.is_file() for f in files):
        return load_attribute_snippets(files[0]), load_tfidf(files[1], files[2])
    if cfg.consistency_dir:
        raise DatasetError(f"consistency_dir {folder} lacks {', '.join(f.name for f in files if not f.is_file())}")
    return None, None


def _groups(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


# ----------------------------------------------------------------------------- what a run needs


@dataclass
class RunSetup:
    """Everything a run needs, prepared before its folder is touched."""

    cfg: RunConfig
    method: EditMethod
    cases: list[Case]
    requests: list[EditRequest]
    model: nn.Module
    tok: Any
    hp: EditHparams
    hp_source: str
    ds_flags: TaskFlags | None
    snippets: Any
    tfidf: TfidfTable | None
    session_times: dict[str, float]
    base_fp: str = field(init=False)  # fingerprint of the unedited model
    batches: list[list[int]] = field(init=False)  # case indices per edited batch
    chunks: list[list[int]] = field(init=False)  # case indices per pre/final scoring chunk

    def __post_init__(self) -> None:
        self.base_fp = model_fingerprint(self.model)
        self.batches = _groups(len(self.cases), self.cfg.edits_per_batch)
        self.chunks = _groups(len(self.cases), self.cfg.eval_chunk)

    def edits_after(self, batches_done: int) -> int:
        """Edits in the model after ``batches_done`` batches (batched: the last batch's)."""
        if self.cfg.sequential:
            return sum(len(b) for b in self.batches[:batches_done])
        return len(self.batches[batches_done - 1]) if batches_done else 0

    def editor(self, target_cache: dict[Any, Any] | None) -> Editor:
        """The run's Editor; batched runs share z* through ``target_cache`` (a new one when None)."""
        cfg = self.cfg
        if cfg.sequential or cfg.conserve_memory:
            cache = None
        else:
            cache = target_cache if target_cache is not None else {}
        return Editor(self.model, self.tok, self.method.name, self.hp, corpus=cfg.corpus,
                      stats_cache_dir=cfg.stats_cache_dir, seed=cfg.seed, show_progress=cfg.show_progress,
                      use_cache=cfg.use_cache, target_cache=cache, stats_device=cfg.stats_device,
                      solve_device=cfg.solve_device, diagnostics=True)

    def case_lines(self, rec: BatchRecord[int], pre: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The ``cases.jsonl`` lines of an edited batch (``pre``: the pre-phase lines by case index)."""
        b = rec.index
        edits = self.edits_after(b + 1)
        v_nll = rec.result.info.get("v_nll", [None] * len(rec.cases))
        return [{"batch": b, "case_id": self.cases[i].case_id, "edits_so_far": edits, "cases_done": rec.cases[-1] + 1,
                 "request": self.requests[i].to_dict(), "pre": pre[i]["pre"], "post": post,
                 "batch_timings": rec.timings, "v_nll": v_nll[j]}
                for j, (i, post) in enumerate(zip(rec.cases, rec.post))]

    def config_json(self, run_dir: Path, command: Sequence[str] | None) -> dict[str, Any]:
        hp = self.hp.to_dict()
        return stored_config(
            self.cfg, run_dir, method=self.method.name, hparams=hp, hparams_source=self.hp_source,
            hparams_label=hparams_label(hp), base_fingerprint=self.base_fp, model_class=type(self.model).__name__,
            n_cases=len(self.cases), n_batches=len(self.batches), case_ids=[c.case_id for c in self.cases],
            fastmemit_version=fastmemit.__version__, command=list(command) if command is not None else None)


def prepare_run(cfg: RunConfig, folder: RunFolder, model: nn.Module | None, tok: Any, continue_run: bool) -> RunSetup:
    """Load and check everything that can fail on bad input, before the run folder is touched."""
    method = get_method(cfg.method)  # unknown method: fail before loading anything
    folder.check_usable()
    ds_flags = parse_task_flags(cfg.downstream_tasks, cfg.number_of_few_shots, cfg.number_of_tests) \
        if cfg.do_downstream_eval else None
    for task in ds_flags.tasks if ds_flags else ():  # a missing data file: fail before the run folder exists
        load_task_data(get_task(task), cfg.downstream_data_dir)
    cases = load_cases(cfg)
    requests = [case_request(c) for c in cases]  # malformed requests: fail before writing
    snippets, tfidf = _consistency_tables(cfg, cases)
    times: dict[str, float] = {}
    if model is None:
        t0 = time.perf_counter()
        model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map)
        times["load_model"] = time.perf_counter() - t0
    elif tok is None:
        raise RunError("a model was passed without its tokenizer")
    model.eval()
    if continue_run:
        stored = folder.stored_config()
        hp = method.hparams_cls.from_dict(stored.get("hparams") or {}, source=str(folder.config_path))
        hp_source = stored.get("hparams_source", "stored")
    else:
        hp, hp_source = resolve_run_hparams(method, cfg, model)
    try:
        check_layers(model, hp.layers)
    except FastMemitError:
        raise
    except ValueError as e:
        raise EditError(f"hparams.layers: {e}") from None
    return RunSetup(cfg, method, cases, requests, model, tok, hp, hp_source, ds_flags, snippets, tfidf, times)

