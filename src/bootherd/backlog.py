"""Started work first: the order in which an overloaded server serves waiting requests.

Pure (no sockets, no clock: every call takes ``now``).  A server puts what it has read
but not yet answered into a :class:`Backlog` and takes it out in the order of these rules
(each has a test in ``tests/core/test_backlog.py``):

1. **Started work first.**  Every request has a class, 0 the most urgent.  A request of a
   lower class is always served before one of a higher class: work already begun (a DHCP
   REQUEST for an offer made, a TMCD request from a node in TBSETUP) is finished before
   new work (a DISCOVER, a first ``status``) is started.
2. **Oldest first** within a class: the time a request is stamped with (the kernel's
   receive time where the socket gives it) orders it (a request read later but stamped
   earlier moves ahead of up to ``SORT_WINDOW`` others).
3. **Once.**  A request whose key (same client, same transaction) is already waiting is a
   retransmission: it is not queued twice (``duplicates``).  The one waiting keeps its
   place (it is the older) and is answered once.
4. **Not late.**  A class may have a deadline: a request that has waited longer than that
   is dropped when its turn comes (``expired``), since its client has retried or given up
   and an answer now only adds to the load (a DISCOVER older than the firmware's next
   retry).  Dropped, not answered: the retry will be.  The deadline runs from the
   request's *latest* copy: a retransmission folded into the waiting request by rule 3
   renews it (the client still waits for an answer to that transaction, now until its
   next retry), else rule 3 would drop the retry with the original and the client would
   wait a whole further timeout.
5. **Bounded.**  At most ``capacity`` requests wait; past that, a newcomer of a class no
   more urgent than the least urgent waiting one is refused (``overflow``), else it takes
   the place of the youngest request of the least urgent class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
SORT_WINDOW = 64  # places a request stamped out of order may move ahead of


@dataclass(slots=True)
class BacklogCounters:
    queued: int = 0
    duplicates: int = 0
    expired: int = 0
    overflow: int = 0
    served: int = 0


class _Entry(Generic[T]):
    __slots__ = ("item", "key", "at", "last", "live")

    def __init__(self, item: T, key: Hashable, at: float):
        self.item = item
        self.key = key
        self.at = at  # its place in the order
        self.last = at  # its latest copy: where its deadline runs from
        self.live = True


class Backlog(Generic[T]):
    """Waiting requests by class, oldest first, each key once.

    ``deadlines[c]`` is the longest a request of class ``c`` may wait (None: no limit)."""

    def __init__(self, deadlines: Sequence[float | None], capacity: int = 65536):
        if not deadlines:
            raise ValueError("a backlog needs at least one class")
        self.deadlines = tuple(deadlines)
        self.capacity = max(1, capacity)
        self.counters = BacklogCounters()
        self._classes: list[deque[_Entry[T]]] = [deque() for _ in deadlines]
        self._keys: dict[Hashable, _Entry[T]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, item: T, key: Hashable, cls: int, at: float) -> bool:
        """Queue ``item`` (stamped ``at``) in class ``cls``; False if it was not queued
        (a duplicate of a waiting request, or no room)."""
        c = self.counters
        waiting = self._keys.get(key)
        if waiting is not None:
            c.duplicates += 1
            if at > waiting.last:
                waiting.last = at
            return False
        if len(self._keys) >= self.capacity and not self._evict_for(cls):
            c.overflow += 1
            return False
        entry = _Entry(item, key, at)
        q = self._classes[cls]
        if q and q[-1].at > at:  # stamped earlier than the last one: keep the order
            self._insert_sorted(q, entry)
        else:
            q.append(entry)
        self._keys[key] = entry
        c.queued += 1
        return True

    @staticmethod
    def _insert_sorted(q: deque[_Entry[T]], entry: _Entry[T]) -> None:
        # Stamps arrive nearly in order (each socket's queue is FIFO; sockets and CPUs
        # interleave by microseconds): look back SORT_WINDOW places at most, so a burst
        # costs O(n), not O(n^2).
        i, stop = len(q), max(0, len(q) - SORT_WINDOW)
        while i > stop and q[i - 1].at > entry.at:
            i -= 1
        if i == len(q):
            q.append(entry)
        else:
            q.insert(i, entry)

    def _evict_for(self, cls: int) -> bool:
        """Make room for a class-``cls`` newcomer by dropping the youngest request of the
        least urgent class, if that class is less urgent than ``cls``."""
        for worst in range(len(self._classes) - 1, cls, -1):
            q = self._classes[worst]
            while q:
                e = q.pop()
                if e.live:
                    del self._keys[e.key]
                    self.counters.overflow += 1
                    return True
        return False

    def take(self, now: float, limit: int | None = None) -> Iterator[T]:
        """Requests in serving order, at most ``limit``; expired ones are dropped on the
        way.  A request is out of the backlog once yielded."""
        n = 0
        for cls, q in enumerate(self._classes):
            deadline = self.deadlines[cls]
            while q:
                if limit is not None and n >= limit:
                    return
                e = q.popleft()
                if not e.live:
                    continue
                del self._keys[e.key]
                if deadline is not None and now - e.last > deadline:
                    self.counters.expired += 1
                    continue
                self.counters.served += 1
                n += 1
                yield e.item

    def get(self, key: Hashable) -> T | None:
        """The request waiting under ``key``, or None."""
        e = self._keys.get(key)
        return e.item if e is not None else None

    def discard(self, key: Hashable) -> T | None:
        """Take a waiting request out (its client went away); returns it, or None."""
        e = self._keys.pop(key, None)
        if e is None:
            return None
        e.live = False
        return e.item

    def waiting(self) -> list[int]:
        """Requests waiting per class."""
        return [sum(e.live for e in q) for q in self._classes]
