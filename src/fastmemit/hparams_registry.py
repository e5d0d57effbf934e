"""Built-in hyperparameters: ``src/fastmemit/hparams/<FOLDER>/<name>.json``, and :func:`load_hparams`.

The research models' files hold the values of the FastMEMIT code (the seed,
scalable-model-editing/efficient-model-editing) where it has a file for the method and model, field
for field; ``<model>-classic.json`` keeps the published non-dynamic values of the method's own
repository (kmeng01/memit, unified-model-editing's EMMET); smollm2-135m holds fastmemit's swept values
(docs/hparams-sweep.md). Sources in hparams/SOURCES.md.

Names are looked up as the seed looks up ``--hparams_fname`` (``hparams/<ALG>/<name>``): under the
method's folder, by fastmemit's file name or by the seed's own (``gpt2-xl.json``,
``EleutherAI_gpt-j-6B.json``, ``llama2-7b.json``, ``EleutherAI_gpt-j-6B_constr.json``), by the seed's
``--model_name`` (``Llama-2-7b``) or a known model's hub id (``meta-llama/Llama-2-7b-hf``,
``EleutherAI/gpt-j-6B``), with or without ``.json``; ``FOLDER/name`` reaches another folder of the
same method (``FastEMMET/gpt2-xl``).

A loaded model gets a built-in only when
it *is* that model (:func:`model_key`): the offline models by their weights (a probe of their
input embeddings), the hub models by their Hugging Face id, and always with the config's shape as
a consistency check. A model of the same shape is never given another model's hparams.

A model with no built-in gets :func:`automatic_hparams` with a one-line warning naming
``fastmemit tune``; the rules (docs/tune.md):

- **layers**: a window of :data:`AUTO_WINDOW` consecutive layers ending at layer
  ``⌊AUTO_DEPTH_FRACTION · L + ½⌋`` of an L-layer model (at most L − 2, so the target tokens come
  after the last edit); one layer, that last one, for single-layer methods (ROME). The published
  and swept windows end at 25–35 % of the depth (mean 30 %): gpt2-medium 8/24, gpt2-large 12/36,
  gpt2-xl 17/48, gpt-j-6b 8/28, llama-2-7b 8/32, smollm2-135m 8/30; the rule gives 7, 11, 14, 8,
  10, 9 (gemma3-270m: 5 of 18).
- **λ** (``mom2_update_weight``) = d_k. The preservation term λ·E[k kᵀ] then has mean eigenvalue
  λ·tr(E[k kᵀ])/d_k = tr(E[k kᵀ]) = E‖k‖²: each preserved direction weighs as much as one typical
  key's energy, whatever the key scale and width (a λ proportional to the trace itself would not
  be: MEMIT's Δk is unchanged when every key is scaled, so λ must be dimensionless). Published:
  MEMIT λ/d_k = 3.1 (gpt2-xl), 0.9 (gpt-j-6b), 1.4 (llama-2-7b); smollm2's sweep reaches ES 100 up
  to λ/d_k ≈ 0.65 (MEMIT) and 6.5 (EMMET, μ = 0.1).
- FastMEMIT statistics (``dynamic``, ``dynamic_multiplier`` 10), 20 v* steps, MEMIT's five
  10-token context templates; every other field is the method's hparams class default.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from fastmemit.errors import EditError
from fastmemit.methods import EditHparams, EditMethod, get_method
from fastmemit.models.arch import key_dim, num_layers
from fastmemit.models.loading import GGUF_ALIASES
from fastmemit.utils import logger

Shape = tuple[str, int, int, int]  # (model_type, hidden, layers, d_k)

AUTO_DEPTH_FRACTION = 0.3
AUTO_WINDOW = 5
AUTO_FIELDS = {"dynamic": True, "dynamic_multiplier": 10, "v_num_grad_steps": 20, "context_template_length_params": [[10, 5]]}

_PROBE_COUNT = 16  # embedding entries compared (evenly strided over the flattened matrix)
_PROBE_RTOL, _PROBE_ATOL = 1e-2, 1e-3  # atol relative to the largest probe value; bf16 rounds at 4e-3

# The seed's model names in its hparams file names and its --model_name choices -> fastmemit's (a file name
# starts with one of them). A known model's hub id, "/" written "_" as the research code names files, maps too
# (:func:`_seed_names`).
SEED_MODEL_NAMES: dict[str, str] = {
    "EleutherAI_gpt-j-6B": "gpt-j-6b",
    "EleutherAI_gpt-neox-20b": "gpt-neox-20b",
    "llama2-7b": "llama-2-7b",
    "Llama-2-7b": "llama-2-7b",  # the seed's --model_name for its local Llama-2 folder
}


@dataclass(frozen=True)
class KnownModel:
    """A model that built-in files may be written for, and how to recognize it."""

    name: str  # the built-in files' name: hparams/<METHOD>/<name>.json
    shape: Shape
    hub_ids: tuple[str, ...] = ()  # Hugging Face ids (matched on the config's name or path)
    probe: tuple[float, ...] = ()  # input-embedding values at the probe positions (offline models)
    probe_numel: int = 0  # number of entries of that embedding matrix


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("smollm2-135m", ("llama", 576, 30, 1536), (), (
        -0.106544, 0.163204, 0.0575867, -0.118713, -0.0484428, -0.121033, -0.388504, -0.039978,
        -0.0316811, 0.00843048, 0.00710678, 0.0215302, 0.267296, 0.0947418, -0.0153065, -0.0417805), 28311552),
    KnownModel("gemma3-270m", ("gemma3_text", 640, 18, 2048), (), (
        -0.00724411, 0.0433702, -0.0175066, 0.00969505, 0.0116258, -0.0711784, -0.0391831, -0.0355339,
        0.00189114, 0.00376701, -0.00884581, -0.0119934, -0.0133982, 0.0161963, 0.038527, -0.0117598), 167772160),
    KnownModel("gpt2-medium", ("gpt2", 1024, 24, 4096), ("openai-community/gpt2-medium", "gpt2-medium")),
    KnownModel("gpt2-large", ("gpt2", 1280, 36, 5120), ("openai-community/gpt2-large", "gpt2-large")),
    KnownModel("gpt2-xl", ("gpt2", 1600, 48, 6400), ("openai-community/gpt2-xl", "gpt2-xl")),
    KnownModel("gpt-j-6b", ("gptj", 4096, 28, 16384), ("EleutherAI/gpt-j-6B", "EleutherAI/gpt-j-6b")),
    KnownModel("llama-2-7b", ("llama", 4096, 32, 11008), ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b")),
    KnownModel("gpt-neox-20b", ("gpt_neox", 6144, 44, 24576), ("EleutherAI/gpt-neox-20b",)),
)


# ----------------------------------------------------------------------------- identity


def config_shape(model: nn.Module) -> Shape:
    """(model_type, hidden size, number of layers, MLP width) from the model's config."""
    c = model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or (4 * hidden if hidden else None)
    return (str(c.model_type), hidden, layers, inner)


def model_name(model: nn.Module) -> str:
    """The name a model was loaded under: a built-in alias for the converted copy of an offline model,
    else its config's ``_name_or_path``, else its class name."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    folder = PurePosixPath(name.replace("\\", "/").rstrip("/")).name
    alias = next((a for a in GGUF_ALIASES if folder == f"{a}-float32"), None)  # fastmemit's converted copies
    return alias or name or type(model).__name__


def _name_matches(name: str, hub_ids: tuple[str, ...]) -> bool:
    """``name`` is one of ``hub_ids``, or a local copy of one: a path whose last component, or whose
    hub-cache folder (``models--org--name``), names it. Case-insensitive."""
    n = name.strip().rstrip("/").lower()
    parts = PurePosixPath(n.replace("\\", "/")).parts
    cached = [p[len("models--"):].replace("--", "/") for p in parts if p.startswith("models--")]
    ids = {h.lower() for h in hub_ids}
    return n in ids or any(c in ids for c in cached) or (bool(parts) and parts[-1] in {h.split("/")[-1] for h in ids})


def embedding_probe(model: nn.Module) -> tuple[int, torch.Tensor] | None:
    """(numel, float64 values at the probe positions) of the input embedding matrix, or None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() < _PROBE_COUNT:
        return None
    flat = weight.detach().reshape(-1)
    step = flat.numel() // _PROBE_COUNT
    return flat.numel(), flat[::step][:_PROBE_COUNT].to(device="cpu", dtype=torch.float64)


def _probe_matches(known: KnownModel, probe: tuple[int, torch.Tensor] | None) -> bool:
    if not known.probe or probe is None or probe[0] != known.probe_numel:
        return False
    ref = torch.tensor(known.probe, dtype=torch.float64)
    atol = _PROBE_ATOL * float(ref.abs().max())
    return bool(torch.allclose(probe[1], ref, rtol=_PROBE_RTOL, atol=atol))


def model_key(model_or_name: nn.Module | str | None) -> str | None:
    """The built-in name of a model, matched by identity (None for a model that is none of
    :data:`KNOWN_MODELS`). A string is taken as a built-in name and returned as it is.

    A model is a known one when its config has that model's shape and either its input embedding
    agrees with the recorded probe (models whose weights fastmemit ships, whatever their name) or
    its config names one of the model's hub ids. Shape alone never matches.
    """
    if model_or_name is None or isinstance(model_or_name, str):
        return model_or_name
    shape = config_shape(model_or_name)
    candidates = [k for k in KNOWN_MODELS if k.shape == shape]
    if not candidates:
        return None
    probe = embedding_probe(model_or_name) if any(k.probe for k in candidates) else None
    name = model_name(model_or_name)
    for k in candidates:
        if _probe_matches(k, probe) or (k.hub_ids and _name_matches(name, k.hub_ids)):
            return k.name
    return None


# ----------------------------------------------------------------------------- built-in files


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


def _seed_names() -> dict[str, str]:
    """:data:`SEED_MODEL_NAMES` and the known models' hub ids (``meta-llama_Llama-2-7b-hf``), longest first."""
    names = {h.replace("/", "_"): k.name for k in KNOWN_MODELS for h in k.hub_ids} | SEED_MODEL_NAMES
    return dict(sorted(names.items(), key=lambda kv: -len(kv[0])))


def _seed_stem(stem: str) -> str:
    """fastmemit's file name for a seed file name or a model name (its model prefix renamed; a hub id's
    ``/`` read as ``_``), else ``stem``."""
    flat = stem.replace("/", "_")
    for seed, ours in _seed_names().items():
        if flat == seed or flat.startswith(seed + "_"):
            return ours + flat[len(seed):]
    return stem


def find_builtin(method: EditMethod, name: str) -> Traversable | None:
    """The built-in file ``name`` refers to for ``method`` (module docstring), or None when it is not one."""
    parts = name.replace(os.sep, "/").split("/")
    if len(parts) == 2 and _folder(parts[0]) is None:  # a hub id (meta-llama/Llama-2-7b-hf), not FOLDER/name
        parts = ["_".join(parts)]
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


def builtin_name(method: str, model: nn.Module) -> str | None:
    """The name of ``method``'s built-in file for ``model`` (matched by identity), or None when it has none."""
    name = model_key(model)
    files = next((v for k, v in available().items() if k.upper() == get_method(method).name.upper()), [])
    return name if name in files else None


def builtin_hparams(method: str, model_or_name: nn.Module | str | None) -> EditHparams:
    """The built-in hparams of ``method`` for a model (object or built-in name).

    A model object with no built-in (see :func:`model_key`) gets :func:`automatic_hparams` and a
    warning; a name with no built-in, or no model at all, is an :class:`EditError`.
    """
    m = get_method(method)
    name = model_key(model_or_name)
    files = next((v for k, v in available().items() if k.upper() == m.name.upper()), [])
    if name is None or _seed_stem(name.removesuffix(".json")) not in files:
        if isinstance(model_or_name, nn.Module):
            return automatic_hparams(method, model_or_name, warn=True)
        what = name or "no model"
        raise EditError(
            f"no built-in {m.name} hparams for {what!r} (built-in: {', '.join(files) or 'none'}); "
            "pass hparams= (a JSON file, a dict or an hparams object)"
        )
    return load_hparams(_seed_stem(name.removesuffix(".json")), m.name)



# ----------------------------------------------------------------------------- automatic defaults


def automatic_layers(n_layers: int, *, window: int = AUTO_WINDOW, single: bool = False) -> list[int]:
    """The edit layers of the depth rule: ``window`` consecutive layers ending at
    ``⌊AUTO_DEPTH_FRACTION · n_layers + ½⌋`` (at most ``n_layers − 2``); ``single``: that last one only."""
    if n_layers < 2:
        raise EditError(f"a model needs at least 2 layers to be edited (the target is read after the edit), has {n_layers}")
    last = min(math.floor(AUTO_DEPTH_FRACTION * n_layers + 0.5), n_layers - 2)
    return [last] if single else list(range(max(0, last - window + 1), last + 1))


def automatic_hparams(method: str, model: nn.Module, *, warn: bool = False) -> EditHparams:
    """Hparams of ``method`` for a model without built-ins: layers by depth, λ = d_k (module docstring)."""
    m = get_method(method)
    layers = automatic_layers(num_layers(model), single=m.single_layer)
    d_k = key_dim(model, layers[-1])
    hp = m.hparams_cls.from_dict({**AUTO_FIELDS, "layers": layers, "mom2_update_weight": float(d_k)})
    if warn:
        logger.warning(
            "no built-in %s hparams for %s: automatic defaults (layers %s by depth, λ = d_k = %d); "
            "run `fastmemit tune --model %s --method %s` to tune them for this model",
            m.name, model_name(model), _span(layers), d_k, model_name(model), m.name)
    return hp


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
