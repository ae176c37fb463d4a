"""A dict whose entries expire, swept in time proportional to what expired.

The memory store keeps every kind of entry (budget windows, idempotency records,
once-markers, approvals, feedback verdicts) in one of these. Each key has one
authoritative slot in a min-heap of due times, never later than the entry's
expiry; :meth:`ExpiringMap.sweep` pops only the due slots, so the cost of
dropping expired entries is paid once per entry (``O(log n)`` each) instead of a
scan of the whole store. An entry whose expiry moved later since it was queued
is simply queued again at its new expiry when its old slot comes due.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["ExpiringMap"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Slot(Generic[V]):
    __slots__ = ("due", "value")

    def __init__(self, value: V, due: float) -> None:
        self.value = value
        self.due = due


class ExpiringMap(Generic[K, V]):
    """``expiry_of(value)`` is when an entry stops being live (it may move later while stored)."""

    def __init__(self, expiry_of: Callable[[V], float]) -> None:
        self._expiry_of = expiry_of
        self._slots: dict[K, _Slot[V]] = {}
        # (due, tie-breaker, key): the counter keeps keys of different types from being compared
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: K) -> bool:
        return key in self._slots

    def get(self, key: K) -> V | None:
        """The stored value, live or not (callers judge liveness against their own clock)."""
        slot = self._slots.get(key)
        return None if slot is None else slot.value

    def live(self, key: K, now: float) -> V | None:
        slot = self._slots.get(key)
        if slot is None or now >= self._expiry_of(slot.value):
            return None
        return slot.value

    def set(self, key: K, value: V) -> None:
        at = self._expiry_of(value)
        slot = self._slots.get(key)
        if slot is None:
            self._slots[key] = _Slot(value, at)
            self._push(at, key)
            return
        slot.value = value
        if at < slot.due:  # the queued slot would come too late: queue an earlier one (the old one goes stale)
            slot.due = at
            self._push(at, key)

    def pop(self, key: K) -> V | None:
        slot = self._slots.pop(key, None)  # its heap slot goes stale and is dropped when it comes due
        return None if slot is None else slot.value

    def values(self) -> Iterator[V]:
        return (s.value for s in self._slots.values())

    def items(self) -> Iterator[tuple[K, V]]:
        return ((k, s.value) for k, s in self._slots.items())

    def sweep(self, now: float, limit: int | None = None) -> int:
        """Drop entries expired at ``now``; look at no more than ``limit`` due slots. Returns how many went."""
        dropped = 0
        seen = 0
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or seen < limit):
            due, _, key = heapq.heappop(heap)
            seen += 1
            slot = self._slots.get(key)
            if slot is None or slot.due != due:
                continue  # stale: the key was removed or re-queued earlier
            at = self._expiry_of(slot.value)
            if now >= at:
                del self._slots[key]
                dropped += 1
            else:
                slot.due = at
                self._push(at, key)
        return dropped

    def _push(self, at: float, key: K) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), key))
