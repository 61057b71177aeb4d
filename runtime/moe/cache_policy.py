"""The decisions of an offloaded-expert cache, one source for the runtime and the TPOT simulation.

:class:`CachePolicy` decides what
:class:`~moco_compile.runtime.moe.expert_offload.OffloadedExperts` does and what
:func:`~moco_compile.runtime.moe.timeline.simulate_decode` replays: which expert each
layer's cache evicts, which loads to submit, for which layers, in which order, and which to
skip.  Both call :meth:`CachePolicy.step` once per token and layer with the same inputs, so the
simulated policy is the one that runs.  Time is a model: a compute clock advanced by a
:class:`Timing`'s durations and one link serving loads in submission order (the runtime copies
weights for real as well; the model is what its decisions read).  Per token and layer ``l``:

1. compute the layer's attention, norms and gate (``dense_seconds[l]``; ``head_seconds`` first
   at layer 0);
2. (``predictive``) spend ``predictor_seconds`` on the predictions of the next ``K`` layers
   and record them (:meth:`CachePolicy.believe`);
3. submit a load for each chosen expert not cached (a miss; its slot is taken now);
4. (``prefetch``) spend ``predictor_seconds``, then submit loads for the predicted experts of
   layer ``l+1`` that are not cached; (``predictive``, ``optimal`` with foresight) look ahead
   (:meth:`CachePolicy.look_ahead`);
5. compute the chosen experts in expert order, each starting when both the clock and its
   own load are done (``expert_seconds`` each).

A load takes ``transfer_seconds``.  Experts with a load in flight and the layer's chosen
experts are never evicted; when every slot holds one, the layer waits for the loads in flight.

Modes (eviction / loads):

* ``resident``: every expert on the device (no cache, no loads);
* ``on_demand``: every chosen expert loaded when needed (the cache is emptied every token);
* ``lru``: least recently used evicted, loads on demand;
* ``prefetch``: LRU, plus the predicted experts of layer ``l+1``, which are also never
  evicted by each other;
* ``optimal``: Belady's offline cache (``first_use``: the true routing's next use of every
  expert): it evicts the expert whose next use is furthest away; demand loads only, or with
  ``foresight`` (the true routing) it also looks ahead as ``predictive`` does;
* ``predictive``: ``foresight`` ``[K, E]`` at layer ``l`` of token ``t``: the probability that
  each expert is used at layer ``(l + d) % L`` of token ``t + (l + d) // L`` (``d = 1..K``).
  Eviction keeps the experts most likely used at their layer's next use (least recently used
  among equals; LRU where no prediction covers that use); with a ``prior`` (each expert's
  long-run probability of use) it keeps those with the highest mean of the two, since a large
  cache keeps experts for more than the next token, which the look-ahead does not see.
  Look-ahead, nearest layer first, most likely expert first: a load is submitted only if a
  less likely expert can make room and ``p * gain > (1 - p) * transfer`` (``gain``: how much
  earlier than a demand load it would arrive, zero when the link is booked past the moment of
  need, so a load the link cannot finish in time is skipped; ``(1 - p) * transfer``: the link
  time a wrong guess wastes).  Where prediction cannot pay, the mode is ``lru`` and no
  predictor runs (:attr:`CachePolicy.mode` says): a prediction that costs at least a load
  (``predictor_seconds >= transfer_seconds``), or a cache of ``k`` slots (each step's ``k``
  chosen experts fill it: no eviction to choose).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moco_compile.runtime.moe.expert_cache import LayerCache


@dataclass(frozen=True)
class Timing:
    """Durations (seconds) of the parts of one decoding step."""

    dense_seconds: Sequence[float]  # per layer: attention, norms, gate
    expert_seconds: float           # one expert on one token
    transfer_seconds: float         # one expert's weights, host to device
    predictor_seconds: float = 0.0  # one prediction (of the next layer, or of the next K at once)
    head_seconds: float = 0.0       # embedding and output projection


@dataclass
class CacheCounts:
    """Counts over the experts that layers computed with."""

    hits: int = 0           # cached before the layer asked (by an earlier use or a prefetch)
    misses: int = 0         # loaded on demand
    prefetches: int = 0     # loads submitted ahead of need
    prefetch_hits: int = 0  # of the hits, loaded ahead of need

    @property
    def hit_rate(self) -> float:
        """Hits over the experts computed with."""
        return self.hits / max(self.hits + self.misses, 1)


@dataclass(frozen=True)
class Load:
    """A copy of ``expert``'s weights into ``slot`` of ``layer``'s cache, evicting ``evicted`` (None: a free slot)."""

    layer: int
    expert: int
    slot: int
    evicted: int | None


class CachePolicy:
    """Clock, link, per-layer caches and (``predictive``) beliefs of one offloaded decode.

    ``mode`` is the one asked for, or ``lru`` where ``predictive`` cannot pay (the module notes);
    ``first_use`` ``[T + 1, L, E]`` (mode ``optimal``): the first token ``>= t`` whose layer ``l``
    uses expert ``e`` (a large number: none); ``counts`` receives the hits, misses and prefetches.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, capacity: int, timing: Timing, mode: str,
                 prior: np.ndarray | None = None, first_use: np.ndarray | None = None,
                 counts: CacheCounts | None = None) -> None:
        if mode == "predictive" and (timing.predictor_seconds >= timing.transfer_seconds or capacity <= top_k):
            mode = "lru"  # predictions that cost a load, or a cache with no choice to make, cannot pay
        self.num_layers, self.capacity, self.timing, self.mode = num_layers, capacity, timing, mode
        self.caches = [LayerCache(capacity) for _ in range(num_layers)]
        self.arrival: list[dict[int, float]] = [{} for _ in range(num_layers)]  # modelled end of each load
        self.prefetched: list[set[int]] = [set() for _ in range(num_layers)]
        self.now = self.link = 0.0
        self.counts = CacheCounts() if counts is None else counts
        self.first_use = first_use
        self.belief = np.zeros((num_layers, num_experts))  # per layer: P(used) at the token in belief_token
        self.belief_token = np.full(num_layers, -1)
        self.ranked = mode in ("optimal", "predictive")
        self.prior = prior

    def step(self, token: int, layer: int, needed: Sequence[int], predicted: Sequence[int] = (),
             foresight: np.ndarray | None = None) -> list[Load]:
        """Steps 1-5 of the module notes for ``layer`` of ``token``, whose chosen experts are ``needed``
        (sorted, at most ``capacity``); ``predicted``: layer ``l+1``'s predicted experts (``prefetch``);
        ``foresight`` ``[K, E]`` (``predictive``, ``optimal``). The loads, in submission order."""
        timing = self.timing
        if layer == 0:
            self.now += timing.head_seconds
            if self.mode == "on_demand":
                self.caches = [LayerCache(self.capacity) for _ in range(self.num_layers)]
        self.now += timing.dense_seconds[layer]
        if self.mode == "predictive":
            self.now += timing.predictor_seconds
            self.believe(token, layer, foresight)
        loads = [] if self.mode == "resident" else self.fetch(token, layer, needed)
        if self.mode == "prefetch" and layer + 1 < self.num_layers:
            self.now += timing.predictor_seconds
            loads += self.prefetch(layer + 1, predicted)
        if foresight is not None and self.mode in ("predictive", "optimal"):
            loads += self.look_ahead(token, layer, needed, foresight)
        self.compute(layer, needed)
        return loads

    def compute(self, layer: int, experts: Sequence[int]) -> None:
        """Advance the clock over ``experts`` of ``layer``, each after its own load."""
        for expert in experts:
            self.now = max(self.now, self.arrival[layer].get(expert, 0.0)) + self.timing.expert_seconds

    def rank(self, token: int, source: int, layer: int) -> np.ndarray | None:
        """Per expert of ``layer``, deciding at layer ``source`` of ``token``: the higher, the later its next
        use (optimal: that token; predictive: 1 - its probability); None: least recently used decides."""
        if not self.ranked:
            return None
        start = token if layer > source else token + 1  # the first token whose `layer` is still to come
        if self.first_use is not None:
            return self.first_use[min(start, len(self.first_use) - 1), layer].astype(float)
        if self.belief_token[layer] != start:
            return None
        belief = self.belief[layer] if self.prior is None else 0.5 * (self.belief[layer] + self.prior[layer])
        return 1.0 - belief

    def believe(self, token: int, source: int, probabilities: np.ndarray) -> None:
        """Record the predictions ``[K, E]`` made at layer ``source`` of ``token``."""
        for distance, row in enumerate(probabilities, start=1):
            offset, layer = divmod(source + distance, self.num_layers)
            self.belief[layer], self.belief_token[layer] = row, token + offset

    def _load(self, layer: int, expert: int, protected: set[int], rank: np.ndarray | None = None) -> Load:
        in_flight = {e for e, done in self.arrival[layer].items() if done > self.now}
        if not self.caches[layer].can_admit(protected | in_flight):  # every slot in use or loading: wait
            self.now = max(self.arrival[layer][e] for e in in_flight)
            in_flight = set()
        slot, evicted = self.caches[layer].admit(expert, protected | in_flight, rank)
        self.arrival[layer].pop(evicted, None)
        self.prefetched[layer].discard(evicted)
        self.link = max(self.link, self.now) + self.timing.transfer_seconds
        self.arrival[layer][expert] = self.link
        return Load(layer, expert, slot, evicted)

    def fetch(self, token: int, layer: int, needed: Sequence[int]) -> list[Load]:
        """Count hits and load the misses among a layer's chosen experts, which are never evicted meanwhile."""
        rank, loads = self.rank(token, layer, layer), []
        for expert in needed:
            if self.caches[layer].lookup(expert) is not None:
                self.counts.hits += 1
                self.counts.prefetch_hits += expert in self.prefetched[layer]
            else:
                self.counts.misses += 1
                loads.append(self._load(layer, expert, set(needed), rank))
        self.prefetched[layer].difference_update(needed)
        return loads

    def prefetch(self, layer: int, experts: Sequence[int]) -> list[Load]:
        """Load the predicted ``experts`` of ``layer`` that are not cached (they never evict each other)."""
        return [self._prefetch_load(layer, expert, set(experts)) for expert in experts
                if expert not in self.caches[layer]]

    def _prefetch_load(self, layer: int, expert: int, protected: set[int], rank: np.ndarray | None = None) -> Load:
        self.counts.prefetches += 1
        self.prefetched[layer].add(expert)
        return self._load(layer, expert, protected, rank)

    def look_ahead(self, token: int, source: int, needed: Sequence[int], probabilities: np.ndarray) -> list[Load]:
        """Loads for the next ``K`` layers from the predictions ``[K, E]`` made at layer ``source`` of
        ``token``, nearest layer first (the module notes give the rule)."""
        timing, top_k, loads = self.timing, len(needed), []
        need = self.now + top_k * timing.expert_seconds  # when layer `source` is done, at the earliest
        for distance, row in enumerate(probabilities, start=1):
            layer = (source + distance) % self.num_layers
            need += timing.dense_seconds[layer] + (timing.head_seconds if layer == 0 else 0.0)
            loads += self._look_at(layer, row, need, self.rank(token, source, layer),
                                   set(needed) if layer == source else set())
            need += top_k * timing.expert_seconds
        return loads

    def _look_at(self, layer: int, probabilities: np.ndarray, need: float, rank: np.ndarray | None,
                 protected: set[int]) -> list[Load]:
        """Loads of the experts of ``layer`` that pay, most likely first, for a use at time ``need``."""
        cache, loads = self.caches[layer], []
        protected = protected | {e for e, done in self.arrival[layer].items() if done > self.now}
        for expert in np.argsort(-probabilities, kind="stable").tolist():
            p = float(probabilities[expert])
            if p * (need - max(self.link, self.now)) <= (1 - p) * self.timing.transfer_seconds:
                break  # the less likely experts gain as little: none pays
            if expert in cache:
                continue
            if not cache.can_admit(protected):
                break
            full = len(cache.experts) == cache.capacity
            if full and rank is not None and rank[cache.victim(protected, rank)] <= rank[expert]:
                break  # every expert that could make room is as likely (as soon) needed
            loads.append(self._prefetch_load(layer, expert, protected, rank))
            protected.add(expert)
        return loads
