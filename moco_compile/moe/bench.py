"""TPOT of offloaded-expert decoding for each policy: trace a greedy decode, predict, simulate.

1. :func:`decode_routing`: greedy decoding of each prompt with all experts resident,
   recording per decoded token and layer the experts chosen and the hidden state
   entering the MoE block (the routing the offloaded runtime must reproduce: it
   computes identical outputs, so it routes identically);
2. :func:`predictions`: each predictor's experts for layers ``1..L-1`` of every token (one layer
   ahead); :func:`foresight`: each probabilistic predictor's ``P(used)`` for the next ``K`` layers;
3. :func:`measured_timing`: the compute durations of this model on this machine, timed
   inside greedy decoding (medians), with the transfer time of the given expert size and link;
4. :func:`tpot_table`: :func:`~moco_compile.runtime.moe.timeline.simulate_decode` for
   every policy, the decoded tokens of all prompts as one stream (prefill not counted), each
   policy's gain over the LRU cache also as a share of the offline optimum's.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moco_compile.passes.moe.expert_predictors import PREDICTORS, PROBABILISTIC, FittedPredictors
from moco_compile.runtime.moe.decode import greedy_decode, moe_blocks, reference_step
from moco_compile.runtime.moe.expert_offload import Foresee, Predict
from moco_compile.runtime.moe.timeline import Timing, simulate_decode


@dataclass
class DecodeRouting:
    """Routing of decoded tokens: ``chosen`` ``[T, L, k]``, ``hidden`` ``[T, L, D]`` and ``previous``
    ``[T, L, k]`` (the routing of each token's predecessor: a prompt's last token for its first)."""

    chosen: np.ndarray
    hidden: np.ndarray
    previous: np.ndarray
    tokens: list[list[int]]


def decode_routing(model: torch.nn.Module, prompts: Sequence[Sequence[int]], steps: int,
                   progress: Callable[[], None] | None = None) -> DecodeRouting:
    """Greedy-decode ``steps`` tokens after each prompt and record the decoded tokens' routing."""
    num_layers = len(moe_blocks(model))
    chosen, hidden, previous, tokens = [], [], [], []
    for prompt in prompts:
        records: list[tuple[np.ndarray, np.ndarray]] = []  # per forward and layer: its last token's routing

        def record(layer: int, residual: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor) -> None:
            records.append((experts[-1].numpy(), residual[-1].float().numpy()))

        generated, _ = greedy_decode(model, torch.tensor(list(prompt)), steps, reference_step(model, record),
                                     progress)
        tokens.append(generated)
        routing = np.stack([r[0] for r in records]).astype(np.int64).reshape(-1, num_layers, records[0][0].size)
        states = np.stack([r[1] for r in records]).reshape(len(routing), num_layers, -1)
        chosen.append(routing[1:])  # forward 0 is the prompt (its last token), then one per decoded token
        previous.append(routing[:-1])
        hidden.append(states[1:])
    return DecodeRouting(np.concatenate(chosen), np.concatenate(hidden), np.concatenate(previous), tokens)


@dataclass(frozen=True)
class PredictorCost:
    """Seconds of one predictor's work per decoding step and layer."""

    next_layer: float  # the next layer's experts (LRU + prefetch)
    look_ahead: float  # the next K layers' probabilities (predictive)


def predictions(predictors: FittedPredictors, name: str, routing: DecodeRouting) -> np.ndarray:
    """``[T, L, k]``: predictor ``name``'s experts for layer ``l`` from layer ``l - 1`` (row 0: -1)."""
    tokens, num_layers, top_k = routing.chosen.shape
    predicted = np.full((tokens, num_layers, top_k), -1)
    for target in range(1, num_layers):
        scores = predictors.scores(name, target - 1, 1, routing.hidden[:, target - 1], routing.previous[:, target])
        predicted[:, target] = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return predicted


def foresight(predictors: FittedPredictors, name: str | None, routing: DecodeRouting) -> np.ndarray:
    """``[T, L, K, E]``: at layer ``s`` of token ``t``, predictor ``name``'s probability that each expert is used
    ``d`` layers later (``name`` None: the true routing, 0 or 1); zero past the last token."""
    tokens, num_layers, _ = routing.chosen.shape
    out = np.zeros((tokens, num_layers, predictors.lookahead, predictors.spec.num_experts), np.float32)
    for source in range(num_layers):
        for distance in range(1, predictors.lookahead + 1):
            offset, layer = predictors.target(source, distance)
            rows = tokens - offset
            if name is None:
                np.put_along_axis(out[:rows, source, distance - 1], routing.chosen[offset:, layer], 1.0, axis=1)
            else:
                out[:rows, source, distance - 1] = predictors.use_probabilities(
                    name, source, distance, routing.hidden[:rows, source], routing.previous[offset:, layer])
    return out


def runtime_predictor(predictors: FittedPredictors, name: str) -> Predict:
    """Predictor ``name`` as :class:`~moco_compile.runtime.moe.expert_offload.OffloadedExperts` calls it:
    the ``k`` best-scored experts of a layer for one token."""
    top_k = predictors.spec.top_k

    def predict(target: int, hidden: np.ndarray, previous: np.ndarray) -> np.ndarray:
        scores = predictors.scores(name, target - 1, 1, hidden[None], previous[None])[0]
        return np.argsort(-scores, kind="stable")[:top_k]

    return predict


def runtime_foresight(predictors: FittedPredictors, name: str) -> Foresee:
    """Probabilistic predictor ``name`` as :class:`~moco_compile.runtime.moe.expert_offload.OffloadedExperts`
    calls it in mode ``predictive``: for one token, the rows :func:`foresight` holds ``[K, E]``."""

    def foresee(source: int, hidden: np.ndarray, latest: np.ndarray) -> np.ndarray:
        return np.stack([predictors.use_probabilities(name, source, distance, hidden[None],
                                                      latest[predictors.target(source, distance)[1]][None])[0]
                         for distance in range(1, predictors.lookahead + 1)])

    return foresee


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of one expert's weights as the model holds them."""
    expert = moe_blocks(model)[0].experts[0]
    return sum(p.numel() * p.element_size() for p in expert.parameters())


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def measured_timing(model: torch.nn.Module, prompts: Sequence[Sequence[int]], steps: int,
                    predictors: FittedPredictors, transfer_seconds: float) -> tuple[Timing, dict[str, PredictorCost]]:
    """This machine's compute durations, timed inside real greedy decoding of ``prompts`` (medians
    over decoded tokens), and each predictor's time per step and layer.

    Per layer, the gate and the experts are timed inside the MoE step; everything else a
    decoded token costs (attention, norms, embedding, output, the decoding loop) is the
    token's time minus its MoE steps, spread evenly over the layers.
    """
    layers = moe_blocks(model)
    gate, experts, stamps = [[] for _ in layers], [[] for _ in layers], []

    def timed(layer: int, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        _, chosen, weights = layers[layer].route(normed)
        routed = time.perf_counter()
        out = layers[layer].combine(normed, chosen, weights, layers[layer].experts)
        if len(normed) == 1:  # a decoded token (a prompt's forward is left out)
            gate[layer].append(routed - start)
            experts[layer].append(time.perf_counter() - routed)
        return out

    for prompt in prompts:
        marks: list[float] = []
        greedy_decode(model, torch.tensor(list(prompt)), steps, timed, lambda: marks.append(time.perf_counter()))
        stamps += list(np.diff(marks))
    moe = sum(np.median(g) + np.median(e) for g, e in zip(gate, experts))
    rest = (np.median(stamps) - moe) / len(layers)
    top_k = layers[0].top_k
    timing = Timing([float(rest + np.median(g)) for g in gate], float(np.median(np.concatenate(experts))) / top_k,
                    transfer_seconds)
    hidden, previous = np.zeros((1, predictors.spec.d_model), np.float32), np.zeros((1, top_k), np.int64)
    distances = range(1, predictors.lookahead + 1)

    def look_ahead(name: str) -> None:
        for distance in distances:
            predictors.use_probabilities(name, 0, distance, hidden, previous)

    costs = {name: PredictorCost(_median_seconds(lambda: predictors.scores(name, 0, 1, hidden, previous), 200),
                                 _median_seconds(lambda: look_ahead(name), 50) if name in PROBABILISTIC else 0.0)
             for name in PREDICTORS}
    return timing, costs


OPTIMUM = "offline optimum (Belady)"
OPTIMUM_PREFETCH = "offline optimum + prefetch (true routing)"


def tpot_table(routing: DecodeRouting, predictors: FittedPredictors, timing: Timing, capacity: int,
               costs: dict[str, PredictorCost] | None = None) -> list[dict]:
    """One row per policy: ``policy``, ``tpot_ms``, ``hit_rate`` (cache hits over chosen experts),
    ``prefetches`` per token, the reduction vs on-demand loading and vs the LRU cache, and
    ``gap_closed`` (cache policies): the gain over LRU as a share of the offline optimum's (the better of
    Belady's cache alone and with prefetching of the true routing; None where that gains under 1%).  ``costs``: each predictor's
    time (default: ``timing.predictor_seconds`` for any prediction)."""
    num_experts = predictors.spec.num_experts

    def timed(seconds: float | None) -> Timing:
        return Timing(timing.dense_seconds, timing.expert_seconds, timing.transfer_seconds,
                      timing.predictor_seconds if seconds is None else seconds, timing.head_seconds)

    def cost(name: str) -> PredictorCost | None:
        return (costs or {}).get(name)

    def cached(mode: str, **kwargs):
        return simulate_decode(routing.chosen, kwargs.pop("timing", timing), mode, capacity, num_experts=num_experts,
                               **kwargs)

    runs = {"all resident": simulate_decode(routing.chosen, timing, "resident"),
            "on-demand": simulate_decode(routing.chosen, timing, "on_demand"),
            "LRU cache": cached("lru"),
            OPTIMUM: cached("optimal"),
            OPTIMUM_PREFETCH: cached("optimal", foresight=foresight(predictors, None, routing))}
    for name in PREDICTORS:
        runs[f"LRU + prefetch ({name})"] = cached("prefetch", predicted=predictions(predictors, name, routing),
                                                  timing=timed(cost(name) and cost(name).next_layer))
    for name in PROBABILISTIC:
        runs[f"predictive ({name})"] = cached("predictive", foresight=foresight(predictors, name, routing),
                                              prior=predictors.long_run_probabilities(),
                                              timing=timed(cost(name) and cost(name).look_ahead))
    tokens = len(routing.chosen)
    on_demand, lru = runs["on-demand"].tpot_seconds, runs["LRU cache"].tpot_seconds
    best = min(runs[OPTIMUM].tpot_seconds, runs[OPTIMUM_PREFETCH].tpot_seconds)
    return [{"policy": policy, "tpot_ms": 1e3 * run.tpot_seconds,
             "hit_rate": None if policy == "all resident" else run.hit_rate,
             "prefetches_per_token": run.prefetches / tokens,
             "reduction_vs_on_demand": 1 - run.tpot_seconds / on_demand,
             "reduction_vs_lru": 1 - run.tpot_seconds / lru,
             "gap_closed": (lru - run.tpot_seconds) / (lru - best)
             if lru - best >= 0.01 * lru and policy not in ("all resident", "on-demand") else None}
            for policy, run in runs.items()]
