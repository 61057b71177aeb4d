"""Which experts a layer keeps on the device: a fixed number of slots, least recently used evicted.

One policy for the real offloading runtime (``runtime/moe/expert_offload.py``, which copies
weights into the slot this class assigns) and the TPOT simulation
(``runtime/moe/timeline.py``), so the simulated cache is the one that runs.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

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

    def can_admit(self, protected: Collection[int] = ()) -> bool:
        """Whether :meth:`admit` finds a slot: a free one, or a cached expert not in ``protected``."""
        return len(self._slots) < self.capacity or any(cached not in protected for cached in self._slots)

    def admit(self, expert: int, protected: Collection[int] = ()) -> tuple[int, int | None]:
        """A slot for ``expert`` (not cached yet) and the expert evicted from it (None: a free slot).

        The least recently used expert not in ``protected`` is evicted; :class:`ExpertCacheError`
        when every cached expert is protected.
        """
        if expert in self._slots:
            raise ValueError(f"expert {expert} is already cached")
        if len(self._slots) < self.capacity:
            slot, evicted = len(self._slots), None
        else:
            evicted = next((cached for cached in self._slots if cached not in protected), None)
            if evicted is None:
                raise ExpertCacheError(f"all {self.capacity} slots hold experts in use; the cache needs more slots")
            slot = self._slots.pop(evicted)
        self._slots[expert] = slot
        return slot, evicted
