"""The seed's hparams files: built-ins by the seed's own file names with its values, research-code
files loading unchanged (fixture copies in tests/data/seed_hparams written in the research schemas),
fields we do not implement refused with the reason, and dynamic_multiplier never silently unused."""

from __future__ import annotations

import json
import logging

import pytest

import fastmemit
from fastmemit.cli import build_parser
from fastmemit.cli.evaluate_cmd import build_config
from fastmemit.errors import EditError
from fastmemit.hparams_registry import available, builtin_hparams, load_hparams
from fastmemit.methods import EditHparams, FTHparams, get_method
from fastmemit.models.loading import resolve_model_path
from tests.helpers import TESTS

DATA = TESTS / "data" / "seed_hparams"

# scalable-model-editing/efficient-model-editing hparams/EMMET/gpt2-xl.json @ 4817b3b, every field but the
# module templates (which do not enter the maths)
SEED_EMMET_GPT2_XL = {
    "layers": [17], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
    "v_num_grad_steps": 20, "v_lr": 0.5, "v_loss_layer": 47, "v_weight_decay": 0.5, "kl_factor": 0.0625,
    "mom2_adjustment": True, "mom2_update_weight": 10000, "mom2_dataset": "wikipedia", "mom2_n_samples": 100000,
    "mom2_dtype": "float32", "calculate_objective_value": False, "update_norm_lambda": 0, "emmet_lambda": 0.1,
    "dynamic_multiplier": 10, "dynamic": True, "shuffle_text": False, "wikipedia_lang": "en",
    "skill_preservation": False, "skill_lambda": 1, "skill_sample_size": 10000, "random_vector_preservation": False,
    "proj_dim": 6400, "identity_cov": False,
}
# what the seed's code hard-codes for such a file: 6 context templates, the ridge only for more than one edit,
# v* stopped once the total loss is below 5e-2 (compute_z.py / compute_v.py: `if loss < 5e-2: break`)
SEED_HARD_CODED = {"context_template_length_params": [[10, 5]], "emmet_ridge_one_edit": False,
                   "v_early_stop": "loss", "v_early_stop_nll": 0.05}


def test_load_hparams_is_public_and_gives_the_seeds_emmet_gpt2_xl_on_every_maths_field():
    assert fastmemit.load_hparams is load_hparams
    hp = fastmemit.load_hparams("gpt2-xl.json", method="EMMET")
    got = hp.to_dict()
    assert {k: got[k] for k in SEED_EMMET_GPT2_XL} == SEED_EMMET_GPT2_XL
    assert {k: got[k] for k in SEED_HARD_CODED} == SEED_HARD_CODED
    assert load_hparams("gpt2-xl", "EMMET") == hp == builtin_hparams("EMMET", "gpt2-xl")


@pytest.mark.parametrize(("method", "name", "field", "value"), [
    ("EMMET", "EleutherAI_gpt-j-6B.json", "mom2_update_weight", 100000.0),
    ("EMMET", "llama2-7b.json", "mom2_update_weight", 100000.0),
    ("MEMIT", "EleutherAI_gpt-j-6B.json", "mom2_update_weight", 100000.0),
    ("MEMIT", "llama2-7b.json", "update_norm_lambda", 0.01),
    ("MEMIT", "gpt2-xl.json", "dynamic", True),
    ("ROME", "EleutherAI_gpt-neox-20b.json", "layers", [15]),
    ("ROME", "gpt2-medium.json", "clamp_norm_factor", 3.0),
    ("FT", "EleutherAI_gpt-j-6B_constr.json", "norm_constraint", 5e-5),
    ("FT", "gpt2-xl_unconstr.json", "norm_constraint", False),
    # the published non-dynamic values stay reachable
    ("MEMIT", "gpt2-xl-classic", "mom2_update_weight", 20000.0),
    ("MEMIT", "gpt2-xl-classic", "dynamic", False),
    ("EMMET", "gpt2-xl-classic.json", "mom2_update_weight", 1000.0),
    ("EMMET", "FastEMMET/gpt2-xl", "mom2_update_weight", 10000.0),
])
def test_builtins_by_the_seeds_file_names(method, name, field, value):
    assert getattr(load_hparams(name, method), field) == value


@pytest.mark.parametrize("name", ["Llama-2-7b", "Llama-2-7b.json", "meta-llama/Llama-2-7b-hf",
                                  "meta-llama/Llama-2-7b-hf.json", "meta-llama_Llama-2-7b-hf.json"])
@pytest.mark.parametrize("method", ["EMMET", "MEMIT"])
def test_the_seeds_llama_model_names_reach_its_llama2_file(name, method):
    """The seed's --model_name (Llama-2-7b) and the hub id name its llama2-7b.json as well."""
    assert load_hparams(name, method) == load_hparams("llama2-7b.json", method) == builtin_hparams(method, "llama-2-7b")
    assert builtin_hparams(method, name.removesuffix(".json")) == load_hparams("llama2-7b", method)


def test_hub_ids_of_known_models_name_their_builtins_and_folders_still_come_first():
    assert load_hparams("EleutherAI/gpt-j-6B", "EMMET") == load_hparams("EleutherAI_gpt-j-6B.json", "EMMET")
    assert load_hparams("openai-community/gpt2-xl", "MEMIT") == load_hparams("gpt2-xl", "MEMIT")
    assert load_hparams("EleutherAI/gpt-j-6B_constr", "FT") == load_hparams("gpt-j-6b_constr", "FT")
    assert load_hparams("FastEMMET/gpt2-xl", "EMMET").dynamic is True  # FOLDER/name as before
    with pytest.raises(EditError, match="no built-in EMMET hparams named 'someone/gpt2-xl'"):
        load_hparams("someone/gpt2-xl", "EMMET")


def test_the_seeds_llama_model_name_is_a_model_alias(tmp_path, monkeypatch):
    assert resolve_model_path("Llama-2-7b") == "meta-llama/Llama-2-7b-hf"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Llama-2-7b").mkdir()  # the seed's local folder of that name wins, as there
    assert resolve_model_path("Llama-2-7b") == "Llama-2-7b"


def test_the_seeds_models_default_to_its_values_and_smollm2_keeps_ours():
    assert builtin_hparams("EMMET", "gpt2-xl").mom2_update_weight == 10000
    assert builtin_hparams("MEMIT", "llama-2-7b").update_norm_lambda == 0.01
    ours = builtin_hparams("EMMET", "smollm2-135m")
    assert ours.mom2_update_weight == 1000 and ours.emmet_ridge_one_edit is True  # the sweep's file is ours
    assert "gpt2-xl-classic" in available("MEMIT")["MEMIT"]


def test_a_builtin_of_another_method_or_an_unknown_name_is_refused_with_the_choices(tmp_path):
    with pytest.raises(EditError, match="are EMMET's, not MEMIT's"):
        load_hparams("FastEMMET/gpt2-xl", "MEMIT")
    with pytest.raises(EditError, match=r"no built-in EMMET hparams named 'gpt9'.*gpt2-xl-classic"):
        load_hparams("gpt9", "EMMET")
    with pytest.raises(EditError, match="neither a built-in EMMET name.*nor an existing file"):
        load_hparams(tmp_path / "missing.json", "EMMET")


def test_a_builtin_name_comes_before_a_file_of_that_name_as_in_the_seed(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2-xl.json").write_text(json.dumps({"layers": [3], "mom2_update_weight": 7}))
    with caplog.at_level(logging.WARNING, logger="fastmemit"):
        assert load_hparams("gpt2-xl.json", "EMMET").mom2_update_weight == 10000
    assert "./gpt2-xl.json" in caplog.text
    assert load_hparams("./gpt2-xl.json", "EMMET").mom2_update_weight == 7
    assert load_hparams(tmp_path / "gpt2-xl.json", "EMMET").layers == [3]


# ----------------------------------------------------------------------------- research-code files

LOADS = {  # fixture file -> (method, expected values)
    "EMMET/fast-gpt2.json": ("EMMET", {"dynamic": True, "dynamic_multiplier": 2.0, "proj_dim": 64, **SEED_HARD_CODED}),
    "EMMET/unified-gpt2.json": ("EMMET", {"dynamic": False, "emmet_lambda": 0.1, **SEED_HARD_CODED}),
    "MEMIT/fast-llama.json": ("MEMIT", {"update_norm_lambda": 0.01, "context_template_length_params": [[10, 5]],
                                        "v_early_stop": "loss"}),
    "ROME/gpt2.json": ("ROME", {"bias_update": False, "dynamic": False,
                                "context_template_length_params": [[5, 2], [10, 2]], "v_early_stop": "loss"}),
    "FT/gpt2_constr.json": ("FT", {"norm_constraint": 5e-4, "ft_loss": "next_token", "batch_size": 64}),
    "FT/gpt2_unconstr.json": ("FT", {"norm_constraint": False, "weight_decay": 0.0}),
}
REFUSED = {  # fixture file -> (method, the reason)
    "FT/gpt2_wd.json": ("FT", r"rewrite_module_tmp = 'transformer.h.\{\}'.*another module .* not implemented"),
    "FT/gpt2_attn.json": ("FT", r"rewrite_module_tmp = 'transformer.h.\{\}.attn.c_attn'"),
    "MEND/gpt2.json": ("MEND", "MEND edits through a hypernetwork trained for each model"),
}


def test_the_fixture_covers_every_file():
    assert {str(p.relative_to(DATA)) for p in DATA.rglob("*.json")} == set(LOADS) | set(REFUSED)


@pytest.mark.parametrize("name", sorted(LOADS))
def test_research_files_load_unchanged(name):
    method, expected = LOADS[name]
    hp = load_hparams(DATA / name, method)
    assert isinstance(hp, get_method(method).hparams_cls)
    assert {k: getattr(hp, k) for k in expected} == expected


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_we_do_not_implement_is_refused_with_the_reason(name):
    method, reason = REFUSED[name]
    with pytest.raises(EditError, match=reason):
        load_hparams(DATA / name, method)


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("random_vector_preservation", True, "random keys instead of corpus keys"),
    ("skill_preservation", True, "missing from the seed's code"),
    ("shuffle_text", True, "shuffled inside each text"),
    ("bias_update", True, "ROME's bias update"),
    ("layer_selection", "random", "never implements it"),
])
def test_unimplemented_research_values_are_refused_with_the_reason(field, value, reason):
    with pytest.raises(EditError, match=f"hparams.{field} = .* is not implemented in fastmemit: .*{reason}"):
        EditHparams.from_dict({field: value})


def test_hard_coded_research_values_only_for_research_files(tmp_path):
    research = json.loads((DATA / "EMMET/fast-gpt2.json").read_text())
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({**research, "stats_seq_len": 128}))  # names a fastmemit field: ours
    hp = EditHparams.from_json(ours)
    assert (hp.context_template_length_params, hp.emmet_ridge_one_edit) == ([[5, 10], [10, 10]], True)
    assert hp.v_early_stop == "nll"
    assert EditHparams.from_dict(research).emmet_ridge_one_edit is True  # a dict is not a file
    assert EditHparams.is_research_file(research) and not EditHparams.is_research_file({"stats_corpus": None})
    ft = FTHparams.from_json(DATA / "FT/gpt2_constr.json")
    assert ft.context_template_length_params == [] and ft.ft_loss == "next_token"


def test_a_seed_emmet_file_gets_the_seeds_v_star_rules():
    """The seed's v* numerics from its file alone: the total-loss stop at 5e-2, δ at the block output for
    EMMET/MEMIT (compute_z.py: layer_module_tmp) and at the MLP output for ROME (compute_v.py: mlp_module_tmp)."""
    hp = load_hparams(DATA / "EMMET/fast-gpt2.json", "EMMET")
    assert (hp.v_early_stop, hp.v_early_stop_nll, hp.v_site) == ("loss", 0.05, "auto")
    assert hp.v_max_rows == 70  # only bounds v*'s memory: fastmemit's default (micro-batching is exact)
    assert get_method("EMMET").value_site == get_method("MEMIT").value_site == "block"
    assert get_method("ROME").value_site == "matrix"
    assert load_hparams("gpt2-xl.json", "EMMET").v_early_stop == "loss"  # the built-in seed file too
    # fastmemit's own files keep the NLL rule they were tuned with
    assert {builtin_hparams(m, "smollm2-135m").v_early_stop for m in ("EMMET", "MEMIT", "ROME")} == {"nll"}
    assert {builtin_hparams(m, "gemma3-270m").v_early_stop for m in ("EMMET", "MEMIT", "ROME")} == {"nll"}
    assert builtin_hparams("EMMET", "gemma3-270m").emmet_ridge_one_edit is False  # as before the v_early_stop field


# ----------------------------------------------------------------------------- dynamic_multiplier


def test_a_file_multiplier_with_dynamic_false_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="fastmemit"):
        hp = load_hparams(DATA / "ROME/gpt2.json", "ROME")
    assert hp.dynamic is False and "dynamic_multiplier = 1 is not used because dynamic is false" in caplog.text


def test_the_dynamic_multiplier_flag_turns_dynamic_on(tmp_path):
    path = tmp_path / "static.json"
    path.write_text(json.dumps({"layers": [1], "dynamic": False, "mom2_n_samples": 500}))
    cfg, _ = build_config(build_parser().parse_args(["evaluate", "--hparams", str(path), "--out", "o",
                                                     "--dynamic_multiplier", "3"]))
    hp = load_hparams(cfg.hparams, cfg.method).replace(**cfg.hparams_overrides)  # as the runner applies them
    assert (hp.dynamic, hp.dynamic_multiplier) == (True, 3.0)
    assert EditHparams(dynamic=False).replace(dynamic_multiplier=2).dynamic is True
    assert EditHparams(dynamic=False).replace(dynamic_multiplier=2, dynamic=False).dynamic is False  # both explicit


def test_recompute_stats_takes_false_true_or_layer():
    assert EditHparams.from_dict({"recompute_stats": "layer"}).recompute_stats == "layer"
    assert EditHparams.from_dict({"recompute_stats": True}).recompute_stats is True
    with pytest.raises(EditError, match="recompute_stats must be false, true or 'layer'"):
        EditHparams.from_dict({"recompute_stats": "sometimes"})
    args = build_parser().parse_args(["evaluate", "--recompute_stats", "layer", "--out", "o"])
    assert build_config(args)[0].hparams_overrides == {"recompute_stats": "layer"}
