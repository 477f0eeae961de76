"""A scorer behind a ScoreCache, reporting where each score came from.

Provenance per item: "cached" when the score was read from the cache (memory or SQLite),
"fresh" when it was computed by the wrapped scorer during this call. Duplicates within one
batch (same cache key) are scored once and all get that fresh score, labelled "fresh".

bypass=True (the validation set each epoch) scores everything fresh and leaves the cache exactly
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
        # items: requested; fresh/cached: by provenance; scored: items the wrapped scorer saw;
        # deduped: fresh items that shared another item's score in the same batch
        self._counts = dict(items=0, fresh=0, cached=0, scored=0, deduped=0, calls=0)

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
        out = [(found[k], "cached") if k in found else (fresh[k], "fresh") for k in keys]
        with self._lock:
            c = self._counts
            c["items"] += len(items)
            n_fresh = sum(1 for _, p in out if p == "fresh")
            c["fresh"] += n_fresh
            c["cached"] += len(out) - n_fresh
            c["scored"] += len(todo)
            c["deduped"] += n_fresh - len(todo)
            c["calls"] += 1 if todo else 0
        return out

    def stats(self) -> dict:
        """Cumulative counts: items, fresh, cached, scored (sent to the wrapped scorer), deduped,
        calls (score_batch calls made to the wrapped scorer)."""
        with self._lock:
            return dict(self._counts)
