"""The seed's command line: its README command parses as the seed reads it, the flags it names default
as in the seed (RunConfig() keeps neutral defaults for library use), --hparams_fname resolves the
seed's file names, and --alg_name FT / MEND."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmemit.cli import build_parser
from fastmemit.cli.evaluate_cmd import build_config
from fastmemit.errors import DatasetError, EditError, RunError
from fastmemit.eval import RunConfig
from fastmemit.eval.datasets import load_seed_ordering
from fastmemit.eval.runner import resolve_run_hparams, seed_samples_file
from fastmemit.methods import get_method

# the seed README's command (experiments/evaluate_unified_editing.py), model and hparams swapped for the offline ones
README = ["--alg_name=EMMET", "--num_edits=4", "--model_name=smollm2-135m", "--hparams_fname=smollm2-135m.json",
          "--ds_name=cf", "--sequential=True"]


def config(*argv: str) -> RunConfig:
    return build_config(build_parser().parse_args(["evaluate", *argv, "--out", "o"]))[0]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private user cache holding the seed's ordering files (the seed ships them in its repository)."""
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "data" / "seed-samples"
    folder.mkdir(parents=True)
    for name in ("cf", "mcf"):
        (folder / f"counterfact_sampled_unique_{name}_10_20000.json").write_text(json.dumps({"0": [1, 0]}))
    return folder


def test_the_readme_command_parses_as_the_seed_reads_it(tmp_path):
    (tmp_path / "seed-samples").mkdir()
    (tmp_path / "seed-samples" / "counterfact_sampled_unique_cf_10_20000.json").write_text(json.dumps({"0": [0]}))
    cfg = config(*README, "--data", str(tmp_path / "cf.json"), "--dataset_size_limit", "10")
    assert (cfg.method, cfg.edits_per_batch, cfg.model, cfg.hparams, cfg.dataset, cfg.sequential) == \
        ("EMMET", 4, "smollm2-135m", "smollm2-135m.json", "cf", True)
    assert (cfg.sample_num, cfg.download, cfg.downstream_eval_steps, cfg.save_model_interval) == (0, True, 100, 100)
    hp, source = resolve_run_hparams(get_method(cfg.method), cfg, None)
    assert source == "built-in smollm2-135m.json" and hp.mom2_update_weight == 1000


def test_flags_named_as_in_the_seed_default_as_in_the_seed_and_the_library_stays_neutral():
    cfg = config()
    assert (cfg.dataset, cfg.sample_num, cfg.downstream_eval_steps, cfg.save_model_interval, cfg.download) == \
        ("mcf", 0, 100, 100, True)
    lib = RunConfig()
    assert (lib.dataset, lib.sample_num, lib.downstream_eval_steps, lib.save_model_interval, lib.download) == \
        ("cf", None, 1, 1, True)
    assert config("--sample_num", "none").sample_num is None  # the data file's own order
    assert config("--sample_num", "3").sample_num == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--sample_num", "-1"])


def test_without_the_seeds_ordering_file_the_default_is_the_files_order(cache, tmp_path, caplog):
    for f in cache.iterdir():
        f.unlink()
    with caplog.at_level("WARNING", logger="fastmemit"):
        cfg = config("--data", str(tmp_path / "cf.json"))
    assert cfg.sample_num is None and "using the dataset file's own order" in caplog.text
    assert config("--data", str(tmp_path / "cf.json"), "--sample_num", "0").sample_num == 0  # asked for: kept


def test_sample_num_errors_are_one_line_naming_the_problem_and_the_fix(cache, tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--sample_num", "first"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--sample_num" in err and "got 'first'" in err and "'none' for the dataset file's own order" in err
    with pytest.raises(RunError, match=r"sample_num must be a non-negative integer .*--sample_num none\), got 'none'"):
        RunConfig(sample_num="none")  # the flag's word is not a library value: None is
    with pytest.raises(DatasetError) as e:
        load_seed_ordering(cache / "counterfact_sampled_unique_cf_10_20000.json", 4)
    assert "\n" not in str(e.value)
    assert str(e.value) == ("counterfact_sampled_unique_cf_10_20000.json: no ordering '4' (--sample_num 4); it has 0: "
                            "pass one of them, or --sample_num none for the dataset file's own order")
    # asked for explicitly without the file: one line naming the file, where it was looked for and the fix
    cfg = config("--data", str(tmp_path / "cf.json"), "--sample_num", "0", "--seed_samples", str(tmp_path / "none"))
    with pytest.raises(DatasetError) as e:
        seed_samples_file(cfg, tmp_path / "cf.json")
    assert "\n" not in str(e.value) and "counterfact_sampled_unique_mcf_10_20000.json not found" in str(e.value)
    assert "--seed_samples" in str(e.value) and "--sample_num none for the dataset file's own order" in str(e.value)


def test_hparams_fname_takes_the_seeds_file_names_for_each_method():
    for alg, fname, field, value in (("EMMET", "gpt2-xl.json", "mom2_update_weight", 10000.0),
                                     ("MEMIT", "EleutherAI_gpt-j-6B.json", "mom2_update_weight", 100000.0),
                                     ("ROME", "gpt2-xl.json", "layers", [17]),
                                     ("FT", "gpt2-xl_constr.json", "norm_constraint", 5e-4)):
        cfg = config("--alg_name", alg, "--hparams_fname", fname, "--model_name", "gpt2-xl")
        hp, _ = resolve_run_hparams(get_method(cfg.method), cfg, None)
        assert getattr(hp, field) == value, (alg, fname)


def test_alg_name_mend_is_refused_with_the_reason():
    cfg = config("--alg_name", "MEND", "--hparams_fname", "gpt2-xl.json")
    with pytest.raises(EditError, match="MEND edits through a hypernetwork"):
        get_method(cfg.method)


def test_a_config_file_or_a_resumed_run_keeps_its_own_settings(tmp_path):
    stored = RunConfig(dataset="cf", sample_num=None, downstream_eval_steps=1, data=str(tmp_path / "cf.json"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"run": stored.to_dict()}))
    cfg, _ = build_config(build_parser().parse_args(["evaluate", "--config", str(path), "--out", "o"]))
    assert (cfg.dataset, cfg.sample_num, cfg.downstream_eval_steps) == ("cf", None, 1)
    assert Path(cfg.data) == tmp_path / "cf.json"
