"""Serving a mixture-of-experts decoder whose expert weights live in host memory.

Per layer, ``capacity`` device slots (copies of one expert module) hold the cached experts.
What to evict, which loads to submit for which layers, in which order, and which to skip is
decided by :class:`~moco_compile.runtime.moe.cache_policy.CachePolicy`, the object the TPOT
simulation (``runtime/moe/timeline.py``) replays, in the simulation's modes (:data:`RUNTIME_MODES`):

* ``lru``: least recently used evicted, loads on demand;
* ``prefetch``: LRU, plus the experts ``predict`` gives for layer ``l+1``;
* ``predictive``: ``foresee``'s probabilities for the next ``K`` layers (averaged with ``prior``,
  each expert's long-run probability of use) rank evictions and drive loads, nearest layer
  first, skipping those the link would not finish in time (LRU where prediction cannot pay).

The policy decides on a modelled clock: ``timing`` gives the durations of a step's parts as
in the simulation (on a CPU-only machine, the simulation's parameters; on a GPU, the serving
device's figures: its compute per layer, and one expert's transfer, which
:meth:`OffloadedExperts.measure_transfer_seconds` measures on this link), so for the same routing
and timing its decisions are the simulation's.  One transfer worker copies host weights into
slots in submission order (one link: a side CUDA stream on a GPU, a background thread on a
CPU-only machine).  At each MoE layer ``l`` (:meth:`OffloadedExperts.moe_step`):

1. route the tokens; run the mode's predictor on the hidden state entering layer ``l``'s MoE;
2. submit the loads of the policy's step (misses, then loads ahead of need), so they travel
   while layer ``l``'s experts compute;
3. compute layer ``l``'s experts, each waiting for its own load only.

A forward whose tokens (a prompt) route to more experts than there are slots loads them one at
a time as they compute (on demand, no predictions).  The layer's chosen experts are never
evicted, and copies land in submission order, so a slot handed to another expert is written only
after its earlier copies: the weights used are always exact copies of the model's, and outputs
equal the non-offloaded model's.  ``link_seconds`` emulates a slower link: a load takes at least
that long (the worker sleeps, so compute overlaps it as it would a DMA copy).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from moco_compile.runtime.moe.cache_policy import CacheCounts, CachePolicy, Load, Timing
from moco_compile.runtime.moe.decode import moe_blocks
from moco_compile.runtime.moe.expert_cache import check_capacity

RUNTIME_MODES = ("lru", "prefetch", "predictive")
# (next layer, hidden state entering this layer's MoE [D], next layer's experts for the previous token) -> experts
Predict = Callable[[int, np.ndarray, np.ndarray], Sequence[int]]
# (layer, hidden state entering its MoE [D], every layer's experts for the latest token routed there [L, k])
#   -> [K, E]: the probability that each expert is used 1..K layers later (across tokens)
Foresee = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class OffloadStats(CacheCounts):
    """The policy's counts, and the loads the transfer worker finished."""

    loads: int = 0              # loads the transfer worker finished
    load_seconds: float = 0.0   # their wall-clock time on the worker (copy, and the emulated link's wait)


class OffloadedExperts:
    """The experts of ``model`` served from host memory through per-layer device caches.

    ``mode`` (one of :data:`RUNTIME_MODES`; by default the one ``predict`` or ``foresee`` implies, else
    ``lru``) needs ``predict`` (``prefetch``) or ``foresee`` and ``timing`` (``predictive``); ``timing``
    defaults to zero durations (no load ever in flight in the model).  ``policy`` makes every cache
    decision; ``stats`` counts them and the loads done.  Use :meth:`moe_step` as the ``moe_step`` of
    :func:`~moco_compile.runtime.moe.decode.forward_tokens`.
    """

    def __init__(self, model: torch.nn.Module, capacity: int, predict: Predict | None = None,
                 device: str | torch.device = "cpu", link_seconds: float = 0.0, mode: str | None = None,
                 foresee: Foresee | None = None, timing: Timing | None = None,
                 prior: np.ndarray | None = None) -> None:
        self.layers = moe_blocks(model)
        num_experts, top_k = len(self.layers[0].experts), self.layers[0].top_k
        check_capacity(capacity, num_experts, top_k)
        mode = mode or ("prefetch" if predict is not None else "predictive" if foresee is not None else "lru")
        if mode not in RUNTIME_MODES:
            raise ValueError(f"unknown mode {mode!r}; the runtime runs {', '.join(RUNTIME_MODES)}")
        if (mode == "prefetch") != (predict is not None) or (mode == "predictive") != (foresee is not None):
            raise ValueError(f"mode {mode!r}: give `predict` for mode 'prefetch' and `foresee` for 'predictive', "
                             "and neither for the other modes")
        if mode == "predictive" and timing is None:
            raise ValueError("mode 'predictive' needs the timing of its device (transfer and compute seconds): "
                             "its loads are skipped when the link would not finish them in time")
        num_layers = len(self.layers)
        if timing is not None and len(timing.dense_seconds) != num_layers:
            raise ValueError(f"timing.dense_seconds must give one duration per MoE layer ({num_layers}), "
                             f"got {len(timing.dense_seconds)}")
        if prior is not None and np.shape(prior) != (num_layers, num_experts):
            raise ValueError(f"prior must be [L, E] = [{num_layers}, {num_experts}] for this model, "
                             f"got {list(np.shape(prior))}")
        self.device = torch.device(device)
        self.predict, self.foresee = predict, foresee
        self.link_seconds = link_seconds
        self.stats = OffloadStats()
        self.policy = CachePolicy(num_layers, num_experts, top_k, capacity,
                                  timing or Timing([0.0] * num_layers, 0.0, 0.0), mode, prior, counts=self.stats)
        pin = self.device.type == "cuda"
        self.host = [[[p.detach().to("cpu", copy=True).pin_memory() if pin else p.detach().clone()
                       for p in expert.parameters()] for expert in layer.experts] for layer in self.layers]
        self.slots = [[copy.deepcopy(layer.experts[0]).to(self.device).requires_grad_(False)
                       for _ in range(capacity)] for layer in self.layers]
        self.latest = np.full((num_layers, top_k), -1)  # per layer: the experts of the latest token
        self._token = -1
        self._in_flight: list[dict[int, Future]] = [{} for _ in self.layers]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moco-expert-link")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def close(self) -> None:
        """Stop the transfer worker (after the loads in flight)."""
        self._worker.shutdown(wait=True)

    def __enter__(self) -> "OffloadedExperts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _copy(self, target: torch.nn.Module, source: list[torch.Tensor], computed: torch.cuda.Event | None) -> float:
        start = time.perf_counter()
        with torch.no_grad(), torch.cuda.stream(self._stream):  # a None stream: no-op (CPU)
            if computed is not None:  # the GPU may still be computing with the slot's evicted expert
                self._stream.wait_event(computed)
            for parameter, weights in zip(target.parameters(), source):
                parameter.copy_(weights, non_blocking=True)
        if self._stream is not None:
            self._stream.synchronize()
        remaining = self.link_seconds - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return time.perf_counter() - start

    def _load(self, load: Load, computed: torch.cuda.Event | None) -> None:
        seconds = self._copy(self.slots[load.layer][load.slot], self.host[load.layer][load.expert], computed)
        self.stats.loads += 1  # only this worker thread writes these two
        self.stats.load_seconds += seconds

    def _submit(self, loads: list[Load]) -> None:
        for load in loads:
            computed = torch.cuda.current_stream(self.device).record_event() if self._stream is not None else None
            in_flight = self._in_flight[load.layer]
            in_flight.pop(load.evicted, None)  # its copy still lands first: the worker keeps submission order
            in_flight[load.expert] = self._worker.submit(self._load, load, computed)

    def measure_transfer_seconds(self, repeats: int = 8) -> float:
        """Median wall-clock seconds of one expert's copy from host memory to the device through the
        transfer worker (into a scratch module: the cache is untouched), for a measured ``timing``."""
        scratch = copy.deepcopy(self.slots[0][0])
        samples = [self._worker.submit(self._copy, scratch, self.host[0][0], None).result() for _ in range(repeats)]
        return float(np.median(samples))

    def _ready(self, layer: int, expert: int) -> torch.nn.Module:
        """The slot module holding ``expert``, once its load is done."""
        future = self._in_flight[layer].pop(expert, None)
        if future is not None:
            future.result()
        return self.slots[layer][self.policy.caches[layer].slot(expert)]

    def moe_step(self, layer: int, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s MoE output for ``normed`` ``[T, D]``, with its experts served from the cache."""
        moe, policy = self.layers[layer], self.policy
        _, chosen, weights = moe.route(normed)
        needed = [int(e) for e in chosen.unique()]
        self._token += layer == 0
        self.latest[layer] = chosen[-1].cpu().numpy()
        if len(needed) > policy.capacity:  # a prompt may need more experts than slots: loaded one by one
            return moe.combine(normed, chosen, weights, _OneByOne(self, layer))
        predicted, foresight = (), None
        if policy.mode in ("prefetch", "predictive"):
            hidden = residual[-1].float().cpu().numpy()
            if policy.mode == "predictive":
                foresight = self.foresee(layer, hidden, self.latest)
            elif layer + 1 < len(self.layers):
                predicted = [int(expert) for expert in self.predict(layer + 1, hidden, self.latest[layer + 1])]
        self._submit(policy.step(self._token, layer, needed, predicted, foresight))
        return moe.combine(normed, chosen, weights, _Slots(self, layer))


class _Slots:
    """``experts[e]`` for ``MoELayer.combine``: the device slot holding expert ``e`` once loaded."""

    def __init__(self, offload: OffloadedExperts, layer: int) -> None:
        self.offload, self.layer = offload, layer

    def __getitem__(self, expert: int) -> torch.nn.Module:
        return self.offload._ready(self.layer, expert)


class _OneByOne(_Slots):
    """``experts[e]`` loading expert ``e`` on demand when asked (a forward routed to more experts than slots)."""

    def __getitem__(self, expert: int) -> torch.nn.Module:
        policy = self.offload.policy
        self.offload._submit(policy.fetch(self.offload._token, self.layer, [expert]))
        policy.compute(self.layer, [expert])
        return super().__getitem__(expert)
