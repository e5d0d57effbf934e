"""Hyperparameters for one model, found on the model itself: ``fastmemit tune`` (docs/tune.md).

1. **Layers by a causal trace** (ROME, Meng et al. 2022, §2.1). For a few facts the model gets
   right, the subject's token embeddings are corrupted with Gaussian noise (3× their standard
   deviation) and the clean value of one site at the subject's last token is put back: the gain in
   the probability of the model's answer is the site's *restoration effect*. Two traces per layer
   l: the hidden state (block output of l) and the MLP outputs of the candidate edit window that
   ends at l (the ``window`` layers l − window + 1 … l restored together). The edit window is the
   one with the largest MLP effect (ties: the earliest), never ending at the last layer.
2. **A budgeted coordinate search** on the tuning cases (a slice of a CounterFact file; each trial
   edits them in batches, batched mode, and scores ES/PS/NS): the start (the built-in or the
   automatic default) with the traced layers and with its own; λ (``mom2_update_weight``) on a
   log scale; μ (``emmet_lambda``) apart from λ; ``dynamic_multiplier``; ``clamp_norm_factor``;
   ``v_lr``; λ once more at half-decade steps. A field whose change leaves every delta bit for
   bit the same is one the method does not read: its other values are skipped. z* is optimized
   once per (last layer, v* settings) and shared. A trial starts only when its estimated cost fits
   the time left before the validation's reserve, and stops between two batches at the deadline.
3. **Validation on held-aside cases** (disjoint from the tuning and trace cases): the best
   configurations of the search and the start are scored there; the best held-aside Score wins
   (ties: the tuning Score), so the choice is made on cases the search never saw.

Trials are compared by Score (harmonic mean of ES, PS, NS), then by the mean of the efficacy,
paraphrase and neighbourhood magnitudes (EM, PM, NM). The result, :class:`TuneResult`, is an
hparams JSON (``--hparams`` reads it) with its provenance under ``_tune``. With a trial log,
trials already in it (same model, method, start, cases) are read back instead of run again.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmemit.editing import Editor, TargetValue
from fastmemit.errors import ConfigurationError, EditError, FastMemitError, RunError
from fastmemit.eval.datasets import CounterFactCase
from fastmemit.eval.loop import edit_batches
from fastmemit.eval.metrics import evaluate_counterfact_cases, summarize
from fastmemit.hooks import Trace, edit_output
from fastmemit.hparams_registry import automatic_layers, config_shape, model_key, model_name
from fastmemit.keys_values import fact_position
from fastmemit.lm import model_device, pad_id, pad_left, target_ids
from fastmemit.methods import EditHparams, get_method
from fastmemit.models.arch import get_arch, num_layers
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.utils import logger, progress, read_json, write_json_atomic

TUNED_FIELDS = ("layers", "mom2_update_weight", "emmet_lambda", "dynamic_multiplier", "clamp_norm_factor", "v_lr")
Z_FIELDS = ("clamp_norm_factor", "v_lr")  # besides the last layer: fields z* depends on
LOG_FORMAT = "fastmemit-tune-log/1"
TRACE_SHARE = 0.2  # of the budget, at most, for the causal trace (its first fact always runs)

# ============================================================================= causal trace


@dataclass(frozen=True)
class TraceFact:
    """One prompt of the trace: its ids, the subject's tokens and the token the model answers."""

    ids: tuple[int, ...]
    subject: tuple[int, int]  # first and last token index of the subject
    target: int  # the model's top-1 next token
    known: bool  # that token is the first token of the true answer
    case_id: int | str | None = None


@dataclass
class CausalTrace:
    """Mean restoration effects (probability gains of the model's answer) per layer."""

    window: int  # MLP outputs restored together: the candidate edit window
    hidden: list[float]  # [l]: block output of layer l at the subject's last token restored
    mlp: list[float]  # [l]: MLP outputs of layers l − window + 1 … l restored
    clean: float  # mean probability of the answer, clean
    corrupted: float  # ... with the subject corrupted
    noise: float  # standard deviation of the added noise
    facts: list[int | str | None] = field(default_factory=list)
    n_known: int = 0  # facts whose answer is the true one (the others: the model's own prediction)

    def best_last(self) -> int:
        """Last layer of the window with the largest MLP effect (ties: the earliest; never the final layer)."""
        allowed = self.mlp[: max(1, len(self.mlp) - 1)]
        return max(range(len(allowed)), key=lambda i: (allowed[i], -i))

    def layers(self) -> list[int]:
        last = self.best_last()
        return list(range(max(0, last - self.window + 1), last + 1))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": self.layers()}


def trace_facts(model: nn.Module, tok: Any, cases: Sequence[CounterFactCase], n: int, *, max_scan: int = 200,
                batch_size: int = 16) -> list[TraceFact]:
    """Up to ``n`` facts for the trace from the first ``max_scan`` cases: those whose true answer's
    first token is the model's top-1 after the rewrite prompt. When none is known (a random model),
    the first ``n`` with the model's own top-1 as the answer, so that such a model still has a trace."""
    rows = []
    for c in cases[:max_scan]:
        text = c.rewrite_prompt
        start = c.prompt.index("{}")
        ids, last = fact_position(tok, text, start, start + len(c.subject), "subject_last")
        _, first = fact_position(tok, text, start, start + len(c.subject), "subject_first")
        ctx, true = target_ids(tok, text, c.target_true, ids)
        if last < len(ctx) and list(ctx) == list(ids[: len(ctx)]):  # the subject lies inside the context
            rows.append((tuple(ctx), (first, last), true[0], c.case_id))
    device = model_device(model)
    facts: list[TraceFact] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        ids, mask, pos = pad_left([r[0] for r in chunk], pad_id(tok))
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           use_cache=False, logits_to_keep=1).logits[:, -1]  # (b, V)
        top = logits.argmax(-1).tolist()
        facts += [TraceFact(r[0], r[1], int(t), int(t) == r[2], r[3]) for r, t in zip(chunk, top)]
        if sum(f.known for f in facts) >= n:
            break
    known = [f for f in facts if f.known]
    return (known or facts)[:n]


@torch.no_grad()
def causal_trace(model: nn.Module, tok: Any, facts: Sequence[TraceFact], *, window: int = 5, samples: int = 2,
                 noise_factor: float = 3.0, seed: int = 0, deadline: float | None = None) -> CausalTrace:
    """Restoration effects per layer, averaged over ``facts`` and ``samples`` noise draws (module docstring).

    ``deadline`` (a ``time.monotonic()`` value): facts after it are left out (the first one always runs).
    """
    if not facts:
        raise EditError("the causal trace needs at least one fact")
    n_layers = num_layers(model)
    clean = [_clean_states(model, f) for f in facts]
    subj = torch.cat([c["embed"][f.subject[0] : f.subject[1] + 1] for c, f in zip(clean, facts)])  # (n, d)
    sigma = noise_factor * float(subj.float().std())
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.zeros(n_layers, dtype=torch.float64)  # (L,)
    mlp = torch.zeros(n_layers, dtype=torch.float64)  # (L,)
    p_clean = p_corrupt = 0.0
    used: list[TraceFact] = []
    for f, states in zip(facts, clean):
        if used and deadline is not None and time.monotonic() > deadline:
            break
        probs = _restored_probs(model, f, states, sigma, samples, window, gen)  # (samples, 1 + 2L)
        base = probs[:, :1]  # (samples, 1): corrupted
        hidden += (probs[:, 1 : 1 + n_layers] - base).mean(0)
        mlp += (probs[:, 1 + n_layers :] - base).mean(0)
        p_clean += states["p"]
        p_corrupt += float(base.mean())
        used.append(f)
    n = len(used)
    return CausalTrace(window, (hidden / n).tolist(), (mlp / n).tolist(), p_clean / n, p_corrupt / n, sigma,
                       [f.case_id for f in used], sum(f.known for f in used))


def _sites(model: nn.Module) -> tuple[str, list[str], list[str]]:
    arch, n = get_arch(model), num_layers(model)
    return arch.site("embed"), [arch.site("block", i) for i in range(n)], [arch.site("mlp_down", i) for i in range(n)]


def _clean_states(model: nn.Module, fact: TraceFact) -> dict[str, Any]:
    """Clean outputs (T, d) of the embedding, every block and every MLP, and p(answer)."""
    embed, blocks, mlps = _sites(model)
    ids = torch.tensor([fact.ids], device=model_device(model))  # (1, T)
    with Trace(model, [embed, *blocks, *mlps]) as tr:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]  # (V,)
    p = float(torch.softmax(logits.float(), -1)[fact.target])
    return {"embed": tr.outputs[embed][0], "block": [tr.outputs[b][0] for b in blocks],
            "mlp": [tr.outputs[m][0] for m in mlps], "p": p}


def _restored_probs(model: nn.Module, fact: TraceFact, clean: dict[str, Any], sigma: float, samples: int,
                    window: int, gen: torch.Generator) -> torch.Tensor:
    """p(answer) (samples, 1 + 2L): per noise draw, corrupted; hidden state of layer l restored (l = 0…L−1);
    MLP outputs of the window ending at l restored. All rows of a fact in one batch."""
    embed, blocks, mlps = _sites(model)
    L, last = len(blocks), fact.subject[1]
    per = 1 + 2 * L  # rows per noise draw
    device = model_device(model)
    lo, hi = fact.subject[0], fact.subject[1] + 1
    noise = torch.randn(samples, hi - lo, clean["embed"].shape[-1], generator=gen) * sigma  # (S, n_subj, d)

    def corrupt(h: torch.Tensor) -> torch.Tensor:  # (S·per, T, d)
        h = h.clone()
        h[:, lo:hi] += noise.repeat_interleave(per, 0).to(device=h.device, dtype=h.dtype)
        return h

    def restore(rows: list[int], value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        idx = torch.tensor([s * per + r for s in range(samples) for r in rows], device=device)

        def fn(h: torch.Tensor) -> torch.Tensor:  # (S·per, T, d)
            h = h.clone()
            h[idx, last] = value.to(h.dtype)
            return h

        return fn

    ids = torch.tensor([fact.ids], device=device).expand(samples * per, -1)  # (S·per, T)
    with contextlib.ExitStack() as stack:
        stack.enter_context(edit_output(model, embed, corrupt))
        for i in range(L):
            stack.enter_context(edit_output(model, blocks[i], restore([1 + i], clean["block"][i][last])))
            ends = range(i, min(L, i + window))  # the windows ending at e contain layer i
            stack.enter_context(edit_output(model, mlps[i], restore([1 + L + e for e in ends], clean["mlp"][i][last])))
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]  # (S·per, V)
    return torch.softmax(logits.float(), -1)[:, fact.target].reshape(samples, per).double().cpu()


# ============================================================================= trials


@dataclass
class TrialResult:
    """One configuration edited into one case set and scored."""

    stage: str  # the search step that asked for it ("trace", "start", "λ", "μ", ..., "held-aside")
    config: dict[str, Any]  # the tuned fields' values
    cases: str  # "tune" or "held"
    scores: dict[str, Any]  # summarize() of the post-edit records (×100), with "score"
    seconds: float
    digest: str  # sha256 of every batch's deltas: equal digests, equal edits
    timings: dict[str, float] = field(default_factory=dict)  # summed v, stats, solve, eval seconds
    status: str = "done"  # "done", "aborted" (the deadline passed between two batches) or "failed: <reason>"

    @property
    def key(self) -> tuple[float, float]:
        """Sort key: Score, then the mean of EM, PM and NM."""
        s = self.scores
        mags = [s[k] for k in ("em", "pm", "nm") if k in s]
        return (round(float(s.get("score", 0.0)), 9), sum(mags) / len(mags) if mags else 0.0)


def config_of(hp: EditHparams) -> dict[str, Any]:
    """The tuned fields of an hparams object."""
    d = hp.to_dict()
    return {k: d[k] for k in TUNED_FIELDS}


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


class Budget:
    """Seconds allowed from ``start`` (a ``time.monotonic()`` value; default now)."""

    def __init__(self, seconds: float, start: float | None = None) -> None:
        if not seconds > 0:
            raise ConfigurationError(f"the budget must be positive, got {seconds} s")
        self.seconds = float(seconds)
        self.start = time.monotonic() if start is None else start

    def used(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.used()


@dataclass
class CostModel:
    """Seconds per case of the parts of a trial, measured on the trials run so far."""

    z: float | None = None  # v* optimization
    rest: float | None = None  # keys, solves, scoring
    stats: float = 0.0  # one statistics pass (the largest seen)

    def update(self, t: TrialResult, n_cases: int) -> None:
        v = t.timings.get("v", 0.0)
        if v > 0:
            self.z = v / n_cases
        self.rest = max(0.0, t.seconds - v - t.timings.get("stats", 0.0)) / n_cases
        self.stats = max(self.stats, t.timings.get("stats", 0.0))

    def estimate(self, n_cases: int, *, new_z: bool, new_stats: bool) -> float | None:
        if self.rest is None:
            return None
        z = (self.z or 0.0) if new_z else 0.0
        return n_cases * (self.rest + z) + (self.stats if new_stats else 0.0)


class TrialRunner:
    """Runs trials of one method on one model: shared z*, statistics folder, trial log, cost model."""

    def __init__(self, model: nn.Module, tok: Any, method: str, base: EditHparams, case_sets: dict[str, list[CounterFactCase]],
                 *, batch_size: int = 10, corpus: str | None = None, stats_cache_dir: str | Path | None = None,
                 seed: int = 0, log: str | Path | None = None, context: dict[str, Any] | None = None) -> None:
        self.model, self.tok, self.method, self.base = model, tok, get_method(method).name, base
        self.case_sets, self.batch_size, self.corpus, self.seed = case_sets, batch_size, corpus, seed
        self.stats_cache_dir = stats_cache_dir
        self.targets: dict[Any, TargetValue] = {}
        self.costs = CostModel()
        self.seen_z: set[tuple[str, str]] = set()  # (case set, z* settings) already optimized
        self.seen_stats: set[str] = set()  # statistics settings already computed
        self.log_path = Path(log) if log is not None else None
        self.context = context or {}
        self.logged: dict[str, dict[str, Any]] = self._read_log()

    def hparams(self, config: dict[str, Any]) -> EditHparams:
        return self.base.replace(**config)

    def z_key(self, config: dict[str, Any]) -> str:
        """What z* of a configuration depends on besides the cases: its last layer, clamp and v_lr."""
        return json.dumps([config["layers"][-1], *(config[k] for k in Z_FIELDS)])

    def _stats_key(self, config: dict[str, Any]) -> str:
        return json.dumps([config["layers"], config["dynamic_multiplier"]])

    def estimate(self, config: dict[str, Any], cases: str) -> float | None:
        """Estimated seconds of a trial (None before the first one)."""
        if self._log_key(config, cases) in self.logged:
            return 0.0
        return self.costs.estimate(len(self.case_sets[cases]), new_z=(cases, self.z_key(config)) not in self.seen_z,
                                   new_stats=self._stats_key(config) not in self.seen_stats)

    def run(self, config: dict[str, Any], cases: str, stage: str, deadline: float | None = None) -> TrialResult:
        """Edit ``cases`` in batches with ``config`` (each batch restored after scoring) and score them.

        A trial that fails (a fastmemit error: statistics the corpus cannot give, an unsolvable
        system) is returned with status ``"failed: <reason>"``; the model is restored either way."""
        hit = self.logged.get(self._log_key(config, cases))
        if hit is not None:
            return TrialResult(**{**hit, "stage": stage})
        t0 = time.perf_counter()
        try:
            post, digest, timings, status = self._edit_and_score(config, self.case_sets[cases], deadline)
        except FastMemitError as e:
            logger.warning("tune: %s trial %s failed: %s", stage, config, e)
            failed = TrialResult(stage, dict(config), cases, {}, time.perf_counter() - t0, "", {}, f"failed: {e}")
            self._append_log(failed)  # deterministic: not tried again on resume
            return failed
        result = TrialResult(stage, dict(config), cases, summarize(post), time.perf_counter() - t0, digest,
                             {k: round(v, 3) for k, v in timings.items()}, status)
        if status == "done":
            self.costs.update(result, len(post))
            self.seen_z.add((cases, self.z_key(config)))
            self.seen_stats.add(self._stats_key(config))
            self._append_log(result)
        return result

    def _edit_and_score(self, config: dict[str, Any], part: list[CounterFactCase],
                        deadline: float | None) -> tuple[list[dict[str, Any]], str, dict[str, float], str]:
        """(post-edit records, deltas digest, summed timings, status) of one trial."""
        editor = Editor(self.model, self.tok, self.method, self.hparams(config), corpus=self.corpus,
                        stats_cache_dir=self.stats_cache_dir, seed=self.seed, show_progress=False, target_cache=self.targets)
        batches = [part[s : s + self.batch_size] for s in range(0, len(part), self.batch_size)]
        post: list[dict[str, Any]] = []
        digest = hashlib.sha256()
        timings = {"v": 0.0, "stats": 0.0, "solve": 0.0, "eval": 0.0}
        status = "done"
        records = edit_batches(editor, batches, lambda cs: evaluate_counterfact_cases(self.model, self.tok, cs, generation=False),
                               request=lambda c: c.requested_rewrite, sequential=False, seed=self.seed)
        with contextlib.closing(records):  # every batch is restored once scored
            for rec in records:
                post += rec.post
                for name in sorted(rec.result.deltas):
                    digest.update(rec.result.deltas[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                for k in timings:
                    timings[k] += rec.timings.get(k, 0.0)
                if deadline is not None and time.monotonic() > deadline and len(post) < len(part):
                    status = "aborted"
                    break
        return post, digest.hexdigest(), timings, status

    # --- the trial log (resume) -------------------------------------------------------------------
    def _log_key(self, config: dict[str, Any], cases: str) -> str:
        return f"{cases}|{config_key(config)}"

    def _read_log(self) -> dict[str, dict[str, Any]]:
        if self.log_path is None or not self.log_path.is_file():
            return {}
        data = read_json(self.log_path, "tune log", RunError)
        if not isinstance(data, dict) or data.get("format") != LOG_FORMAT:
            raise RunError(f"tune log {str(self.log_path)!r} is not a fastmemit tune log")
        if data.get("context") != self.context:
            diff = sorted(k for k in {*data.get("context", {}), *self.context}
                          if data.get("context", {}).get(k) != self.context.get(k))
            raise RunError(f"tune log {str(self.log_path)!r} belongs to another run (differs in {', '.join(diff)}); "
                           "give another --log file")
        return {self._log_key(t["config"], t["cases"]): t for t in data.get("trials", [])}

    def _append_log(self, result: TrialResult) -> None:
        self.logged[self._log_key(result.config, result.cases)] = asdict(result)
        if self.log_path is not None:
            write_json_atomic(self.log_path, {"format": LOG_FORMAT, "context": self.context,
                                              "trials": list(self.logged.values())})


# ============================================================================= the search


@dataclass
class TuneSettings:
    """What ``tune`` searches and how long it may take."""

    budget_s: float = 3600.0  # wall-clock seconds for the whole tune
    n_tune: int = 20  # tuning cases (the first ones of the file)
    n_held: int = 50  # held-aside cases (the next ones)
    n_trace: int = 8  # facts for the causal trace (after both)
    batch_size: int = 10  # cases edited together in a trial
    layers: list[int] | None = None  # fixed edit layers (no trace)
    window: int | None = None  # edit-window length (default: the start's)
    trace_samples: int = 2  # noise draws per trace fact
    finalists: int = 2  # best search configurations validated besides the start
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_tune", "n_held", "n_trace", "batch_size", "trace_samples"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"tune: {name} must be at least 1, got {getattr(self, name)}")
        if not self.budget_s > 0:
            raise ConfigurationError(f"tune: the budget must be positive, got {self.budget_s} s")


LAMBDA_STEPS = (0.1, 10.0, 0.01, 100.0, 1e-3, 1e3)  # × the λ in place; a direction that got worse is not extended
MU_VALUES = (0.01, 1.0, 0.0, 10.0, 0.1)
MULTIPLIER_VALUES = (5.0, 20.0, 2.0, 10.0)
CLAMP_VALUES = (1.5, 0.5, 3.0, 0.75)
VLR_VALUES = (0.1, 1.0, 0.5)


class Search:
    """The coordinate search of :func:`tune` over one :class:`TrialRunner` (module docstring, step 2)."""

    def __init__(self, runner: TrialRunner, budget: Budget, reserve: Callable[[Search], float], bar: Any) -> None:
        self.runner, self.budget, self.reserve, self.bar = runner, budget, reserve, bar
        self.trials: list[TrialResult] = []
        self.best: TrialResult | None = None
        self.skipped: list[dict[str, Any]] = []
        self.tried: dict[str, TrialResult] = {}

    def deadline(self) -> float:
        return self.budget.start + self.budget.seconds

    def fits(self, config: dict[str, Any]) -> bool:
        est = self.runner.estimate(config, "tune")
        if est is None:  # nothing measured yet: the first trial runs while any time is left
            return self.budget.left() > 0
        return est <= self.budget.left() - self.reserve(self)

    def try_config(self, config: dict[str, Any], stage: str) -> TrialResult | None:
        """Run (or recall) one tuning trial; it becomes the incumbent if better. None: skipped or aborted."""
        k = config_key(config)
        if k in self.tried:
            return self.tried[k]
        if not self.fits(config):
            self.skipped.append({"stage": stage, "config": config, "reason": "budget"})
            return None
        self.bar.set_description(f"tune {stage}")
        t = self.runner.run(config, "tune", stage, deadline=self.deadline())
        self.bar.update(1)
        self.trials.append(t)
        if t.status != "done":
            return None
        self.tried[k] = t
        if self.best is None or t.key > self.best.key:
            self.best = t
        self.bar.set_postfix(best=f"{self.best.scores.get('score', 0):.1f}")
        return t

    def sweep(self, stage: str, name: str, values: Sequence[Any], *, stop_if_ignored: bool = True) -> None:
        """Try the incumbent with ``name`` set to each value in turn; stop when the method ignores the field."""
        for v in values:
            if self.best is None:
                return
            ref = self.best
            if ref.config[name] == v:
                continue
            t = self.try_config({**ref.config, name: v}, stage)
            if t is not None and stop_if_ignored and t.digest == ref.digest:
                self.skipped.append({"stage": stage, "field": name, "reason": "the method does not read it"})
                return

    def sweep_lambda(self, stage: str, steps: Sequence[float]) -> None:
        """λ × each step in turn, around the incumbent when the stage began; a direction that got worse stops."""
        if self.best is None:
            return
        center, worse = self.best, set()
        for s in steps:
            direction = s > 1
            if direction in worse:
                continue
            t = self.try_config({**center.config, "mom2_update_weight": center.config["mom2_update_weight"] * s}, stage)
            if t is not None and t.key < center.key:
                worse.add(direction)


def tune(model: nn.Module, tok: Any, method: str, cases: Sequence[CounterFactCase], settings: TuneSettings, *,
         start: EditHparams, start_source: str, corpus: str | None = None, stats_cache_dir: str | Path | None = None,
         log: str | Path | None = None, budget: Budget | None = None, command: str = "",
         data_file: str | None = None) -> TuneResult:
    """Tune ``method``'s hparams for ``model`` from ``start`` (module docstring); returns a :class:`TuneResult`.

    ``cases``: CounterFact cases in file order; the first ``n_tune`` are the tuning cases, the next
    ``n_held`` the held-aside ones, the rest the pool for the trace facts. ``budget`` (default
    ``settings.budget_s`` from now) bounds everything, the trace included.
    """
    budget = budget or Budget(settings.budget_s)
    m = get_method(method)
    tune_cases, held = list(cases[: settings.n_tune]), list(cases[settings.n_tune : settings.n_tune + settings.n_held])
    if len(tune_cases) < settings.n_tune or len(held) < settings.n_held:
        raise ConfigurationError(f"tune needs {settings.n_tune + settings.n_held} cases "
                                 f"({settings.n_tune} tuning + {settings.n_held} held-aside), the data has {len(cases)}")
    fingerprint = model_fingerprint(model)
    window = 1 if m.single_layer else (settings.window or len(start.layers))
    pool = list(cases[settings.n_tune + settings.n_held :])
    trace_deadline = budget.start + TRACE_SHARE * budget.seconds  # the trace stops adding facts after it
    trace, layers = _pick_layers(model, tok, pool, settings, window, trace_deadline)
    context = {"model": fingerprint, "method": m.name, "start": _without_tuned(start), "batch_size": settings.batch_size,
               "corpus": corpus, "seed": settings.seed, "tune_cases": [c.case_id for c in tune_cases],
               "held_cases": [c.case_id for c in held]}
    runner = TrialRunner(model, tok, m.name, start, {"tune": tune_cases, "held": held}, batch_size=settings.batch_size,
                         corpus=corpus, stats_cache_dir=stats_cache_dir, seed=settings.seed, log=log, context=context)
    unedited = {name: summarize(evaluate_counterfact_cases(model, tok, part, generation=False))
                for name, part in (("tune", tune_cases), ("held", held))}
    first = {**config_of(start), "layers": layers}
    bar = progress(total=_planned(first, config_of(start)), desc="tune", unit="trial")
    try:
        search = Search(runner, budget, lambda s: _reserve(runner, s, config_of(start)), bar)
        _search(search, first, config_of(start))
        validation = _validate(runner, search, budget, settings, config_of(start))
    finally:
        bar.close()
    chosen = _choose(search, validation, first)
    hp = runner.hparams(chosen)
    prov = {
        "command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name(model), "fingerprint": fingerprint, "shape": list(config_shape(model)),
                  "builtin": model_key(model)},
        "method": m.name, "start": start_source, "start_config": config_of(start),
        "data": {"file": data_file, "tune_case_ids": context["tune_cases"], "held_aside_case_ids": context["held_cases"],
                 "trace_case_ids": trace.facts if trace else []},
        "corpus": corpus, "settings": asdict(settings), "trace": trace.to_dict() if trace else None,
        "unedited": unedited, "trials": [asdict(t) for t in search.trials], "skipped": search.skipped,
        "validation": [asdict(t) for t in validation], "chosen": chosen,
        "budget": {"seconds": budget.seconds, "used": round(budget.used(), 1)},
    }
    return TuneResult(hp, m.name, prov, search.trials, validation, trace)


def _without_tuned(hp: EditHparams) -> dict[str, Any]:
    return {k: v for k, v in hp.to_dict().items() if k not in TUNED_FIELDS}


def _pick_layers(model: nn.Module, tok: Any, pool: list[CounterFactCase], settings: TuneSettings, window: int,
                 deadline: float) -> tuple[CausalTrace | None, list[int]]:
    """The edit layers: ``settings.layers``, else the trace's window (the depth rule if no fact can be traced)."""
    if settings.layers is not None:
        return None, list(settings.layers)
    facts = trace_facts(model, tok, pool, settings.n_trace)
    if not facts:
        logger.warning("tune: no fact to trace; layers by the depth rule")
        return None, automatic_layers(num_layers(model), window=window, single=window == 1)
    trace = causal_trace(model, tok, facts, window=window, samples=settings.trace_samples, seed=settings.seed,
                         deadline=deadline)
    return trace, trace.layers()


def _planned(first: dict[str, Any], start: dict[str, Any]) -> int:
    """At most how many trials the search runs (the progress bar's total; skipped ones do not count)."""
    others = (MU_VALUES, MULTIPLIER_VALUES, CLAMP_VALUES, VLR_VALUES)
    return 1 + (first != start) + len(LAMBDA_STEPS) + sum(len(v) - 1 for v in others) + 2


def _search(search: Search, first: dict[str, Any], start: dict[str, Any]) -> None:
    search.try_config(first, "trace")
    search.try_config(start, "start")
    search.sweep_lambda("λ", LAMBDA_STEPS)
    search.sweep("μ", "emmet_lambda", MU_VALUES)
    search.sweep("dynamic_multiplier", "dynamic_multiplier", MULTIPLIER_VALUES)
    search.sweep("clamp", "clamp_norm_factor", CLAMP_VALUES)
    search.sweep("v_lr", "v_lr", VLR_VALUES)
    search.sweep_lambda("λ (refine)", (10 ** -0.5, 10 ** 0.5))


def _reserve(runner: TrialRunner, search: Search, start: dict[str, Any]) -> float:
    """Seconds kept for the validation of the best configuration so far and of the start."""
    configs = {config_key(c): c for c in ([search.best.config] if search.best else []) + [start]}
    n_held = len(runner.case_sets["held"])
    z = runner.costs.estimate(n_held, new_z=True, new_stats=False)
    rest = runner.costs.estimate(n_held, new_z=False, new_stats=False)
    if z is None or rest is None:
        return 0.0
    n_z = len({runner.z_key(c) for c in configs.values()})
    return n_z * (z - rest) + len(configs) * rest


def _validate(runner: TrialRunner, search: Search, budget: Budget, settings: TuneSettings,
              start: dict[str, Any]) -> list[TrialResult]:
    """On the held-aside cases, while they fit the budget: the best search configuration, the start,
    then the next best ones (``settings.finalists`` from the search in all)."""
    ranked = [t.config for t in sorted(search.tried.values(), key=lambda t: t.key, reverse=True)]
    finalists = {config_key(c): c for c in [*ranked[:1], start, *ranked[1 : settings.finalists]]}
    out = []
    for config in finalists.values():
        est = runner.estimate(config, "held")
        if budget.left() <= 0 or (est is not None and est > budget.left()):
            search.skipped.append({"stage": "held-aside", "config": config, "reason": "budget"})
            continue
        out.append(runner.run(config, "held", "held-aside", deadline=budget.start + budget.seconds))
    return out


def _choose(search: Search, validation: list[TrialResult], first: dict[str, Any]) -> dict[str, Any]:
    """The best held-aside Score (ties: the tuning Score); no validation: the best tuning trial; none: the trace's."""
    done = [t for t in validation if t.status == "done"]
    if done:
        untried = (-1.0, -1.0)
        return max(done, key=lambda t: (t.key, getattr(search.tried.get(config_key(t.config)), "key", untried))).config
    return search.best.config if search.best is not None else first


# ============================================================================= the result


@dataclass
class TuneResult:
    """Tuned hparams and how they were found."""

    hparams: EditHparams
    method: str
    provenance: dict[str, Any]
    trials: list[TrialResult]
    validation: list[TrialResult]
    trace: CausalTrace | None

    def to_json(self) -> dict[str, Any]:
        """The hparams file: every field, then ``_method``, ``_source`` and ``_tune`` (ignored when loading)."""
        return {**self.hparams.to_dict(), "_method": self.method,
                "_source": f"fastmemit tune on {self.provenance['model']['name']} ({self.provenance['date']})",
                "_tune": self.provenance}

    def save(self, path: str | Path) -> Path:
        write_json_atomic(path, _finite(self.to_json()))
        return Path(path)


def _finite(obj: Any) -> Any:
    """JSON-safe: NaN and inf become None (strict JSON readers refuse them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
