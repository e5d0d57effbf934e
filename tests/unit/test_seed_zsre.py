"""zsRE conventions: the seed's by default (edit towards answers[0]; neighbour prompt without its
"nq question:" prefix, plus "?"), ROME/MEMIT's (answers[0], loc + "?") and EasyEdit's target (alt),
from the loader through the runner's cases to the metrics, and in run configs old and new."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fastmemit.cli import build_parser
from fastmemit.cli.evaluate_cmd import build_config
from fastmemit.errors import DatasetError, RunError
from fastmemit.eval import RunConfig, metrics
from fastmemit.eval.config import config_differences, stored_config
from fastmemit.eval.datasets import ZsreCase, load_dataset, load_zsre
from fastmemit.eval.runner import load_cases
from fastmemit.requests import EditRequest

RECORDS = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
     "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
     "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak", "cond": "x"},
    {"subject": "Jenna Carroll", "src": "What is Jenna Carroll's gender?", "pred": "female",
     "rephrase": "The gender of Jenna Carroll is what?", "alt": "", "answers": ["female"],
     "loc": "nq question: who sings the song it's a small world", "loc_ans": "the Sherman Brothers", "cond": "x"},
]


@pytest.fixture
def zsre_file(tmp_path: Path) -> Path:
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_the_seeds_convention_is_the_default(zsre_file):
    cases = load_zsre(zsre_file)
    assert [c.case_id for c in cases] == [0, 1]  # an empty alt is no problem when the target is answers[0]
    c = cases[0]
    assert (c.convention, c.target_new) == ("seed", "uniform")
    assert c.neighborhood_prompt == "john goodman's character in the big lebowski?"
    assert c.requested_rewrite == {"prompt": "What is the product made by {}?", "subject": "UniFirst",
                                   "target_new": "uniform", "target_true": None, "case_id": 0}
    assert EditRequest.from_any(c.requested_rewrite).target_new == "uniform"
    assert load_dataset("zsre", zsre_file) == cases


def test_memit_and_alt_conventions(zsre_file):
    memit = load_zsre(zsre_file, convention="memit")[0]
    assert (memit.target_new, memit.neighborhood_prompt) == ("uniform", RECORDS[0]["loc"] + "?")
    alt = load_dataset("zsre", zsre_file, zsre_convention="alt")
    assert [c.case_id for c in alt] == [0]  # EasyEdit's target: a record without alt has nothing to edit towards
    assert (alt[0].target_new, alt[0].neighborhood_prompt) == ("unmanned aircraft", RECORDS[0]["loc"] + "?")
    assert alt[0].requested_rewrite["target_true"] == "uniform"
    with pytest.raises(DatasetError, match="zsRE convention must be one of seed, memit, alt"):
        load_zsre(zsre_file, convention="easy")


def test_the_metrics_score_the_cases_target_and_neighbour_prompt(zsre_file, monkeypatch):
    seen: dict[str, Any] = {}

    def capture(model, tok, prompts, targets, batch_size):
        seen.update(prompts=list(prompts), targets=list(targets))
        raise StopIteration  # nothing to score: the inputs are what is checked

    monkeypatch.setattr(metrics, "score_targets", capture)
    for convention, target, loc in (("seed", "uniform", "john goodman's character in the big lebowski?"),
                                    ("alt", "unmanned aircraft", RECORDS[0]["loc"] + "?")):
        with pytest.raises(StopIteration):
            metrics.evaluate_zsre_cases(None, None, load_zsre(zsre_file, convention=convention)[:1])
        assert seen["prompts"] == [RECORDS[0]["src"], RECORDS[0]["rephrase"], loc]
        assert seen["targets"] == [target, target, "Walter Sobchak"]


def test_the_run_config_carries_the_convention_to_the_cases(zsre_file):
    cfg = RunConfig(dataset="zsre", data=str(zsre_file))
    assert cfg.zsre_convention == "seed" and {c.convention for c in load_cases(cfg)} == {"seed"}
    alt = RunConfig(dataset="zsre", data=str(zsre_file), zsre_convention="alt")
    assert [c.target_new for c in load_cases(alt)] == ["unmanned aircraft"]
    with pytest.raises(RunError, match="zsre_convention must be one of"):
        RunConfig(zsre_convention="mend")
    args = build_parser().parse_args(["evaluate", "--ds_name", "zsre", "--zsre_convention", "memit", "--out", "o"])
    assert build_config(args)[0].zsre_convention == "memit"


def test_a_stored_zsre_run_from_before_the_field_was_the_alt_convention(tmp_path):
    facts = dict(method="EMMET", hparams={"layers": [1]}, base_fingerprint="fp", case_ids=[0, 1])
    for dataset, old_convention in (("zsre", "alt"), ("cf", "seed")):
        now = stored_config(RunConfig(dataset=dataset, zsre_convention=old_convention), Path("/r"), **facts)
        old = json.loads(json.dumps(now))
        del old["run"]["zsre_convention"]  # written before the field existed
        path = tmp_path / f"{dataset}.json"
        path.write_text(json.dumps(old))
        assert RunConfig.from_json(path).zsre_convention == old_convention
        assert config_differences(old, now) == []
    seed = stored_config(RunConfig(dataset="zsre"), Path("/r"), **facts)
    old_zsre = {**seed, "run": {k: v for k, v in seed["run"].items() if k != "zsre_convention"}}
    assert config_differences(old_zsre, seed) == ["run.zsre_convention: 'alt' → 'seed'"]  # an old run is not resumed
    cf = stored_config(RunConfig(dataset="cf"), Path("/r"), **facts)
    assert config_differences(cf, stored_config(RunConfig(dataset="cf", zsre_convention="alt"), Path("/r"),
                                                 **facts)) == []  # meaningless for CounterFact


def test_zsre_case_refuses_an_unknown_convention():
    with pytest.raises(DatasetError, match="zsRE convention"):
        ZsreCase(0, "s", "q s", "r", "a", ("b",), "nq question: l", "x", convention="other")
