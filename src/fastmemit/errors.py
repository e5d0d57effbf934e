"""Exceptions raised by fastmemit. Every one names the problem; all derive from FastMemitError.

Every error the package raises is one of these (they also derive from ValueError, so code that
caught ValueError before keeps working). The CLI turns any of them into one line and exit code 2.
"""

from __future__ import annotations


class FastMemitError(Exception):
    """Base class of fastmemit's errors."""


class ConfigurationError(FastMemitError, ValueError):
    """A setting, flag or path is invalid: a dtype or device name, an output path that cannot be
    written, a number out of range."""


class UnsupportedArchitectureError(FastMemitError, ValueError):
    """The model's family is not in the architecture table, or the table does not match it."""


class UnknownModelError(FastMemitError, ValueError):
    """A model name is neither an alias, a local folder, nor loadable from the hub, or its files are
    unreadable."""


class CorpusError(FastMemitError, ValueError):
    """A statistics corpus is missing, empty, malformed or too short for the requested count."""


class StatisticsError(FastMemitError, ValueError):
    """Covariance statistics are singular, non-finite or otherwise unusable."""


class EditError(FastMemitError, ValueError):
    """An edit request or hyperparameter set is invalid, or the edit system cannot be solved."""


class DeltaMismatchError(FastMemitError, ValueError):
    """Saved deltas are unreadable or belong to a different model than the one they are applied to."""


class DatasetError(FastMemitError, ValueError):
    """An evaluation dataset file (CounterFact, zsRE, seed orderings) is missing or malformed."""


class RunError(FastMemitError, ValueError):
    """An evaluation run folder cannot be used: another configuration, a broken checkpoint, a bad setting."""


class PlotError(FastMemitError, ValueError):
    """A run folder cannot be plotted or summarized (missing or malformed result files)."""


class DownstreamError(FastMemitError, ValueError):
    """A downstream (few-shot) check is misconfigured."""


class DownstreamDataError(DownstreamError):
    """A downstream data file is missing or malformed."""
