"""Built-in hyperparameters: ``src/fastmemit/hparams/<METHOD>/<model>.json``.

Published values for the research models (sources in hparams/SOURCES.md) and swept values for
the offline default smollm2-135m (docs/hparams-sweep.md). A loaded model is matched to its
built-in name by its config's shape (family, width, depth, MLP width).
"""

from __future__ import annotations

from importlib import resources

from torch import nn

from fastmemit.errors import EditError
from fastmemit.methods import EditHparams, get_method

# (model_type, hidden, layers, d_k) -> built-in model name
_SHAPES: dict[tuple[str, int, int, int], str] = {
    ("llama", 576, 30, 1536): "smollm2-135m",
    ("gemma3_text", 640, 18, 2048): "gemma3-270m",
    ("gpt2", 1024, 24, 4096): "gpt2-medium",
    ("gpt2", 1280, 36, 5120): "gpt2-large",
    ("gpt2", 1600, 48, 6400): "gpt2-xl",
    ("gptj", 4096, 28, 16384): "gpt-j-6b",
    ("llama", 4096, 32, 11008): "llama-2-7b",
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


def available(method: str | None = None) -> dict[str, list[str]]:
    root = resources.files("fastmemit") / "hparams"
    out: dict[str, list[str]] = {}
    for d in root.iterdir():
        if d.is_dir() and (method is None or d.name.upper() == method.upper()):
            out[d.name] = sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".json"))
    return out


def builtin_hparams(method: str, model_or_name: nn.Module | str | None) -> EditHparams:
    """The built-in hparams of ``method`` for a model (object or built-in name)."""
    m = get_method(method)
    name = model_key(model_or_name)
    files = next((v for k, v in available().items() if k.upper() == m.name.upper()), [])
    if name is None or name not in files:
        what = name or (type(model_or_name).__name__ if model_or_name is not None else "no model")
        raise EditError(
            f"no built-in {m.name} hparams for {what!r} (built-in: {', '.join(files) or 'none'}); "
            "pass hparams= (a JSON file, a dict or an hparams object)"
        )
    folder = next(d for d in (resources.files("fastmemit") / "hparams").iterdir() if d.name.upper() == m.name.upper())
    return m.hparams_cls.from_json(str(folder / f"{name}.json"))
