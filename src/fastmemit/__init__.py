"""fastmemit: closed-form knowledge editing with FastMEMIT's reduced covariance statistics."""

from fastmemit.editing import Editor, EditResult, apply_deltas, edit
from fastmemit.errors import (
    CorpusError,
    DeltaMismatchError,
    EditError,
    FastMemitError,
    StatisticsError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from fastmemit.methods import EditHparams, get_method
from fastmemit.models import ArchSpec, get_arch, load_model, model_fingerprint, register_architecture
from fastmemit.requests import EditRequest
from fastmemit.stats import LayerStats, compute_layer_stats

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "CorpusError",
    "DeltaMismatchError",
    "EditHparams",
    "EditRequest",
    "EditResult",
    "Editor",
    "EditError",
    "FastMemitError",
    "LayerStats",
    "StatisticsError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "__version__",
    "apply_deltas",
    "compute_layer_stats",
    "edit",
    "get_method",
    "get_arch",
    "load_model",
    "model_fingerprint",
    "register_architecture",
]
