"""Plots of evaluation runs: metrics against the number of edits, and runs side by side.

Every PNG is written with the data behind it (same name, ``.csv``), atomically. matplotlib's object
API with the Agg canvas: no pyplot, no global state, no display.

- :func:`plot_run` — one run folder: per metric, the post-edit value of each batch (dots) and the
  running mean over the cases edited so far (line), against the number of edits so far; the
  pre-edit mean as a dashed line. Sequential runs: x is the number of edits in the model. Batched
  runs: x is the number of cases processed (the model is restored after each batch). Downstream
  checks, when the run made them, go to ``downstream.png`` (:func:`fastmemit.downstream.plots.plot_downstream`).
- :func:`plot_runs` — several run folders overlaid (running means), plus grouped bars of each run's
  pre and post means; the downstream plots of runs that have them beside it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastmemit.downstream.plots import plot_downstream
from fastmemit.errors import PlotError
from fastmemit.eval.config import renamed
from fastmemit.eval.summary import CF_METRICS, TITLES, ZSRE_METRICS, MetricMeans, metrics_of
from fastmemit.utils import atomic_path, read_json

__all__ = ["CF_METRICS", "TITLES", "ZSRE_METRICS", "PlotError", "load_run", "plot_run", "plot_runs", "run_curves",
           "run_label"]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line of a run still in progress
            if isinstance(rec, dict):
                out.append(rec)
    return out


def read_run_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON object file (config.json, summary.json); PlotError naming it otherwise."""
    data = read_json(path, "run file", PlotError)
    if not isinstance(data, dict):
        raise PlotError(f"run file {str(path)!r}: expected a JSON object, got {type(data).__name__}")
    return data


def load_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"dir", "config", "summary", "cases", "downstream"}`` of a run folder (summary may be {})."""
    d = Path(run_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise PlotError(f"{d} is not a run folder (no config.json)")
    config = read_run_json(cfg_path)
    summary = read_run_json(d / "summary.json") if (d / "summary.json").is_file() else {}
    return {"dir": d, "config": config, "summary": summary, "cases": _jsonl(d / "cases.jsonl"),
            "downstream": _jsonl(d / "downstream.jsonl")}


def run_label(run: Mapping[str, Any]) -> str:
    cfg = run["config"]
    r = renamed(cfg.get("run", {}))  # run folders written before the rename use the research code's names
    mode = "seq" if r.get("sequential", True) else "batch"
    return f"{cfg.get('method', r.get('method', '?'))} {mode}×{r.get('edits_per_batch')} {cfg.get('hparams_label', '')}".strip()


def _metrics_of(cases: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    return metrics_of(cases[0].get("post", {})) if cases else CF_METRICS


def run_curves(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per finished batch: ``batch, cases_done, edits_so_far`` and, per metric, the batch's
    post-edit mean (``<m>_batch``), the running post mean over all cases so far (``<m>``) and the
    running pre-edit mean (``<m>_pre``); ×100."""
    by_batch: dict[int, list[dict[str, Any]]] = {}
    for rec in run["cases"]:
        by_batch.setdefault(int(rec["batch"]), []).append(rec)
    metrics = _metrics_of(run["cases"])
    rows: list[dict[str, Any]] = []
    post, pre = MetricMeans(), MetricMeans()  # running over the batches so far
    for b in sorted(by_batch):
        recs = by_batch[b]
        batch = MetricMeans(r["post"] for r in recs)
        post.add_all(r["post"] for r in recs)
        pre.add_all(r["pre"] for r in recs)
        row: dict[str, Any] = {"batch": b, "cases_done": post.n_cases, "edits_so_far": recs[0].get("edits_so_far")}
        for m in metrics:
            row[f"{m}_batch"] = batch.mean(m)
            row[m] = post.mean(m)
            row[f"{m}_pre"] = pre.mean(m)
        rows.append(row)
    return rows


def _figure(n_rows: int, n_cols: int, w: float = 4.2, h: float = 3.2) -> tuple[Any, Any]:
    # imported here, as in downstream.plots: matplotlib takes ~0.7 s and reads its rc files at import,
    # and only a finished run draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * n_cols, h * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def _save(fig: Any, png: Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    csv_path = png.with_suffix(".csv")
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return {"png": png, "csv": csv_path}


def _xlabel(run: Mapping[str, Any]) -> str:
    if run["config"].get("run", {}).get("sequential", True):
        return "number of edits (accumulated)"
    return "cases edited (model restored after each batch)"


def plot_run(run_dir: str | os.PathLike[str], out_png: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Metrics of one run against the number of edits; default ``RUN_DIR/plots/metrics.png``.

    Returns the paths written (``png``, ``csv``, and ``downstream_png`` ... when there are checks).
    """
    run = load_run(run_dir)
    rows = run_curves(run)
    if not rows:
        raise PlotError(f"{run['dir']}: no finished batch to plot")
    png = Path(out_png) if out_png is not None else run["dir"] / "plots" / "metrics.png"
    metrics = _metrics_of(run["cases"])
    fig, axes = _figure(1, len(metrics))
    xs = [r["cases_done"] for r in rows]
    for ax, m in zip(axes[0], metrics):
        ax.plot(xs, [r[f"{m}_batch"] for r in rows], "o", markersize=3, alpha=0.45, color="C0", label="batch (post)")
        ax.plot(xs, [r[m] for r in rows], "-", color="C0", label="running mean (post)")
        pre = rows[-1][f"{m}_pre"]
        if pre is not None:
            ax.axhline(pre, color="C3", linestyle="--", linewidth=1, label="before editing")
        final = run["summary"].get("final", {}).get(m)
        if final is not None:
            ax.plot([xs[-1]], [final], "s", color="C2", label="all cases on the final model")
        ax.set_title(TITLES[m])
        ax.set_xlabel(_xlabel(run))
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{run_label(run)} — {run['dir'].name}")
    paths = _save(fig, png, [{"run": str(run["dir"]), **r} for r in rows])
    paths.update(_downstream_plot(run, png.with_name("downstream.png") if out_png is None
                                  else png.with_name(png.stem + ".downstream.png")))
    return paths


def _downstream_plot(run: Mapping[str, Any], png: Path) -> dict[str, Path]:
    records = [row for check in run["downstream"] for row in check.get("records", [])]
    if not records:
        return {}
    got = plot_downstream(records, png, title=f"downstream checks — {run_label(run)}")
    return {f"downstream_{k}": v for k, v in got.items()}


def plot_runs(run_dirs: Sequence[str | os.PathLike[str]], out_png: str | os.PathLike[str]) -> dict[str, Path]:
    """Runs side by side: running post means against edits, and grouped bars of pre/post means.

    The downstream plots of runs that made checks are written beside ``out_png`` as
    ``<stem>.downstream.<run folder>.png``. Returns the paths written.
    """
    if not run_dirs:
        raise PlotError("no run folders given")
    runs = [load_run(d) for d in run_dirs]
    labels = [run_label(r) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({r['dir'].name})" for lab, r in zip(labels, runs)]
    kinds = {_metrics_of(r["cases"]) for r in runs if r["cases"]}
    if not kinds:
        raise PlotError("none of the runs has a finished batch")
    metrics = sorted(kinds, key=len)[-1] if len(kinds) == 1 else CF_METRICS + ZSRE_METRICS
    png = Path(out_png)
    fig, axes = _figure(2, len(metrics))
    data: list[dict[str, Any]] = []
    for k, (run, label) in enumerate(zip(runs, labels)):
        rows = run_curves(run)
        for r in rows:
            data.append({"run": str(run["dir"]), "label": label, **r})
        for ax, m in zip(axes[0], metrics):
            pts = [(r["cases_done"], r[m]) for r in rows if r.get(m) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "-", marker="o", markersize=2, color=f"C{k % 10}", label=label)
    for ax, m in zip(axes[0], metrics):
        ax.set_title(TITLES[m])
        ax.set_xlabel("number of edits / cases")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    data += _bar_panel(fig, axes, runs, labels, metrics)
    fig.suptitle("runs compared — top: post-edit running mean over the cases so far; bottom: means over all cases")
    paths = _save(fig, png, data)
    for run in runs:
        got = _downstream_plot(run, png.with_name(f"{png.stem}.downstream.{run['dir'].name}.png"))
        paths.update({f"{k}:{run['dir'].name}": v for k, v in got.items()})
    return paths


def _bar_panel(fig: Any, axes: Any, runs: Sequence[Mapping[str, Any]], labels: Sequence[str],
               metrics: Sequence[str]) -> list[dict[str, Any]]:
    """The second row of :func:`plot_runs`: one wide panel of each run's means (bar: post; line:
    pre; triangle: final model); returns its data rows."""
    for ax in axes[1][1:]:
        ax.remove()
    gs = axes[1][0].get_subplotspec().get_gridspec()
    axes[1][0].remove()
    bar_ax = fig.add_subplot(gs[1, :])
    data: list[dict[str, Any]] = []
    width = 0.8 / len(runs)
    for k, (run, label) in enumerate(zip(runs, labels)):
        s = run["summary"]
        for j, m in enumerate(metrics):
            x = j + (k - (len(runs) - 1) / 2) * width
            pre, post = s.get("pre", {}).get(m), s.get("post", {}).get(m)
            final = s.get("final", {}).get(m)
            if post is not None:
                bar_ax.bar(x, post, width * 0.9, color=f"C{k % 10}", label=label if j == 0 else None)
            if pre is not None:
                bar_ax.plot([x - width * 0.45, x + width * 0.45], [pre, pre], color="black", linewidth=1.5,
                            label="before editing" if j == 0 and k == 0 else None)
            if final is not None:
                bar_ax.plot([x], [final], "v", color="black", markersize=4,
                            label="final model (sequential)" if j == 0 and not any(
                                r["summary"].get("final") for r in runs[:k]) else None)
            data.append({"run": str(run["dir"]), "label": label, "metric": m, "pre": pre, "post": post,
                         "final": final, "n_cases": s.get("n_cases")})
    bar_ax.set_xticks(range(len(metrics)), [TITLES[m] for m in metrics], fontsize=8)
    bar_ax.set_ylim(0, 105)
    bar_ax.set_ylabel("mean ×100 (bar: post; line: pre)")
    bar_ax.grid(alpha=0.3, axis="y")
    bar_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return data
