"""Built-in hyperparameters: ``src/fastmemit/hparams/<FOLDER>/<name>.json``, and :func:`load_hparams`.

The research models' files hold the values of the FastMEMIT code (the seed,
scalable-model-editing/efficient-model-editing) where it has a file for the method and model, field
for field; ``<model>-classic.json`` keeps the published non-dynamic values of the method's own
repository (kmeng01/memit, unified-model-editing's EMMET); smollm2-135m holds fastmemit's swept values
(docs/hparams-sweep.md). Sources in hparams/SOURCES.md. A loaded model is matched to its built-in
name by its config's shape (family, width, depth, MLP width).

Names are looked up as the seed looks up ``--hparams_fname`` (``hparams/<ALG>/<name>``): under the
method's folder, by fastmemit's file name or by the seed's own (``gpt2-xl.json``,
``EleutherAI_gpt-j-6B.json``, ``llama2-7b.json``, ``EleutherAI_gpt-j-6B_constr.json``), with or
without ``.json``; ``FOLDER/name`` reaches another folder of the same method (``FastEMMET/gpt2-xl``).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from torch import nn

from fastmemit.errors import EditError
from fastmemit.methods import EditHparams, EditMethod, get_method
from fastmemit.utils import logger

# (model_type, hidden, layers, d_k) -> built-in model name
_SHAPES: dict[tuple[str, int, int, int], str] = {
    ("llama", 576, 30, 1536): "smollm2-135m",
    ("gemma3_text", 640, 18, 2048): "gemma3-270m",
    ("gpt2", 1024, 24, 4096): "gpt2-medium",
    ("gpt2", 1280, 36, 5120): "gpt2-large",
    ("gpt2", 1600, 48, 6400): "gpt2-xl",
    ("gptj", 4096, 28, 16384): "gpt-j-6b",
    ("gpt_neox", 6144, 44, 24576): "gpt-neox-20b",
    ("llama", 4096, 32, 11008): "llama-2-7b",
}

# The seed's model names in its hparams file names -> fastmemit's (a file name starts with one of them)
SEED_MODEL_NAMES: dict[str, str] = {
    "EleutherAI_gpt-j-6B": "gpt-j-6b",
    "EleutherAI_gpt-neox-20b": "gpt-neox-20b",
    "llama2-7b": "llama-2-7b",
}


def model_key(model_or_name: nn.Module | str | None) -> str | None:
    if model_or_name is None or isinstance(model_or_name, str):
        return model_or_name
    c = model_or_name.config
    mt = c.model_type
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or (4 * hidden if hidden else None)
    return _SHAPES.get((mt, hidden, layers, inner))


def _root() -> Traversable:
    return resources.files("fastmemit") / "hparams"


def available(method: str | None = None) -> dict[str, list[str]]:
    """Built-in file names (without ``.json``) per folder; with ``method``, only the folder of that name."""
    out: dict[str, list[str]] = {}
    for d in _root().iterdir():
        if d.is_dir() and (method is None or d.name.upper() == method.upper()):
            out[d.name] = sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".json"))
    return out


def _folder(name: str) -> Traversable | None:
    return next((d for d in _root().iterdir() if d.is_dir() and d.name.upper() == name.upper()), None)


def _seed_stem(stem: str) -> str:
    """fastmemit's file name for a seed file name (its model prefix renamed), else ``stem``."""
    for seed, ours in SEED_MODEL_NAMES.items():
        if stem == seed or stem.startswith(seed + "_"):
            return ours + stem[len(seed):]
    return stem


def find_builtin(method: EditMethod, name: str) -> Traversable | None:
    """The built-in file ``name`` refers to for ``method`` (module docstring), or None when it is not one."""
    parts = name.replace(os.sep, "/").split("/")
    if len(parts) > 2 or not parts[-1]:
        return None
    folder = _folder(parts[0] if len(parts) == 2 else method.name)
    if folder is None:
        return None
    stem = parts[-1][:-5] if parts[-1].endswith(".json") else parts[-1]
    for candidate in dict.fromkeys((stem, _seed_stem(stem))):
        f = folder / f"{candidate}.json"
        if f.is_file():
            declared = json.loads(f.read_text()).get("_method", folder.name)
            if str(declared).upper() != method.name.upper():
                raise EditError(f"built-in hparams {folder.name}/{f.name} are {declared}'s, not {method.name}'s")
            return f
    return None


def load_hparams(name_or_path: str | os.PathLike[str], method: str = "EMMET") -> EditHparams:
    """``method``'s hparams from a built-in name or the seed's file name (``"gpt2-xl.json"``,
    ``"EleutherAI_gpt-j-6B.json"``, ``"gpt2-xl-classic"``, ``"FastEMMET/gpt2-xl"``), else from a JSON file.

    Built-in names come first, as in the seed (``hparams/<ALG>/<name>``); a file of the same bare name in
    the current folder is reached as ``./name.json``. Research-code files load unchanged (their fields
    the research code hard-codes take its values: :meth:`EditHparams.from_json`).
    """
    m = get_method(method)
    s = os.fspath(name_or_path)
    builtin = find_builtin(m, s)
    if builtin is not None:
        if "/" not in s and os.sep not in s and Path(s).is_file():
            logger.warning("hparams %r: using the built-in %s/%s (pass ./%s for the file in the current folder)",
                           s, m.name, builtin.name, s)
        return m.hparams_cls.from_json(str(builtin))
    p = Path(s).expanduser()
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            files = available(m.name).get(m.name, [])
            raise EditError(f"hparams {s!r}: neither a built-in {m.name} name ({', '.join(files) or 'none'}; the seed's "
                            "file names are accepted too) nor an existing file")
        return m.hparams_cls.from_json(p)
    files = available(m.name).get(m.name, [])
    raise EditError(f"no built-in {m.name} hparams named {s!r} (built-in: {', '.join(files) or 'none'}); "
                    "pass a JSON file, a dict or an hparams object")


def builtin_hparams(method: str, model_or_name: nn.Module | str | None) -> EditHparams:
    """The built-in hparams of ``method`` for a model (object or built-in name)."""
    m = get_method(method)
    name = model_key(model_or_name)
    files = next((v for k, v in available().items() if k.upper() == m.name.upper()), [])
    if name is None or _seed_stem(name.removesuffix(".json")) not in files:
        what = name or (type(model_or_name).__name__ if model_or_name is not None else "no model")
        raise EditError(
            f"no built-in {m.name} hparams for {what!r} (built-in: {', '.join(files) or 'none'}); "
            "pass hparams= (a JSON file, a dict or an hparams object)"
        )
    return load_hparams(_seed_stem(name.removesuffix(".json")), m.name)
