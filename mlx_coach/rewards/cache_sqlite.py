"""ScoreCache's persistence: one SQLite file (WAL) shared by runs and processes, what each row says about
where it came from, and the JSON form of a cached value that its rows and the cache's snapshots both use.

Table `entries (ns, key, value, created, writer, seq)`:
  key      the cache key as JSON; value: a JSON-encoded Score or string (`encode`);
  created  the wall-clock time of the write, used for one thing only: a row's age under a TTL (rows
           outlive reboots and cross processes, where monotonic clocks are not comparable);
  writer   the run that wrote the row (ScoreCache's `run`); NULL for a writer outside a run
           (`mlx-coach score --cache`) and for rows written before the column existed;
  seq      the row's place in the file's write order: one more than the largest seq in the file, taken
           inside the INSERT, so it is unique and only grows across processes whatever any clock does;
           NULL (read as 0) for rows written before the column existed.
Table `checkpointed (writer, seq)`: the largest seq held by a run's newest successful checkpoint.
Which rows a run must not read back is decided on (writer, seq) alone, never on `created`.

Rows are never deleted (other processes may share the file), so the largest seq never falls. A file
written before `writer` and `seq` existed gains them when first opened; its rows keep NULL in both.
Opening first checks the whole file through a read-only connection (`PRAGMA quick_check`), so a file
refused is left untouched and damage is found at start, never in the middle of a step: a file that is
not a database or is damaged (truncated, a bad page) raises DamagedStore, a database holding other
tables but no score table NotAStore. Later, a row that cannot be read or decoded raises CorruptRow for
that row alone, and a write the file cannot take (disk full, read-only) WriteFailed.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import NamedTuple, Optional, get_type_hints

from mlx_coach.rewards.scoring.base import Score, is_number
from mlx_coach.runtime.stops import WriteFailed

ON_CORRUPT = ("refuse", "move-aside")
_SIDE_FILES = ("-wal", "-shm")  # SQLite's journal files beside the database


class DamagedStore(sqlite3.DatabaseError):
    """The file is not a SQLite database, or is a damaged one; the message says what SQLite found."""


class NotAStore(sqlite3.DatabaseError):
    """A sound SQLite database that holds no score table (another program's file): refused, never moved."""


class CorruptRow(ValueError):
    """A row that cannot be read, or that holds what `encode` never writes."""


# ---------------------------------------------------------------------------------------------
# Values


def encode(value) -> str:
    if isinstance(value, Score):
        return json.dumps({"score": value.to_dict()})
    return json.dumps({"text": value})


def _is_str(v):
    return isinstance(v, str)


def _is_bool(v):
    return isinstance(v, bool)


# the type check of each Score field, from its annotation; the fields without a default must be present
_CHECKS = {name: {float: is_number, str: _is_str, bool: _is_bool}[tp] for name, tp in get_type_hints(Score).items()}
_REQUIRED = {f.name for f in fields(Score) if f.default is MISSING and f.default_factory is MISSING}


def decode(text):
    """The Score or string that `encode` turned into `text`; CorruptRow for anything `encode` does not write
    (not JSON, another shape, unknown or missing fields, wrong types, a score the cache refuses to store)."""
    try:
        d = json.loads(text)
    except (TypeError, ValueError) as e:
        raise CorruptRow(f"not JSON ({e})") from None
    if not isinstance(d, dict) or len(d) != 1 or not ({"score", "text"} & d.keys()):
        raise CorruptRow("not a stored score or text")
    if "text" in d:
        if not isinstance(d["text"], str):
            raise CorruptRow("text that is not a string")
        return d["text"]
    s = d["score"]
    if not isinstance(s, dict):
        raise CorruptRow("score that is not an object")
    if s.keys() - _CHECKS.keys() or _REQUIRED - s.keys():
        raise CorruptRow(f"score with unknown or missing fields ({sorted(s)})")
    wrong = [name for name, v in s.items() if not _CHECKS[name](v)]
    if wrong:
        raise CorruptRow(f"score field(s) of the wrong type: {', '.join(wrong)}")
    score = Score(**s)
    if not score.cacheable or score.fallback:
        raise CorruptRow("a score the cache never stores (not cacheable, or a fallback)")
    return score


class Row(NamedTuple):
    value: object  # Score or str
    created: float  # wall-clock time of the write
    writer: Optional[str]
    seq: int  # 0 for a row written before seq existed


# ---------------------------------------------------------------------------------------------
# The file


class SqliteScores:
    """The rows of one SQLite file; not locked here: its owner (ScoreCache) serialises every call.

    on_corrupt "refuse": a damaged file raises DamagedStore; "move-aside": it is renamed, with its
    -wal and -shm files, to `NAME.damaged-N` (`moved_to`), and an empty store is started in its place."""

    def __init__(self, path, on_corrupt="refuse"):
        self.path, self.moved_to = Path(path), None
        try:
            self._db = _open_db(self.path)
        except DamagedStore:
            if on_corrupt != "move-aside":
                raise
            self.moved_to = move_aside(self.path)
            self._db = _open_db(self.path)

    def read(self, namespace: str, key: tuple) -> Optional[Row]:
        """The row for key, or None; CorruptRow when it cannot be read or holds what this module never writes."""
        try:
            row = self._db.execute("SELECT value, created, writer, seq FROM entries WHERE ns = ? AND key = ?",
                                   (namespace, json.dumps(key))).fetchone()
        except sqlite3.OperationalError:  # locked past busy_timeout, an I/O error: not the row's fault
            raise
        except sqlite3.DatabaseError as e:  # a damaged page
            raise CorruptRow(f"unreadable ({e})") from None
        if row is None:
            return None
        value, created, writer, seq = row
        if not isinstance(value, str):
            raise CorruptRow("value that is not text")
        if not is_number(created) or not math.isfinite(created):
            raise CorruptRow(f"created that is not a time ({created!r})")
        if not (writer is None or isinstance(writer, str)) or not (seq is None or isinstance(seq, int)):
            raise CorruptRow("writer or seq of the wrong type")
        return Row(decode(value), float(created), writer, seq or 0)

    def write(self, namespace: str, key: tuple, value, created: float, writer: Optional[str]) -> None:
        self._change("INSERT OR REPLACE INTO entries (ns, key, value, created, writer, seq) VALUES (?, ?, ?, ?, ?, "
                     "(SELECT COALESCE(MAX(seq), 0) + 1 FROM entries))",
                     (namespace, json.dumps(key), encode(value), created, writer))

    def last_seq(self) -> int:
        """The largest seq in the file (0 when empty): every row written so far has seq <= it."""
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM entries").fetchone()[0]

    def checkpointed_seq(self, writer: str) -> int:
        """The largest seq held by `writer`'s newest successful checkpoint (0 when it has none)."""
        row = self._db.execute("SELECT seq FROM checkpointed WHERE writer = ?", (writer,)).fetchone()
        return row[0] if row else 0

    def mark_checkpointed(self, writer: str, seq: int) -> None:
        self._change("INSERT INTO checkpointed (writer, seq) VALUES (?, ?) "
                     "ON CONFLICT (writer) DO UPDATE SET seq = MAX(seq, excluded.seq)", (writer, seq))

    def _change(self, sql, params):
        # a write the store cannot take (disk full, read-only, damaged, locked past busy_timeout) stops
        # the run in one line, as any other write the run depends on
        try:
            self._db.execute(sql, params)
        except sqlite3.Error as e:
            raise WriteFailed(f"cannot write the score store {self.path} ({e})") from None

    def close(self) -> None:
        self._db.close()


def move_aside(path) -> Path:
    """Rename `path` and its -wal/-shm files to `NAME.damaged-N` (the first N free); returns the new path.
    The journal files go with it: SQLite would otherwise replay a stale -wal into the new, empty file."""
    path = Path(path)
    n = 1
    while any(path.with_name(f"{path.name}.damaged-{n}{s}").exists() for s in ("", *_SIDE_FILES)):
        n += 1
    target = path.with_name(f"{path.name}.damaged-{n}")
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    os.replace(path, target)
    return target


def _check_usable(path):
    """DamagedStore unless `path` is missing, empty or a sound SQLite database; NotAStore when it holds
    tables but no score table. Read through a read-only connection of its own: a file refused is left
    exactly as it was, its -wal and -shm too (a writable connection would apply its -wal to it, or
    delete a -wal it cannot use, when it closes)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30.0)
    try:
        try:
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.OperationalError:  # cannot open, locked: not a verdict on the file
            raise
        except sqlite3.DatabaseError as e:  # not a database, a damaged header or page
            raise DamagedStore(str(e)) from None
        if problem != "ok":
            raise DamagedStore(f"damaged: {problem}")
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
    finally:
        db.close()
    if tables and "entries" not in tables:
        raise NotAStore(f"it holds other tables ({', '.join(sorted(tables))}) and no score table")
    missing = {"ns", "key", "value", "created"} - columns
    if "entries" in tables and missing:
        raise NotAStore(f"its table 'entries' is not a score table (no {', '.join(sorted(missing))})")


def _open_db(path) -> sqlite3.Connection:
    _check_usable(path)
    # autocommit; one connection guarded by ScoreCache's lock; WAL lets readers in other
    # processes proceed while one writes, busy_timeout makes writers wait instead of failing.
    db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout = 30000")
        # Switching a new file to WAL takes an exclusive lock and does not wait on busy_timeout: two
        # processes opening one new file at once see "database is locked". Retry those statements.
        _while_locked(lambda: db.execute("PRAGMA journal_mode = WAL"))
        db.execute("PRAGMA synchronous = NORMAL")
        _while_locked(lambda: _make_tables(db))
    except BaseException:
        db.close()
        raise
    return db


def _make_tables(db):
    """Create the tables, or add `writer` and `seq` to a file written before they existed. In one
    transaction, so that two processes opening one old file add the columns once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS entries (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
                   " created REAL NOT NULL, writer TEXT, seq INTEGER, PRIMARY KEY (ns, key)) WITHOUT ROWID")
        columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
        for name, kind in (("writer", "TEXT"), ("seq", "INTEGER")):
            if name not in columns:
                db.execute(f"ALTER TABLE entries ADD COLUMN {name} {kind}")
        db.execute("CREATE INDEX IF NOT EXISTS entries_seq ON entries (seq)")
        db.execute("CREATE TABLE IF NOT EXISTS checkpointed (writer TEXT PRIMARY KEY, seq INTEGER NOT NULL)")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _while_locked(statement, timeout_s=30.0):
    deadline, delay = time.monotonic() + timeout_s, 0.005
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.25)
