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
import sqlite3
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from mlx_coach.core.errors import UserError
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.rewards.cache_policies import POLICIES, TIMED_POLICIES, Counts, Entry, approx_bytes, student_store
from mlx_coach.rewards.cache_sqlite import ON_CORRUPT, CorruptRow, DamagedStore, SqliteScores, decode, encode
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
    on_corrupt: str = setting("refuse", choices=ON_CORRUPT,
                              help="a sqlite_path file that is not a database or is damaged: refuse to start, or "
                                   "move it aside (NAME.damaged-N) and start an empty store")

    def __post_init__(self):
        check_fields(self, "cache")
        if not math.isfinite(self.ttl_s):
            raise UserError(f"config key 'cache.ttl_s' must be a finite number > 0; got {self.ttl_s!r}")


# ---------------------------------------------------------------------------------------------
# The cache


class ScoreCache:
    """Score cache in front of a scorer. Thread-safe.

    run:   the identity of the run this cache serves (its run directory, resolved), stamped on the
           SQLite rows it writes; None outside a run (`mlx-coach score --cache`).
    timer: clock for in-memory TTL (monotonic by default; inject a fake one in tests).
    wall:  clock for the `created` stamp of SQLite rows, which only ages rows under a TTL. Wall-clock
           time because rows are shared between processes and outlive reboots, where monotonic clocks
           are not comparable.
    shared_over: the World whose ranks use this cache as one (None: this process alone). Rank 0's
           instance then holds the run's student entries, decides every lookup with its own clocks and
           alone persists them (CachedScorer's shared path); the other ranks' instances are never asked
           for student entries and open no SQLite store.

    Which SQLite rows this cache does not read back is decided by a row's writer and seq
    (cache_sqlite.py), never by a clock. `_hidden` holds (writer, after, until) windows: the rows a run
    wrote after its last checkpoint (seq > after), up to its restart (seq <= until), are not read by
    that run; what it writes from then on has larger seqs and is read. A cache made for a run hides
    the rows that run wrote after the last checkpoint the file records for it (`checkpointed`), every
    one when there is none: a run killed before its first checkpoint restarts at step 0 and scores
    them again, as a straight run did. `restore` puts the checkpoint's own seq in place of that window
    and keeps the windows of earlier resumes. `_watermark` hides, per namespace, every row written
    before its last clear. Rows of other runs and processes are read whatever their seq.

    Under a TTL a row's age is this process's wall time minus its `created` stamp, and a stamp ahead of
    this clock makes the row expired: a clock that was ahead when it wrote, or that was stepped back
    since, costs one re-score (which stamps the row again), never a row that outlives the TTL.
    """

    def __init__(self, policy="lru", maxsize=100_000, ttl_s=3600.0, sqlite_path=None, on_corrupt="refuse", *,
                 run=None, timer=time.monotonic, wall=time.time, shared_over=None):
        self.config = CacheConfig(policy, maxsize, ttl_s, sqlite_path, on_corrupt)
        self.shared_over = shared_over
        self._timer, self._wall = timer, wall
        self._lock = threading.RLock()
        self._tick = itertools.count()
        self._counts = {ns: Counts() for ns in NAMESPACES}
        self._watermark = {ns: -1 for ns in NAMESPACES}  # rows with seq <= it are hidden (-1: no clear)
        self._stores = {"student": student_store(self.config, self._counts["student"], self._timer), "reference": {}}
        self._run = None if run is None else str(Path(run).resolve())
        self._db = SqliteScores(sqlite_path, on_corrupt) if sqlite_path else None
        self._hidden: list = []
        if self._db is not None and self._run is not None:
            self._hidden = [(self._run, self._db.checkpointed_seq(self._run), self._db.last_seq())]

    @classmethod
    def from_config(cls, cfg: CacheConfig, run=None, timer=time.monotonic, wall=time.time,
                    shared_over=None) -> "ScoreCache":
        """The cache a run's `cache:` section describes. A sqlite_path that cannot be used is a UserError
        naming it; a damaged one moved aside (on_corrupt: move-aside) is said in one line on stderr.
        shared_over: the run's World; on its ranks other than 0 the SQLite store is not opened (rank 0
        alone persists)."""
        sqlite_path = cfg.sqlite_path if shared_over is None or shared_over.is_main else None
        try:
            cache = cls(cfg.policy, cfg.maxsize, cfg.ttl_s, sqlite_path, cfg.on_corrupt, run=run, timer=timer,
                        wall=wall, shared_over=shared_over)
        except DamagedStore as e:
            raise UserError(f"cache.sqlite_path: {cfg.sqlite_path} is not a usable score store ({e}); to move it "
                            f"aside and start an empty one, set cache.on_corrupt: move-aside (--set "
                            f"cache.on_corrupt=move-aside)") from None
        except (sqlite3.Error, OSError) as e:  # another program's database, a folder, no permission
            raise UserError(f"cache.sqlite_path: cannot use {cfg.sqlite_path} as a score store ({e})") from None
        moved = cache._db.moved_to if cache._db is not None else None
        if moved is not None:
            print(f"cache.sqlite_path: {cfg.sqlite_path} was not a usable score store; moved it to {moved} "
                  f"(cache.on_corrupt: move-aside), starting an empty one", file=sys.stderr, flush=True)
        return cache

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
                try:
                    value = self._read_through(key, namespace)
                except CorruptRow:  # skipped: a miss, re-scored and written again
                    counts.corrupt_rows += 1
                    value = None
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
        if row is None or row.seq <= self._watermark[namespace]:
            return None
        if any(row.writer == writer and after < row.seq <= until for writer, after, until in self._hidden):
            return None
        age = self._wall() - row.created
        if namespace == "student" and self._timed and not 0.0 <= age < self.config.ttl_s:
            return None  # too old, or stamped ahead of this clock (see the class docstring)
        self._insert(key, row.value, namespace, max(0.0, age))
        return row.value

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
            if self._db is not None:  # its seq is above every watermark and window: read back by this run
                self._db.write(namespace, key, value, self._wall(), self._run)
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
        processes may share the file; rows written before the clear (by any writer) are hidden from
        this cache."""
        with self._lock:
            store, counts = self._stores[namespace], self._counts[namespace]
            if namespace == "student" and self._timed:
                store.expire()
            n = len(store)
            store.clear()
            counts.bytes = 0
            counts.clears += 1
            counts.cleared += n
            if self._db is not None:
                self._watermark[namespace] = self._db.last_seq()
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
        clears, cleared, corrupt_rows, size, bytes (approximate), lookup_s, mean_lookup_us."""
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
        least-recently-used-first order so that restore keeps the eviction order; with SQLite, the run
        and the largest seq in the file (every row this run wrote so far is at or below it)."""
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
            watermarks = {ns: (w if w >= 0 else None) for ns, w in self._watermark.items()}
            return {"format": 2, "config": asdict(self.config), "counts": counts, "watermarks": watermarks,
                    "entries": entries, "run": self._run, "seq": self._db.last_seq() if self._db else None,
                    "hidden": [list(w) for w in self._hidden]}

    def checkpointed(self, snap: dict) -> None:
        """Record that a checkpoint now holds `snap` (one of this cache's snapshots): a later fresh start of
        the same run (its directory deleted and used again) reads this run's rows up to there."""
        if self._db is not None and snap.get("run") is not None and snap.get("seq") is not None:
            with self._lock:
                self._db.mark_checkpointed(snap["run"], snap["seq"])

    def restore(self, snap: dict) -> None:
        """Replace entries and counters with a snapshot's (under this cache's own policy).
        Entries keep their remaining TTL; nothing is written to SQLite. The SQLite rows the snapshot's
        run wrote after it are hidden from now on."""
        if not isinstance(snap, dict) or snap.get("format") not in (1, 2):
            raise UserError("cache snapshot: unknown format (expected a dict with format 1 or 2)")
        with self._lock:
            self._stores = {"student": student_store(self.config, self._counts["student"], self._timer), "reference": {}}
            for ns in NAMESPACES:
                self._counts[ns].bytes = 0
                if not self._keeps(ns):
                    continue
                for key, value, age in snap["entries"].get(ns, []):
                    try:
                        self._insert(tuple(key), decode(json.dumps(value)), ns, float(age))
                    except CorruptRow:
                        self._counts[ns].corrupt_rows += 1
            names = {f.name for f in fields(Counts)} - {"bytes"}
            for ns in NAMESPACES:
                for k, v in snap["counts"].get(ns, {}).items():
                    if k in names:
                        setattr(self._counts[ns], k, v)
            if snap["format"] == 1:
                self._restore_provenance_v1(snap)
            else:
                self._restore_provenance(snap)

    def _restore_provenance(self, snap):
        self._watermark = {ns: -1 if w is None else int(w) for ns, w in snap.get("watermarks", {}).items()}
        self._watermark.update({ns: -1 for ns in NAMESPACES if ns not in self._watermark})
        self._hidden = [tuple(w) for w in snap.get("hidden", [])]
        if self._db is not None and snap.get("run") is not None:
            # the snapshot's seq counts in this file only; from another file, every row of the run is hidden
            same_file = snap.get("config", {}).get("sqlite_path") == self.config.sqlite_path
            after = snap["seq"] if same_file and snap.get("seq") is not None else 0
            self._hidden.append((snap["run"], after, self._db.last_seq()))

    def _restore_provenance_v1(self, snap):
        """A snapshot from when rows carried only a wall-clock stamp: which of those rows came after it
        cannot be told without trusting a clock, so every such row (writer NULL, seq 0) is hidden, and
        every row this run has stamped since (attempts resumed from this same snapshot). A clear then
        hid rows written before it, all of them unstamped: the first window covers it."""
        self._watermark = {ns: -1 for ns in NAMESPACES}
        self._hidden = [(None, -1, 0)]
        if self._db is not None and self._run is not None:
            self._hidden.append((self._run, 0, self._db.last_seq()))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

