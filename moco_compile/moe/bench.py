"""TPOT of offloaded-expert decoding for each policy: trace a greedy decode, predict, simulate.

1. :func:`decode_routing`: greedy decoding of each prompt with all experts resident,
   recording per decoded token and layer the experts chosen and the hidden state
   entering the MoE block (the routing the offloaded runtime must reproduce: it
   computes identical outputs, so it routes identically);
2. :func:`predictions`: each predictor's experts for layers ``1..L-1`` of every token;
3. :func:`measured_timing`: the compute durations of this model on this machine, timed
   inside greedy decoding (medians), with the transfer time of the given expert size and link;
4. :func:`tpot_table`: :func:`~moco_compile.runtime.moe.timeline.simulate_decode` for
   every mode, the decoded tokens of all prompts as one stream (prefill not counted).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moco_compile.passes.moe.expert_predictors import FittedPredictors, PREDICTORS
from moco_compile.runtime.moe.decode import greedy_decode, moe_blocks, reference_step
from moco_compile.runtime.moe.expert_offload import Predict
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


def predictions(predictors: FittedPredictors, name: str, routing: DecodeRouting) -> np.ndarray:
    """``[T, L, k]``: predictor ``name``'s experts for layer ``l`` from layer ``l - 1`` (row 0: -1)."""
    tokens, num_layers, top_k = routing.chosen.shape
    predicted = np.full((tokens, num_layers, top_k), -1)
    for target in range(1, num_layers):
        scores = predictors.scores(name, target, routing.hidden[:, target - 1], routing.previous[:, target])
        predicted[:, target] = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return predicted


def runtime_predictor(predictors: FittedPredictors, name: str) -> Predict:
    """Predictor ``name`` as :class:`~moco_compile.runtime.moe.expert_offload.OffloadedExperts` calls it:
    the ``k`` best-scored experts of a layer for one token."""
    top_k = predictors.spec.top_k

    def predict(target: int, hidden: np.ndarray, previous: np.ndarray) -> np.ndarray:
        scores = predictors.scores(name, target, hidden[None], previous[None])[0]
        return np.argsort(-scores, kind="stable")[:top_k]

    return predict


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
                    predictors: FittedPredictors, transfer_seconds: float) -> tuple[Timing, dict[str, float]]:
    """This machine's compute durations, timed inside real greedy decoding of ``prompts`` (medians
    over decoded tokens), and each predictor's time for one prediction (seconds).

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
    predictor_seconds = {name: _median_seconds(lambda: predictors.scores(name, 1, hidden, previous), 200)
                         for name in PREDICTORS}
    return timing, predictor_seconds


def tpot_table(routing: DecodeRouting, predictors: FittedPredictors, timing: Timing, capacity: int,
               predictor_seconds: dict[str, float] | None = None) -> list[dict]:
    """One row per policy: ``policy``, ``tpot_ms``, ``hit_rate`` (cache hits over chosen experts),
    ``prefetches`` per token and the reduction vs on-demand loading and vs the LRU cache.  The last
    row prefetches the experts each layer really chooses: the bound of one-layer-ahead prefetching."""
    num_experts = predictors.spec.num_experts
    runs = {"all resident": simulate_decode(routing.chosen, timing, "resident"),
            "on-demand": simulate_decode(routing.chosen, timing, "on_demand"),
            "LRU cache": simulate_decode(routing.chosen, timing, "lru", capacity, num_experts=num_experts)}
    for name in PREDICTORS:
        cost = (predictor_seconds or {}).get(name, timing.predictor_seconds)
        timed = Timing(timing.dense_seconds, timing.expert_seconds, timing.transfer_seconds, cost, timing.head_seconds)
        runs[f"LRU + prefetch ({name})"] = simulate_decode(routing.chosen, timed, "prefetch", capacity,
                                                           predictions(predictors, name, routing), num_experts)
    runs["LRU + prefetch (oracle: the true experts)"] = simulate_decode(routing.chosen, timing, "prefetch", capacity,
                                                                       routing.chosen, num_experts)
    tokens = len(routing.chosen)
    on_demand, lru = runs["on-demand"].tpot_seconds, runs["LRU cache"].tpot_seconds
    return [{"policy": policy, "tpot_ms": 1e3 * run.tpot_seconds,
             "hit_rate": None if policy == "all resident" else run.hit_rate,
             "prefetches_per_token": run.prefetches / tokens,
             "reduction_vs_on_demand": 1 - run.tpot_seconds / on_demand,
             "reduction_vs_lru": 1 - run.tpot_seconds / lru} for policy, run in runs.items()]
