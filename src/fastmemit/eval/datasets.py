"""Evaluation datasets: CounterFact (two forms), multi-CounterFact, zsRE, seed orderings, downloads.

Every loader reads a JSON file a user names and returns typed, immutable records; a malformed
record raises :class:`DatasetError` naming the record (index and ``case_id``) and the field.

- **CounterFact, original form** (ROME's ``counterfact.json``; ``multi_counterfact.json`` is the
  same format): ``case_id``, ``requested_rewrite {prompt with "{}", subject, target_new {str},
  target_true {str}, relation_id}``, ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``generation_prompts``, ``attribute_prompts``.
- **CounterFact, simplified form** (one paraphrase, one neighbour): ``case_id, prompt`` (subject
  written literally), ``subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth``. Its neighbour prompt's answer ``locality_ground_truth`` is, in CounterFact,
  the edit's ``target_true`` (neighbours share the relation and the true object); a record where the
  two differ is accepted and the neighbour keeps its own answer (:attr:`CounterFactCase.neighborhood_target`).
- **zsRE, MEND form** (``zsre_mend_eval.json``): ``subject, src, pred, rephrase, alt, answers, loc,
  loc_ans, cond``; records carry no id, so ``case_id`` is the record's index in the file (what the
  research code and the seed orderings use). What is edited and scored depends on the convention
  (:data:`ZSRE_CONVENTIONS`): the seed's by default (edit ``src`` towards ``answers[0]``, neighbour
  prompt ``loc`` without its ``"nq question:"`` prefix, plus ``"?"``).

Seed orderings (``{"0": [case_id, ...], ..., "9": [...]}``) refer to the full datasets' ids: against a
smaller file :func:`order_cases` keeps the ids present, in the ordering's order.

Nothing here touches the network except :func:`download_dataset`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastmemit.errors import DatasetError
from fastmemit.utils import atomic_path, cache_dir, logger, read_json

BASE_URL = "https://memit.baulab.info/data/dsets/"

# zsRE conventions: name -> (edit target, neighbour prompt), see ZsreCase.
ZSRE_CONVENTIONS: dict[str, str] = {
    "seed": "target answers[0]; neighbour prompt loc without 'nq question:', plus '?' (efficient-/unified-model-editing)",
    "memit": "target answers[0]; neighbour prompt loc + '?' (kmeng01 ROME/MEMIT)",
    "alt": "target alt (EasyEdit's choice); neighbour prompt loc + '?' (fastmemit 0.1)",
}
NQ_PREFIX = "nq question:"



@dataclass(frozen=True)
class EvalDataset:
    """An evaluation dataset's files: the published data file and the seed's ordering file."""

    loader: str  # what load_dataset reads it as: counterfact, mcf or zsre
    file: str  # the published file (BASE_URL + file)
    ordering: str  # the seed-ordering file of --sample_num


_CF = EvalDataset("counterfact", "counterfact.json", "counterfact_sampled_unique_cf_10_20000.json")
_MCF = EvalDataset("mcf", "multi_counterfact.json", "counterfact_sampled_unique_mcf_10_20000.json")

# The one table of evaluation datasets, by every short name a run or loader accepts.
EVAL_DATASETS: dict[str, EvalDataset] = {
    "cf": _CF,
    "counterfact": _CF,
    "mcf": _MCF,
    "multi_counterfact": _MCF,
    "zsre": EvalDataset("zsre", "zsre_mend_eval.json", "zsre_sampled_unique_10_10000.json"),
}

# Short names accepted by download_dataset, mapped to the published file names.
DATASET_FILES: dict[str, str] = {
    **{name: d.file for name, d in EVAL_DATASETS.items()},
    "attribute_snippets": "attribute_snippets.json",
    "idf": "idf.npy",
    "tfidf_vocab": "tfidf_vocab.json",
    "known_1000": "known_1000.json",
}


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact edit and the prompts that evaluate it.

    ``prompt`` holds ``{}`` where the subject goes. ``neighborhood_target`` is the correct answer of
    the neighbour prompts (equal to ``target_true`` in CounterFact; the simplified form states it).
    """

    case_id: int
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    neighborhood_target: str = ""
    relation_id: str | None = None
    target_new_id: str | None = None  # Wikidata id of target_new: keys the attribute snippets
    target_true_id: str | None = None

    def __post_init__(self) -> None:
        if not self.neighborhood_target:
            object.__setattr__(self, "neighborhood_target", self.target_true)

    @property
    def requested_rewrite(self) -> dict[str, Any]:
        """A fresh ``fastmemit.EditRequest``-compatible dict ``{prompt, subject, target_new, target_true}``."""
        return {"prompt": self.prompt, "subject": self.subject, "target_new": self.target_new,
                "target_true": self.target_true, "case_id": self.case_id}

    @property
    def rewrite_prompt(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)


@dataclass(frozen=True)
class ZsreCase:
    """One zsRE question-answering edit (MEND split): make ``src`` answer :attr:`target_new`.

    ``convention`` (:data:`ZSRE_CONVENTIONS`) decides the target (``answers[0]`` as the seed and
    ROME/MEMIT, or ``alt`` as EasyEdit) and the neighbour prompt (:attr:`neighborhood_prompt`).
    """

    case_id: int
    subject: str
    src: str
    rephrase: str
    alt: str
    answers: tuple[str, ...]
    loc: str
    loc_ans: str
    pred: str | None = None
    cond: str | None = None
    convention: str = "seed"

    def __post_init__(self) -> None:
        if self.convention not in ZSRE_CONVENTIONS:
            raise DatasetError(f"zsRE convention must be one of {', '.join(ZSRE_CONVENTIONS)}, got {self.convention!r}")

    @property
    def target_new(self) -> str:
        """What the edit writes and efficacy/generalization score: ``alt`` (convention ``alt``), else ``answers[0]``."""
        return self.alt if self.convention == "alt" else self.answers[0]

    @property
    def neighborhood_prompt(self) -> str:
        """The neighbour question whose answer ``loc_ans`` must survive the edit (``loc`` lacks its '?')."""
        if self.convention == "seed" and self.loc.startswith(NQ_PREFIX):
            return self.loc[len(NQ_PREFIX):].strip() + "?"
        return self.loc + "?"

    @property
    def requested_rewrite(self) -> dict[str, Any]:
        """A fresh ``EditRequest``-compatible dict; ``target_true`` is ``answers[0]`` when the target is ``alt``
        (None otherwise: the research code's placeholder ``<|endoftext|>`` is no answer)."""
        i = self.src.find(self.subject)
        prompt = self.src[:i] + "{}" + self.src[i + len(self.subject):] if i >= 0 else self.src
        true = self.answers[0] if self.convention == "alt" and self.answers else None
        return {"prompt": prompt, "subject": self.subject, "target_new": self.target_new, "target_true": true,
                "case_id": self.case_id}


# ----------------------------------------------------------------------------- field checks


class _Record:
    """Field access on one raw record that raises errors naming the record and the field."""

    def __init__(self, raw: Any, index: int, source: str) -> None:
        self.index = index
        self.source = source
        self.case_id = raw.get("case_id") if isinstance(raw, Mapping) else None
        if not isinstance(raw, Mapping):
            raise self.error("", f"expected a JSON object, got {type(raw).__name__}")
        self.raw = raw

    def error(self, field: str, problem: str) -> DatasetError:
        where = f"record {self.index}" + (f" (case_id {self.case_id!r})" if self.case_id is not None else "")
        what = f", field {field!r}" if field else ""
        return DatasetError(f"{self.source}: {where}{what}: {problem}")

    def get(self, mapping: Any, key: str, field: str) -> Any:
        if not isinstance(mapping, Mapping) or key not in mapping:
            raise self.error(field, "missing")
        return mapping[key]

    def string(self, value: Any, field: str, *, nonempty: bool = True) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        if nonempty and not value.strip():
            raise self.error(field, "empty string")
        return value

    def str_field(self, key: str, *, nonempty: bool = True) -> str:
        return self.string(self.get(self.raw, key, key), key, nonempty=nonempty)

    def target(self, rewrite: Mapping[str, Any], key: str) -> tuple[str, str | None]:
        """A CounterFact target: ``{"str": ..., "id": ...}`` (or a bare string)."""
        field = f"requested_rewrite.{key}"
        value = self.get(rewrite, key, field)
        if isinstance(value, Mapping):
            text = self.string(self.get(value, "str", f"{field}.str"), f"{field}.str")
            tid = value.get("id")
            return text, (str(tid) if tid is not None else None)
        return self.string(value, field), None

    def str_list(self, key: str, *, required: bool) -> tuple[str, ...]:
        if key not in self.raw:
            if required:
                raise self.error(key, "missing")
            return ()
        value = self.raw[key]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {type(value).__name__}")
        for j, item in enumerate(value):
            self.string(item, f"{key}[{j}]")
        return tuple(value)

    def int_case_id(self, default: int) -> int:
        if "case_id" not in self.raw:
            return default
        cid = self.raw["case_id"]
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise self.error("case_id", f"expected an integer, got {cid!r}")
        return cid


# ----------------------------------------------------------------------------- loaders


def _read_json_list(path: str | os.PathLike[str]) -> tuple[list[Any], str]:
    p = Path(path)
    data = read_json(p, "dataset file", DatasetError)
    if not isinstance(data, list):
        raise DatasetError(f"{p.name}: expected a JSON list of records, got {type(data).__name__}")
    return data, p.name


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"dataset_size_limit must be a non-negative integer or None, got {limit!r}")


def _counterfact_original(rec: _Record) -> CounterFactCase:
    rw = rec.get(rec.raw, "requested_rewrite", "requested_rewrite")
    if not isinstance(rw, Mapping):
        raise rec.error("requested_rewrite", f"expected an object, got {type(rw).__name__}")
    subject = rec.string(rec.get(rw, "subject", "requested_rewrite.subject"), "requested_rewrite.subject")
    prompt = rec.string(rec.get(rw, "prompt", "requested_rewrite.prompt"), "requested_rewrite.prompt")
    if prompt.count("{}") != 1:
        raise rec.error("requested_rewrite.prompt", f"must contain '{{}}' exactly once where the subject goes: {prompt!r}")
    new, new_id = rec.target(rw, "target_new")
    true, true_id = rec.target(rw, "target_true")
    rel = rw.get("relation_id")
    return CounterFactCase(
        case_id=rec.int_case_id(rec.index),
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=rec.str_list("paraphrase_prompts", required=True),
        neighborhood_prompts=rec.str_list("neighborhood_prompts", required=True),
        generation_prompts=rec.str_list("generation_prompts", required=False),
        attribute_prompts=rec.str_list("attribute_prompts", required=False),
        relation_id=str(rel) if rel is not None else None,
        target_new_id=new_id,
        target_true_id=true_id,
    )


def _counterfact_simplified(rec: _Record) -> CounterFactCase:
    subject = rec.str_field("subject")
    prompt = rec.str_field("prompt")
    if "{}" in prompt:
        template = prompt
    elif subject in prompt:
        i = prompt.index(subject)  # the first occurrence, as EditRequest.template does
        template = prompt[:i] + "{}" + prompt[i + len(subject):]
    else:
        raise rec.error("prompt", f"subject {subject!r} not found in prompt {prompt!r}")
    true = rec.str_field("ground_truth")
    return CounterFactCase(
        case_id=rec.int_case_id(rec.index),
        prompt=template,
        subject=subject,
        target_new=rec.str_field("target_new"),
        target_true=true,
        paraphrase_prompts=(rec.str_field("rephrase_prompt"),),
        neighborhood_prompts=(rec.str_field("locality_prompt"),),
        neighborhood_target=rec.str_field("locality_ground_truth"),
    )


def load_counterfact(
    path: str | os.PathLike[str], *, dataset_size_limit: int | None = None
) -> list[CounterFactCase]:
    """Load CounterFact or multi-CounterFact, original or simplified form (detected per record).

    ``dataset_size_limit`` keeps the first N records of the file (``None``: all).
    """
    _check_limit(dataset_size_limit)
    raw, name = _read_json_list(path)
    if dataset_size_limit is not None:
        raw = raw[:dataset_size_limit]
    cases = []
    seen: dict[int, int] = {}
    for i, r in enumerate(raw):
        rec = _Record(r, i, name)
        case = _counterfact_original(rec) if "requested_rewrite" in rec.raw else _counterfact_simplified(rec)
        if case.case_id in seen:
            raise rec.error("case_id", f"duplicate of record {seen[case.case_id]}")
        seen[case.case_id] = i
        cases.append(case)
    return cases


def load_zsre(
    path: str | os.PathLike[str], *, dataset_size_limit: int | None = None, skip_empty_alt: bool = True,
    convention: str = "seed",
) -> list[ZsreCase]:
    """Load zsRE in the MEND form; ``case_id`` is the record's index in the file.

    ``convention`` (:data:`ZSRE_CONVENTIONS`) sets what the cases edit and score. With ``"alt"``,
    records whose new answer ``alt`` is empty (2 of the first 1,000 in the MEND split) have no
    target to edit towards: they are skipped with a warning (``skip_empty_alt=False``: an error); the
    other conventions edit towards ``answers[0]`` and keep them, as the research code does.
    ``dataset_size_limit`` keeps the first N records of the file, before skipping.
    """
    if convention not in ZSRE_CONVENTIONS:
        raise DatasetError(f"zsRE convention must be one of {', '.join(ZSRE_CONVENTIONS)}, got {convention!r}")
    _check_limit(dataset_size_limit)
    raw, name = _read_json_list(path)
    if dataset_size_limit is not None:
        raw = raw[:dataset_size_limit]
    cases = []
    skipped = []
    for i, r in enumerate(raw):
        rec = _Record(r, i, name)
        alt = rec.str_field("alt", nonempty=False)
        if not alt.strip() and convention == "alt":
            if not skip_empty_alt:
                raise rec.error("alt", "empty string")
            skipped.append(i)
            continue
        answers = rec.get(rec.raw, "answers", "answers")
        if not isinstance(answers, list) or not answers:
            raise rec.error("answers", f"expected a non-empty list of strings, got {answers!r:.80}")
        for j, a in enumerate(answers):
            rec.string(a, f"answers[{j}]")
        loc = rec.str_field("loc")
        pred = rec.raw.get("pred")
        cond = rec.raw.get("cond")
        cases.append(ZsreCase(
            case_id=i,
            subject=rec.str_field("subject"),
            src=rec.str_field("src"),
            rephrase=rec.str_field("rephrase"),
            alt=alt,
            answers=tuple(answers),
            loc=loc,
            loc_ans=rec.str_field("loc_ans"),
            pred=pred if isinstance(pred, str) else None,
            cond=cond if isinstance(cond, str) else None,
            convention=convention,
        ))
    if skipped:
        logger.warning("%s: skipped %d record(s) with an empty 'alt' (indices %s)", name, len(skipped),
                       ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else ""))
    return cases


# ----------------------------------------------------------------------------- orderings

_C = TypeVar("_C", CounterFactCase, ZsreCase)


def load_seed_ordering(path: str | os.PathLike[str], sample_num: int = 0) -> list[int]:
    """Ordering ``sample_num`` of a seed-sample file ``{"0": [case_id, ...], ...}``."""
    p = Path(path)
    data = read_json(p, "seed-sample file", DatasetError)
    if not isinstance(data, Mapping):
        raise DatasetError(f"{p.name}: expected an object {{\"0\": [case ids], ...}}, got {type(data).__name__}")
    key = str(sample_num)
    if key not in data:
        raise DatasetError(f"{p.name}: no ordering {key!r} (--sample_num {key}); it has {', '.join(sorted(data, key=str))}: "
                           "pass one of them, or --sample_num none for the dataset file's own order")
    ids = data[key]
    if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        raise DatasetError(f"{p.name}: ordering {key!r} must be a list of integer case ids")
    return list(ids)


def order_cases(cases: Sequence[_C], ordering: Sequence[int], *, limit: int | None = None) -> list[_C]:
    """The cases whose ids appear in ``ordering``, in that order (ids absent from ``cases`` are skipped).

    ``limit`` keeps the first N after ordering.
    """
    _check_limit(limit)
    by_id = {c.case_id: c for c in cases}
    out = []
    seen: set[int] = set()
    for cid in ordering:
        if cid in by_id and cid not in seen:
            seen.add(cid)
            out.append(by_id[cid])
            if limit is not None and len(out) >= limit:
                break
    return out


# ----------------------------------------------------------------------------- consistency data


def load_attribute_snippets(path: str | os.PathLike[str]) -> dict[tuple[str, str], list[dict[str, str]]]:
    """``attribute_snippets.json`` as ``{(relation_id, target_id): [{"name", "text"}, ...]}``."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"attribute snippets file {str(p)!r} does not exist")
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise DatasetError(f"{p.name}: expected a JSON list, got {type(data).__name__}")
    out: dict[tuple[str, str], list[dict[str, str]]] = {}
    for i, r in enumerate(data):
        rec = _Record(r, i, p.name)
        rel = str(rec.get(r, "relation_id", "relation_id"))
        tid = str(rec.get(r, "target_id", "target_id"))
        samples = rec.get(r, "samples", "samples")
        if not isinstance(samples, list):
            raise rec.error("samples", "expected a list of {name, text} objects")
        out.setdefault((rel, tid), []).extend(
            {"name": str(s.get("name", "")), "text": rec.string(rec.get(s, "text", f"samples[{j}].text"), f"samples[{j}].text")}
            for j, s in enumerate(samples)
        )
    return out


@dataclass(frozen=True)
class TfidfTable:
    """The published tf-idf vocabulary (term → column) and idf weights (one per column)."""

    vocab: dict[str, int]
    idf: Any  # numpy float array, (V,)


def load_tfidf(idf_path: str | os.PathLike[str], vocab_path: str | os.PathLike[str]) -> TfidfTable:
    """Load ``idf.npy`` (a plain array: ``allow_pickle=False``) and ``tfidf_vocab.json``."""
    import numpy as np

    for p in (idf_path, vocab_path):
        if not Path(p).is_file():
            raise DatasetError(f"tf-idf file {str(p)!r} does not exist")
    try:
        idf = np.load(idf_path, allow_pickle=False)
    except ValueError as e:
        raise DatasetError(f"{idf_path}: not a plain numpy array ({e})") from e
    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    if not isinstance(vocab, Mapping) or idf.ndim != 1:
        raise DatasetError("tf-idf tables: expected a {term: column} object and a 1-D idf array")
    bad = [t for t, j in vocab.items() if not isinstance(j, int) or not 0 <= j < idf.shape[0]]
    if bad:
        raise DatasetError(f"{vocab_path}: {len(bad)} term(s) point outside the idf array of length {idf.shape[0]}, e.g. {bad[0]!r}")
    return TfidfTable(vocab=dict(vocab), idf=idf.astype("float64"))


# ----------------------------------------------------------------------------- download / dispatch


def _file_name(name: str) -> str:
    if name in DATASET_FILES:
        return DATASET_FILES[name]
    if name in DATASET_FILES.values():
        return name
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASET_FILES))}")


def default_data_dir() -> Path:
    """Where downloaded datasets go: ``<fastmemit cache>/data``."""
    return cache_dir() / "data"


def download_dataset(
    name: str, cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False, timeout: float = 60.0
) -> Path:
    """Fetch a published dataset file from ``BASE_URL`` into ``cache_dir`` (atomically); return its path.

    ``name`` is a short name (``counterfact``, ``mcf``, ``zsre``, ``attribute_snippets``, ``idf``,
    ``tfidf_vocab``) or the file name. An existing file is reused unless ``force``.
    """
    fname = _file_name(name)
    folder = Path(cache_dir) if cache_dir is not None else default_data_dir()
    target = folder / fname
    if target.is_file() and not force:
        return target
    url = BASE_URL + fname
    logger.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(target) as tmp:
            with open(tmp, "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DatasetError(
            f"could not download {url} ({e.__class__.__name__}: {e}); if offline, fetch the file "
            f"elsewhere and put it at {target}, or pass its path to the loader"
        ) from e
    if fname.endswith(".json"):
        try:
            json.loads(target.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            target.unlink()
            raise DatasetError(f"downloaded {url} is not valid JSON ({e}); removed it") from e
    return target


def load_dataset(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    dataset_size_limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    zsre_convention: str = "seed",
) -> list[CounterFactCase] | list[ZsreCase]:
    """Load ``counterfact``/``cf``, ``mcf`` or ``zsre`` from ``path``, or from the download cache.

    Without ``path`` the published file is looked up in ``cache_dir`` (default
    :func:`default_data_dir`) and fetched only when ``download=True`` (the evaluation runs' default).
    ``zsre_convention``: see :func:`load_zsre`.
    """
    if name not in EVAL_DATASETS:
        raise DatasetError(f"unknown evaluation dataset {name!r}; use counterfact, mcf or zsre")
    if path is None:
        folder = Path(cache_dir) if cache_dir is not None else default_data_dir()
        path = folder / _file_name(name)
        if not Path(path).is_file():
            if not download:
                raise DatasetError(f"{path} not found: pass the dataset's path, or download=True to fetch {BASE_URL}{_file_name(name)}")
            path = download_dataset(name, folder)
    if name == "zsre":
        return load_zsre(path, dataset_size_limit=dataset_size_limit, convention=zsre_convention)
    return load_counterfact(path, dataset_size_limit=dataset_size_limit)
