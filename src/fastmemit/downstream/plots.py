"""Downstream metrics against the number of edits: one PNG plus its data as CSV and JSON.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global state, no display).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastmemit.errors import DownstreamError
from fastmemit.utils import atomic_path

METRIC_TITLES = {"accuracy": "accuracy", "f1": "weighted F1", "mcc": "MCC", "invalid": "invalid rate"}
_COLUMNS = ("edits_so_far", "task", "mode", "accuracy", "f1", "mcc")


def plot_downstream(
    records: Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    metrics: Sequence[str] = ("accuracy", "f1", "mcc"),
    title: str | None = None,
) -> dict[str, Path]:
    """Plot each task's metrics against ``edits_so_far``; return the paths written.

    ``records``: dicts with ``edits_so_far`` (int), ``task``, ``mode`` ("generate"/"loglik") and the
    metric values (e.g. rows of :func:`~fastmemit.downstream.evaluate.results_to_records`). One
    panel per (metric, mode); one colour per task; the unedited baseline (``edits_so_far == 0``)
    is a dashed horizontal line in the task's colour. For repeated (task, mode, edits) the last
    record wins. Writes ``out_png`` and, beside it, the same name with ``.csv`` and ``.json``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:
        for key in ("edits_so_far", "task", "mode"):
            if key not in r:
                raise DownstreamError(f"plot record lacks {key!r}: {dict(r)}")
        rows[(str(r["task"]), str(r["mode"]), int(r["edits_so_far"]))] = dict(r)
    if not rows:
        raise DownstreamError("no records to plot")
    data = [rows[k] for k in sorted(rows)]
    tasks = sorted({k[0] for k in rows})
    modes = [m for m in ("generate", "loglik") if any(k[1] == m for k in rows)] + sorted(
        {k[1] for k in rows} - {"generate", "loglik"})
    colours = {t: f"C{i % 10}" for i, t in enumerate(tasks)}

    fig = Figure(figsize=(5.0 * len(modes), 3.2 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), len(modes), squeeze=False)
    for mi, metric in enumerate(metrics):
        for ci, mode in enumerate(modes):
            ax = axes[mi][ci]
            for t in tasks:
                pts = sorted((k[2], v.get(metric)) for k, v in rows.items()
                             if k[0] == t and k[1] == mode and v.get(metric) is not None)
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, color=colours[t], label=t)
                base = [y for x, y in pts if x == 0]
                if base:
                    ax.axhline(base[-1], color=colours[t], linestyle="--", linewidth=1, alpha=0.8)
            ax.set_title(f"{METRIC_TITLES.get(metric, metric)} ({mode})")
            ax.set_xlabel("edits so far")
            ax.grid(alpha=0.3)
            if mi == 0 and ci == len(modes) - 1:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or "downstream checks vs number of edits (dashed: before editing)")

    out_png = Path(out_png)
    paths = {"png": out_png, "csv": out_png.with_suffix(".csv"), "json": out_png.with_suffix(".json")}
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    columns = list(_COLUMNS) + sorted({c for r in data for c in r} - set(_COLUMNS))
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(data)
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths
