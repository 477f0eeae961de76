"""A scorer behind a ScoreCache, reporting where each score came from.

Provenance per item: "fresh" when the wrapped scorer computed it during this call, "cached" when it
was read from the cache (memory or SQLite), "duplicate" when an earlier item of the same batch has
the same cache key: the key is looked up and scored once, at its first item, and every later item
gets a copy of that score, whether it was fresh or cached. So the fresh items are exactly the
scorer's work, one per distinct text.

bypass=True (the validation set each epoch) scores every distinct text fresh and leaves the cache exactly
as it was: no reads, no writes, no stats. A measurement pass then cannot change what training
later sees, nor the numbers two cache policies are compared on.

A cache shared over several ranks (`ScoreCache.shared_over`, a World of size > 1) is one cache for the
run: each call is one step's batch split over the ranks in rank order, and every rank calls
score_batch with its share at the same point (a collective). The keys of every share are gathered, rank 0
(which alone holds the cache's entries, its clock and its SQLite store) decides hits, misses and
duplicates on the global batch in its order, each miss is scored by the rank holding its first
item, and the new verdicts are gathered so that rank 0 stores them in that order and every rank copies
them to its duplicates. Lookups, stores and provenances are then exactly those of one process scoring
the global batch, whatever the number of ranks.
"""

from __future__ import annotations

import json
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
        world = self.cache.shared_over
        if bypass or world is None or world.size == 1:
            found, todo = self._look_up(keys, bypass)
            fresh = self._score_fresh(items, todo, bypass)
            out = _provenances(keys, found, fresh)
        else:
            out = self._score_shared(world, items, keys)
        self._count(out, called=any(origin == "fresh" for _, origin in out))
        return out

    def _look_up(self, keys, bypass=False):
        """({key: cached Score}, {key: index of its first item}) of the keys not in the cache, in order."""
        found: dict = {}
        todo: dict = {}
        for i, key in enumerate(keys):
            if key in found or key in todo:
                continue
            score = None if bypass else self.cache.get(key)
            if isinstance(score, Score):
                found[key] = score
            else:
                todo[key] = i
        return found, todo

    def _score_fresh(self, items, todo, bypass):
        """{key: Score} from the wrapped scorer for each key of todo (its item), stored unless bypass."""
        if not todo:
            return {}
        scores = self.scorer.score_batch([items[i] for i in todo.values()])
        if len(scores) != len(todo):
            raise RuntimeError(f"{self.name}: score_batch returned {len(scores)} scores for {len(todo)} items")
        fresh = dict(zip(todo, scores))
        if not bypass:
            for key, score in fresh.items():
                self.cache.put(key, score)  # refuses fallbacks and non-cacheable scores
        return fresh

    def _score_shared(self, world, items, keys):
        """This rank's (Score, provenance) rows of a step's batch scored with one cache over the ranks."""
        shares = world.gather_bytes([json.dumps(list(k)).encode() for k in keys])
        offset = sum(len(share) for share in shares[: world.rank])
        everyone = [tuple(json.loads(b)) for share in shares for b in share]
        decided = []
        if world.is_main:  # the one cache: its lookups in the global batch's order
            found, todo = self._look_up(everyone)
            at = {}
            for i, key in enumerate(everyone):
                at.setdefault(key, i)
            decided = [json.dumps({"found": [[at[k], s.to_dict()] for k, s in found.items()],
                                   "todo": list(todo.values())}).encode()]
        decision = json.loads(world.gather_bytes(decided)[0][0])
        found = {everyone[i]: Score(**d) for i, d in decision["found"]}
        first = decision["todo"]
        mine = {everyone[i]: i - offset for i in first if offset <= i < offset + len(items)}
        scores = self._score_fresh(items, mine, bypass=True)  # stored below, by rank 0, in the global order
        verdicts = world.gather_bytes([json.dumps(scores[k].to_dict()).encode() for k in mine])
        fresh = {everyone[i]: Score(**json.loads(b)) for i, b in zip(first, (b for v in verdicts for b in v))}
        if world.is_main:
            for key, score in fresh.items():
                self.cache.put(key, score)  # refuses fallbacks and non-cacheable scores
        out = _provenances(everyone, found, fresh)
        return out[offset: offset + len(items)]

    def _count(self, out, called):
        with self._lock:
            c = self._counts
            c["items"] += len(out)
            for _, origin in out:
                c[origin] += 1
            c["calls"] += 1 if called else 0

    def stats(self) -> dict:
        """Cumulative counts: items, and of them fresh (sent to the wrapped scorer), cached and
        duplicate; calls (score_batch calls made to the wrapped scorer)."""
        with self._lock:
            return dict(self._counts)


def _provenances(keys, found, fresh):
    """(Score, provenance) per key: a key's first item is "cached" (found) or "fresh", later ones "duplicate"."""
    out, seen = [], set()
    for key in keys:
        origin = "duplicate" if key in seen else "cached" if key in found else "fresh"
        seen.add(key)
        out.append((found[key] if key in found else fresh[key], origin))
    return out
