"""Exceptions raised by fastmemit. Every one names the problem; all derive from FastMemitError."""

from __future__ import annotations


class FastMemitError(Exception):
    """Base class of fastmemit's errors."""


class UnsupportedArchitectureError(FastMemitError, ValueError):
    """The model's family is not in the architecture table, or the table does not match it."""


class UnknownModelError(FastMemitError, ValueError):
    """A model name is neither an alias, a local folder, nor loadable from the hub."""


class CorpusError(FastMemitError, ValueError):
    """A statistics corpus is missing, empty, malformed or too short for the requested count."""


class StatisticsError(FastMemitError, ValueError):
    """Covariance statistics are singular, non-finite or otherwise unusable."""


class EditError(FastMemitError, ValueError):
    """An edit request or hyperparameter set is invalid, or the edit system cannot be solved."""


class DeltaMismatchError(FastMemitError, ValueError):
    """Saved deltas belong to a different model than the one they are applied to."""


class RunError(FastMemitError, ValueError):
    """An evaluation run folder cannot be used: another configuration, a broken checkpoint, a bad setting."""
