"""eval/loop.py on a tiny random Llama: batched mode scores each batch on its edit and restores the
model exactly (also when the caller stops in the middle), sequential mode accumulates the edits
(each undoable, in reverse, exactly), per-batch seeds, and the same scores as a hand-written
edit → score → restore loop."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from fastmemit.editing import Editor
from fastmemit.eval import edit_batches
from fastmemit.eval.metrics import score_targets
from fastmemit.models.arch import mlp_down_weight
from fastmemit.models.fingerprint import model_fingerprint
from tests.helpers import RUN_HPARAMS, tiny_llm

HPARAMS = RUN_HPARAMS
SUBJECTS = ["Toko Yasuda", "Danielle Darrieux", "Edwin of Northumbria", "Apple A5", "Honda Civic"]
OBJECTS = ["piano", "guitar", "French", "English", "Paris"]
REQUESTS = [{"prompt": "{} plays the", "subject": s, "target_new": OBJECTS[i], "target_true": OBJECTS[(i + 2) % 5]}
            for i, s in enumerate(SUBJECTS)]
BATCHES = [REQUESTS[0:2], REQUESTS[2:4], REQUESTS[4:5]]


pytestmark = pytest.mark.usefixtures("private_cache")

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny matrices: one torch thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loop")




@pytest.fixture(scope="module")
def corpus(work, tokenizer) -> Path:
    rng = random.Random(0)
    path = work / "corpus.jsonl"
    with path.open("w") as f:
        for _ in range(60):  # random tokens: 2·d_k keys give a full-rank E[kkᵀ]
            f.write(json.dumps({"text": tokenizer.decode([rng.randrange(300, 30000) for _k in range(40)])}) + "\n")
    return path


def make_editor(model: torch.nn.Module, tok: Any, corpus: Path, work: Path, method: str = "EMMET") -> Editor:
    return Editor(model, tok, method, HPARAMS, corpus=corpus, stats_cache_dir=work / "stats", show_progress=False)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p.detach(), snap[n]) for n, p in model.named_parameters())


class Scorer:
    """NLL of each request's new target, and the model's fingerprint when it was scored."""

    def __init__(self, model: torch.nn.Module, tok: Any) -> None:
        self.model, self.tok = model, tok
        self.seen: list[str] = []
        self.seeds: list[int] = []

    def __call__(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.seen.append(model_fingerprint(self.model))
        self.seeds.append(torch.initial_seed())
        scores = score_targets(self.model, self.tok, [r["prompt"].format(r["subject"]) for r in reqs],
                               [r["target_new"] for r in reqs])
        return [{"nll": s.nll} for s in scores]


def test_batched_scores_each_edit_and_restores_the_model_exactly(tokenizer, corpus, work):
    model = tiny_llm("llama", len(tokenizer))
    before, fp0 = weights(model), model_fingerprint(model)
    score = Scorer(model, tokenizer)
    records = edit_batches(make_editor(model, tokenizer, corpus, work), BATCHES, score, request=lambda r: r,
                           sequential=False, seed=7)
    got = []
    with contextlib.closing(records):
        for rec in records:
            assert not same(model, before) and model_fingerprint(model) == score.seen[-1]  # edited while handed out
            got.append(rec)
    assert same(model, before), "batched loop left the model edited"
    assert [r.index for r in got] == [0, 1, 2] and [len(r.post) for r in got] == [2, 2, 1]
    assert all(fp != fp0 for fp in score.seen) and score.seeds == [7, 8, 9]
    assert all({"stats", "v", "solve", "edit", "eval"} <= r.timings.keys() for r in got)
    assert [r.cases for r in got] == BATCHES and all(r.result.requests for r in got)
    # the same scores as the loop the benchmarks used to write by hand, on an identical model
    other = tiny_llm("llama", len(tokenizer))
    editor, by_hand = make_editor(other, tokenizer, corpus, work), Scorer(other, tokenizer)
    for b, batch in enumerate(BATCHES):
        torch.manual_seed(7 + b)
        res = editor.edit(batch)
        assert by_hand(batch) == got[b].post
        res.restore()


def test_batched_loop_stopped_midway_restores_the_batch_in_hand(tokenizer, corpus, work):
    model = tiny_llm("llama", len(tokenizer))
    before = weights(model)
    records = edit_batches(make_editor(model, tokenizer, corpus, work), BATCHES, Scorer(model, tokenizer),
                           request=lambda r: r, sequential=False, start=1)
    with pytest.raises(KeyboardInterrupt), contextlib.closing(records):
        for rec in records:
            assert rec.index == 1 and not same(model, before)
            raise KeyboardInterrupt
    assert same(model, before)


def test_sequential_accumulates_and_each_batch_undoes_exactly_in_reverse(tokenizer, corpus, work):
    model = tiny_llm("llama", len(tokenizer))
    names = [mlp_down_weight(model, layer)[0] for layer in HPARAMS["layers"]]
    states = [weights(model)]
    records = edit_batches(make_editor(model, tokenizer, corpus, work, "AlphaEdit"), BATCHES,
                           Scorer(model, tokenizer), request=lambda r: r, sequential=True)
    results = []
    for rec in records:
        results.append(rec.result)
        states.append(weights(model))
    assert len(results) == 3
    for k in range(1, 4):  # every batch changed the edited matrices further, and only those
        changed = [n for n in states[k] if not torch.equal(states[k][n], states[k - 1][n])]
        assert changed == names
    assert same(model, states[-1]), "sequential loop did not keep the last edit"
    for k in range(3, 0, -1):
        results[k - 1].restore()
        assert same(model, states[k - 1])
