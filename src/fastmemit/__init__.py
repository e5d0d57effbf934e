"""fastmemit: closed-form knowledge editing with FastMEMIT's reduced covariance statistics.

    model, tok = fastmemit.load_model("smollm2-135m")
    result = fastmemit.edit(model, tok, requests, method="EMMET")   # result.restore() / .apply() / .save()
    hp = fastmemit.load_hparams("gpt2-xl.json", method="EMMET")      # built-ins by the seed's file names

Methods are found by name in a registry (:func:`available_methods`; add one with
:func:`register_method`); :class:`Editor` edits batch after batch and keeps statistics, factors and
the method's memory between them.
"""

from fastmemit.editing import Editor, EditResult, TargetCache, apply_deltas, edit, load_deltas
from fastmemit.errors import (
    CorpusError,
    DeltaMismatchError,
    EditError,
    FastMemitError,
    StatisticsError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from fastmemit.hparams_registry import load_hparams
from fastmemit.methods import (
    AlphaEditHparams,
    EditHparams,
    EditMethod,
    FTHparams,
    LayerState,
    available_methods,
    get_method,
    register_method,
)
from fastmemit.models import ArchSpec, load_model, register_architecture
from fastmemit.requests import EditRequest
from fastmemit.stats import ALL_KEYS, compute_layer_stats

__version__ = "0.1.0"

__all__ = [
    "ALL_KEYS",
    "AlphaEditHparams",
    "ArchSpec",
    "CorpusError",
    "DeltaMismatchError",
    "EditError",
    "EditHparams",
    "EditMethod",
    "EditRequest",
    "EditResult",
    "Editor",
    "FTHparams",
    "FastMemitError",
    "LayerState",
    "StatisticsError",
    "TargetCache",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "__version__",
    "apply_deltas",
    "available_methods",
    "compute_layer_stats",
    "edit",
    "get_method",
    "load_deltas",
    "load_hparams",
    "load_model",
    "register_architecture",
    "register_method",
]
