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
- Lifelong runs: :func:`plot_run` also writes ``diagnostics.png`` (per edited layer: ‖W − W0‖/‖W0‖, the
  preservation RMS of the batch and of W − W0, max kᵀC⁻¹k, the seed's edit distances, the unmet
  fraction) and ``retention.png`` (ES/PS/NS of every case edited so far, from ``retention.jsonl``);
  :func:`plot_lifelong` puts several runs' retention, downstream accuracy and weight distance in one PNG.
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

__all__ = ["CF_METRICS", "TITLES", "ZSRE_METRICS", "PlotError", "diagnostics_rows", "load_run", "plot_lifelong",
           "plot_run", "plot_runs", "retention_rows", "run_curves", "run_label"]

DIAGNOSTIC_PANELS = (("relative_distance_w0", "‖W − W0‖_F / ‖W0‖_F"), ("preservation_rms_w0", "preservation RMS of W − W0"),
                     ("preservation_rms", "preservation RMS of the batch's Δ"), ("max_kCk", "max kᵀC⁻¹k of the batch"),
                     ("new_edit_distance", "mean ‖Ŵk − z*‖ (seed)"), ("unmet_fraction", "‖ΔK − R‖ / ‖R‖"))


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
            "downstream": _jsonl(d / "downstream.jsonl"), "diagnostics": _jsonl(d / "diagnostics.jsonl"),
            "retention": _jsonl(d / "retention.jsonl")}


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


def _metric_panel(ax: Any, run: Mapping[str, Any], m: str, pre: float | None,
                  final: tuple[float, float] | None = None) -> None:
    """A metric's panel finished: the pre-edit line, the final scoring's point (x, y), title, axes."""
    if pre is not None:
        ax.axhline(pre, color="C3", linestyle="--", linewidth=1, label="before editing")
    if final is not None:
        ax.plot([final[0]], [final[1]], "s", color="C2", label="all cases on the final model")
    ax.set_title(TITLES[m])
    ax.set_xlabel(_xlabel(run))
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


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
        final = run["summary"].get("final", {}).get(m)
        _metric_panel(ax, run, m, rows[-1][f"{m}_pre"], None if final is None else (xs[-1], final))
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{run_label(run)} — {run['dir'].name}")
    paths = _save(fig, png, [{"run": str(run["dir"]), **r} for r in rows])
    paths.update(_downstream_plot(run, png.with_name("downstream.png") if out_png is None
                                  else png.with_name(png.stem + ".downstream.png")))
    for name, plot in (("diagnostics", _diagnostics_plot), ("retention", _retention_plot)):
        got = plot(run, png.with_name(f"{name}.png") if out_png is None else png.with_name(f"{png.stem}.{name}.png"))
        paths.update({f"{name}_{k}": v for k, v in got.items()})
    return paths


# ----------------------------------------------------------------------------- lifelong runs


def diagnostics_rows(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (batch, edited layer) of ``diagnostics.jsonl``: ``batch, edits_so_far`` and the layer's values."""
    return [{"batch": line["batch"], "edits_so_far": line["edits_so_far"], **row}
            for line in run["diagnostics"] for row in line.get("layers", [])]


def retention_rows(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per retention check (``edits_so_far``, ``n_cases`` and the means ×100 of every case edited
    so far), then the final scoring of a finished sequential run (``"final": True``)."""
    rows = [{"edits_so_far": c["edits_so_far"], "batches_done": c["batches_done"], "final": False, **c["means"]}
            for c in run["retention"]]
    final, s = run["summary"].get("final"), run["summary"]
    if final and not s.get("partial") and not s.get("stopped"):
        edits = max((r.get("edits_so_far") or 0 for r in run["cases"]), default=0)
        if not rows or rows[-1]["edits_so_far"] != edits:
            rows.append({"edits_so_far": edits, "batches_done": s.get("batches_done"), "final": True, **final})
    return rows


def _diagnostics_plot(run: Mapping[str, Any], png: Path) -> dict[str, Path]:
    rows = diagnostics_rows(run)
    if not rows:
        return {}
    layers = sorted({r["layer"] for r in rows})
    fig, axes = _figure(2, 3)
    for ax, (key, title) in zip([a for row in axes for a in row], DIAGNOSTIC_PANELS):
        for k, layer in enumerate(layers):
            pts = [(r["edits_so_far"], r[key]) for r in rows if r["layer"] == layer and r.get(key) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "-", marker="o", markersize=2, color=f"C{k % 10}", label=f"layer {layer}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(_xlabel(run))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"per-batch diagnostics — {run_label(run)} — {run['dir'].name}")
    return _save(fig, png, [{"run": str(run["dir"]), **{k: v for k, v in r.items() if not isinstance(v, dict)}}
                            for r in rows])


def _retention_plot(run: Mapping[str, Any], png: Path) -> dict[str, Path]:
    rows = retention_rows(run)
    if not run["retention"] or not rows:
        return {}
    metrics = _metrics_of(run["cases"])
    curves = run_curves(run)
    fig, axes = _figure(1, len(metrics))
    for ax, m in zip(axes[0], metrics):
        ax.plot([r["edits_so_far"] for r in rows], [r.get(m) for r in rows], "-s", markersize=3, color="C2",
                label="all edits so far, on the model then")
        ax.plot([r["cases_done"] for r in curves], [r[m] for r in curves], "-", color="C0", alpha=0.6,
                label="each batch right after its edit (running mean)")
        _metric_panel(ax, run, m, curves[-1][f"{m}_pre"] if curves else None)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"retention — {run_label(run)} — {run['dir'].name}")
    return _save(fig, png, [{"run": str(run["dir"]), **r} for r in rows])


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


def _windowed(run: Mapping[str, Any], key: str, window: int) -> list[tuple[int, float]]:
    """(edits so far, post − pre of ``key`` ×100 over the latest ≥ ``window`` cases) after every batch."""
    by_batch: dict[int, list[Mapping[str, Any]]] = {}
    for r in run["cases"]:
        by_batch.setdefault(int(r["batch"]), []).append(r)
    out, recent = [], []
    for b in sorted(by_batch):
        recent += [(r["pre"].get(key), r["post"].get(key)) for r in by_batch[b]]
        recent = [x for x in recent if x[0] is not None and x[1] is not None][-window:]
        if recent:
            out.append((by_batch[b][0].get("edits_so_far"), 100.0 * sum(p - q for q, p in recent) / len(recent)))
    return out


def _lifelong_series(run: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, list[tuple[Any, Any]]]:
    """Every curve of one run in :func:`plot_lifelong`, by panel name: [(edits so far, value), ...]."""
    series: dict[str, list[tuple[Any, Any]]] = {}
    ret = retention_rows(run)
    for m in CF_METRICS:
        series[m] = [(r["edits_so_far"], r.get(m)) for r in ret]
    recs = [row for check in run["downstream"] for row in check.get("records", [])]
    for t in tasks:
        for mode in ("generate", "loglik"):
            series[f"{t}/{mode}"] = [(r["edits_so_far"], r["accuracy"]) for r in recs if r["task"] == t and r["mode"] == mode]
    gen: dict[int, list[float]] = {}
    for r in recs:
        if r["mode"] == "generate":
            gen.setdefault(r["edits_so_far"], []).append(r["invalid"])
    series["invalid"] = [(e, sum(v) / len(v)) for e, v in sorted(gen.items())]
    diag: dict[int, dict[str, float]] = {}
    for r in diagnostics_rows(run):
        top = diag.setdefault(r["edits_so_far"], {})
        for k in ("relative_distance_w0", "preservation_rms_w0", "max_kCk"):
            if r.get(k) is not None:
                top[k] = max(top.get(k, r[k]), r[k])
    for k in ("relative_distance_w0", "preservation_rms_w0", "max_kCk"):
        series[k] = [(e, v[k]) for e, v in sorted(diag.items()) if k in v]
    series["ns_window"] = _windowed(run, "ns", 100)
    return series


def plot_lifelong(run_dirs: Sequence[str | os.PathLike[str]], out_png: str | os.PathLike[str],
                  labels: Sequence[str] | None = None) -> dict[str, Path]:
    """Several sequential runs against the number of edits, in one PNG (and its CSV).

    Row 1: ES/PS/NS/Score of every case edited so far (retention checks; the final scoring of finished
    runs). Row 2: downstream accuracy per task (generate solid, loglik dotted; baseline at 0 edits) and the
    rate of invalid generated answers. Row 3: the largest ‖W − W0‖/‖W0‖, preservation RMS of W − W0 and
    max kᵀC⁻¹k over the edited layers, and post − pre NS of the latest 100 edited cases, right after their edit.
    """
    if not run_dirs:
        raise PlotError("no run folders given")
    runs = [load_run(d) for d in run_dirs]
    names = list(labels) if labels is not None else [run_label(r) for r in runs]
    tasks = sorted({row["task"] for r in runs for c in r["downstream"] for row in c.get("records", [])})[:3]
    panels = [*((m, TITLES[m] + " — all edits so far") for m in CF_METRICS),
              *((t, f"{t} accuracy (generate —, loglik ···)") for t in tasks), ("invalid", "invalid generated answers"),
              ("relative_distance_w0", "max over layers ‖W − W0‖ / ‖W0‖"),
              ("preservation_rms_w0", "max over layers preservation RMS of W − W0"),
              ("max_kCk", "max over layers kᵀC⁻¹k of the batch"), ("ns_window", "post − pre NS, latest 100 cases")]
    fig, axes = _figure(3, 4, w=4.4, h=3.3)
    flat = {name: ax for (name, _), ax in zip(panels, [a for row in axes for a in row])}
    for ax in [a for row in axes for a in row][len(panels):]:
        ax.remove()
    data: list[dict[str, Any]] = []
    for k, (run, name) in enumerate(zip(runs, names)):
        series = _lifelong_series(run, tasks)
        colour, labelled = f"C{k % 10}", False
        for key, pts in series.items():
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            data += [{"run": str(run["dir"]), "label": name, "series": key, "edits_so_far": x, "value": y} for x, y in pts]
            panel = key.split("/")[0]
            if not pts or panel not in flat:
                continue
            x, y = zip(*pts)
            style = ":" if key.endswith("/loglik") else "-"
            flat[panel].plot(x, y, style, marker="o", markersize=2, color=colour, label=None if labelled else name)
            labelled = True
    for name, title in panels:
        ax = flat[name]
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("number of edits", fontsize=8)
        ax.grid(alpha=0.3)
        if name in CF_METRICS:
            ax.set_ylim(-2, 102)
        elif name in tasks or name == "invalid":
            ax.set_ylim(-0.02, 1.02)
    handles: dict[str, Any] = {}
    for ax in flat.values():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=7, loc="outside lower center", ncols=4)
    fig.suptitle("lifelong editing: retention, downstream accuracy and weight drift against the number of edits")
    return _save(fig, Path(out_png), data)
