"""The run folder of an evaluation: its lock, ``config.json``, result logs, summary and checkpoints.

Layout::

    RUN_DIR/config.json     settings, resolved hparams, model fingerprint, case ids (the run's identity)
            hparams.json    the resolved hparams
            pre.jsonl       pre-edit scores, a chunk of cases at a time      (GroupLog "chunk")
            cases.jsonl     per case of each edited batch: pre and post     (GroupLog "batch")
            final.jsonl     sequential: every case on the final model        (GroupLog "chunk")
            downstream.jsonl  downstream checks                               (GroupLog "check")
            retention.jsonl sequential: every case edited so far, every K batches (GroupLog "check")
            diagnostics.jsonl per batch: weight distances, objective terms, max kᵀC⁻¹k per layer
            summary.json    rewritten after every batch ("partial": true) and at the end
            stopped.json    stop_on_collapse: the rule that fired, the batch, the healthy model kept
            checkpoint/     sequential: cumulative deltas W − W₀ (float64) + the method's state; with
                            stop_on_collapse also the last healthy one (checkpoint.json "healthy")
            models/         --save_model output
            .lock           one process per folder

Every file is written atomically or a group of lines at a time (:class:`GroupLog`), so that an
interrupted run leaves a prefix of complete groups that a restart continues from. Weights are
written only through :func:`fastmemit.editing.write_weights`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastmemit.editing import Editor, EditResult, load_deltas, write_weights
from fastmemit.errors import DeltaMismatchError, RunError
from fastmemit.eval.config import RUNTIME_FIELDS, config_differences
from fastmemit.models.fingerprint import model_fingerprint
from fastmemit.requests import EditRequest
from fastmemit.utils import atomic_path, check_writable, logger, write_json_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]


class GroupLog:
    """A JSON Lines file written one group (a batch, a chunk, a check) at a time.

    Each group's lines go out in one ``write`` followed by flush and fsync. :meth:`load` returns the
    longest prefix of complete groups and truncates the file after it, so that a torn line or a
    half-written group from an interrupted run is dropped and redone.
    """

    def __init__(self, path: Path, group_key: str, id_key: str) -> None:
        self.path, self.group_key, self.id_key = path, group_key, id_key

    def _lines(self, raw: bytes) -> list[tuple[int, dict[str, Any]]]:
        """(end offset, record) of every complete line up to the first torn or invalid one."""
        lines: list[tuple[int, dict[str, Any]]] = []
        pos = 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl < 0:
                break  # torn final line
            try:
                rec = json.loads(raw[pos:nl].decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not isinstance(rec, dict):
                break
            lines.append((nl + 1, rec))
            pos = nl + 1
        return lines

    def _truncate(self, raw: bytes, keep: int) -> None:
        if keep < len(raw):
            logger.info("%s: dropping %d trailing byte(s) of unfinished or superseded groups", self.path.name,
                        len(raw) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def read_groups(self) -> dict[int, list[dict[str, Any]]]:
        """{group: its lines} of the complete lines, in file order; the file is not changed (another
        run's log, read only)."""
        if not self.path.is_file():
            return {}
        out: dict[int, list[dict[str, Any]]] = {}
        for _, rec in self._lines(self.path.read_bytes()):
            g = rec.get(self.group_key)
            if isinstance(g, int):
                out.setdefault(g, []).append(rec)
        return out

    def load_before(self, limit: int) -> list[dict[str, Any]]:
        """The lines whose group number is below ``limit``, the longest such prefix, in order; the rest is
        dropped. For a log that may lack groups (one line a group, written by a version that made it)."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        out: list[dict[str, Any]] = []
        keep = 0
        for end, rec in self._lines(raw):
            g = rec.get(self.group_key)
            if not isinstance(g, int) or g >= limit or (out and g <= out[-1][self.group_key]):
                break
            out.append(rec)
            keep = end
        self._truncate(raw, keep)
        return out

    def load(self, expected: Sequence[tuple[int, Sequence[Any]]], max_groups: int | None = None) -> list[list[dict[str, Any]]]:
        """Complete groups, in order; ``expected`` = [(group, [ids in order]), ...]."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = self._lines(raw)
        groups: list[list[dict[str, Any]]] = []
        keep, i = 0, 0
        limit = len(expected) if max_groups is None else min(max_groups, len(expected))
        for gid, ids in expected[:limit]:
            chunk = lines[i : i + len(ids)]
            if len(chunk) < len(ids) or any(r.get(self.group_key) != gid or r.get(self.id_key) != cid
                                            for (_, r), cid in zip(chunk, ids)):
                break
            groups.append([r for _, r in chunk])
            i += len(ids)
            keep = chunk[-1][0]
        self._truncate(raw, keep)
        return groups

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "ab") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


class RunFolder:
    """One run's folder: lock, identity (``config.json``), logs and summary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config_path = path / "config.json"
        self.pre_log = GroupLog(path / "pre.jsonl", "chunk", "case_id")
        self.cases_log = GroupLog(path / "cases.jsonl", "batch", "case_id")
        self.final_log = GroupLog(path / "final.jsonl", "chunk", "case_id")
        self.downstream_log = GroupLog(path / "downstream.jsonl", "check", "batches_done")
        self.retention_log = GroupLog(path / "retention.jsonl", "check", "batches_done")
        self.diagnostics_log = GroupLog(path / "diagnostics.jsonl", "batch", "batch")
        self.stopped_path = path / "stopped.json"
        self.checkpoint = Checkpoint(path / "checkpoint")

    def stored_config(self) -> dict[str, Any]:
        """The folder's ``config.json`` (a :class:`RunError` when there is none or it is broken)."""
        if not self.config_path.is_file():
            raise RunError(f"{self.path} holds no run to continue (no config.json)")
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{self.config_path} is not valid JSON ({e.msg}); remove the folder or choose another "
                           "--out") from None

    def check_usable(self) -> None:
        """Refuse a path that is a file, or a folder that holds files and no ``config.json``."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {str(self.path)!r} is a file, not a run folder")
        check_writable(self.path, "--out", kind="dir")
        if self.path.exists() and not self.config_path.is_file() and any(p.name != ".lock" for p in self.path.iterdir()):
            raise RunError(f"{self.path} exists, is not empty and holds no config.json: not a run folder")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Create the folder and hold it for this process (POSIX advisory lock; a no-op elsewhere)."""
        self.check_usable()
        self.path.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path / ".lock", "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RunError(f"another process is running in {self.path}") from None
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def open(self, config_json: Mapping[str, Any]) -> bool:
        """Start the run ``config_json`` here, or continue it; True when continuing.

        A stored run with another identity (:func:`~fastmemit.eval.config.config_differences`) is
        refused; changed runtime settings are written into the stored config.
        """
        if not self.config_path.is_file():
            write_json_atomic(self.path / "hparams.json", config_json["hparams"])
            write_json_atomic(self.config_path, config_json)  # the last file of a fresh run's setup
            return False
        old = self.stored_config()
        diffs = config_differences(old, config_json)
        if diffs and not self.has_edits():  # it failed before its first batch: nothing of it is worth keeping
            logger.warning("%s: the stored run never finished a batch; starting over with the new configuration "
                           "(%s)", self.path, "; ".join(diffs[:3]))
            self.clear()
            return self.open(config_json)
        if diffs:
            raise RunError(
                f"{self.path} holds a run with another configuration; refusing to mix results. Differences "
                f"(stored → now): {'; '.join(diffs[:12])}{' ...' if len(diffs) > 12 else ''}. Use a new --out, or "
                f"--continue_from_run {self.path} to resume that run with its own settings"
            )
        runtime = {k: v for k, v in config_json["run"].items() if k in RUNTIME_FIELDS}
        if any(old.get("run", {}).get(k) != v for k, v in runtime.items()):
            old["run"].update(runtime)
            write_json_atomic(self.config_path, old)
        return True

    def has_edits(self) -> bool:
        """Whether a batch of this run was ever completed (edited and logged, or checkpointed)."""
        cases = self.path / "cases.jsonl"
        return (cases.is_file() and cases.stat().st_size > 0) or (self.path / "checkpoint").exists()

    def clear(self) -> None:
        """Remove everything of the stored run but the lock (the caller holds it)."""
        for p in self.path.iterdir():
            if p.name == ".lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def stopped(self) -> dict[str, Any] | None:
        """The record of a run that stopped on collapse (``stopped.json``), None for a run that did not."""
        if not self.stopped_path.is_file():
            return None
        return dict(json.loads(self.stopped_path.read_text()))

    def write_stopped(self, record: Mapping[str, Any]) -> None:
        write_json_atomic(self.stopped_path, record)


class Checkpoint:
    """A sequential run's edited model after its last checkpointed batch, exactly: the cumulative
    deltas W − W₀ in float64 (an ordinary deltas file) plus the Editor's state (``state_dict``).

    With ``healthy`` writes (``stop_on_collapse``) the manifest also names the last checkpoint marked
    healthy (``"healthy": {"batches_done", "deltas", "state", "fingerprint"}``), whose files are kept
    when later checkpoints replace the others."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest_path = path / "checkpoint.json"

    def deltas_path(self, batches_done: int) -> Path:
        return self.path / f"deltas-{batches_done:06d}.safetensors"

    def _manifest(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.manifest_path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            return {}

    def healthy(self) -> dict[str, Any] | None:
        """The entry of the last checkpoint marked healthy, None when there is none."""
        return self._manifest().get("healthy")

    def batches_done(self) -> int:
        """Batches the checkpoint holds (0: none, or an unreadable manifest)."""
        if not self.manifest_path.is_file():
            return 0
        try:
            return int(json.loads(self.manifest_path.read_text())["batches_done"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s is unreadable: starting the edits over", self.manifest_path)
            return 0

    def write(self, batches_done: int, model: nn.Module, w0: Mapping[str, torch.Tensor], editor: Editor,
              requests: Sequence[EditRequest], base_fingerprint: str, healthy: bool = False) -> Path:
        """Checkpoint ``model`` (edited by ``requests``, at W₀ = ``w0`` before them); the deltas file.
        ``healthy``: mark it the last healthy one (else the earlier mark, if any, is kept)."""
        previous = self._manifest().get("healthy")
        self.path.mkdir(exist_ok=True)
        tag = f"{batches_done:06d}"
        params = dict(model.named_parameters())
        deltas = {}
        for name, base in w0.items():
            w = params[name].detach().cpu()
            d = w.double() - base.double()  # exact: W and W₀ are float32/16 values
            if not torch.equal((base.double() + d).to(w.dtype), w):  # pragma: no cover - cannot happen
                raise RunError(f"checkpoint of {name} would not reproduce the edited weights")
            deltas[name] = d
        result = EditResult(deltas, editor.method.name, editor.hp.to_dict(), list(requests), base_fingerprint)
        result.save(self.deltas_path(batches_done))
        with atomic_path(self.path / f"state-{tag}.safetensors") as tmp:
            save_file(editor.state_dict(), str(tmp), metadata={"batches_done": str(batches_done)})
        manifest: dict[str, Any] = {
            "batches_done": batches_done, "edits": len(requests), "deltas": f"deltas-{tag}.safetensors",
            "state": f"state-{tag}.safetensors", "base_fingerprint": base_fingerprint,
            "fingerprint": model_fingerprint(model),
        }
        mark = {k: manifest[k] for k in ("batches_done", "edits", "deltas", "state", "fingerprint")} if healthy else previous
        if mark is not None:
            manifest["healthy"] = mark
        write_json_atomic(self.manifest_path, manifest)
        keep = {manifest["deltas"], manifest["state"]} | ({mark["deltas"], mark["state"]} if mark else set())
        for old in self.path.glob("*.safetensors"):  # older checkpoints, and orphans of an interrupted write
            if old.name not in keep:
                old.unlink()
        return self.deltas_path(batches_done)

    def restore_healthy(self, model: nn.Module, w0: Mapping[str, torch.Tensor], base_fingerprint: str) -> int:
        """Put ``model`` back to the last healthy checkpoint, exactly (W₀ when none is marked); its batch count."""
        mark = self.healthy()
        write_weights(model, w0)
        if mark is None:
            return 0
        tensors, meta = load_deltas(self.path / mark["deltas"])
        if meta.get("fingerprint") != base_fingerprint or set(tensors) != set(w0):
            raise RunError(f"{self.path}: the healthy checkpoint does not belong to this run's model")
        write_weights(model, w0, {name: d.double() for name, d in tensors.items()})
        if model_fingerprint(model) != mark["fingerprint"]:
            raise RunError(f"{self.path}: re-applied healthy checkpoint does not reproduce its model's fingerprint")
        return int(mark["batches_done"])

    def restore(self, batches_done: int, model: nn.Module, w0: Mapping[str, torch.Tensor], base_fingerprint: str,
                editor: Editor | None) -> None:
        """Re-apply the checkpoint of ``batches_done`` batches to ``model`` (at W₀ on entry); with
        ``editor``, load the method's state into it too."""
        manifest = json.loads(self.manifest_path.read_text())
        if manifest.get("batches_done") != batches_done:
            raise RunError(f"{self.path}: checkpoint holds {manifest.get('batches_done')} batches, expected {batches_done}")
        tensors, meta = load_deltas(self.path / manifest["deltas"])
        # the deltas are applied to W₀ without apply_deltas' own check: the base model is checked here
        if meta.get("fingerprint") != base_fingerprint or model_fingerprint(model) != base_fingerprint:
            raise DeltaMismatchError(f"{self.path}: checkpoint made on model {meta.get('fingerprint')}, run's model is "
                                     f"{base_fingerprint}, loaded model is {model_fingerprint(model)}")
        if set(tensors) != set(w0):
            raise RunError(f"{self.path}: checkpoint edits {sorted(tensors)}, the run edits {sorted(w0)}")
        write_weights(model, w0, {name: d.double() for name, d in tensors.items()})
        if model_fingerprint(model) != manifest.get("fingerprint"):
            raise RunError(f"{self.path}: re-applied checkpoint does not reproduce the edited model's fingerprint")
        if editor is not None:  # statistics prepared as needed (recompute_stats: on the edited model)
            editor.load_state_dict(load_file(str(self.path / manifest["state"])))
        logger.info("resumed from checkpoint after %d batches (%d edits)", batches_done, manifest.get("edits"))


def save_model_folder(model: nn.Module, tok: Any, target: Path) -> None:
    """``save_pretrained`` of the model and tokenizer into ``target``, replacing it atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def copy_file(src: Path, target: Path) -> None:
    """Copy ``src`` to ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)
