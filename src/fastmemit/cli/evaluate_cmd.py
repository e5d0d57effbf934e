"""`fastmemit evaluate`: edit a dataset's cases batch after batch and score them (resumable runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from fastmemit.cli.common import (
    DEVICE_MAP_HELP,
    SOLVE_DEVICE_HELP,
    STATS_DEVICE_HELP,
    load_cli_model,
    non_negative_int,
    parse_bool,
    parse_set_overrides,
    positive_int,
)
from fastmemit.errors import DatasetError, RunError
from fastmemit.eval.config import ALIAS_OF, FIELD_NAMES, SEED_CLI_DEFAULTS, RunConfig, setting_conflicts
from fastmemit.eval.datasets import ZSRE_CONVENTIONS
from fastmemit.eval.runner import default_run_dir, run_evaluation, seed_samples_file
from fastmemit.eval.summary import metrics_of
from fastmemit.stats.distributed import session
from fastmemit.stats.service import lead_or_serve
from fastmemit.utils import logger

NAME = "evaluate"
HELP = ("edit CounterFact / multi-CounterFact / zsRE cases in batches of --edits_per_batch and score them before "
        "and after; sequential by default (edits accumulate; --sequential false restores the model after each "
        "batch); resumable: rerun the same command (same --out) after an interruption")

_BOOL = "bool"
_OFF = "off"  # a collapse threshold switched off on the command line (None in RunConfig)


def _threshold(s: str) -> float | str:
    """argparse type: a finite number ≥ 0, or 'off' / 'none' (the rule switched off)."""
    if s.strip().lower() in ("off", "none"):
        return _OFF
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number or 'off', got {s!r}")
    return v


def _flag(p: argparse.ArgumentParser | Any, name: str, kind: Any = str, help: str = "", **kw: Any) -> None:
    """``--name`` for the RunConfig field ``name`` (its dest), with ``--na-me`` and the research code's
    name (:data:`~fastmemit.eval.config.ALIASES`) in both spellings; booleans take an optional
    true/false value."""
    names = [name] + ([ALIAS_OF[name]] if name in ALIAS_OF else [])
    forms = list(dict.fromkeys(f for n in names for f in (f"--{n}", f"--{n.replace('_', '-')}")))
    if kind == _BOOL:
        p.add_argument(*forms, dest=name, nargs="?", const=True, default=None, type=parse_bool, metavar="BOOL",
                       help=help, **kw)
    else:
        p.add_argument(*forms, dest=name, type=kind, default=None, help=help, **kw)


def _default(name: str) -> Any:
    """The command's default: the seed's for the flags it names (SEED_CLI_DEFAULTS), else RunConfig's."""
    if name in SEED_CLI_DEFAULTS:
        return SEED_CLI_DEFAULTS[name]
    return next(f.default for f in dataclasses.fields(RunConfig) if f.name == name)


def _sample_num(s: str) -> int | str:
    """--sample_num: an ordering K ≥ 0, or 'none' for the dataset file's own order."""
    if s.strip().lower() == "none":
        return "none"
    try:
        return non_negative_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an ordering K ≥ 0 of the seed-samples file, or 'none' for the "
                                         f"dataset file's own order, got {s!r}") from None


def _recompute(s: str) -> bool | str:
    """--recompute_stats: true/false, or 'layer' (per layer, as the seed's dynamic)."""
    return "layer" if s.strip().lower() == "layer" else parse_bool(s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = _default
    g = p.add_argument_group("what to run (dash forms and the research code's names accepted too: --alg_name, "
                             "--model_name, --hparams_fname, --ds_name, --num_edits)")
    _flag(g, "method", help=f"editing method: ROME, MEMIT, EMMET, AlphaEdit, ENCORE, FT (default {d('method')})")
    _flag(g, "model", help=f"model alias, local folder or hub id (default {d('model')})")
    _flag(g, "hparams", help="built-in name, also the seed's file names (gpt2-xl.json, EleutherAI_gpt-j-6B.json, ...), "
                             "or a JSON file (default: the built-in for method and model)")
    _flag(g, "dataset", help=f"cf (CounterFact), mcf (multi-CounterFact) or zsre (default {d('dataset')}, as the seed)",
          choices=["cf", "counterfact", "mcf", "multi_counterfact", "zsre"])
    _flag(g, "data", help="dataset file (default: the published file in the download cache, see --download)")
    _flag(g, "download", _BOOL, help="download the published dataset into the cache when --data is not given and "
                                     "it is missing (default true, as the seed)")
    _flag(g, "dataset_size_limit", int, help="use at most N cases (after ordering)")
    _flag(g, "sample_num", _sample_num, help=f"seed ordering K of the case ids (seed-samples file), or 'none' for the "
                                             f"file's own order (default {d('sample_num')}, as the seed, when its "
                                             "seed-samples file is found; else the file's order, with a warning)")
    _flag(g, "zsre_convention", help=f"zsRE: {'; '.join(f'{k} = {v}' for k, v in ZSRE_CONVENTIONS.items())} "
                                     f"(default {d('zsre_convention')})", choices=list(ZSRE_CONVENTIONS))
    _flag(g, "seed_samples", help="seed-samples file or folder (default: seed-samples/ beside --data, or the cache)")
    _flag(g, "edits_per_batch", int, help=f"cases edited together (default {d('edits_per_batch')})")
    _flag(g, "sequential", _BOOL, help="true (default): edits accumulate over batches; false: batched, the "
                                       "model is restored after every batch")
    _flag(g, "seed", int, help="seeds context templates, the statistics corpus shuffle, torch's RNG (default 0)")
    _flag(g, "corpus", help="statistics corpus (default: hparams.stats_corpus or the offline default)")
    _flag(g, "dtype", help="model dtype (default float32)")

    h = p.add_argument_group("hparams overrides")
    _flag(h, "recompute_stats", _recompute, help="recompute the statistics on the edited model: true = before every "
                                                   "batch; layer = for every layer after the batch's earlier layers are "
                                                   "written (the seed's dynamic: true); default: the hparams' value",
          nargs="?", const=True, metavar="BOOL|layer")
    _flag(h, "dynamic_multiplier", float, help="FastMEMIT: statistics from this many × d_k keys (turns dynamic on)")
    h.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override one hparams field, e.g. --set mom2_update_weight=1e4 (repeatable)")

    e = p.add_argument_group("evaluation")
    _flag(e, "skip_generation_tests", _BOOL, help="no generation (fluency, consistency) tests (default false)")
    _flag(e, "generation_test_interval", int, help="generation tests for every K-th case; K ≤ 0: none (default 1)")
    _flag(e, "seed_sliding", _BOOL, help="CounterFact: also the seed's *_prompts_correct (the expected string in the "
                                         "greedy generation after each prompt; default false)")
    _flag(e, "consistency_dir", help="folder of attribute_snippets.json, idf.npy, tfidf_vocab.json "
                                     "(default: beside --data when present)")
    _flag(e, "final_eval", _BOOL, help="sequential runs: score all cases again on the final model (default true)")
    _flag(e, "eval_batch_size", int, help="scored (prompt, target) pairs per forward pass (default 32)")
    _flag(e, "eval_chunk", int, help="cases per pre/final scoring chunk, the unit written and resumed (default 100)")

    ds = p.add_argument_group("downstream checks (before the first edit and every K batches)")
    _flag(ds, "do_downstream_eval", _BOOL, help="run few-shot downstream checks (default false)")
    _flag(ds, "downstream_eval_steps", int, help=f"K: a check after every K batches and after the last "
                                                 f"(default {d('downstream_eval_steps')}, as the seed)")
    _flag(ds, "downstream_tasks", help=f"comma list (default {d('downstream_tasks')})")
    _flag(ds, "number_of_few_shots", help="comma list, one shot count per task (default 0 for all)")
    _flag(ds, "number_of_tests", int, help="test items per task (default: all)")
    _flag(ds, "downstream_data_dir", help="folder of <task>.jsonl (default: the downstream default)")

    lf = p.add_argument_group("lifelong runs: retention and collapse (sequential; docs/lifelong.md)")
    _flag(lf, "retention_eval_steps", positive_int, help="every K batches, score ES/PS/NS of all cases edited so "
                                                         "far (retention.jsonl; default off)")
    _flag(lf, "stop_on_collapse", _BOOL, help="stop when a collapse rule fires, keeping the last healthy model "
                                              "(default false)")
    _flag(lf, "collapse_downstream_drop", _threshold,
          help=f"rule: mean downstream accuracy this far (0-1) below the baseline; 'off' (default {d('collapse_downstream_drop')})")
    _flag(lf, "collapse_invalid_rise", _threshold,
          help=f"rule: invalid generated answers this far (0-1) above the baseline's rate; 'off' (default {d('collapse_invalid_rise')})")
    _flag(lf, "collapse_ns_drop", _threshold,
          help=f"rule: post NS of the latest --collapse_window cases this many points under their pre NS; 'off' "
               f"(default {d('collapse_ns_drop')})")
    _flag(lf, "collapse_rel_distance", _threshold,
          help="rule: an edited layer's ||W - W0||_F / ||W0||_F above this; 'off' (default off)")
    _flag(lf, "collapse_window", positive_int, help=f"cases the NS rule averages over (default {d('collapse_window')})")

    r = p.add_argument_group("run folder, resuming, saving (may change when resuming)")
    r.add_argument("--out", "--run_dir", "--run-dir", dest="out", default=None,
                   help="run folder (default: results/<METHOD>/run_NNN); an existing run folder with the same "
                        "configuration is resumed, one with another configuration is refused")
    r.add_argument("--continue_from_run", "--continue-from-run", dest="continue_from_run", default=None,
                   metavar="RUN", help="resume the run in RUN (a folder, or run_NNN under results/<METHOD>) with its "
                                       "stored settings and hparams; flags that contradict them are refused")
    r.add_argument("--config", default=None, help="take the settings from a run's config.json (reproduce a run); "
                                                  "other flags override them")
    _flag(r, "device", help="torch device (default cpu); under torchrun, cuda means each rank's cuda:LOCAL_RANK")
    _flag(r, "device_map", help=DEVICE_MAP_HELP)
    _flag(r, "stats_device", help=STATS_DEVICE_HELP)
    _flag(r, "solve_device", help=SOLVE_DEVICE_HELP)
    _flag(r, "use_cache", _BOOL, help="disk caches of statistics and context templates (default true)")
    _flag(r, "stats_cache_dir", help="statistics cache folder")
    _flag(r, "conserve_memory", _BOOL, help="no shared z* cache; free accelerator memory between batches")
    _flag(r, "checkpoint_interval", int, help="sequential: checkpoint the edited model every K batches; a "
                                              "restart redoes the batches after the last checkpoint (default 1)")
    _flag(r, "save_model", _BOOL, help="save deltas (or the model) every --save_model_interval batches")
    _flag(r, "save_model_interval", int, help=f"K for --save_model (default {d('save_model_interval')}, as the seed)")
    _flag(r, "save_model_location", help="where --save_model writes (default RUN_DIR/models)")
    _flag(r, "save_model_format", help="deltas (safetensors; sequential: cumulative) or full (save_pretrained)",
          choices=["deltas", "full"])
    _flag(r, "plots", _BOOL, help="write RUN_DIR/plots/*.png at the end (default true)")
    r.add_argument("--json", action="store_true", help="print summary.json instead of a table")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.recompute_stats is not None:
        out["recompute_stats"] = args.recompute_stats
    if args.dynamic_multiplier is not None:
        out["dynamic_multiplier"] = args.dynamic_multiplier
    out.update(parse_set_overrides(args.set))
    return out


def _continue_dir(spec: str, method: str | None) -> Path:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    cands = [Path("results") / method / spec] if method else sorted(Path("results").glob(f"*/{spec}"))
    cands = [c for c in cands if c.is_dir()]
    if len(cands) != 1:
        raise RunError(f"--continue_from_run {spec!r}: no such run folder" + (
            f" (several under results/: {', '.join(map(str, cands))}; give the folder)" if cands else ""))
    return cands[0]


def _continued(args: argparse.Namespace, explicit: dict[str, Any], overrides: dict[str, Any]) -> tuple[RunConfig, Path]:
    """The stored settings of the run ``--continue_from_run`` names; flags that contradict them are refused."""
    run_dir = _continue_dir(args.continue_from_run, explicit.get("method"))
    stored = RunConfig.from_json(run_dir / "config.json")
    conflicts = setting_conflicts(stored, explicit)
    conflicts += [f"hparams {k}={v!r} (run: {stored.hparams_overrides.get(k)!r})" for k, v in overrides.items()
                  if stored.hparams_overrides.get(k) != v]
    if args.out is not None and Path(args.out).expanduser().resolve() != run_dir.resolve():
        conflicts.append(f"--out {args.out} (the run is {run_dir})")
    if conflicts:
        raise RunError(f"--continue_from_run {run_dir}: these flags contradict the run's settings: "
                       f"{'; '.join(conflicts)}. Drop them, or start a new run with another --out")
    return stored, run_dir


def _default_ordering(cfg: RunConfig) -> RunConfig:
    """The seed's default ordering when its seed-samples file is found (the seed ships them in its repository,
    not with the data), else the data file's own order, said in a warning."""
    try:
        seed_samples_file(cfg, Path(cfg.data).expanduser() if cfg.data is not None else None)
        return cfg
    except DatasetError as e:
        logger.warning("%s; using the dataset file's own order (--sample_num none) instead of the seed's default "
                       "ordering %s", e, cfg.sample_num)
        return dataclasses.replace(cfg, sample_num=None)


def build_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The RunConfig and run folder that the flags describe (stored settings first when resuming);
    paths absolute, as the run stores them, so that a resume from another folder compares equal."""
    explicit = {k: (None if v is _OFF else v) for k, v in vars(args).items() if k in FIELD_NAMES and v is not None}
    if explicit.get("sample_num") == "none":
        explicit["sample_num"] = None
    overrides = _overrides(args)
    run_dir: Path | None = None
    if args.continue_from_run is not None:
        stored, run_dir = _continued(args, explicit, overrides)
        base = stored.to_dict()
    elif args.config is not None:
        base = RunConfig.from_json(args.config).to_dict()
    else:
        base = RunConfig(**SEED_CLI_DEFAULTS).to_dict()
    base.update(explicit)
    if overrides:
        base["hparams_overrides"] = {**base["hparams_overrides"], **overrides}
    cfg = RunConfig.from_dict(base).normalized()
    if args.continue_from_run is None and args.config is None and "sample_num" not in explicit:
        cfg = _default_ordering(cfg)
    if run_dir is None:
        run_dir = Path(args.out).expanduser() if args.out is not None else default_run_dir(cfg.method)
    return cfg, run_dir


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def run(args: argparse.Namespace) -> int:
    cfg, run_dir = build_config(args)
    with session(cfg.device) as shard:
        if shard is None:
            return _evaluate(args, cfg, run_dir)
        # under torchrun: rank 0 runs the evaluation, the other ranks serve its statistics passes
        model, tok = load_cli_model(argparse.Namespace(model=cfg.model, device=cfg.device, dtype=cfg.dtype,
                                                       device_map=cfg.device_map), shard)
        return lead_or_serve(model, tok, shard, lambda: _evaluate(args, cfg, run_dir, model, tok))


def _evaluate(args: argparse.Namespace, cfg: RunConfig, run_dir: Path, model: Any = None, tok: Any = None) -> int:
    argv = sys.argv[sys.argv.index(NAME) + 1:] if NAME in sys.argv else None
    result = run_evaluation(cfg, run_dir, model=model, tok=tok,
                            command=["fastmemit", NAME, *argv] if argv is not None else None,
                            continue_run=args.continue_from_run is not None)
    s = result.summary
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    keys = metrics_of(s.get("post", {}))
    print(f"{s['method']} {s['mode']} ×{s['num_edits']} on {s['n_cases']} cases ({s['hparams_label']}) → {run_dir}")
    blocks = [b for b in ("pre", "post", "final") if s.get(b)]
    print(f"{'':<8}" + "".join(f"{k:>10}" for k in keys))
    for b in blocks:
        print(f"{b:<8}" + "".join(f"{_fmt(s[b].get(k)):>10}" for k in keys))
    if s.get("stopped"):
        st = s["stopped"]
        print(f"stopped on collapse after batch {st['batches_done']} ({st['edits_so_far']} edits): {st['reason']}; "
              f"the model kept is the healthy one after {st['healthy_batches_done']} batches ({st['healthy_edits']} edits)")
    t = s["time_seconds"]
    print("time: " + ", ".join(f"{k} {t[k]:.1f}s" for k in ("stats", "v", "solve", "eval", "downstream")) +
          (f"; {s['edits_per_second']:.2f} edits/s" if s.get("edits_per_second") else ""))
    return 0
