"""Time per output token of offloaded-expert decoding, simulated from a routing trace.

In modes ``lru`` and ``prefetch`` the simulation replays what
:class:`~moco_compile.runtime.moe.expert_offload.OffloadedExperts` does, step for step, with
durations instead of work: one compute stream, one transfer link serving loads in submission
order, the same per-layer cache (:class:`~moco_compile.runtime.moe.expert_cache.LayerCache`).
Modes ``optimal`` and ``predictive`` exist in the simulation only (the runtime has no ranked
eviction or look-ahead yet).  Per token and layer ``l``:

1. compute the layer's attention, norms and gate (``dense_seconds[l]``);
2. (``predictive``) spend ``predictor_seconds`` on the predictions of the next ``K`` layers;
3. submit a load for each chosen expert not cached (a miss; its slot is taken now);
4. (``prefetch``) spend ``predictor_seconds``, then submit loads for the predicted experts of
   layer ``l+1`` that are not cached; (``predictive``, ``optimal`` with foresight) look ahead
   (:meth:`_State.look_ahead`);
5. compute the chosen experts in expert order, each starting when both the stream and
   its own load are done (``expert_seconds`` each).

A load takes ``transfer_seconds``.  Experts with a load in flight and the layer's chosen
experts are never evicted; when every slot holds one, the layer waits for the loads in flight.

Modes (eviction / loads):

* ``resident``: every expert on the device (the lower bound);
* ``on_demand``: no cache, every chosen expert loaded when needed;
* ``lru``: least recently used evicted, loads on demand;
* ``prefetch``: LRU, plus the predicted experts of layer ``l+1`` (``predicted``), which are
  also never evicted by each other;
* ``optimal``: Belady's offline cache, which knows the true routing: it evicts the expert
  whose next use is furthest away (demand loads only; with ``foresight``, the true
  routing, it also prefetches as ``predictive`` does);
* ``predictive``: ``foresight[t, l, d-1]`` is the probability that each expert is used at
  layer ``(l + d) % L`` of token ``t + (l + d) // L`` (``d = 1..K``), predicted at layer
  ``l`` of token ``t``.  Eviction keeps the experts most likely used at their layer's next
  use (least recently used among equals; LRU where no prediction covers that use); with a
  ``prior`` (each expert's long-run probability of use) it keeps those with the highest
  mean of the two, since a large cache keeps experts for more than the next token, which
  the look-ahead does not see.
  Look-ahead, nearest layer first, most likely expert first: a load is submitted only if
  a less likely expert can make room and ``p * gain > (1 - p) * transfer`` (``gain``: how
  much earlier than a demand load it would arrive, zero when the link is booked past the
  moment of need; ``(1 - p) * transfer``: the link time a wrong guess wastes).  Where
  prediction cannot pay, the mode is ``lru`` and no predictor runs: a prediction that costs
  at least a load (``predictor_seconds >= transfer_seconds``), or a cache of ``k`` slots
  (each step's ``k`` chosen experts fill it: no eviction to choose).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moco_compile.runtime.moe.expert_cache import LayerCache, check_capacity

MODES = ("resident", "on_demand", "lru", "prefetch", "optimal", "predictive")
_NEVER = np.iinfo(np.int64).max // 2


@dataclass(frozen=True)
class Timing:
    """Durations (seconds) of the parts of one decoding step."""

    dense_seconds: Sequence[float]  # per layer: attention, norms, gate
    expert_seconds: float           # one expert on one token
    transfer_seconds: float         # one expert's weights, host to device
    predictor_seconds: float = 0.0  # one prediction (of the next layer, or of the next K at once)
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
                    predicted: np.ndarray | None = None, num_experts: int | None = None,
                    foresight: np.ndarray | None = None, prior: np.ndarray | None = None) -> Simulated:
    """Simulate decoding tokens whose routing is ``chosen`` ``[T, L, k]``.

    ``predicted`` ``[T, L, m]`` (mode ``prefetch``): row ``[t, l]`` lists the experts predicted for
    layer ``l`` of token ``t`` while layer ``l - 1`` computes (``-1``: none; row ``l = 0`` unused).
    ``foresight`` ``[T, L, K, E]`` (mode ``predictive``, optional for ``optimal``): see the module notes;
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
    if mode == "predictive" and (timing.predictor_seconds >= timing.transfer_seconds or capacity <= top_k):
        mode, foresight = "lru", None  # predictions that cost a load, or a cache with no choice to make, cannot pay
    state = _State(chosen, capacity if cached else top_k, timing, num_experts, mode, prior)
    for token in range(tokens):
        if mode == "on_demand":
            state.caches = [LayerCache(top_k) for _ in range(num_layers)]
        state.now += timing.head_seconds
        for layer in range(num_layers):
            state.now += timing.dense_seconds[layer]
            needed = sorted({int(e) for e in chosen[token, layer]})
            if mode == "predictive":
                state.now += timing.predictor_seconds
                state.believe(token, layer, foresight[token, layer])
            if mode != "resident":
                state.fetch(token, layer, needed)
            if mode == "prefetch" and layer + 1 < num_layers:
                state.now += timing.predictor_seconds
                state.prefetch(layer + 1, [int(e) for e in predicted[token, layer + 1] if e >= 0])
            if foresight is not None:
                state.look_ahead(token, layer, needed, foresight[token, layer])
            for expert in needed:
                state.now = max(state.now, state.arrival[layer].get(expert, 0.0)) + timing.expert_seconds
    return Simulated(state.now / max(tokens, 1), state.hits, state.misses, state.prefetches, state.prefetch_hits)


def _first_use(chosen: np.ndarray, num_experts: int) -> np.ndarray:
    """``[T + 1, L, E]``: the first token ``>= t`` whose layer ``l`` uses expert ``e`` (``_NEVER``: none)."""
    tokens, num_layers, _ = chosen.shape
    first = np.full((tokens + 1, num_layers, num_experts), _NEVER, np.int64)
    for token in range(tokens - 1, -1, -1):
        first[token] = first[token + 1]
        for layer in range(num_layers):
            first[token, layer, chosen[token, layer]] = token
    return first


class _State:
    """Clock, link, caches and (``predictive``) beliefs of one simulated decode."""

    def __init__(self, chosen: np.ndarray, capacity: int, timing: Timing, num_experts: int, mode: str,
                 prior: np.ndarray | None = None) -> None:
        tokens, num_layers, _ = chosen.shape
        self.tokens, self.num_layers = tokens, num_layers
        self.caches = [LayerCache(capacity) for _ in range(num_layers)]
        self.arrival: list[dict[int, float]] = [{} for _ in range(num_layers)]
        self.prefetched: list[set[int]] = [set() for _ in range(num_layers)]
        self.timing = timing
        self.now = self.link = 0.0
        self.hits = self.misses = self.prefetches = self.prefetch_hits = 0
        self.first_use = _first_use(chosen, num_experts) if mode == "optimal" else None
        self.belief = np.zeros((num_layers, num_experts))  # per layer: P(used) at the token in belief_token
        self.belief_token = np.full(num_layers, -1)
        self.ranked = mode in ("optimal", "predictive")
        self.prior = prior

    def rank(self, token: int, source: int, layer: int) -> np.ndarray | None:
        """Per expert of ``layer``, deciding at layer ``source`` of ``token``: the higher, the later its next
        use (optimal: that token; predictive: 1 - its probability); None: least recently used decides."""
        if not self.ranked:
            return None
        start = token if layer > source else token + 1  # the first token whose `layer` is still to come
        if self.first_use is not None:
            return self.first_use[min(start, self.tokens), layer].astype(float)
        if self.belief_token[layer] != start:
            return None
        belief = self.belief[layer] if self.prior is None else 0.5 * (self.belief[layer] + self.prior[layer])
        return 1.0 - belief

    def believe(self, token: int, source: int, probabilities: np.ndarray) -> None:
        """Record the predictions ``[K, E]`` made at layer ``source`` of ``token``."""
        for distance, row in enumerate(probabilities, start=1):
            offset, layer = divmod(source + distance, self.num_layers)
            self.belief[layer], self.belief_token[layer] = row, token + offset

    def _load(self, layer: int, expert: int, protected: set[int], rank: np.ndarray | None = None) -> None:
        in_flight = {e for e, done in self.arrival[layer].items() if done > self.now}
        if not self.caches[layer].can_admit(protected | in_flight):  # every slot in use or loading: wait
            self.now = max(self.arrival[layer][e] for e in in_flight)
            in_flight = set()
        _, evicted = self.caches[layer].admit(expert, protected | in_flight, rank)
        self.arrival[layer].pop(evicted, None)
        self.prefetched[layer].discard(evicted)
        self.link = max(self.link, self.now) + self.timing.transfer_seconds
        self.arrival[layer][expert] = self.link

    def fetch(self, token: int, layer: int, needed: list[int]) -> None:
        """Count hits and submit loads for the misses among a layer's chosen experts."""
        rank = self.rank(token, layer, layer)
        for expert in needed:
            if self.caches[layer].lookup(expert) is not None:
                self.hits += 1
                self.prefetch_hits += expert in self.prefetched[layer]
            else:
                self.misses += 1
                self._load(layer, expert, set(needed), rank)
        self.prefetched[layer].difference_update(needed)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Submit loads for the predicted experts of ``layer`` that are not cached."""
        for expert in experts:
            if expert not in self.caches[layer]:
                self._prefetch_load(layer, expert, set(experts))

    def _prefetch_load(self, layer: int, expert: int, protected: set[int], rank: np.ndarray | None = None) -> None:
        self.prefetches += 1
        self._load(layer, expert, protected, rank)
        self.prefetched[layer].add(expert)

    def look_ahead(self, token: int, source: int, needed: list[int], probabilities: np.ndarray) -> None:
        """Prefetch for the next ``K`` layers from the predictions ``[K, E]`` made at layer ``source`` of
        ``token`` (the module notes give the rule)."""
        timing, top_k = self.timing, len(needed)
        need = self.now + top_k * timing.expert_seconds  # when layer `source` is done, at the earliest
        for distance, row in enumerate(probabilities, start=1):
            offset, layer = divmod(source + distance, self.num_layers)
            if token + offset >= self.tokens:
                return
            need += timing.dense_seconds[layer] + (timing.head_seconds if layer == 0 else 0.0)
            self._look_at(layer, row, need, self.rank(token, source, layer),
                          set(needed) if layer == source else set())
            need += top_k * timing.expert_seconds

    def _look_at(self, layer: int, probabilities: np.ndarray, need: float, rank: np.ndarray | None,
                 protected: set[int]) -> None:
        """Prefetch the experts of ``layer`` that pay, most likely first, for a use at time ``need``."""
        cache = self.caches[layer]
        protected = protected | {e for e, done in self.arrival[layer].items() if done > self.now}
        for expert in np.argsort(-probabilities, kind="stable").tolist():
            p = float(probabilities[expert])
            if p * (need - max(self.link, self.now)) <= (1 - p) * self.timing.transfer_seconds:
                return  # the less likely experts gain as little: none pays
            if expert in cache:
                continue
            if not cache.can_admit(protected):
                return
            full = len(cache.experts) == cache.capacity
            if full and rank is not None and rank[cache.victim(protected, rank)] <= rank[expert]:
                return  # every expert that could make room is as likely (as soon) needed
            self._prefetch_load(layer, expert, protected, rank)
            protected.add(expert)
