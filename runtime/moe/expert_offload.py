"""Serving a mixture-of-experts decoder whose expert weights live in host memory.

Per layer, ``capacity`` device slots (copies of one expert module) hold the cached
experts (:class:`~moco_compile.runtime.moe.expert_cache.LayerCache`, least recently used
evicted).  One transfer worker copies host weights into slots in submission order
(one link: a side CUDA stream on a GPU, a background thread on a CPU-only machine).
At each MoE layer ``l`` (:meth:`OffloadedExperts.moe_step`):

1. route the tokens; submit a load for each chosen expert that is not cached (misses);
2. if a predictor is given, predict layer ``l+1``'s experts from the hidden state
   entering layer ``l``'s MoE and submit loads for those not cached (prefetch), so
   they travel while layer ``l``'s experts compute;
3. compute layer ``l``'s experts, each waiting for its own load only.

Slots with a load in flight, the experts the layer is computing with and (while
prefetching) the other predicted experts are never evicted; when every slot holds
one, the layer waits for the loads in flight.  The weights used are always exact
copies of the model's, so outputs equal the non-offloaded model's.  ``link_seconds`` emulates a slower link: a load takes at
least that long (the worker sleeps, so compute overlaps it as it would a DMA copy).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from moco_compile.runtime.moe.decode import moe_blocks
from moco_compile.runtime.moe.expert_cache import LayerCache, check_capacity

# (next layer, hidden state entering this layer's MoE [D], next layer's experts for the previous token) -> experts
Predict = Callable[[int, np.ndarray, np.ndarray], Sequence[int]]


@dataclass
class OffloadStats:
    """Counts over the experts that layers computed with."""

    hits: int = 0          # cached before the layer asked (by an earlier use or a prefetch)
    prefetch_hits: int = 0  # of the hits, loaded by a prefetch
    misses: int = 0        # loaded on demand
    prefetches: int = 0    # loads submitted by prefetching
    loads: int = 0          # loads the transfer worker finished
    load_seconds: float = 0.0  # their wall-clock time on the worker (copy, and the emulated link's wait)

    @property
    def hit_rate(self) -> float:
        """Hits over the experts computed with."""
        return self.hits / max(self.hits + self.misses, 1)


class OffloadedExperts:
    """The experts of ``model`` served from host memory through per-layer device caches.

    Use :meth:`moe_step` as the ``moe_step`` of :func:`~moco_compile.runtime.moe.decode.forward_tokens`.
    """

    def __init__(self, model: torch.nn.Module, capacity: int, predict: Predict | None = None,
                 device: str | torch.device = "cpu", link_seconds: float = 0.0) -> None:
        self.layers = moe_blocks(model)
        num_experts, top_k = len(self.layers[0].experts), self.layers[0].top_k
        check_capacity(capacity, num_experts, top_k)
        self.device = torch.device(device)
        self.predict = predict
        self.link_seconds = link_seconds
        pin = self.device.type == "cuda"
        self.host = [[[p.detach().to("cpu", copy=True).pin_memory() if pin else p.detach().clone()
                       for p in expert.parameters()] for expert in layer.experts] for layer in self.layers]
        self.slots = [[copy.deepcopy(layer.experts[0]).to(self.device).requires_grad_(False)
                       for _ in range(capacity)] for layer in self.layers]
        self.caches = [LayerCache(capacity) for _ in self.layers]
        self.previous = [np.full(top_k, -1) for _ in self.layers]  # experts of the last token, per layer
        self.stats = OffloadStats()
        self._in_flight: list[dict[int, Future]] = [{} for _ in self.layers]
        self._prefetched: list[set[int]] = [set() for _ in self.layers]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moco-expert-link")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def close(self) -> None:
        """Stop the transfer worker (after the loads in flight)."""
        self._worker.shutdown(wait=True)

    def __enter__(self) -> "OffloadedExperts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _copy(self, layer: int, expert: int, slot: int, computed: torch.cuda.Event | None) -> None:
        start = time.perf_counter()
        with torch.no_grad(), torch.cuda.stream(self._stream):  # a None stream: no-op (CPU)
            if computed is not None:  # the GPU may still be computing with the slot's evicted expert
                self._stream.wait_event(computed)
            for target, source in zip(self.slots[layer][slot].parameters(), self.host[layer][expert]):
                target.copy_(source, non_blocking=True)
        if self._stream is not None:
            self._stream.synchronize()
        remaining = self.link_seconds - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        self.stats.loads += 1  # only this worker thread writes these two
        self.stats.load_seconds += time.perf_counter() - start

    def _submit(self, layer: int, expert: int, protected: set[int]) -> None:
        in_flight = self._in_flight[layer]
        keep = protected | {e for e, future in in_flight.items() if not future.done()}
        if not self.caches[layer].can_admit(keep):  # every slot in use or loading: wait for the link
            for future in in_flight.values():
                future.result()
            keep = protected
        slot, evicted = self.caches[layer].admit(expert, keep)
        in_flight.pop(evicted, None)
        self._prefetched[layer].discard(evicted)
        computed = torch.cuda.current_stream(self.device).record_event() if self._stream is not None else None
        in_flight[expert] = self._worker.submit(self._copy, layer, expert, slot, computed)

    def _ready(self, layer: int, expert: int, count: bool) -> torch.nn.Module:
        """The slot module holding ``expert``, loading it on demand (counted if ``count``) and
        waiting for its load."""
        if self.caches[layer].lookup(expert) is None:
            self.stats.misses += count
            self._submit(layer, expert, {expert})
        elif count:
            self.stats.hits += 1
        future = self._in_flight[layer].pop(expert, None)
        if future is not None:
            future.result()
        return self.slots[layer][self.caches[layer].lookup(expert)]

    def moe_step(self, layer: int, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s MoE output for ``normed`` ``[T, D]``, with its experts served from the cache."""
        moe = self.layers[layer]
        _, chosen, weights = moe.route(normed)
        needed = [int(e) for e in chosen.unique()]
        cache = self.caches[layer]
        upfront = len(needed) <= cache.capacity  # a prompt may need more experts than slots: loaded one by one
        for expert in needed if upfront else ():
            if expert in cache:
                self.stats.hits += 1
                self.stats.prefetch_hits += expert in self._prefetched[layer]
            else:
                self.stats.misses += 1
                self._submit(layer, expert, set(needed))
        self._prefetched[layer].difference_update(needed)
        if self.predict is not None and layer + 1 < len(self.layers):
            self._prefetch(layer + 1, residual[-1].float().cpu().numpy())
        self.previous[layer] = chosen[-1].cpu().numpy()
        return moe.combine(normed, chosen, weights, _Slots(self, layer, count=not upfront))

    def _prefetch(self, layer: int, hidden: np.ndarray) -> None:
        predicted = [int(expert) for expert in self.predict(layer, hidden, self.previous[layer])]
        for expert in predicted:
            if expert not in self.caches[layer]:
                self.stats.prefetches += 1
                self._submit(layer, expert, set(predicted))
                self._prefetched[layer].add(expert)


class _Slots:
    """``experts[e]`` for ``MoELayer.combine``: the device slot holding expert ``e`` once loaded."""

    def __init__(self, offload: OffloadedExperts, layer: int, count: bool) -> None:
        self.offload, self.layer, self.count = offload, layer, count

    def __getitem__(self, expert: int) -> torch.nn.Module:
        return self.offload._ready(self.layer, expert, self.count)
