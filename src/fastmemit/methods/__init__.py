"""Editing methods behind one registry: ROME, MEMIT, EMMET, AlphaEdit."""

from fastmemit.methods import alphaedit, emmet, memit, rome  # noqa: F401  (register)
from fastmemit.methods.alphaedit import AlphaEditHparams
from fastmemit.methods.base import METHODS, EditMethod, LayerState, get_method, register_method
from fastmemit.methods.emmet import EMMETHparams
from fastmemit.methods.encore import ENCOREHparams  # noqa: F401  (registers ENCORE)
from fastmemit.methods.hparams import EditHparams

__all__ = [
    "METHODS",
    "AlphaEditHparams",
    "EMMETHparams",
    "EditHparams",
    "EditMethod",
    "LayerState",
    "get_method",
    "register_method",
]
