"""Reading a task's JSON Lines file and splitting it into the shot pool and the tests.

As in the research code, records 0–9 are the few-shot pool (k shots = the first k) and the tests
are records 10, 11, ... — the first 10 are never tested, even with 0 shots.

Default data folder: ``$FASTMEMIT_DOWNSTREAM_DATA``, else ``<repo>/../shared/data/downstream``
when that exists (a development checkout), else an error asking for ``data_dir``/``--data-dir``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fastmemit.downstream.base import FEW_SHOT_POOL, DownstreamDataError, Task
from fastmemit.downstream.registry import resolve_task_name

ENV_DATA = "FASTMEMIT_DOWNSTREAM_DATA"

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TaskData:
    """A task's records split as the research code splits them."""

    task: Task
    path: Path
    pool: list[dict]  # records 0..9: the few-shot pool
    tests: list[dict]  # records 10..: the test items

    def shots(self, k: int) -> list[dict]:
        if not 0 <= k <= len(self.pool):
            raise DownstreamDataError(
                f"{self.task.name}: asked for {k} shots but the pool in {self.path} has {len(self.pool)} (0..{FEW_SHOT_POOL})"
            )
        return self.pool[:k]


def default_data_dir() -> Path:
    """``$FASTMEMIT_DOWNSTREAM_DATA``, else ``<repo>/../shared/data/downstream`` if present."""
    env = os.environ.get(ENV_DATA)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DownstreamDataError(f"${ENV_DATA} points to {p}, which is not a folder")
        return p
    repo = Path(__file__).resolve().parents[3]  # src/fastmemit/downstream/data.py -> repo root
    candidate = repo.parent / "shared" / "data" / "downstream"
    if candidate.is_dir():
        return candidate
    raise DownstreamDataError(
        "no downstream data folder: pass data_dir=... (CLI: --data-dir DIR) naming a folder with "
        f"<task>.jsonl files, or set ${ENV_DATA}"
    )


def task_file(task: Task, data_dir: PathLike | None = None, data_files: Mapping[str, PathLike] | None = None) -> Path:
    """Where ``task``'s records live: ``data_files[task]`` if given, else ``<data_dir>/<task.filename>``."""
    if data_files:
        for key, value in data_files.items():
            if resolve_task_name(key) == task.name:
                return Path(value).expanduser()
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return folder / task.filename


def load_records(task: Task, path: PathLike) -> list[dict]:
    """Read and check every record of ``path`` for ``task``; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DownstreamDataError(f"{task.name}: data file {path} does not exist")
    records: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue  # blank lines (e.g. a trailing one) are allowed
                records.append(_check_record(task, path, lineno, line))
    except UnicodeDecodeError as e:
        raise DownstreamDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise DownstreamDataError(f"{path}: no records")
    return records


def _check_record(task: Task, path: Path, lineno: int, line: str) -> dict:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DownstreamDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise DownstreamDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name, check in task.fields.items():
        if name not in rec:
            raise DownstreamDataError(
                f"{where}: missing field {name!r} (task {task.name} needs {', '.join(task.fields)})"
            )
        problem = check(rec[name])
        if problem:
            raise DownstreamDataError(f"{where}: field {name!r}: {problem}")
    return rec


def load_task_data(
    task: Task, data_dir: PathLike | None = None, data_files: Mapping[str, PathLike] | None = None
) -> TaskData:
    """Load ``task``'s file and split it: records[:10] → shot pool, records[10:] → tests."""
    path = task_file(task, data_dir, data_files)
    records = load_records(task, path)
    if len(records) <= FEW_SHOT_POOL:
        raise DownstreamDataError(
            f"{path}: {len(records)} records; need more than {FEW_SHOT_POOL} "
            f"(records 1-{FEW_SHOT_POOL} are the shot pool, tests start at record {FEW_SHOT_POOL + 1})"
        )
    return TaskData(task=task, path=path, pool=records[:FEW_SHOT_POOL], tests=records[FEW_SHOT_POOL:])
