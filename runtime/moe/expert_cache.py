"""Which experts a layer keeps on the device: a fixed number of slots; the evicted expert is the one a
``rank`` puts last (an array over the experts: the higher, the later it is needed), least recently
used first among equals, so no rank means least recently used.

The cache of :class:`~moco_compile.runtime.moe.cache_policy.CachePolicy`, which decides for both the
real offloading runtime (``runtime/moe/expert_offload.py``, which copies weights into the slot this
class assigns) and the TPOT simulation (``runtime/moe/timeline.py``), so the simulated cache is the
one that runs.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

from moco_compile.errors import ExpertCacheError


def check_capacity(capacity: int, num_experts: int, top_k: int) -> None:
    """:class:`ExpertCacheError` unless ``top_k <= capacity <= num_experts``."""
    if capacity < top_k:
        raise ExpertCacheError(f"an expert cache of {capacity} slots per layer cannot hold the {top_k} experts "
                               f"one token routes to; give at least {top_k} slots (--cache is a number of "
                               "experts per layer, or a fraction of them)")
    if capacity > num_experts:
        raise ExpertCacheError(f"an expert cache of {capacity} slots per layer is larger than the layer's "
                               f"{num_experts} experts; give at most {num_experts}")


class LayerCache:
    """Slots ``0..capacity-1`` of one layer; :meth:`lookup` and :meth:`admit` mark use."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first

    def __contains__(self, expert: int) -> bool:
        return expert in self._slots

    @property
    def experts(self) -> list[int]:
        """Cached experts, least recently used first."""
        return list(self._slots)

    def lookup(self, expert: int) -> int | None:
        """The slot holding ``expert`` (now most recently used), or None."""
        if expert not in self._slots:
            return None
        self._slots.move_to_end(expert)
        return self._slots[expert]

    def slot(self, expert: int) -> int | None:
        """The slot holding ``expert``, or None, without marking use."""
        return self._slots.get(expert)

    def can_admit(self, protected: Collection[int] = ()) -> bool:
        """Whether :meth:`admit` finds a slot: a free one, or a cached expert not in ``protected``."""
        return len(self._slots) < self.capacity or any(cached not in protected for cached in self._slots)

    def victim(self, protected: Collection[int] = (), rank: Sequence[float] | None = None) -> int | None:
        """The cached expert :meth:`admit` would evict: not in ``protected``, the highest ``rank[expert]``,
        the least recently used among equals (None: every cached expert is protected)."""
        candidates = [cached for cached in self._slots if cached not in protected]
        if rank is None or not candidates:
            return candidates[0] if candidates else None
        return max(candidates, key=lambda cached: rank[cached])  # max keeps the first (least recent) of equals

    def admit(self, expert: int, protected: Collection[int] = (),
              rank: Sequence[float] | None = None) -> tuple[int, int | None]:
        """A slot for ``expert`` (not cached yet) and the expert evicted from it (None: a free slot).

        A full cache evicts its :meth:`victim`; :class:`ExpertCacheError` when every cached expert is protected.
        """
        if expert in self._slots:
            raise ValueError(f"expert {expert} is already cached")
        if len(self._slots) < self.capacity:
            slot, evicted = len(self._slots), None
        else:
            evicted = self.victim(protected, rank)
            if evicted is None:
                raise ExpertCacheError(f"all {self.capacity} slots hold experts in use; the cache needs more slots")
            slot = self._slots.pop(evicted)
        self._slots[expert] = slot
        return slot, evicted
