"""Errors moco raises for bad input.  Each message says what is wrong and what to do."""
from __future__ import annotations


class MocoError(Exception):
    """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class ModelError(MocoError):
    """The model cannot be loaded or is not a classifier moco can compile."""


class CalibrationDataError(MocoError):
    """The calibration data does not fit the model (keys, shapes, dtypes, values, row count)."""


class BudgetError(MocoError):
    """No exit plan meets the requested disagreement budget at the requested confidence."""


class OutputError(MocoError):
    """The output location cannot be written."""


class BuildError(MocoError):
    """A directory given as a moco build is damaged: JSON that does not parse or has the wrong
    shape, a frame that does not load (:class:`moco_compile.build.Build`)."""


class NotACompileOutputError(BuildError, FileNotFoundError):
    """A directory given as a moco build is not one: missing, foreign, or without the files
    ``moco compile`` writes there."""


class NoMoELayersError(ModelError):
    """The model has no mixture-of-experts layers to trace, predict or offload."""


class ExpertCacheError(MocoError):
    """The expert cache cannot serve the model (e.g. fewer slots per layer than experts per token)."""


class TraceMismatchError(MocoError):
    """A routing trace (or predictors fitted on one) does not match the model it is used with."""
