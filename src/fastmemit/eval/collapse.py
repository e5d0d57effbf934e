"""Collapse detection for sequential runs (``stop_on_collapse``): the rules, and the verdict after a batch.

A run *collapses* when one of the active rules fires after a batch (each rule is a :class:`RunConfig`
setting; ``None`` switches it off):

- ``collapse_downstream_drop`` (needs ``do_downstream_eval``): at a downstream check, the mean accuracy over
  the checked (task, scoring mode) pairs is at least this much (0–1) below the baseline check's;
- ``collapse_invalid_rise`` (idem): the mean rate of invalid generated answers is at least this much above
  the baseline's (a model that stops answering: EMMET on smollm2 went from 0 % to 98–100 %);
- ``collapse_ns_drop``: over the cases of the latest batches holding at least ``collapse_window`` cases,
  the mean post-edit neighbourhood score (NS; zsRE: specificity), measured right after each batch, is at
  least this many points (×100) below the same cases' pre-edit mean; not judged before that many cases;
- ``collapse_rel_distance``: some edited layer's ‖W − W0‖_F / ‖W0‖_F exceeds this.

A batch count is *verified healthy* when every active rule has been judged there and none fired: with a
downstream rule active, only at downstream checks; otherwise at every checkpoint. The runner writes a
checkpoint at each verified point and marks it healthy; when a rule fires it restores the last healthy
checkpoint (the unedited model if there is none), records ``stopped`` and ends the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NEIGHBOUR_KEYS = ("ns", "specificity")  # CounterFact, zsRE


@dataclass(frozen=True)
class CollapseRules:
    """The active thresholds (None: off) and the NS window, from a run's settings."""

    downstream_drop: float | None = None
    invalid_rise: float | None = None
    ns_drop: float | None = None
    rel_distance: float | None = None
    window: int = 100

    @classmethod
    def from_settings(cls, cfg: Any) -> CollapseRules:
        """The rules of a :class:`~fastmemit.eval.config.RunConfig` (downstream ones only with its checks)."""
        ds = bool(cfg.do_downstream_eval)
        return cls(cfg.collapse_downstream_drop if ds else None, cfg.collapse_invalid_rise if ds else None,
                   cfg.collapse_ns_drop, cfg.collapse_rel_distance, cfg.collapse_window)

    @property
    def downstream(self) -> bool:
        return self.downstream_drop is not None or self.invalid_rise is not None

    @property
    def any(self) -> bool:
        return self.downstream or self.ns_drop is not None or self.rel_distance is not None

    def to_dict(self) -> dict[str, Any]:
        return {"downstream_drop": self.downstream_drop, "invalid_rise": self.invalid_rise, "ns_drop": self.ns_drop,
                "rel_distance": self.rel_distance, "window": self.window}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


class CollapseMonitor:
    """Judges each batch of a sequential run against :class:`CollapseRules`.

    Feed every batch's ``cases.jsonl`` lines in order (:meth:`add_batch`, resumed ones too), then ask
    :meth:`verdict` after a new batch. ``downstream_points``: the batch counts after which the runner makes
    a downstream check.
    """

    def __init__(self, rules: CollapseRules, downstream_points: Sequence[int] = ()) -> None:
        self.rules = rules
        self.downstream_points = frozenset(downstream_points)
        self._batches: deque[tuple[int, float, float]] = deque()  # (cases, Σ pre NS, Σ post NS), latest last

    def add_batch(self, lines: Sequence[Mapping[str, Any]]) -> None:
        n, pre, post = 0, 0.0, 0.0
        for r in lines:
            key = next((k for k in NEIGHBOUR_KEYS if r["post"].get(k) is not None), None)
            if key is None or r["pre"].get(key) is None:
                continue
            n, pre, post = n + 1, pre + float(r["pre"][key]), post + float(r["post"][key])
        self._batches.append((n, pre, post))
        while len(self._batches) > 1 and sum(b[0] for b in list(self._batches)[1:]) >= self.rules.window:
            self._batches.popleft()  # keep only the latest batches that cover the window

    def candidate(self, batches_done: int, checkpoint_due: bool) -> bool:
        """Whether every active rule is judged after ``batches_done`` batches (a healthy point if none fires)."""
        return batches_done in self.downstream_points if self.rules.downstream else checkpoint_due

    def verdict(self, batches_done: int, diagnostics: Sequence[Mapping[str, Any]] | None,
                checks: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        """The first rule that fires after ``batches_done`` batches, as ``{"rule", "value", "limit",
        "reason"}``; None when the batch is healthy. ``diagnostics``: the batch's per-layer rows;
        ``checks``: the downstream checks so far (the baseline first)."""
        for judge in (self._downstream, self._ns, self._distance):
            got = judge(batches_done, diagnostics, checks)
            if got is not None:
                return got
        return None

    # --- the rules ----------------------------------------------------------------------------
    def _downstream(self, batches_done: int, _diag: Any, checks: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        r = self.rules
        if not r.downstream or batches_done not in self.downstream_points or not checks:
            return None
        base = next((c for c in checks if c["batches_done"] == 0), None)
        now = next((c for c in reversed(checks) if c["batches_done"] == batches_done), None)
        if base is None or now is None:
            return None
        b_rows = {(x["task"], x["mode"]): x for x in base["records"]}
        n_rows = {(x["task"], x["mode"]): x for x in now["records"]}
        common = sorted(set(b_rows) & set(n_rows))
        gen = [k for k in common if k[1] == "generate"]
        where = ", ".join(f"{t}/{m}" for t, m in common)
        rules = (  # (rule, limit, rows compared, field, whether a fall is bad, reason)
            ("downstream_drop", r.downstream_drop, common, "accuracy", True,
             lambda v, lim: f"mean downstream accuracy {v:.3f} below the baseline over {where} (limit {lim:g})"),
            ("invalid_rise", r.invalid_rise, gen, "invalid", False,
             lambda v, lim: f"invalid generated answers {v:.3f} above the baseline's rate (limit {lim:g})"),
        )
        for rule, limit, keys, field, falls, reason in rules:
            if limit is None or not keys:
                continue
            before, after = _mean([b_rows[k][field] for k in keys]), _mean([n_rows[k][field] for k in keys])
            value = before - after if falls else after - before  # keys is never empty: no None
            if value >= limit:
                return _fired(rule, value, limit, reason(value, limit))
        return None

    def _ns(self, _done: int, _diag: Any, _checks: Any) -> dict[str, Any] | None:
        limit = self.rules.ns_drop
        n = sum(b[0] for b in self._batches)
        if limit is None or n < self.rules.window or n == 0:
            return None
        drop = 100.0 * (sum(b[1] for b in self._batches) - sum(b[2] for b in self._batches)) / n
        if drop >= limit:
            return _fired("ns_drop", drop, limit, f"post-edit neighbourhood score of the last {n} cases {drop:.1f} "
                                                  f"points under their pre-edit score (limit {limit:g})")
        return None

    def _distance(self, _done: int, diagnostics: Sequence[Mapping[str, Any]] | None, _checks: Any) -> dict[str, Any] | None:
        limit = self.rules.rel_distance
        rows = [d for d in diagnostics or () if d.get("relative_distance_w0") is not None]
        if limit is None or not rows:
            return None
        worst = max(rows, key=lambda d: d["relative_distance_w0"])
        if worst["relative_distance_w0"] > limit:
            return _fired("rel_distance", worst["relative_distance_w0"], limit,
                          f"layer {worst['layer']}: ‖W − W0‖/‖W0‖ = {worst['relative_distance_w0']:.3f} "
                          f"(limit {limit:g})")
        return None


def _fired(rule: str, value: float, limit: float, reason: str) -> dict[str, Any]:
    return {"rule": rule, "value": value, "limit": limit, "reason": reason}
