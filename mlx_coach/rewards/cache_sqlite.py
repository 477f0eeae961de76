"""ScoreCache's persistence: one SQLite file (WAL) shared by runs and processes, and the JSON form of a
cached value that its rows and the cache's snapshots both use.

Table `entries (ns, key, value, created)`: `key` is the cache key as JSON, `value` a JSON-encoded Score
or string, `created` the wall-clock time of the write (rows outlive reboots and cross processes, where
monotonic clocks are not comparable). Rows are never deleted: other processes may share the file.
"""

from __future__ import annotations

import json
import sqlite3
import time

from mlx_coach.rewards.scoring.base import Score


def encode(value) -> str:
    if isinstance(value, Score):
        return json.dumps({"score": value.to_dict()})
    return json.dumps({"text": value})


def decode(text: str):
    d = json.loads(text)
    return Score(**d["score"]) if "score" in d else d["text"]


class SqliteScores:
    """The rows of one SQLite file; not locked here: its owner (ScoreCache) serialises every call."""

    def __init__(self, path):
        self._db = _open_db(path)

    def read(self, namespace: str, key: tuple):
        """(encoded value, created) of the row for key, or None."""
        return self._db.execute(
            "SELECT value, created FROM entries WHERE ns = ? AND key = ?", (namespace, json.dumps(key))
        ).fetchone()

    def write(self, namespace: str, key: tuple, value, created: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO entries (ns, key, value, created) VALUES (?, ?, ?, ?)",
            (namespace, json.dumps(key), encode(value), created),
        )

    def close(self) -> None:
        self._db.close()


def _open_db(path) -> sqlite3.Connection:
    # autocommit; one connection guarded by ScoreCache's lock; WAL lets readers in other
    # processes proceed while one writes, busy_timeout makes writers wait instead of failing.
    db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 30000")
    # Switching a new file to WAL takes an exclusive lock and does not wait on busy_timeout: two
    # processes opening one new file at once see "database is locked". Retry those two statements.
    _while_locked(lambda: db.execute("PRAGMA journal_mode = WAL"))
    db.execute("PRAGMA synchronous = NORMAL")
    _while_locked(lambda: db.execute(
        "CREATE TABLE IF NOT EXISTS entries (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
        " created REAL NOT NULL, PRIMARY KEY (ns, key)) WITHOUT ROWID"
    ))
    return db


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
