"""TPOT of offloaded-expert decoding for each policy: trace a greedy decode, predict, simulate.

1. :func:`decode_routing`: greedy decoding of each prompt with all experts resident,
   recording per decoded token and layer the experts chosen and the hidden state
   entering the MoE block (the routing the offloaded runtime must reproduce: it
   computes identical outputs, so it routes identically);
2. :func:`predictions`: each predictor's experts for layers ``1..L-1`` of every token;
3. :func:`measured_timing`: the compute durations of this model on this machine, one
   token at a time (medians), with the transfer time of the given expert size and link;
4. :func:`tpot_table`: :func:`~moco_compile.runtime.moe_timeline.simulate_decode` for
   every mode, the decoded tokens of all prompts as one stream (prefill not counted).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moco_compile.passes.expert_predictors import PREDICTORS, FittedPredictors
from moco_compile.runtime.moe_decode import greedy_decode, moe_blocks, new_kv, reference_step
from moco_compile.runtime.moe_timeline import Timing, simulate_decode


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
    layers, reference = moe_blocks(model), reference_step(model)
    chosen, hidden, previous, tokens = [], [], [], []
    for prompt in prompts:
        records: list[tuple[np.ndarray, np.ndarray]] = []  # per forward: ([L, k], [L, D]) of its last token
        current: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def record(layer: int, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
            current[layer] = (layers[layer].route(normed[-1:])[1][0].numpy(), residual[-1].float().numpy())
            if layer == len(layers) - 1:
                records.append((np.stack([current[i][0] for i in range(len(layers))]),
                                np.stack([current[i][1] for i in range(len(layers))])))
            return reference(layer, residual, normed)

        generated, _ = greedy_decode(model, torch.tensor(list(prompt)), steps, record, progress)
        tokens.append(generated)
        routing = np.stack([r[0] for r in records]).astype(np.int64)  # prefill's last token, then each step
        chosen.append(routing[1:])
        previous.append(routing[:-1])
        hidden.append(np.stack([r[1] for r in records])[1:])
    return DecodeRouting(np.concatenate(chosen), np.concatenate(hidden), np.concatenate(previous), tokens)


def predictions(predictors: FittedPredictors, name: str, routing: DecodeRouting) -> np.ndarray:
    """``[T, L, k]``: predictor ``name``'s experts for layer ``l`` from layer ``l - 1`` (row 0: -1)."""
    tokens, num_layers, top_k = routing.chosen.shape
    predicted = np.full((tokens, num_layers, top_k), -1)
    for target in range(1, num_layers):
        scores = predictors.scores(name, target, routing.hidden[:, target - 1], routing.previous[:, target])
        predicted[:, target] = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return predicted


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


def measured_timing(model: torch.nn.Module, predictors: FittedPredictors, transfer_seconds: float,
                    context: int = 32, repeats: int = 200) -> tuple[Timing, dict[str, float]]:
    """This machine's compute durations for one decoded token after ``context`` tokens, and each
    predictor's measured time for one prediction (seconds)."""
    layers = moe_blocks(model)
    kv = new_kv(model)
    with torch.no_grad():
        x = model.embed_at(torch.zeros(1, context, dtype=torch.long))
        for layer, block in enumerate(model.blocks):  # fill the key/value cache
            x = x + block.attention(block.norm1(x), kv[layer])
        token = torch.zeros(1, 1, dtype=torch.long)
        step = model.embed_at(token, context)

        def dense(layer: int) -> None:
            block = model.blocks[layer]
            y = step + block.attention(block.norm1(step), [kv[layer][0], kv[layer][1]])
            layers[layer].route(block.norm2(y.flatten(0, 1)))

        dense_seconds = [_median_seconds(lambda: dense(layer), repeats) for layer in range(len(layers))]
        expert = layers[0].experts[0]
        expert_seconds = _median_seconds(lambda: expert(step[0]), repeats)
        head_seconds = _median_seconds(lambda: (model.embed_at(token, context), model.logits(step)), repeats)
    hidden, previous = step[0].numpy(), np.zeros((1, layers[0].top_k), np.int64)
    predictor_seconds = {name: _median_seconds(lambda: predictors.scores(name, 1, hidden, previous), repeats)
                         for name in PREDICTORS}
    return Timing(dense_seconds, expert_seconds, transfer_seconds, 0.0, head_seconds), predictor_seconds


def tpot_table(routing: DecodeRouting, predictors: FittedPredictors, timing: Timing, capacity: int,
               predictor_seconds: dict[str, float] | None = None) -> list[dict]:
    """One row per policy: ``policy``, ``tpot_ms``, ``hit_rate`` (cache hits over chosen experts),
    ``prefetches`` per token and the reduction vs on-demand loading and vs the LRU cache."""
    num_experts = predictors.spec.num_experts
    runs = {"all resident": simulate_decode(routing.chosen, timing, "resident"),
            "on-demand": simulate_decode(routing.chosen, timing, "on_demand"),
            "LRU cache": simulate_decode(routing.chosen, timing, "lru", capacity, num_experts=num_experts)}
    for name in PREDICTORS:
        cost = (predictor_seconds or {}).get(name, timing.predictor_seconds)
        timed = Timing(timing.dense_seconds, timing.expert_seconds, timing.transfer_seconds, cost, timing.head_seconds)
        runs[f"LRU + prefetch ({name})"] = simulate_decode(routing.chosen, timed, "prefetch", capacity,
                                                           predictions(predictors, name, routing), num_experts)
    tokens = len(routing.chosen)
    on_demand, lru = runs["on-demand"].tpot_seconds, runs["LRU cache"].tpot_seconds
    return [{"policy": policy, "tpot_ms": 1e3 * run.tpot_seconds,
             "hit_rate": None if policy == "all resident" else run.hit_rate,
             "prefetches_per_token": run.prefetches / tokens,
             "reduction_vs_on_demand": 1 - run.tpot_seconds / on_demand,
             "reduction_vs_lru": 1 - run.tpot_seconds / lru} for policy, run in runs.items()]
