"""Offloaded experts: identical outputs, the LRU policy, and the TPOT simulation that replays it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moco_compile.errors import ExpertCacheError, NoMoELayersError
from moco_compile.runtime.moe.decode import greedy_decode, moe_blocks, reference_step
from moco_compile.runtime.moe.expert_cache import LayerCache
from moco_compile.runtime.moe.expert_offload import OffloadedExperts
from moco_compile.runtime.moe.timeline import Timing, simulate_decode
from tests.moe_helpers import tiny_model

PROMPT = torch.tensor(list(b"the film is"))


def test_offloaded_decoding_gives_the_resident_models_tokens_and_logits():
    model = tiny_model()
    tokens, logits = greedy_decode(model, PROMPT, 24, reference_step(model))
    # the smallest cache, a slow emulated link and a predictor that is often wrong: many evictions and waits
    with OffloadedExperts(model, capacity=2, predict=lambda layer, hidden, previous: [0, 7],
                          link_seconds=2e-4) as offload:
        offloaded_tokens, offloaded_logits = greedy_decode(model, PROMPT, 24, offload.moe_step)
    assert offloaded_tokens == tokens
    assert torch.allclose(offloaded_logits, logits, rtol=0, atol=1e-6)
    assert offload.stats.misses > 0 and offload.stats.prefetches > 0 and offload.stats.prefetch_hits > 0
    assert offload.stats.loads == offload.stats.misses + offload.stats.prefetches
    assert offload.stats.load_seconds >= 2e-4 * offload.stats.loads


def test_runtime_cache_counts_equal_the_simulated_cache():
    """Without prefetching the simulation must make every hit/miss decision the runtime makes."""
    model = tiny_model(1)
    with OffloadedExperts(model, capacity=4) as offload:
        chosen = []

        def record(layer, residual, normed):
            chosen.append(moe_blocks(model)[layer].route(normed[-1:])[1][0].numpy())
            return offload.moe_step(layer, residual, normed)

        greedy_decode(model, PROMPT[:1], 30, record)  # one prompt token: every forward is one token
    routing = np.array(chosen).reshape(-1, 3, 2)
    simulated = simulate_decode(routing, Timing([0.0] * 3, 0.0, 0.0), "lru", capacity=4, num_experts=8)
    assert (simulated.hits, simulated.misses) == (offload.stats.hits, offload.stats.misses)
    assert 0 < offload.stats.hits and 0 < offload.stats.misses


def test_layer_cache_evicts_the_least_recently_used_unprotected_expert():
    cache = LayerCache(2)
    assert cache.admit(5) == (0, None) and cache.admit(3) == (1, None)
    assert cache.lookup(5) == 0  # 3 is now the least recently used
    assert cache.admit(1) == (1, 3)  # order now 5, 1
    assert cache.admit(2, protected={5}) == (1, 1)
    assert cache.experts == [5, 2]
    assert not cache.can_admit({5, 2}) and cache.can_admit({5})
    with pytest.raises(ExpertCacheError, match="in use"):
        cache.admit(4, protected={5, 2})


def test_simulated_step_times_by_hand():
    """One token, one layer, top-1: dense 1, load 2, expert 0.5 (arbitrary units)."""
    chosen = np.array([[[3]], [[3]]])
    timing = Timing([1.0], 0.5, 2.0)
    assert simulate_decode(chosen[:1], timing, "on_demand").tpot_seconds == pytest.approx(3.5)
    assert simulate_decode(chosen[:1], timing, "resident").tpot_seconds == pytest.approx(1.5)
    # second token: a hit in the cache, no load
    assert simulate_decode(chosen, timing, "lru", 1, num_experts=4).tpot_seconds == pytest.approx((3.5 + 1.5) / 2)


def test_perfect_prefetch_hides_transfers_that_fit_under_compute():
    rng = np.random.default_rng(0)
    chosen = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(4)]) for _ in range(200)])
    timing = Timing([1.0] * 4, 0.5, 1.0)
    runs = {mode: simulate_decode(chosen, timing, mode, 4, chosen if mode == "prefetch" else None, 8).tpot_seconds
            for mode in ("resident", "on_demand", "lru", "prefetch")}
    assert runs["resident"] < runs["prefetch"] < runs["lru"] < runs["on_demand"]
    # layers 1-3 prefetched exactly: only layer 0's misses are left
    assert runs["prefetch"] - runs["resident"] < 0.5 * (runs["lru"] - runs["resident"])


def test_a_cache_smaller_than_top_k_is_refused():
    with pytest.raises(ExpertCacheError, match="cannot hold the 2 experts"):
        OffloadedExperts(tiny_model(), capacity=1)
    with pytest.raises(ExpertCacheError, match="at least 2 slots"):
        simulate_decode(np.zeros((1, 1, 2), int), Timing([1.0], 1.0, 1.0), "lru", capacity=1, num_experts=8)


def test_a_model_without_moe_layers_is_refused():
    dense = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(NoMoELayersError, match="no mixture-of-experts layers"):
        OffloadedExperts(dense, capacity=2)
    model = tiny_model()
    model.blocks[1].moe = torch.nn.Linear(32, 32)
    with pytest.raises(NoMoELayersError, match=r"blocks \[1\]"):
        moe_blocks(model)


def test_a_prefetch_never_evicts_another_predicted_expert():
    chosen = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 4]]])  # token 1 at layer 1: 2 (least recently used) and 4
    run = simulate_decode(chosen, Timing([0.0, 0.0], 0.0, 0.0), "prefetch", 2, chosen, num_experts=8)
    assert (run.misses, run.hits, run.prefetches, run.prefetch_hits) == (2, 6, 3, 3)


def test_fitted_predictors_drive_the_runtime_without_changing_its_outputs(tmp_path):
    from moco_compile.moe.bench import runtime_predictor
    from moco_compile.moe.trace import gate_parameters, routing_spec, trace_routing
    from moco_compile.passes.moe.expert_predictors import fit_predictors

    model = tiny_model(2)
    frame = trace_routing(model, np.random.default_rng(0).integers(0, 256, (8, 32)), tmp_path / "trace.arrow")
    predictors = fit_predictors(frame, routing_spec(model), gate_parameters(model), max_rows=500)
    tokens, logits = greedy_decode(model, PROMPT, 16, reference_step(model))
    with OffloadedExperts(model, 4, runtime_predictor(predictors, "learned")) as offload:
        offloaded_tokens, offloaded_logits = greedy_decode(model, PROMPT, 16, offload.moe_step)
    assert offloaded_tokens == tokens and torch.allclose(offloaded_logits, logits, rtol=0, atol=1e-6)
    assert offload.stats.prefetch_hits > 0
