"""Time per output token of offloaded-expert decoding, simulated from a routing trace.

The simulation replays what :class:`~moco_compile.runtime.moe.expert_offload.OffloadedExperts`
does, step for step, with durations instead of work: one compute stream, one transfer
link serving loads in submission order, the same per-layer cache policy
(:class:`~moco_compile.runtime.moe.expert_cache.LayerCache`).  Per token and layer ``l``:

1. compute the layer's attention, norms and gate (``dense_seconds[l]``);
2. submit a load for each chosen expert not cached (a miss; its slot is taken now);
3. with a predictor: spend ``predictor_seconds``, then submit loads for the predicted
   experts of layer ``l+1`` that are not cached (prefetch);
4. compute the chosen experts in expert order, each starting when both the stream and
   its own load are done (``expert_seconds`` each).

A load takes ``transfer_seconds``.  Experts with a load in flight, the layer's chosen
experts and (while prefetching) the other predicted experts are never evicted; when every
slot holds one, the layer waits for the loads in flight.  Modes: ``resident`` (every expert on the device: the lower
bound), ``on_demand`` (no cache: every chosen expert is loaded when needed), ``lru``
(a cache, no prefetch) and ``prefetch`` (a cache and predictions).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moco_compile.runtime.moe.expert_cache import LayerCache, check_capacity

MODES = ("resident", "on_demand", "lru", "prefetch")


@dataclass(frozen=True)
class Timing:
    """Durations (seconds) of the parts of one decoding step."""

    dense_seconds: Sequence[float]  # per layer: attention, norms, gate
    expert_seconds: float           # one expert on one token
    transfer_seconds: float         # one expert's weights, host to device
    predictor_seconds: float = 0.0  # one prediction of the next layer's experts
    head_seconds: float = 0.0       # embedding and output projection


@dataclass
class Simulated:
    """What a simulated decode measured."""

    tpot_seconds: float
    hits: int
    misses: int
    prefetches: int
    prefetch_hits: int

    @property
    def hit_rate(self) -> float:
        """Hits over the experts computed with."""
        return self.hits / max(self.hits + self.misses, 1)


def simulate_decode(chosen: np.ndarray, timing: Timing, mode: str, capacity: int | None = None,
                    predicted: np.ndarray | None = None, num_experts: int | None = None) -> Simulated:
    """Simulate decoding tokens whose routing is ``chosen`` ``[T, L, k]``.

    ``predicted`` ``[T, L, m]`` (mode ``prefetch``): row ``[t, l]`` lists the experts predicted for
    layer ``l`` of token ``t`` while layer ``l - 1`` computes (``-1``: none; row ``l = 0`` unused).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    tokens, num_layers, top_k = chosen.shape
    if mode in ("lru", "prefetch"):
        check_capacity(capacity, num_experts or int(chosen.max()) + 1, top_k)
    if mode == "prefetch" and (predicted is None or predicted.shape[:2] != chosen.shape[:2]):
        raise ValueError("mode 'prefetch' needs predictions [T, L, m] for the same tokens and layers as `chosen`")
    state = _State(num_layers, capacity if mode in ("lru", "prefetch") else top_k, timing)
    for token in range(tokens):
        if mode == "on_demand":
            state.caches = [LayerCache(top_k) for _ in range(num_layers)]
        state.now += timing.head_seconds
        for layer in range(num_layers):
            state.now += timing.dense_seconds[layer]
            needed = sorted({int(e) for e in chosen[token, layer]})
            if mode != "resident":
                state.fetch(layer, needed)
            if mode == "prefetch" and layer + 1 < num_layers:
                state.now += timing.predictor_seconds
                state.prefetch(layer + 1, [int(e) for e in predicted[token, layer + 1] if e >= 0])
            for expert in needed:
                state.now = max(state.now, state.arrival[layer].get(expert, 0.0)) + timing.expert_seconds
    return Simulated(state.now / max(tokens, 1), state.hits, state.misses, state.prefetches, state.prefetch_hits)


class _State:
    """Clock, link and caches of one simulated decode."""

    def __init__(self, num_layers: int, capacity: int, timing: Timing) -> None:
        self.caches = [LayerCache(capacity) for _ in range(num_layers)]
        self.arrival: list[dict[int, float]] = [{} for _ in range(num_layers)]
        self.prefetched: list[set[int]] = [set() for _ in range(num_layers)]
        self.timing = timing
        self.now = self.link = 0.0
        self.hits = self.misses = self.prefetches = self.prefetch_hits = 0

    def _load(self, layer: int, expert: int, protected: set[int]) -> None:
        in_flight = {e for e, done in self.arrival[layer].items() if done > self.now}
        if not self.caches[layer].can_admit(protected | in_flight):  # every slot in use or loading: wait
            self.now = max(self.arrival[layer][e] for e in in_flight)
            in_flight = set()
        _, evicted = self.caches[layer].admit(expert, protected | in_flight)
        self.arrival[layer].pop(evicted, None)
        self.prefetched[layer].discard(evicted)
        self.link = max(self.link, self.now) + self.timing.transfer_seconds
        self.arrival[layer][expert] = self.link

    def fetch(self, layer: int, needed: list[int]) -> None:
        """Count hits and submit loads for the misses among a layer's chosen experts."""
        for expert in needed:
            if self.caches[layer].lookup(expert) is not None:
                self.hits += 1
                self.prefetch_hits += expert in self.prefetched[layer]
            else:
                self.misses += 1
                self._load(layer, expert, set(needed))
        self.prefetched[layer].difference_update(needed)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Submit loads for the predicted experts of ``layer`` that are not cached."""
        for expert in experts:
            if expert not in self.caches[layer]:
                self.prefetches += 1
                self._load(layer, expert, set(experts))
                self.prefetched[layer].add(expert)
