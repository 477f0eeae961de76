"""The in-memory stores behind ScoreCache's policies: cachetools LRU and TLRU stores that report what they
drop, the counters kept per namespace, and the approximate size of an entry.

Policies: "none" (student entries are never stored), "lru" (maxsize), "ttl" (ttl_s), "lru+ttl",
"epoch-clear" (kept for A/B comparisons: student entries are dropped at every epoch start;
maxsize-bounded LRU otherwise). The "reference" namespace is a plain dict under every policy.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields

from cachetools import LRUCache, TLRUCache

from mlx_coach.rewards.scoring.base import Score

POLICIES = ("none", "lru", "ttl", "lru+ttl", "epoch-clear")
TIMED_POLICIES = ("ttl", "lru+ttl")


class Entry:
    __slots__ = ("value", "born", "used", "nbytes")

    def __init__(self, value, born, used, nbytes):
        self.value, self.born, self.used, self.nbytes = value, born, used, nbytes


class _LRU(LRUCache):
    def __init__(self, maxsize, on_evict):
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self):
        key, entry = super().popitem()
        self._on_evict(entry)
        return key, entry


class _TimedLRU(TLRUCache):
    """TTL with LRU eviction. TLRU rather than TTLCache: an entry read back from SQLite or a
    snapshot keeps its remaining lifetime (expires at born + ttl) instead of getting a new one."""

    def __init__(self, maxsize, ttl, timer, on_evict, on_expire):
        super().__init__(maxsize, lambda key, entry, now: entry.born + ttl, timer)
        self._on_evict, self._on_expire = on_evict, on_expire

    def popitem(self):
        key, entry = super().popitem()
        self._on_evict(entry)
        return key, entry

    def expire(self, time=None):
        expired = super().expire(time)
        for _, entry in expired:
            self._on_expire(entry)
        return expired


@dataclass
class Counts:
    hits: int = 0
    misses: int = 0
    disk_hits: int = 0  # hits served by SQLite read-through (included in hits)
    puts: int = 0
    rejected: int = 0
    evictions: int = 0
    expirations: int = 0
    clears: int = 0  # clear events
    cleared: int = 0  # entries those events removed
    corrupt_rows: int = 0  # SQLite rows (or snapshot entries) that could not be read or decoded: skipped, a miss
    lookup_s: float = 0.0
    bytes: int = 0


def student_store(config, counts: Counts, timer):
    """The store of the "student" namespace under config.policy; evictions and expirations are counted
    in `counts` as they happen."""

    def on_evict(entry):
        counts.evictions += 1
        counts.bytes -= entry.nbytes

    def on_expire(entry):
        counts.expirations += 1
        counts.bytes -= entry.nbytes

    if config.policy == "none":
        return {}
    if config.policy in TIMED_POLICIES:
        bound = config.maxsize if config.policy == "lru+ttl" else math.inf
        return _TimedLRU(bound, config.ttl_s, timer, on_evict, on_expire)
    return _LRU(config.maxsize, on_evict)


# a Score object and its attribute dict, sized once on a fresh Score (the size of a live __dict__ varies)
_SCORE_BYTES = sys.getsizeof(Score(0.0, "ok")) + sys.getsizeof({f.name: None for f in fields(Score)})


def approx_bytes(key, value) -> int:
    n = sys.getsizeof(key) + sum(sys.getsizeof(k) for k in key) + 72  # + the entry and its slots
    if isinstance(value, Score):
        return n + _SCORE_BYTES + sys.getsizeof(value.error)
    return n + sys.getsizeof(value)
