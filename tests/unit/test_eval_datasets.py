"""Evaluation dataset loaders: both CounterFact forms, multi-CounterFact, zsRE, malformed records,
seed orderings, tf-idf tables and the (offline-only testable) download."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastmemit.errors import FastMemitError
from fastmemit.eval import datasets as ds
from fastmemit.eval.datasets import (
    CounterFactCase,
    DatasetError,
    ZsreCase,
    download_dataset,
    load_attribute_snippets,
    load_counterfact,
    load_dataset,
    load_seed_ordering,
    load_tfidf,
    load_zsre,
    order_cases,
)
from tests.helpers import REPO


@pytest.fixture(scope="module")
def data_dir() -> Path:
    env = os.environ.get("FASTMEMIT_SHARED_DATA")
    path = Path(env).expanduser() if env else REPO.parent / "shared" / "data"
    if not (path / "counterfact-train.json").is_file():
        pytest.skip(f"shared data not found at {path} (set FASTMEMIT_SHARED_DATA to the folder holding counterfact-train.json)")
    return path


ORIGINAL = [
    {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                               "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is", "Where Danielle Darrieux is from, people speak the language of"],
    },
    {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} is located in the continent of",
            "relation_id": "P30",
            "target_new": {"str": "Europe", "id": "Q46"},
            "target_true": {"str": "Asia", "id": "Q48"},
            "subject": "Mount Fuji",
        },
        "paraphrase_prompts": ["Mount Fuji belongs to the continent of"],
        "neighborhood_prompts": ["Mount Everest is located in the continent of"],
        "attribute_prompts": [],
        "generation_prompts": [],
    },
]

SIMPLIFIED = [
    {"case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda", "ground_truth": "guitar",
     "rephrase_prompt": "Toko Yasuda is incredible at", "locality_prompt": "John Lennon performs on the",
     "locality_ground_truth": "guitar"},
    {"case_id": 3, "prompt": "Autonomous University of Madrid, which is located in", "target_new": "Sweden",
     "subject": "Autonomous University of Madrid", "ground_truth": "Spain",
     "rephrase_prompt": "Autonomous University of Madrid is located in", "locality_prompt": "Biure, which is located in",
     "locality_ground_truth": "Spain"},
]

ZSRE = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
     "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
     "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak",
     "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?"},
    {"subject": "Jenna Carroll", "src": "Which was the gender of Jenna Carroll?", "pred": "female",
     "rephrase": "The gender of Jenna Carroll is what?", "alt": "", "answers": ["female"],
     "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers", "cond": "female >>  || x"},
    {"subject": "Delta Serpentis", "src": "What is the constellation of Delta Serpentis?", "pred": "Serpens",
     "rephrase": "Delta Serpentis belongs to which constellation?", "alt": "Virgo", "answers": ["Serpens"],
     "loc": "nq question: subjects transferred from state list to concurrent list", "loc_ans": "Education",
     "cond": "Serpens >> Virgo || ..."},
]


def write(tmp_path: Path, name: str, obj: Any) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


# ----------------------------------------------------------------------------- CounterFact


def test_original_form_loads_every_field(tmp_path: Path) -> None:
    cases = load_counterfact(write(tmp_path, "counterfact.json", ORIGINAL))
    assert [c.case_id for c in cases] == [0, 7]
    c = cases[0]
    assert isinstance(c, CounterFactCase)
    assert c.requested_rewrite == {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                   "target_new": "English", "target_true": "French", "case_id": 0}
    assert c.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert c.paraphrase_prompts == tuple(ORIGINAL[0]["paraphrase_prompts"])
    assert c.neighborhood_prompts == tuple(ORIGINAL[0]["neighborhood_prompts"])
    assert c.generation_prompts == tuple(ORIGINAL[0]["generation_prompts"])
    assert c.attribute_prompts == tuple(ORIGINAL[0]["attribute_prompts"])
    assert c.neighborhood_target == "French"  # neighbours' answer is the edit's true object
    assert (c.relation_id, c.target_new_id, c.target_true_id) == ("P103", "Q1860", "Q150")
    assert cases[1].generation_prompts == ()


def test_requested_rewrite_is_a_fresh_dict_each_time(tmp_path: Path) -> None:
    c = load_counterfact(write(tmp_path, "cf.json", ORIGINAL))[0]
    c.requested_rewrite["target_new"] = "changed"
    assert c.requested_rewrite["target_new"] == "English"


def test_simplified_form_loads_into_the_same_record(tmp_path: Path) -> None:
    cases = load_counterfact(write(tmp_path, "cf.json", SIMPLIFIED))
    c = cases[1]
    assert c.case_id == 3
    assert c.prompt == "{}, which is located in"
    assert c.rewrite_prompt == SIMPLIFIED[1]["prompt"]
    assert (c.target_new, c.target_true, c.neighborhood_target) == ("Sweden", "Spain", "Spain")
    assert c.paraphrase_prompts == ("Autonomous University of Madrid is located in",)
    assert c.neighborhood_prompts == ("Biure, which is located in",)
    assert c.generation_prompts == () and c.relation_id is None


def test_simplified_form_keeps_a_neighbour_answer_that_differs_from_ground_truth(tmp_path: Path) -> None:
    rec = dict(SIMPLIFIED[0], locality_ground_truth="violin")
    c = load_counterfact(write(tmp_path, "cf.json", [rec]))[0]
    assert (c.target_true, c.neighborhood_target) == ("guitar", "violin")


def test_shared_counterfact_train_loads_with_limit(data_dir: Path) -> None:
    cases = load_counterfact(data_dir / "counterfact-train.json", dataset_size_limit=5)
    assert len(cases) == 5
    assert cases[0].case_id == 2 and cases[0].prompt == "{}, the" and cases[0].target_new == "piano"
    assert all(c.rewrite_prompt.startswith(c.subject) or c.subject in c.rewrite_prompt for c in cases)


def test_mcf_is_loaded_like_the_original_form(tmp_path: Path) -> None:
    path = write(tmp_path, "multi_counterfact.json", ORIGINAL)
    assert load_dataset("mcf", path) == load_counterfact(path)


def test_dataset_size_limit_keeps_the_first_records_and_rejects_negatives(tmp_path: Path) -> None:
    path = write(tmp_path, "cf.json", ORIGINAL)
    assert [c.case_id for c in load_counterfact(path, dataset_size_limit=1)] == [0]
    assert load_counterfact(path, dataset_size_limit=0) == []
    with pytest.raises(ValueError, match="dataset_size_limit"):
        load_counterfact(path, dataset_size_limit=-1)


def _broken(mutate: Any) -> list[dict[str, Any]]:
    recs = copy.deepcopy(ORIGINAL)
    mutate(recs[1])
    return recs


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["requested_rewrite"].pop("target_new"), "requested_rewrite.target_new"),
        (lambda r: r["requested_rewrite"]["target_true"].pop("str"), "requested_rewrite.target_true.str"),
        (lambda r: r["requested_rewrite"].update(prompt="no placeholder"), "requested_rewrite.prompt"),
        (lambda r: r["requested_rewrite"].update(subject=""), "requested_rewrite.subject"),
        (lambda r: r.update(paraphrase_prompts="one string"), "paraphrase_prompts"),
        (lambda r: r.update(neighborhood_prompts=["ok", 3]), "neighborhood_prompts[1]"),
        (lambda r: r.pop("neighborhood_prompts"), "neighborhood_prompts"),
        (lambda r: r.update(case_id="7"), "case_id"),
        (lambda r: r.update(case_id=0), "case_id"),  # duplicate
    ],
)
def test_malformed_original_record_error_names_record_and_field(tmp_path: Path, mutate: Any, field: str) -> None:
    path = write(tmp_path, "cf.json", _broken(mutate))
    with pytest.raises(DatasetError) as e:
        load_counterfact(path)
    msg = str(e.value)
    assert "record 1" in msg and f"field {field!r}" in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, FastMemitError)


def test_malformed_simplified_record_error_names_case_id_and_field(tmp_path: Path) -> None:
    recs = copy.deepcopy(SIMPLIFIED)
    recs[1]["prompt"] = "A university located in"  # subject missing
    with pytest.raises(DatasetError, match=r"record 1 \(case_id 3\), field 'prompt': subject"):
        load_counterfact(write(tmp_path, "cf.json", recs))
    recs = copy.deepcopy(SIMPLIFIED)
    del recs[0]["locality_ground_truth"]
    with pytest.raises(DatasetError, match=r"record 0 \(case_id 2\), field 'locality_ground_truth': missing"):
        load_counterfact(write(tmp_path, "cf.json", recs))


def test_unreadable_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_counterfact(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="invalid JSON"):
        load_counterfact(tmp_path / "bad.json")
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_counterfact(write(tmp_path, "obj.json", {"a": 1}))
    with pytest.raises(DatasetError, match="record 0: expected a JSON object"):
        load_counterfact(write(tmp_path, "list.json", [[1, 2]]))


# ----------------------------------------------------------------------------- zsRE


def test_zsre_loads_with_index_case_ids_and_skips_empty_alt(tmp_path: Path) -> None:
    cases = load_zsre(write(tmp_path, "zsre.json", ZSRE), convention="alt")  # the seed's default: tests/test_seed_zsre.py
    assert [c.case_id for c in cases] == [0, 2]  # record 1 has an empty alt
    c = cases[0]
    assert isinstance(c, ZsreCase)
    assert (c.src, c.rephrase, c.alt, c.answers, c.loc, c.loc_ans, c.pred) == (
        ZSRE[0]["src"], ZSRE[0]["rephrase"], "unmanned aircraft", ("uniform",), ZSRE[0]["loc"], "Walter Sobchak", "uniform")
    assert c.requested_rewrite == {"prompt": "What is the product made by {}?", "subject": "UniFirst",
                                   "target_new": "unmanned aircraft", "target_true": "uniform", "case_id": 0}


def test_zsre_empty_alt_is_an_error_when_not_skipped(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"record 1, field 'alt': empty"):
        load_zsre(write(tmp_path, "zsre.json", ZSRE), skip_empty_alt=False, convention="alt")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.pop("loc_ans"), "loc_ans"),
        (lambda r: r.update(answers=[]), "answers"),
        (lambda r: r.update(answers=["ok", None]), "answers[1]"),
        (lambda r: r.update(rephrase=5), "rephrase"),
    ],
)
def test_malformed_zsre_record_error_names_record_and_field(tmp_path: Path, mutate: Any, field: str) -> None:
    recs = copy.deepcopy(ZSRE)
    mutate(recs[2])
    with pytest.raises(DatasetError) as e:
        load_zsre(write(tmp_path, "zsre.json", recs))
    assert "record 2" in str(e.value) and f"field {field!r}" in str(e.value)


def test_shared_zsre_file_loads(data_dir: Path) -> None:
    cases = load_zsre(data_dir / "zsre-1k.json", convention="alt")
    assert len(cases) == 998  # records 534 and 723 have an empty alt
    assert cases[0].case_id == 0 and cases[-1].case_id == 999
    assert all(c.subject in c.src for c in cases)
    assert load_dataset("zsre", data_dir / "zsre-1k.json", dataset_size_limit=10, zsre_convention="alt") == cases[:10]
    assert len(load_zsre(data_dir / "zsre-1k.json")) == 1000  # the seed's convention edits towards answers[0]: all kept


# ----------------------------------------------------------------------------- seed orderings


def test_order_cases_keeps_present_ids_in_ordering_order(tmp_path: Path) -> None:
    cases = load_counterfact(write(tmp_path, "cf.json", SIMPLIFIED + [dict(SIMPLIFIED[0], case_id=9)]))
    seeds = write(tmp_path, "seeds.json", {"0": [9, 100, 3, 2, 3], "1": [2]})
    ordering = load_seed_ordering(seeds, sample_num=0)
    assert ordering == [9, 100, 3, 2, 3]
    assert [c.case_id for c in order_cases(cases, ordering)] == [9, 3, 2]
    assert [c.case_id for c in order_cases(cases, ordering, limit=2)] == [9, 3]
    assert [c.case_id for c in order_cases(cases, load_seed_ordering(seeds, 1))] == [2]
    with pytest.raises(DatasetError, match="no ordering '5'"):
        load_seed_ordering(seeds, sample_num=5)
    with pytest.raises(DatasetError, match="integer case ids"):
        load_seed_ordering(write(tmp_path, "bad.json", {"0": ["a"]}))


def test_shared_seed_ordering_against_the_smaller_counterfact_file(data_dir: Path) -> None:
    cases = load_counterfact(data_dir / "counterfact-train.json")
    ordering = load_seed_ordering(data_dir / "seed-samples" / "counterfact_sampled_unique_cf_10_20000.json", 3)
    ordered = order_cases(cases, ordering)
    ids = {c.case_id for c in cases}
    expected = [i for i in ordering if i in ids]
    assert [c.case_id for c in ordered] == expected
    assert 0 < len(ordered) <= len(cases)


def test_shared_zsre_seed_ordering_uses_file_indices(data_dir: Path) -> None:
    cases = load_zsre(data_dir / "zsre-1k.json", convention="alt")
    ordering = load_seed_ordering(data_dir / "seed-samples" / "zsre_sampled_unique_10_10000.json", 0)
    ordered = order_cases(cases, ordering)
    assert ordered and all(c.case_id < 1000 for c in ordered)
    assert [c.case_id for c in ordered] == [i for i in ordering if i < 1000 and i not in (534, 723)]


# ----------------------------------------------------------------------------- consistency tables


def test_tfidf_tables_and_snippets_load(tmp_path: Path) -> None:
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 3.0]))
    write(tmp_path, "vocab.json", {"paris": 0, "france": 1, "london": 2})
    table = load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")
    assert table.vocab["london"] == 2 and table.idf.tolist() == [1.0, 2.0, 3.0]
    snips = load_attribute_snippets(write(tmp_path, "snips.json", [
        {"relation_id": "P103", "target_id": "Q1860", "samples": [{"name": "X", "text": "English text"}]},
    ]))
    assert snips[("P103", "Q1860")] == [{"name": "X", "text": "English text"}]


def test_idf_needing_pickle_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "idf.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    write(tmp_path, "vocab.json", {"a": 0})
    with pytest.raises(DatasetError, match="plain numpy array"):
        load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")


def test_tfidf_vocab_pointing_outside_idf_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "idf.npy", np.array([1.0]))
    write(tmp_path, "vocab.json", {"a": 0, "b": 4})
    with pytest.raises(DatasetError, match="outside the idf array"):
        load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")


# ----------------------------------------------------------------------------- download


def test_download_offline_gives_a_clear_error_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "BASE_URL", "http://127.0.0.1:9/")  # nothing listens on the discard port
    with pytest.raises(DatasetError, match=r"could not download http://127.0.0.1:9/counterfact.json .*pass its path"):
        download_dataset("counterfact", tmp_path, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_download_reuses_a_cached_file_and_rejects_unknown_names(tmp_path: Path) -> None:
    cached = write(tmp_path, "zsre_mend_eval.json", ZSRE)
    assert download_dataset("zsre", tmp_path) == cached  # no network needed
    with pytest.raises(DatasetError, match="unknown dataset"):
        download_dataset("wikitext", tmp_path)


def test_load_dataset_without_path_reads_the_cache_or_explains(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="download=True"):
        load_dataset("counterfact", cache_dir=tmp_path)
    write(tmp_path, "counterfact.json", ORIGINAL)
    assert [c.case_id for c in load_dataset("counterfact", cache_dir=tmp_path)] == [0, 7]
    with pytest.raises(DatasetError, match="unknown evaluation dataset"):
        load_dataset("idf", cache_dir=tmp_path)
