"""fastmemit: closed-form knowledge editing with FastMEMIT's reduced covariance statistics."""

from fastmemit.errors import (
    CorpusError,
    DeltaMismatchError,
    EditError,
    FastMemitError,
    StatisticsError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from fastmemit.models import ArchSpec, get_arch, load_model, model_fingerprint, register_architecture
from fastmemit.stats import LayerStats, compute_layer_stats

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "CorpusError",
    "DeltaMismatchError",
    "EditError",
    "FastMemitError",
    "LayerStats",
    "StatisticsError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "__version__",
    "compute_layer_stats",
    "get_arch",
    "load_model",
    "model_fingerprint",
    "register_architecture",
]
