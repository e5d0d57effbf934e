"""Every subcommand over a table of bad inputs: exit code 2, one line naming the problem, no traceback,
and nothing written where an output path was refused.

The CLI runs in process (``fastmemit.cli.main``) on a tiny random llama saved to a folder, so a case
costs a fraction of a second; an exception escaping ``main`` is what a user would see as a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmemit.cli import main
from tests.helpers import gpt2_tokenizer, tiny_llm

REQ = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data) -> dict[str, str]:
    """Files the table refers to by name: a tiny model folder, hparams for it, corpora, broken files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tok = gpt2_tokenizer()
    model = tiny_llm("llama", len(tok))
    (root / "tiny").mkdir()
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    trunc = root / "truncated"
    trunc.mkdir()
    for f in (root / "tiny").iterdir():
        data = f.read_bytes()
        (trunc / f.name).write_bytes(data[:4000] if f.suffix == ".safetensors" else data)
    (root / "empty_model").mkdir()
    hp = {"layers": [0, 1], "dynamic": True, "dynamic_multiplier": 2, "context_template_length_params": [],
          "v_num_grad_steps": 2, "mom2_update_weight": 1000, "emmet_lambda": 0.1}
    (root / "hp.json").write_text(json.dumps(hp))
    (root / "hp_unknown.json").write_text(json.dumps({**hp, "no_such_field": 1}))
    (root / "corpus.txt").write_text(("the city of paris is in france and the river runs through it . " * 40 + "\n") * 30)
    (root / "bad_utf8.txt").write_bytes(b"\xff\xfe\xfa not utf-8\n" * 10)
    (root / "corpus.csv").write_text("a,b\n")
    (root / "broken.json").write_text('{"a": 1')
    (root / "number.json").write_text("3")
    (root / "a_file").write_text("x")
    (root / "out_dir").mkdir()
    for name, summary in (("run_broken", "{bad"), ("run_mistyped", "[1, 2]")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(summary)
        (root / name / "summary.json").write_text(summary)
    return {"root": str(root), "T": str(root / "tiny"), "HP": str(root / "hp.json"), "C": str(root / "corpus.txt"),
            "DATA": str(shared_data / "counterfact-train.json"), "DS": str(shared_data / "downstream")}


def _edit(*extra: str, request: dict | None = None) -> list[str]:
    return ["edit", "--model", "{T}", "--hparams", "{HP}", "--corpus", "{C}",
            "--request", json.dumps(request or REQ), *extra]


def _stats(*extra: str) -> list[str]:
    return ["stats", "--model", "{T}", "--layers", "0-1", "--corpus", "{C}", "--no-cache", *extra]


def _ds(*extra: str) -> list[str]:
    return ["downstream", "--model", "{T}", "--tasks", "sst2", "--number_of_few_shots", "1", "--number_of_tests", "3",
            "--data-dir", "{DS}", *extra]


def _ev(*extra: str) -> list[str]:
    return ["evaluate", "--model_name", "{T}", "--hparams_fname", "{HP}", "--corpus", "{C}", "--data", "{DATA}",
            "--dataset_size_limit", "2", "--out", "{root}/run", *extra]


# (id, argv, fragment of the one-line error message, path that must not exist afterwards)
CASES: list[tuple[str, list[str], str, str | None]] = [
    # --- edit: requests
    ("edit-unknown-method", _edit("--method", "NoSuch"), "unknown method 'NoSuch'", None),
    ("edit-request-bad-json", ["edit", "--model", "{T}", "--request", '{"prompt": '], "invalid JSON", None),
    ("edit-request-missing-target", _edit(request={"prompt": "{} is", "subject": "X"}), "target_new", None),
    ("edit-request-subject-absent", _edit(request={**REQ, "prompt": "The mother tongue is"}), "not found in prompt", None),
    ("edit-request-empty-target", _edit(request={**REQ, "target_new": " "}), "empty target_new", None),
    ("edit-request-not-object", ["edit", "--model", "{T}", "--request", "[1, 2]"], "must be a mapping", None),
    ("edit-request-two-slots", _edit(request={**REQ, "prompt": "{} and {} is"}), "more than one", None),
    ("edit-requests-missing-file", ["edit", "--model", "{T}", "--requests", "{root}/nope.json"], "does not exist", None),
    ("edit-requests-broken-file", ["edit", "--model", "{T}", "--requests", "{root}/broken.json"], "invalid JSON", None),
    ("edit-requests-number", ["edit", "--model", "{T}", "--requests", "{root}/number.json"], "list of requests", None),
    # --- edit: hparams and overrides
    ("edit-hparams-missing", _edit("--hparams", "{root}/nope.json"), "nope.json", None),
    ("edit-hparams-broken", _edit("--hparams", "{root}/broken.json"), "invalid JSON", None),
    ("edit-hparams-unknown-field", _edit("--hparams", "{root}/hp_unknown.json"), "no_such_field", None),
    ("edit-set-no-equals", _edit("--set", "v_lr"), "FIELD=VALUE", None),
    ("edit-set-wrong-type", _edit("--set", "v_lr=fast"), "'v_lr'", None),
    ("edit-set-unknown", _edit("--set", "no_such_field=1"), "no_such_field", None),
    ("edit-set-dm-infinity", _edit("--set", "dynamic_multiplier=Infinity"), "dynamic_multiplier", None),
    ("edit-set-dm-nan", _edit("--set", "dynamic_multiplier=NaN"), "dynamic_multiplier", None),
    ("edit-set-lambda-inf", _edit("--set", "mom2_update_weight=Infinity"), "mom2_update_weight", None),
    ("edit-set-lambda-negative", _edit("--set", "mom2_update_weight=-1"), "mom2_update_weight", None),
    ("edit-set-seq-len-1", _edit("--set", "stats_seq_len=1"), "stats_seq_len", None),
    ("edit-set-steps-zero", _edit("--set", "v_num_grad_steps=0"), "v_num_grad_steps", None),
    ("edit-set-fact-token", _edit("--set", "fact_token=\"middle\""), "fact_token", None),
    ("edit-set-layers-out-of-range", _edit("--set", "layers=[7]"), "out of range", None),
    ("edit-set-layers-empty", _edit("--set", "layers=[]"), "layers", None),
    ("edit-set-layers-final", _edit("--set", "layers=[2]"), "final layer", None),
    ("edit-layers-reversed", _edit("--layers", "7-3"), "invalid layer list", None),
    ("edit-layers-garbage", _edit("--layers", "x"), "invalid layer list", None),
    # --- edit: model, device, paths, numbers
    ("edit-dtype", _edit("--dtype", "float8"), "unknown dtype 'float8'", None),
    ("edit-device-nonsense", _edit("--device", "warp9"), "device", None),
    ("edit-model-missing-folder", _edit("--model", "{root}/no_model"), "does not exist", None),
    ("edit-model-truncated", _edit("--model", "{root}/truncated"), "truncated or corrupt", None),
    ("edit-model-empty-folder", _edit("--model", "{root}/empty_model"), "cannot load model", None),
    ("edit-top-negative", _edit("--top", "-1"), "--top", None),
    ("edit-top-zero", _edit("--top", "0"), "--top", None),
    ("edit-max-new-tokens-negative", _edit("--max-new-tokens", "-5"), "--max-new-tokens", None),
    ("edit-seed-garbage", _edit("--seed", "x"), "--seed", None),
    ("edit-save-deltas-folder", _edit("--save-deltas", "{root}/out_dir"), "is a folder", None),
    ("edit-save-deltas-under-file", _edit("--save-deltas", "{root}/a_file/d.safetensors"), "is a file",
     "{root}/a_file/d.safetensors"),
    ("edit-cache-dir-file", _edit("--cache-dir", "{root}/a_file"), "is a file", None),
    ("edit-corpus-missing", _edit("--corpus", "{root}/nope.txt"), "nope.txt", None),
    ("edit-corpus-not-utf8", _edit("--corpus", "{root}/bad_utf8.txt"), "not UTF-8", None),
    ("edit-corpus-suffix", _edit("--corpus", "{root}/corpus.csv"), "unsupported suffix", None),
    ("edit-prompt-too-long", _edit(request={**REQ, "prompt": "word " * 300 + "{} is"}), "context", None),
    ("edit-no-request", ["edit", "--model", "{T}"], "--request", None),
    # --- stats
    ("stats-layers-out-of-range", _stats("--layers", "0-9"), "out of range", None),
    ("stats-seq-len-1", _stats("--seq-len", "1"), "--seq-len", None),
    ("stats-n-tokens-negative", _stats("--n-tokens", "-3"), "--n-tokens", None),
    ("stats-n-tokens-zero", _stats("--n-tokens", "0"), "--n-tokens", None),
    ("stats-dm-nan", _stats("--dynamic-multiplier", "nan"), "--dynamic-multiplier", None),
    ("stats-dm-negative", _stats("--dynamic-multiplier", "-1"), "--dynamic-multiplier", None),
    ("stats-dm-and-count", _stats("--dynamic-multiplier", "2", "--n-tokens", "10"), "not allowed with", None),
    ("stats-batch-size-zero", _stats("--batch-size", "0"), "--batch-size", None),
    ("stats-corpus-not-utf8", _stats("--corpus", "{root}/bad_utf8.txt"), "not UTF-8", None),
    ("stats-corpus-missing", _stats("--corpus", "{root}/nope.jsonl"), "nope.jsonl", None),
    ("stats-corpus-too-short", _stats("--n-tokens", "10000000"), "corpus", None),
    ("stats-cache-dir-file", ["stats", "--model", "{T}", "--layers", "0", "--corpus", "{C}", "--cache-dir",
                              "{root}/a_file"], "is a file", None),
    ("stats-dtype", _stats("--dtype", "int3"), "unknown dtype", None),
    ("stats-no-layers", ["stats", "--model", "{T}"], "--layers", None),
    # --- downstream
    ("ds-unknown-task", _ds("--tasks", "nosuch"), "nosuch", None),
    ("ds-too-many-shots", _ds("--number_of_few_shots", "11"), "shot", None),
    ("ds-negative-tests", _ds("--number_of_tests", "-1"), "number_of_tests", None),
    ("ds-batch-size-zero", _ds("--batch-size", "0"), "--batch-size", None),
    ("ds-max-length-tiny", _ds("--max-length", "5"), "max", None),
    ("ds-out-under-file", _ds("--out", "{root}/a_file/r.json"), "is a file", "{root}/a_file/r.json"),
    ("ds-out-folder", _ds("--out", "{root}/out_dir"), "is a folder", None),
    ("ds-deltas-broken", _ds("--deltas", "{root}/broken.json"), "safetensors", None),
    ("ds-deltas-missing", _ds("--deltas", "{root}/nope.safetensors"), "does not exist", None),
    ("ds-data-file-no-equals", _ds("--data-file", "sst2"), "TASK=PATH", None),
    ("ds-data-file-missing", _ds("--data-file", "sst2={root}/nope.jsonl"), "nope.jsonl", None),
    ("ds-data-dir-missing", _ds("--data-dir", "{root}/nope"), "nope", None),
    ("ds-mode", _ds("--mode", "nosuch"), "--mode", None),
    # --- plot and summarize
    ("plot-broken-json", ["plot", "{root}/run_broken"], "run_broken", None),
    ("plot-mistyped-json", ["plot", "{root}/run_mistyped"], "run_mistyped", None),
    ("plot-not-a-run", ["plot", "{root}/a_file"], "not a run folder", None),
    ("summarize-broken-json", ["summarize", "{root}/run_broken"], "run_broken", None),
    ("summarize-mistyped-json", ["summarize", "{root}/run_mistyped"], "run_mistyped", None),
    ("summarize-missing", ["summarize", "{root}/nope"], "not a run folder", None),
    # --- evaluate
    ("ev-data-broken", ["evaluate", "--model_name", "{T}", "--data", "{root}/broken.json", "--out", "{root}/ev1"],
     "invalid JSON", "{root}/ev1"),
    ("ev-num-edits-zero", _ev("--num_edits", "0"), "num_edits", "{root}/run"),
    ("ev-out-file", ["evaluate", "--model_name", "{T}", "--hparams_fname", "{HP}", "--corpus", "{C}", "--data", "{DATA}",
                     "--dataset_size_limit", "2", "--out", "{root}/a_file"], "a_file", None),
    ("ev-ds-name", _ev("--ds_name", "nosuch"), "--ds_name", "{root}/run"),
    ("ev-alg-name", _ev("--alg_name", "NoSuch"), "NoSuch", "{root}/run"),
    ("ev-size-limit-negative", _ev("--dataset_size_limit", "-1"), "dataset_size_limit", "{root}/run"),
    ("ev-bad-bool", _ev("--sequential", "maybe"), "boolean", "{root}/run"),
    ("ev-hparams-missing", _ev("--hparams_fname", "{root}/nope.json"), "nope.json", "{root}/run"),
    ("ev-continue-missing", ["evaluate", "--continue_from_run", "{root}/nope"], "nope", None),
    ("ev-downstream-data-missing", _ev("--do_downstream_eval", "true", "--downstream_data_dir", "{root}/nope"),
     "nope", "{root}/run"),
    # --- top level
    ("no-command", [], "COMMAND", None),
    ("unknown-command", ["edt"], "invalid choice", None),
]


def _fill(arg: str, env: dict[str, str]) -> str:
    for k, v in env.items():
        arg = arg.replace("{" + k + "}", v)
    return arg


def test_the_table_is_large_and_covers_every_subcommand():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {argv[0] for _, argv, _, _ in CASES if argv}
    assert {"edit", "stats", "downstream", "plot", "summarize", "evaluate"} <= commands


@pytest.mark.parametrize(("argv", "fragment", "absent"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(env, capsys, argv, fragment, absent):
    args = [_fill(a, env) for a in argv]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc!r} for {args}; stderr: {err[-500:]}"
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("fastmemit") and " error: " in lines[-1], err
    assert fragment.lower() in lines[-1].lower(), f"{fragment!r} not in {lines[-1]!r}"
    if absent is not None:
        assert not Path(_fill(absent, env)).exists(), f"{absent} was written although the input was refused"
