"""Score cache: the keys, the `cache:` settings, and ScoreCache with its two namespaces, exact stats,
optional SQLite persistence (cache_sqlite.py) and snapshot/restore.

Namespaces:
  "student"    scores of the policy's completions; follows the configured policy (cache_policies.py).
  "reference"  the teachers' own outputs (e.g. a judge's reference solution per task): pinned,
               never evicted, expired or cleared by epoch-clear, whatever the policy.

Only real judgements are stored: a Score with cacheable=False or fallback=True is refused.
Stored values are `Score`s or strings; treat what `get` returns as read-only.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

from mlx_coach.core.errors import UserError
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.rewards.cache_policies import POLICIES, TIMED_POLICIES, Counts, Entry, approx_bytes, student_store
from mlx_coach.rewards.cache_sqlite import SqliteScores, decode, encode
from mlx_coach.rewards.scoring.base import Score

NAMESPACES = ("student", "reference")


# ---------------------------------------------------------------------------------------------
# Keys


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@functools.lru_cache(maxsize=4096)
def _text_digest(text: str) -> str:
    return _sha(text)


def make_key(scorer_name: str, scorer_version: str, task, completion: str) -> tuple:
    """(scorer@version, task id, sha256 of the task's prompt, test and entry point, sha256 of the
    completion exactly as sampled).

    The key holds everything that decides a verdict: the program that runs is prompt + completion +
    test + check(entry_point), and the scorer's version names every setting that can change a verdict
    (the sandbox folds its limits, partial credit and site-packages into it). Nothing in the completion
    is normalised: indentation width, tabs, trailing spaces, blank lines and line endings can each turn
    a passing program into a failing one (an indented block must match the prompt's indentation, a
    string literal keeps its spaces), so two texts share a key only when they are the same text."""
    return (
        f"{scorer_name}@{scorer_version}",
        str(task.task_id),
        _text_digest("\0".join((getattr(task, "prompt", "") or "", getattr(task, "test", "") or "",
                                 getattr(task, "entry_point", "") or ""))),
        _sha(completion),
    )


def reference_key(owner: str, task, kind: str = "solution") -> tuple:
    """Key of a teacher's own output for a task: (owner, task id, sha256 of the prompt, kind)."""
    return (owner, str(task.task_id), _sha(task.prompt), kind)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class CacheConfig:
    """The `cache:` config section."""

    policy: str = setting("lru", choices=POLICIES)
    maxsize: int = setting(100_000, lo=1)
    ttl_s: float = setting(3600.0, lo=0.0, lo_open=True)
    sqlite_path: Optional[str] = setting(None, help="persist scores across runs and processes (SQLite, WAL)")

    def __post_init__(self):
        check_fields(self, "cache")
        if not math.isfinite(self.ttl_s):
            raise UserError(f"config key 'cache.ttl_s' must be a finite number > 0; got {self.ttl_s!r}")


# ---------------------------------------------------------------------------------------------
# The cache


class ScoreCache:
    """Score cache in front of a scorer. Thread-safe.

    timer: clock for in-memory TTL (monotonic by default; inject a fake one in tests).
    wall:  clock for the `created` stamp of SQLite rows. Wall-clock time because rows are shared
           between processes and outlive reboots, where monotonic clocks are not comparable.
    """

    def __init__(self, policy="lru", maxsize=100_000, ttl_s=3600.0, sqlite_path=None, *,
                 timer=time.monotonic, wall=time.time):
        self.config = CacheConfig(policy, maxsize, ttl_s, sqlite_path)
        self._timer, self._wall = timer, wall
        self._lock = threading.RLock()
        self._tick = itertools.count()
        self._counts = {ns: Counts() for ns in NAMESPACES}
        self._watermark = {ns: -math.inf for ns in NAMESPACES}  # rows created before a clear are hidden
        # (after, until] wall-time windows of SQLite rows that this run must not read: rows a killed
        # run wrote after its last checkpoint. A resumed run re-scores those samples (fresh, as the
        # straight run did); its own new rows are stamped later and read normally.
        self._hidden: list = []
        self._stores = {"student": student_store(self.config, self._counts["student"], self._timer), "reference": {}}
        self._db = SqliteScores(sqlite_path) if sqlite_path else None

    @classmethod
    def from_config(cls, cfg: CacheConfig, timer=time.monotonic, wall=time.time) -> "ScoreCache":
        return cls(cfg.policy, cfg.maxsize, cfg.ttl_s, cfg.sqlite_path, timer=timer, wall=wall)

    @property
    def policy(self) -> str:
        return self.config.policy

    @property
    def _timed(self) -> bool:
        return self.config.policy in TIMED_POLICIES

    def _keeps(self, namespace) -> bool:
        return namespace == "reference" or self.config.policy != "none"

    # -- lookups -------------------------------------------------------------------------------

    def get(self, key: tuple, namespace: str = "student"):
        """The stored value for key, or None. A miss in memory reads through to SQLite."""
        t0 = time.perf_counter()
        with self._lock:
            counts, store = self._counts[namespace], self._stores[namespace]
            if namespace == "student" and self._timed:
                store.expire()  # so that expirations are counted when they happen
            entry = store.get(key)
            if entry is not None:
                entry.used = next(self._tick)
                value = entry.value
                counts.hits += 1
            else:
                value = self._read_through(key, namespace)
                if value is None:
                    counts.misses += 1
                else:
                    counts.hits += 1
                    counts.disk_hits += 1
            counts.lookup_s += time.perf_counter() - t0
            return value

    def _read_through(self, key, namespace):
        if self._db is None or not self._keeps(namespace):
            return None
        row = self._db.read(namespace, key)
        if row is None or row[1] <= self._watermark[namespace]:
            return None
        if any(after < row[1] <= until for after, until in self._hidden):
            return None
        age = max(0.0, self._wall() - row[1])
        if namespace == "student" and self._timed and age >= self.config.ttl_s:
            return None
        value = decode(row[0])
        self._insert(key, value, namespace, age)
        return value

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: tuple, value, namespace: str = "student") -> bool:
        """Store a Score (or a string, e.g. a reference solution). Returns whether it was stored.

        Refuses, and counts as rejected, a Score that is not a real judgement
        (cacheable=False or fallback=True). Policy "none" stores no student entries.
        """
        if namespace not in NAMESPACES:
            raise ValueError(f"unknown cache namespace {namespace!r}")
        if not isinstance(value, (Score, str)):
            raise TypeError(f"cache values are Score or str, not {type(value).__name__}")
        with self._lock:
            counts = self._counts[namespace]
            if isinstance(value, Score) and (not value.cacheable or value.fallback):
                counts.rejected += 1
                return False
            if not self._keeps(namespace):
                return False
            self._insert(key, value, namespace, 0.0)
            counts.puts += 1
            if self._db is not None:
                # strictly after a clear's watermark and any hidden window, even with a coarse or frozen wall clock
                floor = max([self._watermark[namespace]] + [until for _, until in self._hidden])
                created = max(self._wall(), floor + 1e-6)
                self._db.write(namespace, key, value, created)
            return True

    def _insert(self, key, value, namespace, age):
        """Put into memory an entry that is `age` seconds old (0 for a new one)."""
        store, counts = self._stores[namespace], self._counts[namespace]
        if namespace == "student" and self._timed:
            if age >= self.config.ttl_s:
                return
            store.expire()
        old = store.get(key)
        if old is not None:
            counts.bytes -= old.nbytes
        entry = Entry(value, self._timer() - age, next(self._tick), approx_bytes(key, value))
        store[key] = entry
        counts.bytes += entry.nbytes

    # -- clearing --------------------------------------------------------------------------------

    def clear(self, namespace: str = "student") -> int:
        """Drop every entry of a namespace (in memory, and this instance's view of SQLite).
        Returns how many in-memory entries went. SQLite rows are not deleted, since other
        processes may share the file; rows created before the clear are hidden from this cache."""
        with self._lock:
            store, counts = self._stores[namespace], self._counts[namespace]
            if namespace == "student" and self._timed:
                store.expire()
            n = len(store)
            store.clear()
            counts.bytes = 0
            counts.clears += 1
            counts.cleared += n
            self._watermark[namespace] = self._wall()
            return n

    def on_epoch_start(self, epoch: int) -> int:
        """Called by the trainer at each epoch start; clears student entries only under
        policy "epoch-clear". Returns the number of entries cleared."""
        if self.config.policy != "epoch-clear":
            return 0
        return self.clear("student")

    # -- stats -------------------------------------------------------------------------------

    def size(self, namespace: str = "student") -> int:
        with self._lock:
            return len(self._stores[namespace])

    def hit_rate(self, namespace: str = "student") -> float:
        c = self._counts[namespace]
        n = c.hits + c.misses
        return c.hits / n if n else 0.0

    def stats(self) -> dict:
        """{"policy", "maxsize", "ttl_s", "sqlite", "student": {...}, "reference": {...}}; per
        namespace: hits, misses, hit_rate, disk_hits, puts, rejected, evictions, expirations,
        clears, cleared, size, bytes (approximate), lookup_s, mean_lookup_us."""
        with self._lock:
            out = {"policy": self.config.policy, "maxsize": self.config.maxsize,
                   "ttl_s": self.config.ttl_s, "sqlite": self._db is not None}
            for ns in NAMESPACES:
                size = self.size(ns)  # first: it may expire entries, which updates the counts
                d = asdict(self._counts[ns])
                d["size"] = size
                lookups = d["hits"] + d["misses"]
                d["hit_rate"] = self.hit_rate(ns)
                d["mean_lookup_us"] = 1e6 * d["lookup_s"] / lookups if lookups else 0.0
                out[ns] = d
            return out

    # -- checkpoints -----------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """JSON-serialisable state: policy, counters, and every live entry with its age, in
        least-recently-used-first order so that restore keeps the eviction order."""
        with self._lock:
            entries = {}
            now = self._timer()
            for ns in NAMESPACES:
                store = self._stores[ns]
                if ns == "student" and self._timed:
                    store.expire()
                live = [(k, store.get(k)) for k in list(store)]
                live = sorted(((k, e) for k, e in live if e is not None), key=lambda ke: ke[1].used)
                for k, _ in live:  # reading moved entries in the LRU order; put it back
                    store.get(k)
                entries[ns] = [[list(k), json.loads(encode(e.value)), max(0.0, now - e.born)] for k, e in live]
            counts = {ns: asdict(self._counts[ns]) for ns in NAMESPACES}
            for c in counts.values():
                c.pop("bytes")
            watermarks = {ns: (w if w > -math.inf else None) for ns, w in self._watermark.items()}
            return {"format": 1, "config": asdict(self.config), "counts": counts,
                    "watermarks": watermarks, "entries": entries, "wall": self._wall(),
                    "hidden": [list(w) for w in self._hidden]}

    def restore(self, snap: dict) -> None:
        """Replace entries and counters with a snapshot's (under this cache's own policy).
        Entries keep their remaining TTL; nothing is written to SQLite."""
        if not isinstance(snap, dict) or snap.get("format") != 1:
            raise UserError("cache snapshot: unknown format (expected a dict with format 1)")
        with self._lock:
            self._stores = {"student": student_store(self.config, self._counts["student"], self._timer), "reference": {}}
            for ns in NAMESPACES:
                self._counts[ns].bytes = 0
                if not self._keeps(ns):
                    continue
                for key, value, age in snap["entries"].get(ns, []):
                    self._insert(tuple(key), decode(json.dumps(value)), ns, float(age))
            names = {f.name for f in fields(Counts)} - {"bytes"}
            for ns in NAMESPACES:
                for k, v in snap["counts"].get(ns, {}).items():
                    if k in names:
                        setattr(self._counts[ns], k, v)
                w = snap.get("watermarks", {}).get(ns)
                self._watermark[ns] = -math.inf if w is None else float(w)
            # SQLite rows written between the snapshot and now came after the checkpoint: hide them
            self._hidden = [tuple(w) for w in snap.get("hidden", [])]
            if snap.get("wall") is not None:
                self._hidden.append((float(snap["wall"]), self._wall()))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

