"""What the analytics return: linear and MLP conditions and sufficient rules (saved as dicts), separability,
coverage-precision curves, and the errors they raise."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import log_softmax

from moco_compile.errors import MocoError


class AnalyticsError(MocoError, ValueError):
    """Bad input to the analytics (shapes, row counts, classes, parameters)."""


class NoRuleError(AnalyticsError):
    """No threshold of a linear rule meets the requested precision, so the rule would fire on no row."""


class _Condition:
    """What both conditions share: they fire where ``score(x) > threshold``."""

    threshold: float

    def score(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fires(self, x: np.ndarray) -> np.ndarray:
        """``[N]`` booleans: where the condition holds."""
        return self.score(x) > self.threshold


def _feature_rows(x: np.ndarray, width: int) -> np.ndarray:
    """``x`` as ``[N, width]`` float64 rows (one row ``[width]`` allowed), or a clear error."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != width:
        raise AnalyticsError(f"the rule reads {width} features per row; got an array of shape "
                             f"{tuple(np.shape(x))}. Pass [N, {width}] features pooled the way "
                             "the rule's engine pooled them")
    return x.astype(np.float64)


def _checked_keys(data: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise AnalyticsError(f"{what} needs the keys {', '.join(keys)}; missing: {', '.join(missing)}")


@dataclass
class LinearCondition(_Condition):
    """The condition of a linear rule: it fires where ``x @ weights + bias > threshold``.

    ``x`` is the (pooled) feature vector the rule was fitted on, ``[D]`` per row.
    """

    weights: np.ndarray
    bias: float
    threshold: float

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, np.float64).reshape(-1)
        self.bias = float(self.bias)
        self.threshold = float(self.threshold)

    def score(self, x: np.ndarray) -> np.ndarray:
        """``[N]`` scores ``x @ weights + bias`` for ``x`` of shape ``[N, D]`` (or one row ``[D]``)."""
        return _feature_rows(x, len(self.weights)) @ self.weights + self.bias

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``weights`` as a list)."""
        return {"weights": self.weights.tolist(), "bias": self.bias, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LinearCondition":
        """Inverse of :meth:`to_dict`."""
        _checked_keys(data, ("weights", "bias", "threshold"), "a linear condition")
        return cls(np.asarray(data["weights"], np.float64), data["bias"], data["threshold"])


MLP_KEYS = ("hidden_weight", "hidden_bias", "weight", "bias", "cls", "threshold")


@dataclass
class MLPCondition(_Condition):
    """The condition of an MLP rule: it fires where the head's log-probability of class ``cls``,
    ``log_softmax(relu(x @ hidden_weight + hidden_bias) @ weight + bias)[cls]``, exceeds ``threshold``."""

    hidden_weight: np.ndarray  # [D, H]
    hidden_bias: np.ndarray  # [H]
    weight: np.ndarray  # [H, C]
    bias: np.ndarray  # [C]
    cls: int
    threshold: float

    def __post_init__(self) -> None:
        for name in ("hidden_weight", "hidden_bias", "weight", "bias"):
            setattr(self, name, np.asarray(getattr(self, name), np.float64))
        self.cls, self.threshold = int(self.cls), float(self.threshold)

    def score(self, x: np.ndarray) -> np.ndarray:
        """``[N]`` log-probabilities of ``cls`` for ``x`` of shape ``[N, D]`` (or one row ``[D]``)."""
        hidden = np.maximum(_feature_rows(x, len(self.hidden_weight)) @ self.hidden_weight + self.hidden_bias, 0)
        return log_softmax(hidden @ self.weight + self.bias, axis=1)[:, self.cls]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (arrays as lists)."""
        return {name: _plain(getattr(self, name)) for name in MLP_KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MLPCondition":
        """Inverse of :meth:`to_dict`."""
        _checked_keys(data, MLP_KEYS, "an MLP condition")
        return cls(*(data[name] for name in MLP_KEYS))


@dataclass
class SufficientRule:
    """A rule "if ``condition`` holds, the target is ``metadata['class']``" with its held-out statistics.

    ``metadata`` holds: ``class``, ``class_name``, ``target_column``, ``feature`` (the
    embedding it reads); estimates on the held-out rows: ``coverage`` (fraction of
    held-out rows it fires on), ``class_coverage`` (fraction of the class's held-out
    rows it fires on), ``held_out_precision`` (fraction of the fired held-out rows that
    are the class); the bound: ``precision_lower_bound`` (one-sided Clopper-Pearson
    lower confidence bound of the precision at ``confidence`` from the fired held-out
    rows); ``required_precision``, ``confidence``, ``certified`` (True when the
    threshold was chosen so that ``required_precision`` itself is certified at
    ``confidence``, see :meth:`AnalyticsEngine.compute_linear_sufficient_rule`; an MLP rule's condition:
    :meth:`AnalyticsEngine.compute_mlp_sufficient_rule`),
    ``rows`` (held-out rows), ``fired_rows``, ``errors``, ``fit_rows``, ``method``.
    """

    condition: LinearCondition | MLPCondition
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``[N]`` booleans: where the rule fires on features ``x`` (``[N, D]``, or one row ``[D]``)."""
        return self.condition.fires(x)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``{"condition": ..., "metadata": ...}``."""
        return {"condition": self.condition.to_dict(), "metadata": _plain(self.metadata)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SufficientRule":
        """Inverse of :meth:`to_dict`."""
        if "condition" not in data:
            raise AnalyticsError("a sufficient rule needs a 'condition' entry (weights, bias, threshold)")
        condition = data["condition"]
        kind = MLPCondition if isinstance(condition, Mapping) and "hidden_weight" in condition else LinearCondition
        return cls(kind.from_dict(condition), dict(data.get("metadata", {})))


@dataclass
class Separability:
    """kNN class purity of an embedding: the mean fraction of a row's ``k`` nearest
    neighbours (itself excluded) that share its class, overall and per class."""

    purity: float
    per_class: dict[int, float]
    k: int
    rows: int
    target_column: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {"purity": self.purity, "per_class": {str(c): v for c, v in self.per_class.items()},
                "k": self.k, "rows": self.rows, "target_column": self.target_column}


@dataclass
class CoveragePrecisionCurve:
    """One class's trade-off on held-out rows as the rule's threshold is lowered.

    Entry ``i`` describes the rule firing where ``score > thresholds[i]``:
    ``coverage`` (fraction of held-out rows fired), ``class_coverage`` (fraction of
    the class's held-out rows fired), ``precision`` (fraction of fired rows of the
    class) and ``precision_lower_bound`` (one-sided Clopper-Pearson at ``confidence``).
    """

    cls: int
    thresholds: np.ndarray
    coverage: np.ndarray
    class_coverage: np.ndarray
    precision: np.ndarray
    precision_lower_bound: np.ndarray
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (arrays as lists)."""
        return {"class": self.cls, "confidence": self.confidence,
                **{name: getattr(self, name).tolist() for name in
                   ("thresholds", "coverage", "class_coverage", "precision", "precision_lower_bound")}}


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars/arrays turned into JSON-serialisable Python objects."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
