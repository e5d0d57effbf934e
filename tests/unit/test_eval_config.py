"""RunConfig: the library's field names and the research code's aliases (from_dict, the CLI, and the
config.json of run folders written before the rename), checks, path normalization, and the
comparison that decides whether a run folder may be continued."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from fastmemit.cli import build_parser
from fastmemit.cli.evaluate_cmd import build_config
from fastmemit.errors import FastMemitError, RunError
from fastmemit.eval import RunConfig
from fastmemit.eval.config import (
    ADDED_FIELDS,
    ALIASES,
    RUNTIME_FIELDS,
    config_differences,
    identity,
    setting_conflicts,
    stored_config,
)
from fastmemit.methods import FTHparams

# The "run" block of a config.json written by the runner before the rename (every key it wrote).
OLD_RUN_KEYS = ["alg_name", "model_name", "hparams_fname", "hparams_overrides", "ds_name", "data", "download",
                "dataset_size_limit", "sample_num", "seed_samples", "num_edits", "sequential", "seed", "corpus",
                "eval_batch_size", "eval_chunk", "skip_generation_tests", "generation_test_interval",
                "consistency_dir", "final_eval", "do_downstream_eval", "downstream_eval_steps", "downstream_tasks",
                "number_of_few_shots", "number_of_tests", "downstream_data_dir", "dtype", "device", "use_cache",
                "stats_cache_dir", "conserve_memory", "checkpoint_interval", "save_model", "save_model_interval",
                "save_model_location", "save_model_format", "plots", "show_progress"]


def old_run_block(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as the runner wrote it before the rename."""
    new_name = {old: ALIASES.get(old, old) for old in OLD_RUN_KEYS}
    values = cfg.to_dict()
    return {old: values[new] for old, new in new_name.items()}


# Fields added after the rename (lifelong runs: retention and collapse); a config.json without them
# continues with their defaults, the behaviour of the version that wrote it.
NEW_FIELDS = ["retention_eval_steps", "stop_on_collapse", "collapse_downstream_drop", "collapse_invalid_rise",
              "collapse_ns_drop", "collapse_rel_distance", "collapse_window"]
# Settings added after the rename (issue 13: device maps, statistics and solve devices), all runtime settings.
SCALE_KEYS = ["device_map", "stats_device", "solve_device"]
# Scoring settings added later (issue 10: the seed's generation check), off by default.
LATER_FIELDS = ["seed_sliding"]


def test_fields_are_the_old_ones_renamed_by_the_alias_table_and_all_have_help():
    fields = dataclasses.fields(RunConfig)
    added = set(ADDED_FIELDS) | set(NEW_FIELDS) | set(LATER_FIELDS)
    expected = [ALIASES.get(k, k) for k in OLD_RUN_KEYS]
    at = expected.index("device") + 1
    expected[at:at] = SCALE_KEYS
    assert [f.name for f in fields if f.name not in added] == expected
    assert set(ADDED_FIELDS) <= {f.name for f in fields}  # fields added since, with their value for older runs
    assert [f.name for f in fields if f.name in NEW_FIELDS] == NEW_FIELDS
    assert not set(NEW_FIELDS) & RUNTIME_FIELDS  # they change results: a restart may not change them
    assert set(SCALE_KEYS) <= RUNTIME_FIELDS
    assert all(getattr(RunConfig(), k) is None for k in SCALE_KEYS)  # an old config.json means the defaults
    assert ALIASES == {"alg_name": "method", "model_name": "model", "hparams_fname": "hparams",
                       "ds_name": "dataset", "num_edits": "edits_per_batch"}
    assert all(f.metadata.get("help") for f in fields)
    assert RUNTIME_FIELDS <= {f.name for f in fields}


def test_from_dict_takes_field_names_and_research_names_alike():
    old = RunConfig.from_dict({"alg_name": "MEMIT", "model_name": "m", "hparams_fname": "h.json", "ds_name": "zsre",
                               "num_edits": 4, "dataset_size_limit": 9})
    new = RunConfig.from_dict({"method": "MEMIT", "model": "m", "hparams": "h.json", "dataset": "zsre",
                               "edits_per_batch": 4, "dataset_size_limit": 9})
    assert old == new == RunConfig(method="MEMIT", model="m", hparams="h.json", dataset="zsre", edits_per_batch=4,
                                   dataset_size_limit=9)
    assert RunConfig.from_dict({"num_edits": 2, "edits_per_batch": 2}).edits_per_batch == 2  # both names, one value
    with pytest.raises(RunError, match=r"edits_per_batch \(num_edits\) given twice: 2 and 3"):
        RunConfig.from_dict({"num_edits": 2, "edits_per_batch": 3})
    with pytest.raises(RunError, match=r"unknown run setting\(s\) \['num_edit'\].*aliases: alg_name=method"):
        RunConfig.from_dict({"num_edit": 2})


@pytest.mark.parametrize("changes, message", [
    ({"edits_per_batch": 0}, r"edits_per_batch \(num_edits\) must be a positive integer"),
    ({"eval_chunk": True}, "eval_chunk must be int, got bool"),
    ({"dataset": "squad"}, "dataset must be one of cf, counterfact"),
    ({"dataset_size_limit": 0}, "dataset_size_limit must be a positive integer or None"),
    ({"sample_num": -1}, "sample_num must be a non-negative integer"),
    ({"save_model_format": "gguf"}, "save_model_format must be 'deltas' or 'full'"),
    ({"hparams_overrides": []}, "hparams_overrides must be dict, got list"),
])
def test_bad_settings_are_refused_when_the_config_is_made(changes, message):
    with pytest.raises(RunError, match=message) as e:
        RunConfig(**changes)
    assert isinstance(e.value, FastMemitError)


def test_normalized_makes_paths_absolute_and_keeps_builtin_hparams_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("hp.json").write_text("{}")
    cfg = RunConfig(data="d.json", seed_samples="ss", consistency_dir="c", downstream_data_dir="~/dd",
                    hparams="hp.json", stats_cache_dir="stats").normalized()
    assert cfg.data == str(tmp_path / "d.json") and cfg.seed_samples == str(tmp_path / "ss")
    assert cfg.consistency_dir == str(tmp_path / "c") and cfg.downstream_data_dir == str(Path("~/dd").expanduser())
    assert cfg.hparams == str(tmp_path / "hp.json")
    assert cfg.stats_cache_dir == "stats"  # a runtime setting, compared never
    assert RunConfig(hparams="EMMET/gpt2-xl").normalized().hparams == "EMMET/gpt2-xl"  # a built-in name


def stored(cfg: RunConfig, **facts: Any) -> dict[str, Any]:
    base = dict(method=cfg.method, hparams={"layers": [1]}, base_fingerprint="fp", case_ids=[1, 2, 3])
    return stored_config(cfg, Path("/runs/x"), **{**base, **facts})


def test_an_old_config_json_is_read_and_compares_equal_to_the_same_run_today(tmp_path):
    cfg = RunConfig(method="AlphaEdit", model="tiny", edits_per_batch=3, dataset="cf", data=str(tmp_path / "cf.json"),
                    dataset_size_limit=7, sequential=False)
    new = stored(cfg)
    old = {**new, "run": old_run_block(cfg)}  # the same run as the old runner stored it
    assert "alg_name" in old["run"] and "method" not in old["run"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert RunConfig.from_json(tmp_path / "config.json") == cfg
    assert identity(old) == identity(new) and config_differences(old, new) == []
    # a real difference is still found, named by field and alias; runtime settings never count
    other = stored(dataclasses.replace(cfg, edits_per_batch=2, device="cuda", plots=False))
    assert config_differences(old, other) == ["run.edits_per_batch (num_edits): 3 → 2"]
    assert config_differences(new, stored(cfg, case_ids=list(range(20)))) == ["case_ids: 3 items → 20 items"]


def test_hparams_fields_a_stored_run_predates_count_at_their_defaults():
    full = FTHparams(layers=[1]).to_dict()
    cfg = RunConfig(method="FT")
    new = stored(cfg, hparams=full)
    old = stored(cfg, hparams={k: v for k, v in full.items() if k not in ("ft_loss", "v_max_rows")})
    assert config_differences(old, new) == [] and identity(old) == identity(new)
    assert identity(old)["hparams"] == full  # the FT class's defaults: ft_loss included
    assert config_differences(old, stored(cfg, hparams={**full, "ft_loss": "next_token"})) == [
        "hparams.ft_loss: 'teacher_forced' → 'next_token'"]
    # a method this version does not know: compared as stored
    assert identity(stored(cfg, method="NoSuch", hparams={"layers": [1]}))["hparams"] == {"layers": [1]}


def test_every_research_flag_and_dash_form_of_the_cli_still_works(tmp_path):
    p = build_parser()
    data = str(tmp_path / "cf.json")
    old = ["--alg_name", "MEMIT", "--model_name", "m", "--hparams_fname", "EMMET/gpt2-xl", "--ds_name", "mcf",
           "--num_edits", "5", "--dataset_size_limit", "10", "--data", data, "--out", "o"]
    dashes = ["--alg-name", "MEMIT", "--model-name", "m", "--hparams-fname", "EMMET/gpt2-xl", "--ds-name", "mcf",
              "--num-edits", "5", "--dataset-size-limit", "10", "--data", data, "--out", "o"]
    new = ["--method", "MEMIT", "--model", "m", "--hparams", "EMMET/gpt2-xl", "--dataset", "mcf",
           "--edits_per_batch", "5", "--dataset_size_limit", "10", "--data", data, "--out", "o"]
    configs = [build_config(p.parse_args(["evaluate", *argv])) for argv in (old, dashes, new)]
    assert configs[0] == configs[1] == configs[2]
    cfg, out = configs[0]
    assert (cfg.method, cfg.model, cfg.hparams, cfg.dataset, cfg.edits_per_batch, cfg.dataset_size_limit) == \
        ("MEMIT", "m", "EMMET/gpt2-xl", "mcf", 5, 10) and out == Path("o")


def test_setting_conflicts_name_both_spellings_and_ignore_runtime_and_equal_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunConfig(edits_per_batch=3, data=str(tmp_path / "cf.json"))
    assert setting_conflicts(run, {"num_edits": 5}) == ["--edits_per_batch (--num_edits) 5 (run: 3)"]
    assert setting_conflicts(run, {"edits_per_batch": 3, "data": "cf.json", "device": "cuda", "plots": False}) == []
