"""Property tests (hypothesis): every parser either loads its input or raises a FastMemitError, never
another exception; the solver gives finite deltas or a named error, never NaN.

Inputs are drawn from JSON-like values biased towards the shapes the parsers expect (records with the
right keys but wrong types, empty strings, nested lists, NaN/inf numbers), plus raw bytes for files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmemit.downstream.data import load_records
from fastmemit.downstream.registry import available_tasks, get_task
from fastmemit.editing import load_deltas
from fastmemit.errors import FastMemitError
from fastmemit.eval.config import RunConfig
from fastmemit.eval.datasets import load_counterfact, load_seed_ordering, load_zsre
from fastmemit.linalg import FactoredCov, ridge_system_delta
from fastmemit.methods import EditHparams
from fastmemit.requests import EditRequest
from fastmemit.stats.corpus import corpus_from_spec

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e300, -0.0])
numbers = st.one_of(special, st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["", " ", "{}", "{} is", "Paris", "The {} of", "0", "-1"]))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)), max_leaves=12)


def _record_like(keys: list[str]) -> st.SearchStrategy:
    """Objects with (some of) the expected keys holding arbitrary JSON values, or anything at all."""
    fields = st.fixed_dictionaries({}, optional={k: json_values for k in keys})
    return st.one_of(fields, json_values)


def _loads_or_named_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except FastMemitError:
        return None


def _write(tmp: Path, name: str, obj) -> Path:
    p = tmp / name
    p.write_text(json.dumps(obj, allow_nan=True))
    return p


REQUEST_KEYS = ["prompt", "subject", "target_new", "target_true", "case_id", "ground_truth", "requested_rewrite"]
CF_KEYS = ["case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
           "locality_ground_truth", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
           "generation_prompts"]
ZSRE_KEYS = ["subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond"]


@SETTINGS
@given(obj=_record_like(REQUEST_KEYS))
def test_edit_request_parser_loads_or_names_the_problem(obj):
    req = _loads_or_named_error(EditRequest.from_any, obj)
    if req is not None:  # a loaded request is usable: its text holds the subject exactly once where {} was
        assert req.subject in req.text and "{}" in req.template


@SETTINGS
@given(obj=st.one_of(st.fixed_dictionaries({}, optional={
    "layers": st.one_of(st.lists(st.integers(-3, 40), max_size=4), json_values),
    "v_lr": st.one_of(numbers, json_values),
    "mom2_update_weight": numbers,
    "dynamic_multiplier": numbers,
    "v_num_grad_steps": st.one_of(st.integers(-2, 50), json_values),
    "fact_token": st.one_of(st.sampled_from(["subject_last", "last", "subject_first", "middle"]), json_values),
    "context_template_length_params": json_values,
    "emmet_lambda": numbers,
    "stats_seq_len": st.integers(-2, 600),
}), json_values))
def test_hparams_parser_loads_or_names_the_problem(obj):
    hp = _loads_or_named_error(EditHparams.from_dict, obj)
    if hp is not None:
        for name in ("v_lr", "mom2_update_weight", "dynamic_multiplier", "emmet_lambda"):
            assert math.isfinite(getattr(hp, name)), name
        assert hp.layers and all(layer >= 0 for layer in hp.layers)


@SETTINGS
@given(records=st.lists(_record_like(CF_KEYS), max_size=3))
def test_counterfact_loader_loads_or_names_the_problem(tmp_path_factory, records):
    path = _write(tmp_path_factory.mktemp("cf"), "cf.json", records)
    cases = _loads_or_named_error(load_counterfact, path)
    for c in cases or []:
        assert c.requested_rewrite["subject"] and c.requested_rewrite["target_new"]["str"]


@SETTINGS
@given(records=st.lists(_record_like(ZSRE_KEYS), max_size=3))
def test_zsre_loader_loads_or_names_the_problem(tmp_path_factory, records):
    path = _write(tmp_path_factory.mktemp("zsre"), "zsre.json", records)
    _loads_or_named_error(load_zsre, path)


@SETTINGS
@given(obj=json_values, sample=st.integers(-2, 12))
def test_seed_ordering_loader_loads_or_names_the_problem(tmp_path_factory, obj, sample):
    path = _write(tmp_path_factory.mktemp("seed"), "seed.json", obj)
    order = _loads_or_named_error(load_seed_ordering, path, sample)
    assert order is None or all(isinstance(i, int) for i in order)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), st.lists(json_values, max_size=4).map(
    lambda rs: "\n".join(json.dumps(r, allow_nan=True) for r in rs).encode())), task=st.sampled_from(available_tasks()))
def test_downstream_jsonl_loader_loads_or_names_the_problem(tmp_path_factory, raw, task):
    path = tmp_path_factory.mktemp("ds") / "data.jsonl"
    path.write_bytes(raw)
    _loads_or_named_error(load_records, get_task(task), path)


@SETTINGS
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".txt"]))
def test_corpus_reader_loads_or_names_the_problem(tmp_path_factory, raw, suffix):
    path = tmp_path_factory.mktemp("corpus") / f"c{suffix}"
    path.write_bytes(raw)
    try:
        docs = list(corpus_from_spec(path))
    except FastMemitError:
        return
    assert all(isinstance(d, str) for d in docs)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), d_k=st.integers(2, 24), n_keys=st.integers(0, 40), batch=st.integers(1, 6),
       lam=st.sampled_from([0.0, 1e-6, 1.0, 1e4]), eps=st.sampled_from([0.0, 1e-8, 1.0]),
       mu=st.sampled_from([0.0, 0.1, 1.0]), scale=st.sampled_from([1e-6, 1.0, 1e6]))
def test_solver_gives_finite_deltas_or_a_named_error(seed, d_k, n_keys, batch, lam, eps, mu, scale):
    g = torch.Generator().manual_seed(seed)
    K0 = torch.randn(d_k, n_keys, generator=g, dtype=torch.float64) * scale  # may be rank deficient
    C = lam * (K0 @ K0.T) / max(n_keys, 1) + eps * torch.eye(d_k, dtype=torch.float64)  # (d_k, d_k)
    K = torch.randn(d_k, batch, generator=g, dtype=torch.float64) * scale  # (d_k, B)
    R = torch.randn(8, batch, generator=g, dtype=torch.float64)  # (d, B)
    try:
        delta = ridge_system_delta(R, K, FactoredCov(C), mu=mu)
    except FastMemitError:
        return
    assert torch.isfinite(delta).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_solver_refuses_non_finite_statistics(bad):
    C = torch.eye(4, dtype=torch.float64)
    C[1, 2] = C[2, 1] = bad
    with pytest.raises(FastMemitError, match="NaN or inf"):
        FactoredCov(C)


@SETTINGS
@given(meta=st.dictionaries(st.sampled_from(["format", "format_version", "method", "hparams", "requests", "fingerprint",
                                             "other"]),
                            st.one_of(st.text(max_size=20), json_values.map(lambda v: json.dumps(v, allow_nan=True))),
                            max_size=6),
       values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4),
       as_int=st.booleans())
def test_delta_file_reader_loads_or_names_the_problem(tmp_path_factory, meta, values, as_int):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("deltas") / "d.safetensors"
    t = torch.tensor(values).reshape(1, -1)
    save_file({"w": t.long() if as_int and all(math.isfinite(v) for v in values) else t}, str(path),
              metadata={"format": "fastmemit-deltas", **meta})
    got = _loads_or_named_error(load_deltas, path)
    if got is not None:
        tensors, _ = got
        assert all(v.is_floating_point() and torch.isfinite(v).all() for v in tensors.values())


@SETTINGS
@given(obj=st.one_of(st.fixed_dictionaries({}, optional={
    "method": st.one_of(st.sampled_from(["EMMET", "nope"]), json_values),
    "alg_name": json_values, "num_edits": st.one_of(st.integers(-2, 50), json_values),
    "edits_per_batch": json_values, "dataset": st.one_of(st.sampled_from(["cf", "zsre", "x"]), json_values),
    "ds_name": json_values, "dataset_size_limit": json_values, "sample_num": json_values, "seed": json_values,
    "sequential": json_values, "hparams_overrides": json_values, "save_model_format": json_values,
    "downstream_eval_steps": json_values, "no_such_field": json_values,
}), json_values))
def test_run_config_parser_loads_or_names_the_problem(obj):
    cfg = _loads_or_named_error(RunConfig.from_dict, obj)
    if cfg is not None:
        assert cfg.edits_per_batch >= 1 and cfg.dataset in ("cf", "counterfact", "mcf", "multi_counterfact", "zsre")
