"""Predicting layer l+1's experts from the hidden state entering layer l's MoE block.

Each predictor scores the ``E`` experts of a target layer ``t = l + 1`` (``t >= 1``) for
every token; its top-k are the experts to prefetch while layer ``l`` computes:

1. ``most_frequent``: layer t's experts by how often the calibration trace used them
   (a constant list, no FLOPs);
2. ``previous_token``: the experts layer t chose for the previous token, ties and the
   first token by frequency (no FLOPs);
3. ``speculative``: layer t's own norm and gate applied to layer l's hidden state;
4. ``learned``: a multinomial linear probe fitted with the spine's rule engine
   (:class:`~moco_compile.passes.calibration.rules.SoftmaxRuleFitter`) on
   ``[layer-normalised hidden state, the speculative logits, previous token's experts
   one-hot]`` to predict layer t's choice (a token counts once per expert it chose).

The hit rate of a prediction is recall@k: the fraction of the ``k`` experts a token
used at layer t that are among the predicted ``k``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moco_compile.errors import TraceMismatchError
from moco_compile.frame import ActivationFrame
from moco_compile.moe.frame import POSITION, RoutingSpec, WINDOW, check_trace, experts_column, hidden_column
from moco_compile.passes.calibration.rules import LinearScores, SoftmaxRuleFitter

PREDICTORS = ("most_frequent", "previous_token", "speculative", "learned")
_GATE_KEYS = ("norm_weight", "norm_bias", "norm_eps", "gate_weight")


def _standardise(hidden: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm without the affine part, per token."""
    centred = hidden - hidden.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + eps)


def previous_one_hot(previous: np.ndarray, num_experts: int) -> np.ndarray:
    """``[N, E]``: 1 where the previous token used the expert (``previous`` is ``[N, k]``, -1 = no token)."""
    rows = np.repeat(np.arange(len(previous)), previous.shape[1])
    chosen = previous.reshape(-1)
    out = np.zeros((len(previous), num_experts), np.float32)
    out[rows[chosen >= 0], chosen[chosen >= 0]] = 1.0
    return out


@dataclass
class FittedPredictors:
    """Every predictor for every transition ``t-1 -> t``, as arrays (``learned_*`` indexed by ``t - 1``)."""

    spec: RoutingSpec
    gates: dict[str, np.ndarray]
    frequency: np.ndarray        # [L, E] share of the trace's choices
    learned_weight: np.ndarray   # [L-1, D + 2E, E]
    learned_bias: np.ndarray     # [L-1, E]

    def speculative_logits(self, target: int, hidden: np.ndarray) -> np.ndarray:
        """Layer ``target``'s gate logits on the hidden state entering layer ``target - 1``'s MoE."""
        normed = _standardise(hidden.astype(np.float32), float(self.gates["norm_eps"][target]))
        normed = normed * self.gates["norm_weight"][target] + self.gates["norm_bias"][target]
        return normed @ self.gates["gate_weight"][target].T

    def features(self, target: int, hidden: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """The learned estimator's input ``[N, D + 2E]``: layer-normalised ``hidden`` (no affine), layer
        ``target``'s speculative logits and the previous token's experts at ``target``, one-hot."""
        eps = float(self.gates["norm_eps"][target])
        return np.concatenate([_standardise(hidden.astype(np.float32), eps), self.speculative_logits(target, hidden),
                               previous_one_hot(previous, self.spec.num_experts)], axis=1)

    def scores(self, name: str, target: int, hidden: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """``[N, E]`` scores of predictor ``name`` for layer ``target`` (``1 <= target < L``), from
        ``hidden`` ``[N, D]`` entering layer ``target - 1``'s MoE and ``previous`` ``[N, k]``, the
        experts layer ``target`` chose for each token's previous token (-1: none)."""
        if not 1 <= target < self.spec.num_layers:
            raise ValueError(f"target layer {target} has no layer before it to predict from "
                             f"(1 <= target < {self.spec.num_layers})")
        frequency = np.broadcast_to(self.frequency[target], (len(hidden), self.spec.num_experts))
        if name == "most_frequent":
            return frequency
        if name == "previous_token":
            return previous_one_hot(previous, self.spec.num_experts) + frequency  # frequency < 1 breaks ties
        if name == "speculative":
            return self.speculative_logits(target, hidden)
        if name == "learned":
            return self._learned(target)(self.features(target, hidden, previous))
        raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")

    def _learned(self, target: int) -> LinearScores:
        return LinearScores(self.learned_weight[target - 1], self.learned_bias[target - 1], "log_softmax")

    def flops(self, name: str) -> float:
        """FLOPs per token of predictor ``name`` for one layer (the top-k selection left out: all share it)."""
        d, e = self.spec.d_model, self.spec.num_experts
        speculative = 8.0 * d + 2.0 * d * e  # norm (mean, variance, scale, affine) + gate
        return {"most_frequent": 0.0, "previous_token": 0.0, "speculative": speculative,
                "learned": speculative + self._learned(1).flops}[name]

    def save(self, path: str | os.PathLike) -> None:
        """Write the predictors as one ``.npz`` (the routing spec included)."""
        with open(path, "wb") as stream:
            np.savez(stream, spec=np.array(list(asdict(self.spec).values())), frequency=self.frequency,
                     learned_weight=self.learned_weight, learned_bias=self.learned_bias,
                     **{f"gates.{key}": self.gates[key] for key in _GATE_KEYS})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FittedPredictors":
        """Read predictors :meth:`save` wrote (:class:`TraceMismatchError` if the file holds none)."""
        try:
            with np.load(Path(path)) as saved:
                spec = RoutingSpec(*(int(v) for v in saved["spec"]))
                return cls(spec, {key: saved[f"gates.{key}"] for key in _GATE_KEYS}, saved["frequency"],
                           saved["learned_weight"], saved["learned_bias"])
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise TraceMismatchError(f"{path} does not hold predictors moco fitted ({error}); fit them with "
                                     "`moco moe fit-predictors`") from error


def previous_experts(frame: ActivationFrame, layer: int) -> np.ndarray:
    """``[N, k]``: the experts ``layer`` chose for each row's previous token (-1 at a window's start)."""
    chosen = frame[experts_column(layer)].astype(np.int64)
    previous = np.full_like(chosen, -1)
    previous[1:] = chosen[:-1]
    previous[frame[POSITION] == 0] = -1
    return previous


def fit_predictors(frame: ActivationFrame, spec: RoutingSpec, gates: dict[str, np.ndarray],
                   max_rows: int = 20_000, regularization: float = 1.0, seed: int = 0,
                   progress: Callable[[], None] | None = None) -> FittedPredictors:
    """Fit every predictor on the trace ``frame`` (at most ``max_rows`` tokens, drawn at random, for the probe);
    ``progress()`` is called after each predicted layer."""
    check_trace(frame, spec)
    num_layers, num_experts, top_k = spec.num_layers, spec.num_experts, spec.top_k
    frequency = np.stack([np.bincount(frame[experts_column(layer)].reshape(-1).astype(np.int64),
                                      minlength=num_experts) / (len(frame) * top_k) for layer in range(num_layers)])
    predictors = FittedPredictors(spec, gates, frequency.astype(np.float32),
                                  np.zeros((num_layers - 1, spec.d_model + 2 * num_experts, num_experts), np.float32),
                                  np.zeros((num_layers - 1, num_experts), np.float32))
    rows = np.sort(np.random.default_rng(seed).permutation(len(frame))[:max_rows])
    fitter = SoftmaxRuleFitter(regularization)
    for target in range(1, num_layers):
        features = predictors.features(target, frame[hidden_column(target - 1)][rows],
                                        previous_experts(frame, target)[rows])
        chosen = frame[experts_column(target)][rows].astype(np.int64)
        fitted = fitter.fit(np.repeat(features, top_k, axis=0), chosen.reshape(-1), num_experts)
        predictors.learned_weight[target - 1], predictors.learned_bias[target - 1] = fitted.weight, fitted.bias
        if progress is not None:
            progress()
    return predictors


def recall_at_k(scores: np.ndarray, chosen: np.ndarray) -> float:
    """Mean fraction of each token's ``k`` chosen experts among its ``k`` best-scored ones."""
    k = chosen.shape[1]
    predicted = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((predicted[:, :, None] == chosen[:, None, :]).any(axis=1).mean())


def hit_rates(predictors: FittedPredictors, frame: ActivationFrame) -> dict[str, list[float]]:
    """Per predictor, recall@k for each target layer ``1..L-1`` on the trace ``frame``."""
    check_trace(frame, predictors.spec)
    rates: dict[str, list[float]] = {name: [] for name in PREDICTORS}
    for target in range(1, predictors.spec.num_layers):
        hidden, previous = frame[hidden_column(target - 1)], previous_experts(frame, target)
        chosen = frame[experts_column(target)].astype(np.int64)
        for name in PREDICTORS:
            rates[name].append(recall_at_k(predictors.scores(name, target, hidden, previous), chosen))
    return rates


def held_out_windows(frame: ActivationFrame, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the rows of a random ``fraction`` of the trace's windows (whole windows, so the
    previous-token feature never crosses the split)."""
    windows = frame[WINDOW]
    unique = np.unique(windows)
    held = np.random.default_rng(seed).permutation(unique)[:max(1, int(round(fraction * len(unique))))]
    return np.isin(windows, held)
