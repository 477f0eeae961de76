"""A scorer behind a ScoreCache, reporting where each score came from.

Provenance per item: "fresh" when the wrapped scorer computed it during this call, "cached" when it
was read from the cache (memory or SQLite), "duplicate" when an earlier item of the same batch has
the same cache key: the key is looked up and scored once, at its first item, and every later item
gets a copy of that score, whether it was fresh or cached. So the fresh items are exactly the
scorer's work, one per distinct text.

bypass=True (the validation set each epoch) scores every distinct text fresh and leaves the cache exactly
as it was: no reads, no writes, no stats. A measurement pass then cannot change what training
later sees, nor the numbers two cache policies are compared on.
"""

from __future__ import annotations

import threading

from mlx_coach.rewards.cache import ScoreCache, make_key
from mlx_coach.rewards.scoring.base import Score


class CachedScorer:
    def __init__(self, scorer, cache: ScoreCache):
        self.scorer = scorer
        self.cache = cache
        self.name = scorer.name
        self.version = scorer.version
        self._lock = threading.Lock()
        # items: requested; fresh, cached, duplicate: items by provenance (fresh = items the wrapped
        # scorer saw); calls: score_batch calls made to the wrapped scorer
        self._counts = dict(items=0, fresh=0, cached=0, duplicate=0, calls=0)

    def score_batch(self, items, *, bypass: bool = False) -> list[tuple[Score, str]]:
        items = list(items)
        keys = [make_key(self.name, self.version, task, completion) for task, completion in items]
        found: dict = {}  # key -> Score read from the cache
        todo: dict = {}  # key -> index of the first item with that key
        for i, key in enumerate(keys):
            if key in found or key in todo:
                continue
            score = None if bypass else self.cache.get(key)
            if isinstance(score, Score):
                found[key] = score
            else:
                todo[key] = i
        fresh: dict = {}
        if todo:
            scores = self.scorer.score_batch([items[i] for i in todo.values()])
            if len(scores) != len(todo):
                raise RuntimeError(f"{self.name}: score_batch returned {len(scores)} scores for {len(todo)} items")
            fresh = dict(zip(todo, scores))
            if not bypass:
                for key, score in fresh.items():
                    self.cache.put(key, score)  # refuses fallbacks and non-cacheable scores
        out, seen = [], set()
        for key in keys:
            origin = "duplicate" if key in seen else "cached" if key in found else "fresh"
            seen.add(key)
            out.append((found[key] if key in found else fresh[key], origin))
        with self._lock:
            c = self._counts
            c["items"] += len(items)
            for _, origin in out:
                c[origin] += 1
            c["calls"] += 1 if todo else 0
        return out

    def stats(self) -> dict:
        """Cumulative counts: items, and of them fresh (sent to the wrapped scorer), cached and
        duplicate; calls (score_batch calls made to the wrapped scorer)."""
        with self._lock:
            return dict(self._counts)
