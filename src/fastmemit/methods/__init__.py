"""Editing methods behind one registry: ROME, MEMIT, EMMET, AlphaEdit, ENCORE, FT (and any registered later)."""

from fastmemit.methods import alphaedit, emmet, encore, ft, memit, rome  # noqa: F401  (register the built-in methods)
from fastmemit.methods.alphaedit import AlphaEditHparams
from fastmemit.methods.base import (
    EditMethod,
    FitResult,
    LayerState,
    RidgeSystemMethod,
    available_methods,
    get_method,
    register_method,
)
from fastmemit.methods.emmet import EMMETHparams
from fastmemit.methods.encore import ENCOREHparams
from fastmemit.methods.ft import FTHparams
from fastmemit.methods.hparams import EditHparams

__all__ = [
    "AlphaEditHparams",
    "EMMETHparams",
    "ENCOREHparams",
    "EditHparams",
    "EditMethod",
    "FTHparams",
    "FitResult",
    "LayerState",
    "RidgeSystemMethod",
    "available_methods",
    "get_method",
    "register_method",
]
