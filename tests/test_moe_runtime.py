"""Offloaded experts: identical outputs, the runtime's policies, and the TPOT simulation that replays them."""
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


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The tiny model and predictors fitted on its routing (every distance up to one token ahead)."""
    from moco_compile.moe.trace import gate_parameters, routing_spec, trace_routing
    from moco_compile.passes.moe.expert_predictors import fit_predictors

    model = tiny_model(2)
    trace = tmp_path_factory.mktemp("trace") / "trace.arrow"
    frame = trace_routing(model, np.random.default_rng(0).integers(0, 256, (8, 32)), trace)
    return model, fit_predictors(frame, routing_spec(model), gate_parameters(model), max_rows=500)


# a layer's compute (1.5) about one load (1.6): loads ahead of need pay when the link is free, not behind a miss
TIMING = Timing([1.0] * 3, 0.25, 1.6, predictor_seconds=0.1, head_seconds=0.5)


def test_fitted_predictors_drive_the_runtime_without_changing_its_outputs(fitted):
    from moco_compile.moe.bench import runtime_predictor

    model, predictors = fitted
    tokens, logits = greedy_decode(model, PROMPT, 16, reference_step(model))
    with OffloadedExperts(model, 4, runtime_predictor(predictors, "learned")) as offload:
        offloaded_tokens, offloaded_logits = greedy_decode(model, PROMPT, 16, offload.moe_step)
    assert offloaded_tokens == tokens and torch.allclose(offloaded_logits, logits, rtol=0, atol=1e-6)
    assert offload.stats.prefetch_hits > 0


def test_predictive_caching_gives_the_resident_models_tokens_and_logits(fitted):
    from moco_compile.moe.bench import runtime_foresight

    model, predictors = fitted
    tokens, logits = greedy_decode(model, PROMPT, 24, reference_step(model))
    with OffloadedExperts(model, 3, mode="predictive", foresee=runtime_foresight(predictors, "learned"),
                          timing=TIMING, prior=predictors.long_run_probabilities(), link_seconds=2e-4) as offload:
        assert offload.policy.mode == "predictive"
        offloaded_tokens, offloaded_logits = greedy_decode(model, PROMPT, 24, offload.moe_step)
    assert offloaded_tokens == tokens
    assert torch.allclose(offloaded_logits, logits, rtol=0, atol=1e-6)
    stats = offload.stats
    assert stats.misses > 0 and stats.prefetches > 0 and stats.prefetch_hits > 0
    assert stats.loads == stats.misses + stats.prefetches


@pytest.mark.parametrize("mode", ["lru", "prefetch", "predictive"])
def test_the_runtime_decides_as_the_simulation_of_its_routing(fitted, mode):
    """The runtime and ``simulate_decode`` on the routing and predictions it met: the same hits, misses,
    loads ahead of need and their hits, and the same modelled time per token (the simulated clock)."""
    from moco_compile.moe.bench import decode_routing, foresight, runtime_foresight, runtime_predictor

    model, predictors = fitted
    steps, layers = 24, moe_blocks(model)
    chosen, ahead, predicted = [], [], np.full((steps + 1, 3, 2), -1)
    predict, foresee = runtime_predictor(predictors, "learned"), runtime_foresight(predictors, "learned")

    def recorded_predict(layer, hidden, previous):
        predicted[len(chosen) // 3, layer] = predict(layer, hidden, previous)
        return predicted[len(chosen) // 3, layer]

    def recorded_foresee(layer, hidden, latest):
        ahead.append(foresee(layer, hidden, latest))
        return ahead[-1]

    kwargs = {"lru": {}, "prefetch": {"predict": recorded_predict},
              "predictive": {"foresee": recorded_foresee, "prior": predictors.long_run_probabilities()}}[mode]
    with OffloadedExperts(model, 3, mode=mode, timing=TIMING, **kwargs) as offload:
        def record(layer, residual, normed):
            out = offload.moe_step(layer, residual, normed)
            chosen.append(layers[layer].route(normed[-1:])[1][0].numpy())
            return out

        greedy_decode(model, PROMPT[:1], steps, record)  # one prompt token: every forward is one token
    routing = np.array(chosen).reshape(-1, 3, 2)
    look = np.array(ahead).reshape(len(routing), 3, -1, 8) if ahead else None
    simulated = simulate_decode(routing, TIMING, mode, 3, predicted, 8, look, kwargs.get("prior"))
    runtime = offload.stats
    assert ((simulated.hits, simulated.misses, simulated.prefetches, simulated.prefetch_hits)
            == (runtime.hits, runtime.misses, runtime.prefetches, runtime.prefetch_hits))
    assert simulated.tpot_seconds == offload.policy.now / len(routing)
    assert runtime.hits > 0 and runtime.misses > 0 and (mode == "lru") == (runtime.prefetch_hits == 0)
    if mode == "predictive":  # the runtime's predictions are those the bench simulates (the last token's aside)
        offline = foresight(predictors, "learned", decode_routing(model, [PROMPT[:1].tolist()], steps))
        assert np.allclose(look[1:-1], offline[:-1], atol=1e-5)


def test_the_predictive_runtime_needs_a_timing_and_its_predictor():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs the timing"):
        OffloadedExperts(model, 3, mode="predictive", foresee=lambda layer, hidden, latest: np.zeros((1, 8)))
    with pytest.raises(ValueError, match="give `predict` for mode 'prefetch' and `foresee` for 'predictive'"):
        OffloadedExperts(model, 3, mode="predictive", timing=TIMING)
    with pytest.raises(ValueError, match="unknown mode 'optimal'"):
        OffloadedExperts(model, 3, mode="optimal")
    with pytest.raises(ValueError, match=r"prior must be \[L, E\] = \[3, 8\]"):
        OffloadedExperts(model, 3, foresee=lambda layer, hidden, latest: np.zeros((1, 8)), timing=TIMING,
                         prior=np.ones(8))
    with pytest.raises(ValueError, match=r"one duration per MoE layer \(3\), got 2"):
        OffloadedExperts(model, 3, timing=Timing([1.0] * 2, 0.25, 1.0))


def test_a_predictor_that_costs_a_load_leaves_the_runtime_lru():
    costly = Timing([1.0] * 3, 0.25, 1.0, predictor_seconds=1.0)
    model, called = tiny_model(), []
    with OffloadedExperts(model, 3, mode="predictive", timing=costly,
                          foresee=lambda layer, hidden, latest: called.append(layer)) as offload:
        greedy_decode(model, PROMPT, 4, offload.moe_step)
    assert offload.policy.mode == "lru" and not called


def test_the_link_is_measured_without_touching_the_cache():
    with OffloadedExperts(tiny_model(), 2, link_seconds=1e-3) as offload:
        assert offload.measure_transfer_seconds(3) >= 1e-3
    assert offload.stats.loads == 0 and all(not cache.experts for cache in offload.policy.caches)
