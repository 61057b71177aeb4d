"""Cache policies of the TPOT simulation: Belady's offline optimum and prediction-aware caching."""
from __future__ import annotations

import numpy as np
import pytest

from moco_compile.runtime.moe.cache_policy import CachePolicy
from moco_compile.runtime.moe.expert_cache import LayerCache
from moco_compile.runtime.moe.timeline import Timing, _first_use, simulate_decode


def _fewest_misses(requests: list[int], capacity: int) -> int:
    """Exhaustive search over every eviction choice (dynamic programming over cache contents)."""
    states = {frozenset(): 0}
    for expert in requests:
        following: dict[frozenset, int] = {}
        for cached, misses in states.items():
            if expert in cached:
                options = [(cached, misses)]
            elif len(cached) < capacity:
                options = [(cached | {expert}, misses + 1)]
            else:
                options = [((cached - {victim}) | {expert}, misses + 1) for victim in cached]
            for state, count in options:
                following[state] = min(following.get(state, count), count)
        states = following
    return min(states.values())


@pytest.mark.parametrize("seed", range(6))
def test_belady_misses_as_few_as_an_exhaustive_search_and_never_more_than_lru(seed):
    rng = np.random.default_rng(seed)
    requests = rng.choice(5, 14, p=[0.35, 0.25, 0.2, 0.1, 0.1]).tolist()
    chosen = np.array(requests)[:, None, None]  # one layer, top-1
    timing = Timing([0.0], 0.0, 0.0)
    optimal = simulate_decode(chosen, timing, "optimal", 2, num_experts=5)
    lru = simulate_decode(chosen, timing, "lru", 2, num_experts=5)
    assert optimal.misses == _fewest_misses(requests, 2) <= lru.misses


def test_layer_cache_evicts_the_highest_rank_least_recent_first_among_equals():
    cache = LayerCache(3)
    for expert in (5, 2, 7):
        cache.admit(expert)
    rank = np.zeros(8)
    rank[[2, 7]] = 1.0
    assert cache.victim(rank=rank) == 2  # 2 and 7 rank alike: 2 is less recently used
    assert cache.victim({2}, rank) == 7 and cache.victim({2, 7}, rank) == 5 and cache.victim() == 5
    assert cache.admit(1, {2}, rank) == (2, 7)


def test_predictions_keep_the_expert_needed_next():
    """Requests 0, 1, 2, 0 with 2 slots: LRU evicts 0 for 2; knowing the next token needs 0 keeps it."""
    chosen = np.array([0, 1, 2, 0])[:, None, None]
    foresight = np.zeros((4, 1, 1, 3))
    foresight[np.arange(3), 0, 0, [1, 2, 0]] = 1.0  # at token t: token t + 1's expert
    timing = Timing([0.0], 0.0, 1.0)
    lru = simulate_decode(chosen, timing, "lru", 2, num_experts=3)
    predictive = simulate_decode(chosen, timing, "predictive", 2, num_experts=3, foresight=foresight)
    assert (lru.misses, predictive.misses, predictive.prefetches) == (4, 3, 0)
    assert predictive.tpot_seconds < lru.tpot_seconds
    # a prediction that costs as much as a load cannot pay: the policy is LRU's, the predictor never runs
    costly = Timing([0.0], 0.0, 1.0, predictor_seconds=1.0)
    fallback = simulate_decode(chosen, costly, "predictive", 2, num_experts=3, foresight=foresight)
    assert (fallback.misses, fallback.tpot_seconds) == (lru.misses, lru.tpot_seconds)
    # nor can a cache of k slots: the step's own experts fill it, there is no eviction to choose
    costly_small = Timing([0.0], 0.0, 1.0, predictor_seconds=0.5)
    assert (simulate_decode(chosen, costly_small, "predictive", 1, num_experts=3, foresight=foresight).tpot_seconds
            == simulate_decode(chosen, timing, "lru", 1, num_experts=3).tpot_seconds)


def test_a_prior_ranks_the_experts_the_next_token_does_not_need():
    """Requests 0, 1, 2, 3, 0: at 2 and 3 no cached expert is needed next; the prior (0 is common) keeps 0."""
    chosen = np.array([0, 1, 2, 3, 0])[:, None, None]
    foresight = np.zeros((5, 1, 1, 4))
    foresight[np.arange(4), 0, 0, [1, 2, 3, 0]] = 1.0
    timing, prior = Timing([0.0], 0.0, 1.0), np.array([[0.9, 0.1, 0.1, 0.1]])
    alone = simulate_decode(chosen, timing, "predictive", 2, num_experts=4, foresight=foresight)
    with_prior = simulate_decode(chosen, timing, "predictive", 2, num_experts=4, foresight=foresight, prior=prior)
    assert (alone.misses, with_prior.misses) == (5, 4)


def _two_layer_trace(tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token t uses expert t % 3 at both layers; the perfect look-ahead of 2 layers for it."""
    chosen = np.repeat((np.arange(tokens) % 3)[:, None, None], 2, axis=1)
    foresight = np.zeros((tokens, 2, 2, 3))
    for token in range(tokens):
        for source in range(2):
            for distance in (1, 2):
                offset, layer = divmod(source + distance, 2)
                if token + offset < tokens:
                    foresight[token, source, distance - 1, chosen[token + offset, layer, 0]] = 1.0
    return chosen, foresight


def test_look_ahead_loads_what_pays_and_skips_what_cannot_arrive_in_time():
    chosen, foresight = _two_layer_trace(30)
    # a layer's compute (2) outlasts a load (1): the next layer's expert arrives in time
    timing = Timing([2.0, 2.0], 0.0, 1.0)
    lru = simulate_decode(chosen, timing, "lru", 2, num_experts=3)
    ahead = simulate_decode(chosen, timing, "predictive", 2, num_experts=3, foresight=foresight)
    assert ahead.prefetches > 0 and ahead.prefetch_hits > 0
    assert ahead.tpot_seconds < lru.tpot_seconds
    assert ahead.prefetches == ahead.prefetch_hits == 59 and ahead.misses == 1  # all but the first load ahead
    # a load lasting 20 layers: after a miss the link is booked past the moment of need and the look-ahead
    # waits; it loads ahead only where the link is idle (after a hit)
    slow = Timing([2.0, 2.0], 0.0, 40.0)
    waits = simulate_decode(chosen, slow, "predictive", 2, num_experts=3, foresight=foresight)
    assert 0 < waits.prefetches == waits.prefetch_hits < ahead.prefetches / 2
    assert waits.tpot_seconds < simulate_decode(chosen, slow, "lru", 2, num_experts=3).tpot_seconds
    # one layer ahead, behind this layer's own miss, a load arrives 1 earlier than on demand: p x 1 must beat
    # (1 - p) x 1, the link time a wrong guess wastes
    for p, loads in ((0.45, False), (0.6, True)):
        guesses = simulate_decode(chosen, timing, "predictive", 2, num_experts=3, foresight=p * foresight[:, :, :1])
        assert (guesses.prefetches > 0) == loads


def test_foresight_of_the_wrong_shape_is_refused():
    chosen, foresight = _two_layer_trace(4)
    with pytest.raises(ValueError, match=r"foresight must be \[T, L, K, E\] = \[4, 2, 1..2, 3\]"):
        simulate_decode(chosen, Timing([0.0] * 2, 0.0, 1.0), "predictive", 1, num_experts=3, foresight=foresight[:3])
    with pytest.raises(ValueError, match=r"prior must be \[L, E\] = \[2, 3\]"):
        simulate_decode(chosen, Timing([0.0] * 2, 0.0, 1.0), "predictive", 1, num_experts=3, foresight=foresight,
                        prior=np.ones((2, 4)))
    with pytest.raises(ValueError, match="needs foresight"):
        simulate_decode(chosen, Timing([0.0] * 2, 0.0, 1.0), "predictive", 1, num_experts=3)


@pytest.mark.parametrize("mode", ["lru", "prefetch", "optimal", "predictive"])
def test_no_load_evicts_an_expert_the_current_layer_computes_with(mode):
    """Random routing, predictions that favour the experts not chosen, loads lasting 0.2 to 8 layers: every
    step's chosen experts are cached when it computes, and none of its loads evicted one of them."""
    rng = np.random.default_rng(0)
    tokens, layers, experts, top_k = 40, 3, 6, 2
    chosen = np.stack([[np.sort(rng.choice(experts, top_k, replace=False)) for _ in range(layers)]
                       for _ in range(tokens)])
    first_use = _first_use(chosen, experts)
    for transfer in (0.3, 3.0, 12.0):
        timing = Timing([1.0] * layers, 0.25, transfer, predictor_seconds=0.05)
        for capacity in (3, 4, 5):
            prior = rng.dirichlet(np.ones(experts), layers)
            policy = CachePolicy(layers, experts, top_k, capacity, timing, mode, prior,
                                 first_use if mode == "optimal" else None)
            for token in range(tokens):
                for layer in range(layers):
                    needed = chosen[token, layer].tolist()
                    foresight = rng.dirichlet(np.full(experts, 0.3), layers)
                    foresight[:, needed] *= 0.1  # the look-ahead wants other experts in their slots
                    foresight = np.minimum(top_k * foresight / foresight.sum(axis=1, keepdims=True), 1.0)
                    predicted = rng.choice(experts, top_k, replace=False).tolist()
                    loads = policy.step(token, layer, needed, predicted, foresight)
                    assert not [load for load in loads if load.layer == layer and load.evicted in needed]
                    assert all(expert in policy.caches[layer] for expert in needed)
            assert policy.counts.prefetches > 0 or mode == "lru"
