"""`fastmemit tune` on tiny models: the causal trace finds a planted layer, a tiny budget is kept and
still gives a loadable hparams file with provenance, the search validates on held-aside cases and
resumes from its log, and the command writes a file that `fastmemit edit --hparams` reads."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
import transformers as tf

import fastmemit
from fastmemit.cli import main
from fastmemit.editing import resolve_hparams
from fastmemit.eval.datasets import CounterFactCase, load_counterfact
from fastmemit.methods import get_method
from fastmemit.models.arch import get_arch, get_module, mlp_down_weight
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.tune import Budget, TrialRunner, TuneSettings, causal_trace, config_of, trace_facts, tune
from tests.helpers import tiny_config, tiny_llm

pytestmark = pytest.mark.usefixtures("one_thread_module")

# Subjects at the end of the prompt: the planted layer's MLP output at the subject's last token feeds
# the answer directly.
PLANTED_PROMPTS = [("The mother tongue of {}", "Danielle Darrieux"), ("We visited {}", "The Eiffel Tower"),
                   ("She listened to {}", "Toko Yasuda"), ("The capital of {}", "the United Kingdom"),
                   ("A letter by {}", "Albert Einstein"), ("The company of {}", "Steve Jobs")]
SMALL_HP = {"v_num_grad_steps": 3, "context_template_length_params": [[3, 1]], "stats_seq_len": 64,
            "stats_batch_size": 4, "dynamic": True, "dynamic_multiplier": 2}


def planted_model(tokenizer, layer: int, n_layers: int = 6) -> torch.nn.Module:
    """A seeded tiny GPT-2 whose MLPs are all zero but ``layer``'s (scaled up), and whose final norm
    is scaled so that its answers are confident: only that layer's MLP carries the subject."""
    cfg = tiny_config("gpt2", len(tokenizer))
    cfg.n_layer = n_layers
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for i in range(n_layers):
            mlp_down_weight(model, i)[1].mul_(20.0 if i == layer else 0.0)
        get_module(model, get_arch(model).final_norm).weight.mul_(30.0)
    return model


@pytest.mark.parametrize("layer", [1, 2, 3, 4])
def test_causal_trace_picks_the_layer_where_the_planted_effect_is(tokenizer, layer):
    model = planted_model(tokenizer, layer)
    cases = [CounterFactCase(i, p, s, "x", "y") for i, (p, s) in enumerate(PLANTED_PROMPTS)]
    facts = trace_facts(model, tokenizer, cases, 6)
    assert len(facts) == 6
    trace = causal_trace(model, tokenizer, facts, window=2, samples=2)
    assert trace.best_last() == layer and trace.layers() == [layer - 1, layer]
    assert trace.mlp[layer] > 0
    # windows without the planted layer restore zeros with zeros: no effect at all
    assert all(trace.mlp[e] == 0.0 for e in range(6) if layer not in (e - 1, e))
    # the block output of the last layer at the last token (the subject's) is the whole clean state
    assert trace.hidden[-1] == pytest.approx(trace.clean - trace.corrupted, abs=1e-6)


def test_trace_facts_takes_known_facts_only_and_never_ends_at_the_final_layer(tokenizer):
    model = planted_model(tokenizer, 2)
    cases = [CounterFactCase(i, p, s, "x", "y") for i, (p, s) in enumerate(PLANTED_PROMPTS)]
    guessed = trace_facts(model, tokenizer, cases, 6)
    assert not any(f.known for f in guessed)  # "y" is nobody's answer: the model's own top-1 is used
    answer = tokenizer.decode([guessed[3].target]).strip()
    cases[3] = CounterFactCase(3, cases[3].prompt, cases[3].subject, "x", answer)
    facts = trace_facts(model, tokenizer, cases, 2)
    assert [f.case_id for f in facts] == [3] and facts[0].known  # known facts only, once there is one
    trace = causal_trace(model, tokenizer, facts, window=2)
    trace.mlp = [0.0] * 5 + [1.0]  # the final layer's window is never chosen
    assert trace.best_last() < 5


# ----------------------------------------------------------------------------- tune on a tiny llama


def _cases_file(path, n: int = 40):
    rng = random.Random(0)
    names = ["Danielle Darrieux", "Toko Yasuda", "Albert Einstein", "Steve Jobs", "Marie Curie", "Ada Lovelace",
             "Pablo Picasso", "Isaac Newton", "Frida Kahlo", "Nikola Tesla"]
    places = ["France", "Japan", "Germany", "Canada", "Italy", "Spain", "Brazil", "India"]
    records = []
    for i in range(n):
        subject = f"{names[i % len(names)]} {i}"
        true, new = rng.sample(places, 2)
        records.append({"case_id": i, "prompt": f"{subject} was born in", "target_new": new, "subject": subject,
                        "ground_truth": true, "rephrase_prompt": f"The birthplace of {subject} is",
                        "locality_prompt": f"{names[(i + 3) % len(names)]} lived in", "locality_ground_truth": true})
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def tune_env(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("FASTMEMIT_CACHE", str(tmp_path / "user-cache"))
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": tokenizer.decode([rng.randrange(300, 30000) for _ in range(40)])}) + "\n"
                              for _ in range(40)))
    data = _cases_file(tmp_path / "cf.json")
    return {"corpus": str(corpus), "data": data, "cases": load_counterfact(data), "stats": tmp_path / "stats"}


def _tune(model, tokenizer, env, method="EMMET", *, budget_s=300.0, log=None, **settings):
    start = get_method(method).hparams_cls.from_dict({**SMALL_HP, "layers": [0, 1]})
    s = TuneSettings(budget_s=budget_s, **{"n_tune": 4, "n_held": 4, "n_trace": 3, "batch_size": 2, **settings})
    return tune(model, tokenizer, method, env["cases"], s, start=start, start_source="test", corpus=env["corpus"],
                stats_cache_dir=env["stats"], log=log, command="pytest", data_file=str(env["data"]))


def test_tune_respects_a_tiny_budget_and_writes_loadable_hparams_with_provenance(tokenizer, tune_env, tmp_path):
    model = tiny_llm("llama", len(tokenizer))
    fingerprint = model_fingerprint(model)
    t0 = time.monotonic()
    result = _tune(model, tokenizer, tune_env, budget_s=1e-3)
    assert time.monotonic() - t0 < 15.0  # the trace's first fact and the unedited scores, nothing more
    prov = result.provenance
    assert prov["trials"] == [] and prov["validation"] == [] and prov["budget"]["seconds"] == 1e-3
    assert {s["reason"] for s in prov["skipped"]} == {"budget"} and prov["skipped"][0]["stage"] == "trace"
    assert prov["chosen"]["layers"] == prov["trace"]["layers"]  # the trace's pick, untried
    path = result.save(tmp_path / "out" / "tuned.json")
    data = json.loads(path.read_text())
    hp = resolve_hparams(get_method("EMMET"), str(path), model)  # what --hparams does
    assert hp.layers == prov["chosen"]["layers"] and hp.v_num_grad_steps == 3
    t = data["_tune"]
    assert t["model"]["fingerprint"] == fingerprint and t["method"] == "EMMET" and t["command"] == "pytest"
    assert t["data"]["tune_case_ids"] == [0, 1, 2, 3] and t["data"]["held_aside_case_ids"] == [4, 5, 6, 7]
    assert len(t["data"]["trace_case_ids"]) >= 1 and t["start"] == "test"
    assert t["date"][:4].isdigit() and data["_method"] == "EMMET"


def test_a_trial_past_its_deadline_stops_after_one_batch_and_restores_the_model(tokenizer, tune_env):
    model = tiny_llm("llama", len(tokenizer))
    fingerprint = model_fingerprint(model)
    start = get_method("EMMET").hparams_cls.from_dict({**SMALL_HP, "layers": [0, 1]})
    runner = TrialRunner(model, tokenizer, "EMMET", start, {"tune": tune_env["cases"][:6]}, batch_size=2,
                         corpus=tune_env["corpus"], stats_cache_dir=tune_env["stats"])
    t = runner.run(config_of(start), "tune", "test", deadline=time.monotonic())
    assert t.status == "aborted" and t.scores["n_cases"] == 2  # one batch of 2, not 3 batches
    assert model_fingerprint(model) == fingerprint
    assert runner.estimate(config_of(start), "tune") is None  # an aborted trial teaches the cost model nothing


def test_tune_searches_validates_on_held_aside_cases_and_resumes_from_its_log(tokenizer, tune_env, tmp_path, monkeypatch):
    model = tiny_llm("llama", len(tokenizer))
    log = tmp_path / "log.json"
    result = _tune(model, tokenizer, tune_env, "MEMIT", log=log)
    prov = result.provenance
    stages = [t["stage"] for t in prov["trials"]]
    assert stages[0] == "trace" and "λ" in stages and "clamp" in stages
    assert all(t["cases"] == "tune" for t in prov["trials"])
    assert all(t["scores"]["n_cases"] == 4 for t in prov["trials"] if t["status"] == "done")
    # MEMIT does not read μ: one try leaves the deltas bit for bit the same, the other values are skipped
    assert [t["stage"] for t in prov["trials"]].count("μ") == 1
    assert {"stage": "μ", "field": "emmet_lambda", "reason": "the method does not read it"} in prov["skipped"]
    assert prov["validation"] and all(t["cases"] == "held" for t in prov["validation"])
    assert prov["chosen"] in [t["config"] for t in prov["validation"]]
    best_held = max(prov["validation"], key=lambda t: t["scores"]["score"])["scores"]["score"]
    assert next(t for t in prov["validation"] if t["config"] == prov["chosen"])["scores"]["score"] == best_held
    assert set(prov["unedited"]) == {"tune", "held"}
    # the test corpus is too short for 20 × d_k keys: that trial fails, is recorded, and the search goes on
    failed = [t for t in prov["trials"] if t["status"] != "done"]
    assert [t["config"]["dynamic_multiplier"] for t in failed] == [20.0] and "only" in failed[0]["status"]
    assert stages.index("v_lr") > stages.index("dynamic_multiplier")

    def no_editor(*a, **k):
        raise AssertionError("a trial ran again instead of being read from the log")

    monkeypatch.setattr("fastmemit.tune.Editor", no_editor)
    again = _tune(model, tokenizer, tune_env, "MEMIT", log=log)
    assert again.provenance["chosen"] == prov["chosen"]
    assert [t["digest"] for t in again.provenance["trials"]] == [t["digest"] for t in prov["trials"]]


def test_tune_log_of_another_run_is_refused(tokenizer, tune_env, tmp_path):
    model = tiny_llm("llama", len(tokenizer))
    log = tmp_path / "log.json"
    log.write_text(json.dumps({"format": "fastmemit-tune-log/1", "context": {"model": "other"}, "trials": []}))
    with pytest.raises(fastmemit.FastMemitError, match="belongs to another run"):
        _tune(model, tokenizer, tune_env, log=log)


def test_budget_must_be_positive():
    with pytest.raises(fastmemit.FastMemitError, match="positive"):
        Budget(0)


# ----------------------------------------------------------------------------- the command


def test_cli_tune_writes_a_file_that_edit_reads(tokenizer, tune_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fastmemit.models, "load_model", lambda name, **kw: (tiny_llm("llama", len(tokenizer)), tokenizer))
    start = tmp_path / "start.json"
    start.write_text(json.dumps({**SMALL_HP, "layers": [0, 1]}))
    out = tmp_path / "tuned.json"
    argv = ["tune", "--model", "tiny", "--method", "EMMET", "--budget-minutes", "0.05", "--out", str(out),
            "--data", str(tune_env["data"]), "--corpus", tune_env["corpus"], "--hparams", str(start),
            "--cases", "4", "--held-aside", "4", "--trace-facts", "2", "--batch", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "tuning cases (4)" in text and "held-aside cases (4)" in text and f"wrote {out}" in text
    data = json.loads(out.read_text())
    assert data["_tune"]["command"].startswith("fastmemit") and data["_tune"]["start"] == f"file {start}"
    assert not list((tmp_path / "user-cache" / "tmp").glob("tune-stats-*"))  # the temporary statistics are gone
    req = json.dumps({"prompt": "{} was born in", "subject": "Marie Curie", "target_new": "Japan"})
    assert main(["edit", "--model", "tiny", "--request", req, "--hparams", str(out), "--corpus", tune_env["corpus"],
                 "--cache-dir", str(tmp_path / "stats"), "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == data["layers"]
