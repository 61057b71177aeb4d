"""Time per output token of offloaded-expert decoding, simulated from a routing trace.

The simulation replays what
:class:`~moco_compile.runtime.moe.expert_offload.OffloadedExperts` does, step for step, with
durations instead of work: every decision (which expert is evicted, which loads are submitted
for which layers, in which order, which are skipped) is made by the runtime's own
:class:`~moco_compile.runtime.moe.cache_policy.CachePolicy`, whose notes give the steps of a
layer, the time model (one compute stream, one link serving loads in submission order) and the
modes.  The runtime runs ``lru``, ``prefetch`` and ``predictive``; ``resident``, ``on_demand``
and ``optimal`` (Belady's offline cache, which knows the true routing) are simulated only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moco_compile.runtime.moe.cache_policy import CacheCounts, CachePolicy, Timing
from moco_compile.runtime.moe.expert_cache import check_capacity

__all__ = ["MODES", "Simulated", "Timing", "simulate_decode"]
MODES = ("resident", "on_demand", "lru", "prefetch", "optimal", "predictive")
_NEVER = np.iinfo(np.int64).max // 2


@dataclass
class Simulated(CacheCounts):
    """What a simulated decode measured: the cache's counts and the time per token."""

    tpot_seconds: float = 0.0


def simulate_decode(chosen: np.ndarray, timing: Timing, mode: str, capacity: int | None = None,
                    predicted: np.ndarray | None = None, num_experts: int | None = None,
                    foresight: np.ndarray | None = None, prior: np.ndarray | None = None) -> Simulated:
    """Simulate decoding tokens whose routing is ``chosen`` ``[T, L, k]``.

    ``predicted`` ``[T, L, m]`` (mode ``prefetch``): row ``[t, l]`` lists the experts predicted for
    layer ``l`` of token ``t`` while layer ``l - 1`` computes (``-1``: none; row ``l = 0`` unused).
    ``foresight`` ``[T, L, K, E]`` (mode ``predictive``, optional for ``optimal``): row ``[t, l]`` as
    :mod:`~moco_compile.runtime.moe.cache_policy` describes (zeros past the last token);
    ``prior`` ``[L, E]`` (``predictive``): each expert's long-run probability of use, averaged into eviction.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    tokens, num_layers, top_k = chosen.shape
    num_experts = num_experts or int(chosen.max()) + 1
    cached = mode not in ("resident", "on_demand")
    if cached:
        check_capacity(capacity, num_experts, top_k)
    if mode == "prefetch" and (predicted is None or predicted.shape[:2] != chosen.shape[:2]):
        raise ValueError("mode 'prefetch' needs predictions [T, L, m] for the same tokens and layers as `chosen`")
    if mode == "predictive" and foresight is None:
        raise ValueError("mode 'predictive' needs foresight [T, L, K, E]")
    if foresight is not None and (foresight.shape[:2] != chosen.shape[:2] or foresight.shape[3] != num_experts
                                  or not 1 <= foresight.shape[2] <= num_layers):
        raise ValueError(f"foresight must be [T, L, K, E] = [{tokens}, {num_layers}, 1..{num_layers}, {num_experts}] "
                         f"for this routing, got {list(foresight.shape)}")
    if prior is not None and prior.shape != (num_layers, num_experts):
        raise ValueError(f"prior must be [L, E] = [{num_layers}, {num_experts}] for this routing, got {list(prior.shape)}")
    counts = Simulated()
    policy = CachePolicy(num_layers, num_experts, top_k, capacity if cached else top_k, timing, mode, prior,
                         _first_use(chosen, num_experts) if mode == "optimal" else None, counts)
    for token in range(tokens):
        for layer in range(num_layers):
            ahead = () if predicted is None or layer + 1 == num_layers else predicted[token, layer + 1]
            needed = sorted({int(e) for e in chosen[token, layer]})
            policy.step(token, layer, needed, [int(e) for e in ahead if e >= 0],
                        None if foresight is None else foresight[token, layer])
    counts.tpot_seconds = policy.now / max(tokens, 1)
    return counts


def _first_use(chosen: np.ndarray, num_experts: int) -> np.ndarray:
    """``[T + 1, L, E]``: the first token ``>= t`` whose layer ``l`` uses expert ``e`` (``_NEVER``: none)."""
    tokens, num_layers, _ = chosen.shape
    first = np.full((tokens + 1, num_layers, num_experts), _NEVER, np.int64)
    for token in range(tokens - 1, -1, -1):
        first[token] = first[token + 1]
        for layer in range(num_layers):
            first[token, layer, chosen[token, layer]] = token
    return first
