"""run_folder.py: group-atomic logs, the folder lock, config refusal and runtime updates, and the
exact checkpoint of an edited model (written and re-applied through write_weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastmemit.editing import Editor, apply_deltas
from fastmemit.errors import DeltaMismatchError, RunError
from fastmemit.eval import RunConfig
from fastmemit.eval.config import config_differences, stored_config
from fastmemit.eval.run_folder import GroupLog, RunFolder
from fastmemit.methods import EditHparams
from fastmemit.models.arch import mlp_down_weight
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.requests import EditRequest
from tests.helpers import tiny_llm


def test_group_log_keeps_complete_groups_and_truncates_the_rest(tmp_path):
    log = GroupLog(tmp_path / "x.jsonl", "batch", "case_id")
    log.append([{"batch": 0, "case_id": 1}, {"batch": 0, "case_id": 2}])
    log.append([{"batch": 1, "case_id": 3}])
    size = log.path.stat().st_size
    with open(log.path, "ab") as f:  # a half group and a torn line
        f.write(b'{"batch": 2, "case_id": 4}\n{"batch": 2, "ca')
    expected = [(0, [1, 2]), (1, [3]), (2, [4, 5])]
    assert log.load(expected) == [[{"batch": 0, "case_id": 1}, {"batch": 0, "case_id": 2}], [{"batch": 1, "case_id": 3}]]
    assert log.path.stat().st_size == size
    assert len(log.load(expected, max_groups=1)) == 1 and log.path.read_text().count("\n") == 2
    assert GroupLog(tmp_path / "none.jsonl", "batch", "case_id").load(expected) == []


def config_json(cfg: RunConfig, run_dir: Path) -> dict:
    return stored_config(cfg, run_dir, method=cfg.method, hparams={"layers": [0]}, hparams_label="L0",
                         base_fingerprint="fp", case_ids=[1, 2])


def test_open_starts_continues_refuses_and_updates_runtime_settings(tmp_path):
    folder = RunFolder(tmp_path / "run")
    cfg = RunConfig(edits_per_batch=2)
    with folder.lock():
        assert folder.open(config_json(cfg, folder.path)) is False
        assert json.loads((folder.path / "hparams.json").read_text()) == {"layers": [0]}
        with pytest.raises(RunError, match="another process"), RunFolder(folder.path).lock():
            pass
        assert folder.open(config_json(RunConfig(edits_per_batch=2, device="cuda"), folder.path)) is True
        assert folder.stored_config()["run"]["device"] == "cuda"
        (folder.path / "pre.jsonl").write_text('{"chunk": 0}\n')
        # a run that never finished a batch (it failed in its set-up) does not block the corrected command
        assert folder.open(config_json(RunConfig(edits_per_batch=3), folder.path)) is False
        assert folder.stored_config()["run"]["edits_per_batch"] == 3 and not (folder.path / "pre.jsonl").exists()
        assert (folder.path / ".lock").exists()
        (folder.path / "cases.jsonl").write_text('{"batch": 0, "case_id": 1}\n')  # one batch done: now it is a run
        stored = folder.config_path.read_text()
        with pytest.raises(RunError, match=r"edits_per_batch \(num_edits\): 3 → 2.*--continue_from_run"):
            folder.open(config_json(RunConfig(edits_per_batch=2), folder.path))
        assert folder.config_path.read_text() == stored and (folder.path / "cases.jsonl").exists()
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(RunError, match="not a run folder"), RunFolder(other).lock():
        pass
    with pytest.raises(RunError, match="no run to continue"):
        RunFolder(tmp_path / "empty").stored_config()


def test_checkpoint_reapplies_the_edited_weights_exactly(tmp_path, tokenizer):
    model = tiny_llm("llama", len(tokenizer))
    base_fp = model_fingerprint(model)
    w0 = {name: p.detach().cpu().clone() for name, p in (mlp_down_weight(model, layer) for layer in (0, 1))}
    editor = Editor(model, tokenizer, "EMMET", {"layers": [0, 1]}, show_progress=False)
    with torch.no_grad():  # stands in for edits: values that float32 rounds, W − W₀ not a float32 number
        for name, p in model.named_parameters():
            if name in w0:
                p.add_(torch.randn_like(p) / 3)
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    req = [EditRequest.from_any({"prompt": "{} is", "subject": "A", "target_new": "b"})]
    deltas = folder.checkpoint.write(2, model, w0, editor, req, base_fp)
    assert folder.checkpoint.batches_done() == 2 and deltas == folder.checkpoint.deltas_path(2)
    fresh = tiny_llm("llama", len(tokenizer))
    folder.checkpoint.restore(2, fresh, w0, base_fp, editor=None)
    assert all(torch.equal(p.detach(), edited[n]) for n, p in fresh.named_parameters())
    again = tiny_llm("llama", len(tokenizer))  # the checkpoint is an ordinary deltas file
    apply_deltas(again, deltas)
    assert all(torch.equal(p.detach(), edited[n]) for n, p in again.named_parameters())
    with pytest.raises(RunError, match="holds 2 batches, expected 3"):
        folder.checkpoint.restore(3, tiny_llm("llama", len(tokenizer)), w0, base_fp, editor=None)
    with pytest.raises(DeltaMismatchError):
        folder.checkpoint.restore(2, tiny_llm("llama", len(tokenizer), seed=1), w0, base_fp, editor=None)


def test_a_run_stored_before_new_hparams_fields_continues_and_a_changed_field_is_refused(tmp_path):
    """Fields a later fastmemit adds (with the old behaviour as default) are absent from an older run's
    stored hparams: at their defaults they compare equal; a value that really changed is named."""
    hp = EditHparams(layers=[0]).to_dict()
    newer = ("v_early_stop", "v_site", "v_max_rows", "recompute_stats", "emmet_ridge_one_edit")
    old_hp = {k: v for k, v in hp.items() if k not in newer}
    cfg = RunConfig(edits_per_batch=2)
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        folder.open(stored_config(cfg, folder.path, method="EMMET", hparams=old_hp, base_fingerprint="fp", case_ids=[1]))
        (folder.path / "cases.jsonl").write_text('{"batch": 0, "case_id": 1}\n')
        now = stored_config(cfg, folder.path, method="EMMET", hparams=hp, base_fingerprint="fp", case_ids=[1])
        assert folder.open(now) is True
        assert config_differences(folder.stored_config(), now) == []
        changed = stored_config(cfg, folder.path, method="EMMET", hparams={**hp, "v_early_stop": "loss"},
                                base_fingerprint="fp", case_ids=[1])
        with pytest.raises(RunError, match=r"hparams\.v_early_stop: 'nll' → 'loss'"):
            folder.open(changed)
        with pytest.raises(RunError, match=r"hparams\.mom2_update_weight: 15000\.0 → 1\.0"):
            folder.open({**now, "hparams": {**hp, "mom2_update_weight": 1.0}})
