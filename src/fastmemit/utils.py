"""Small shared helpers: atomic writes, logging, progress bars."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastmemit.errors import ConfigurationError

logger = logging.getLogger("fastmemit")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A crash or exception before the rename leaves ``path`` untouched (and removes the temporary),
    so a reader never sees a half-written file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphan_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sweep_orphan_temps(target: Path) -> list[Path]:
    """Remove temporaries (files or folders) of earlier writes of ``target`` whose writer process is gone
    (a kill between create and rename leaves one: ``.<name>.<pid>.<random>.tmp``, see :func:`temp_dir`
    and :func:`atomic_path`); those of live writers stay."""
    removed = []
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
    return removed


def temp_dir(target: Path) -> Path:
    """A new temporary folder beside ``target`` (to be renamed onto it), after sweeping orphans."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphan_temps(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def check_writable(path: str | os.PathLike[str], what: str, *, kind: str = "file") -> Path:
    """Check before any work that ``path`` can be written as a file (``kind="file"``) or used as a
    folder (``kind="dir"``): not the other kind already, and its first existing ancestor a writable
    folder. Raises ConfigurationError naming ``what`` (e.g. ``--save-deltas``)."""
    p = Path(path).expanduser()
    if kind == "file" and p.is_dir():
        raise ConfigurationError(f"{what} {str(p)!r} is a folder; give a file path")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ConfigurationError(f"{what} {str(p)!r} is a file; give a folder")
    base = p if kind == "dir" and p.is_dir() else p.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ConfigurationError(f"{what} {str(p)!r}: {str(base)!r} is a file, so nothing can be created below it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{what} {str(p)!r}: folder {str(base)!r} is not writable")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str], what: str, error: type[Exception]) -> Any:
    """The parsed contents of the JSON file ``path``; ``error`` naming ``what`` and the file if it is
    missing, unreadable as UTF-8 or not valid JSON (e.g. ``hparams file 'x.json': invalid JSON ...``)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{what} {str(p)!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} {str(p)!r}: invalid JSON ({e.msg} at line {e.lineno})") from None


def progress(iterable: Any = None, *, total: int | None = None, desc: str = "", unit: str = "it", disable: bool | None = None) -> Any:
    """The one progress helper: a tqdm bar on stderr, silenced when FASTMEMIT_PROGRESS=0."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("FASTMEMIT_PROGRESS", "1") == "0"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=False)


def cache_dir() -> Path:
    """Root of fastmemit's user cache: ``$FASTMEMIT_CACHE`` or ``~/.cache/fastmemit``."""
    env = os.environ.get("FASTMEMIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastmemit"
