"""Append-only JSON Lines results for resumable runs.

Each call writes whole lines with one ``write``, then flushes and fsyncs, so a crash leaves at
most one torn final line; :func:`read_jsonl` skips such a line (with a warning) and
:func:`append_jsonl` starts a fresh line after it, so a resumed run keeps appending cleanly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("fastmemit.downstream")


def append_jsonl(path: str | os.PathLike[str], records: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
    """Append one record (a dict) or several as JSON lines; durable when this returns."""
    rows = [records] if isinstance(records, Mapping) else list(records)
    if not rows:
        return
    text = "".join(json.dumps(dict(r), ensure_ascii=False, allow_nan=True) + "\n" for r in rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a torn line from an interrupted write: do not glue onto it
                text = "\n" + text
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of ``path`` ([] when it does not exist); torn or broken lines are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping an incomplete or broken line", path, lineno)
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out
