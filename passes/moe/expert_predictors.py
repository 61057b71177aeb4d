"""Predicting the experts of the next layers from the hidden state entering layer s's MoE block.

Layers are counted across tokens: from layer ``s`` of a token, distance ``d`` (``1..K``,
``K <= L``) reaches layer ``t = (s + d) % L`` of the same token (``s + d < L``) or of the
next one.  Each predictor scores the ``E`` experts of that target for every token; its
top-k are the experts to prefetch, its probabilities rank what a cache keeps:

1. ``most_frequent``: layer t's experts by how often the calibration trace used them
   (a constant list, no FLOPs);
2. ``previous_token``: the experts layer t chose for the target token's predecessor, ties
   and the first token by frequency (no FLOPs; a ranking, no probabilities);
3. ``speculative``: layer t's own norm and gate applied to layer s's hidden state;
4. ``learned``: one multinomial linear probe per source layer and distance, fitted with
   the spine's rule engine (:class:`~moco_compile.passes.calibration.rules.SoftmaxRuleFitter`)
   on ``[layer-normalised hidden state, the speculative logits, the predecessor's experts
   at t one-hot]`` to predict the target's choice (a token counts once per expert it chose).

The hit rate of a prediction is recall@k: the fraction of the ``k`` experts a token
used at the target that are among the predicted ``k``.
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
PROBABILISTIC = ("most_frequent", "speculative", "learned")  # those that give P(used)
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
    """Every predictor for every source layer and distance, as arrays (``learned_*[s, d - 1]``)."""

    spec: RoutingSpec
    gates: dict[str, np.ndarray]
    frequency: np.ndarray        # [L, E] share of the trace's choices
    learned_weight: np.ndarray   # [L, K, D + 2E, E]
    learned_bias: np.ndarray     # [L, K, E]

    @property
    def lookahead(self) -> int:
        """``K``: the farthest distance predicted (in layers, across tokens)."""
        return self.learned_weight.shape[1]

    def target(self, source: int, distance: int) -> tuple[int, int]:
        """``(token offset, layer)`` that ``distance`` layers after layer ``source`` reaches."""
        if not 0 <= source < self.spec.num_layers or not 1 <= distance <= self.lookahead:
            raise ValueError(f"no predictor from layer {source} at distance {distance}: layers are "
                             f"0..{self.spec.num_layers - 1}, distances 1..{self.lookahead} (fit-predictors "
                             "--lookahead sets the farthest)")
        return divmod(source + distance, self.spec.num_layers)

    def speculative_logits(self, target: int, hidden: np.ndarray) -> np.ndarray:
        """Layer ``target``'s gate logits on ``hidden`` (a hidden state entering an earlier MoE)."""
        normed = _standardise(hidden.astype(np.float32), float(self.gates["norm_eps"][target]))
        normed = normed * self.gates["norm_weight"][target] + self.gates["norm_bias"][target]
        return normed @ self.gates["gate_weight"][target].T

    def features(self, target: int, hidden: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """The learned estimator's input ``[N, D + 2E]``: layer-normalised ``hidden`` (no affine), layer
        ``target``'s speculative logits and the predecessor's experts at ``target``, one-hot."""
        eps = float(self.gates["norm_eps"][target])
        return np.concatenate([_standardise(hidden.astype(np.float32), eps), self.speculative_logits(target, hidden),
                               previous_one_hot(previous, self.spec.num_experts)], axis=1)

    def scores(self, name: str, source: int, distance: int, hidden: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """``[N, E]`` scores of predictor ``name`` for the experts ``distance`` layers after layer ``source``,
        from ``hidden`` ``[N, D]`` entering layer ``source``'s MoE and ``previous`` ``[N, k]``, the experts
        the target layer chose for each target token's predecessor (-1: none)."""
        _, target = self.target(source, distance)
        frequency = np.broadcast_to(self.frequency[target], (len(hidden), self.spec.num_experts))
        if name == "most_frequent":
            return frequency
        if name == "previous_token":
            return previous_one_hot(previous, self.spec.num_experts) + frequency  # frequency < 1 breaks ties
        if name == "speculative":
            return self.speculative_logits(target, hidden)
        if name == "learned":
            return self._learned(source, distance)(self.features(target, hidden, previous))
        raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")

    def use_probabilities(self, name: str, source: int, distance: int, hidden: np.ndarray,
                          previous: np.ndarray) -> np.ndarray:
        """``[N, E]``: the probability that the target uses each expert (``k`` times the predicted share
        of its choices, at most 1), for the predictors in :data:`PROBABILISTIC`."""
        if name not in PROBABILISTIC:
            raise ValueError(f"predictor {name!r} ranks experts but gives no probabilities; choose one of "
                             f"{', '.join(PROBABILISTIC)}")
        scores = self.scores(name, source, distance, hidden, previous)
        if name != "most_frequent":
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores = scores / scores.sum(axis=1, keepdims=True)
        return np.minimum(self.spec.top_k * scores, 1.0)

    def long_run_probabilities(self) -> np.ndarray:
        """``[L, E]``: the probability that a token uses each expert, from the trace's frequencies."""
        return np.minimum(self.spec.top_k * self.frequency, 1.0)

    def _learned(self, source: int, distance: int) -> LinearScores:
        return LinearScores(self.learned_weight[source, distance - 1], self.learned_bias[source, distance - 1],
                            "log_softmax")

    def flops(self, name: str) -> float:
        """FLOPs per token of predictor ``name`` for one layer (the top-k selection left out: all share it)."""
        d, e = self.spec.d_model, self.spec.num_experts
        speculative = 8.0 * d + 2.0 * d * e  # norm (mean, variance, scale, affine) + gate
        return {"most_frequent": 0.0, "previous_token": 0.0, "speculative": speculative,
                "learned": speculative + self._learned(0, 1).flops}[name]

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
                weight, bias = saved["learned_weight"], saved["learned_bias"]
                if weight.ndim != 4 or weight.shape[0] != spec.num_layers:
                    raise ValueError("its learned probes are one per layer, not per source layer and distance")
                return cls(spec, {key: saved[f"gates.{key}"] for key in _GATE_KEYS}, saved["frequency"], weight, bias)
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


def distance_rows(frame: ActivationFrame, spec: RoutingSpec, source: int,
                  distance: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """The trace's pairs for predicting ``distance`` layers after layer ``source``: source rows, target
    rows (the same window), the target layer and the target's predecessor's experts there ``[n, k]``."""
    offset, layer = divmod(source + distance, spec.num_layers)
    windows = frame[WINDOW]
    rows = np.flatnonzero(windows[:len(frame) - offset] == windows[offset:])
    targets = rows + offset
    return rows, targets, layer, previous_experts(frame, layer)[targets]


def fit_predictors(frame: ActivationFrame, spec: RoutingSpec, gates: dict[str, np.ndarray],
                   max_rows: int = 20_000, regularization: float = 1.0, seed: int = 0, lookahead: int | None = None,
                   progress: Callable[[], None] | None = None) -> FittedPredictors:
    """Fit every predictor on the trace ``frame`` for distances ``1..lookahead`` (default: ``L``, one token
    ahead; at most ``max_rows`` tokens, drawn at random, per probe); ``progress()`` is called after each
    fitted probe."""
    check_trace(frame, spec)
    num_layers, num_experts, top_k = spec.num_layers, spec.num_experts, spec.top_k
    lookahead = num_layers if lookahead is None else lookahead
    if not 1 <= lookahead <= num_layers:
        raise ValueError(f"lookahead must be 1..{num_layers} layers (at most one token ahead), got {lookahead}")
    frequency = np.stack([np.bincount(frame[experts_column(layer)].reshape(-1).astype(np.int64),
                                      minlength=num_experts) / (len(frame) * top_k) for layer in range(num_layers)])
    features = spec.d_model + 2 * num_experts
    predictors = FittedPredictors(spec, gates, frequency.astype(np.float32),
                                  np.zeros((num_layers, lookahead, features, num_experts), np.float32),
                                  np.zeros((num_layers, lookahead, num_experts), np.float32))
    rng = np.random.default_rng(seed)
    fitter = SoftmaxRuleFitter(regularization)
    for source in range(num_layers):
        hidden = frame[hidden_column(source)]
        for distance in range(1, lookahead + 1):
            rows, targets, layer, previous = distance_rows(frame, spec, source, distance)
            sample = np.sort(rng.permutation(len(rows))[:max_rows])
            inputs = predictors.features(layer, hidden[rows[sample]], previous[sample])
            chosen = frame[experts_column(layer)][targets[sample]].astype(np.int64)
            fitted = fitter.fit(np.repeat(inputs, top_k, axis=0), chosen.reshape(-1), num_experts)
            predictors.learned_weight[source, distance - 1] = fitted.weight
            predictors.learned_bias[source, distance - 1] = fitted.bias
            if progress is not None:
                progress()
    return predictors


def recall_at_k(scores: np.ndarray, chosen: np.ndarray) -> float:
    """Mean fraction of each token's ``k`` chosen experts among its ``k`` best-scored ones."""
    k = chosen.shape[1]
    predicted = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((predicted[:, :, None] == chosen[:, None, :]).any(axis=1).mean())


def hit_rates(predictors: FittedPredictors, frame: ActivationFrame, distance: int = 1) -> dict[str, list[float]]:
    """Per predictor, recall@k ``distance`` layers after each source layer ``0..L-1`` on the trace ``frame``
    (from the last layers, of the next token's first ones)."""
    check_trace(frame, predictors.spec)
    rates: dict[str, list[float]] = {name: [] for name in PREDICTORS}
    for source in range(predictors.spec.num_layers):
        rows, targets, layer, previous = distance_rows(frame, predictors.spec, source, distance)
        hidden, chosen = frame[hidden_column(source)][rows], frame[experts_column(layer)][targets].astype(np.int64)
        for name in PREDICTORS:
            rates[name].append(recall_at_k(predictors.scores(name, source, distance, hidden, previous), chosen))
    return rates


def held_out_windows(frame: ActivationFrame, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the rows of a random ``fraction`` of the trace's windows (whole windows, so the
    previous-token feature never crosses the split)."""
    windows = frame[WINDOW]
    unique = np.unique(windows)
    held = np.random.default_rng(seed).permutation(unique)[:max(1, int(round(fraction * len(unique))))]
    return np.isin(windows, held)
