"""The SQLite score store does not trust the clock and survives a damaged file (issue 28, item 3).

Which rows a run reads back is decided by the run that wrote them and the file's write order, never by a
clock: a resumed run, or a run restarted after dying before its first checkpoint, scores fresh what its
dead attempt stored after its last checkpoint, whatever the clock did in between; rows of other runs are
read. Under a TTL a row stamped ahead of the clock is expired. A file that is not a database or is
damaged is refused at start in one line (or moved aside on request); a corrupt row is a counted miss.

Real `python -m mlx_coach` runs of the builtin tiny model on real files. A run's clock is stepped by
replacing `time.time` before mlx_coach is imported (LAUNCH); a run is killed at a known point by a reward
function of this module that SIGKILLs its own process at its Nth call, after the step's test scores were
stored. Greedy decoding and groups of two equal samples: the policy never changes, so a straight run
scores each step's texts fresh in its first epoch.
"""

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlx_coach.core.errors import UserError
from mlx_coach.rewards.cache import CacheConfig, ScoreCache
from mlx_coach.rewards.cache_sqlite import DamagedStore, SqliteScores, decode
from mlx_coach.rewards.scoring.base import Score
from mlx_coach.runtime.stops import WriteFailed
from mlx_coach.telemetry.writer import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
DEADLINE_S = 300  # a failure bound: only a hung run reaches it
DIE_AT = "SCORE_STORE_DIE_AT_CALL"
YEAR_S = 365 * 24 * 3600.0
# `python -c LAUNCH SHIFT_S ARGS...`: mlx-coach with its wall clock shifted by SHIFT_S seconds
LAUNCH = ("import sys, time\n"
          "shift = float(sys.argv.pop(1))\n"
          "wall = time.time\n"
          "time.time = lambda: wall() + shift\n"
          "from mlx_coach.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")

_calls = 0


def die_at_call(prompts, completions, **columns):
    """A reward function giving 0 (no signal) that SIGKILLs its own process at its call number $DIE_AT:
    listed after `tests`, it kills a run in the middle of a step whose test scores are already stored."""
    global _calls
    _calls += 1
    if os.environ.get(DIE_AT) == str(_calls):
        os.kill(os.getpid(), signal.SIGKILL)
    return [0.0] * len(completions)


def cli(*args, clock_s=0.0, die_at=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env.pop(DIE_AT, None)
    if die_at is not None:
        env[DIE_AT] = str(die_at)
    return subprocess.run([sys.executable, "-c", LAUNCH, str(clock_s), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)


def write_config(tmp_path, store, *, policy="lru", ttl_s=3600.0, checkpoint_every=0, prompts=2):
    cfg = {
        "model": {"path": "builtin:tiny"},
        "data": {"tasks": "builtin", "limit": 12, "val_fraction": 0.2},
        "rollout": {"group_size": 2, "prompts_per_step": prompts, "max_new_tokens": 8, "temperature": 0.0},
        "train": {"steps": 50, "checkpoint_every": checkpoint_every, "epochs_val": False},
        "rewards": [{"type": "tests"}, {"type": "function", "function": "test_score_store:die_at_call"}],
        "sandbox": {"workers": 1},
        "cache": {"policy": policy, "ttl_s": ttl_s, "sqlite_path": str(store)},
        "telemetry": {"progress": False, "tensorboard": False, "report": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def step_rows(run):
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "reward/mean" in r}


def split(run):
    """step -> (samples scored fresh, samples read from the cache)."""
    return {step: (r["reward/fresh_count"], r["reward/cached_count"]) for step, r in step_rows(run).items()}


def checkpoints(run):
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))


def ok(proc):
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def killed(proc):
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def one_line(text, needle):
    lines = [ln for ln in text.splitlines() if needle in ln]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


# --- provenance: a run's own rows after its checkpoint, whatever the clock ------------------------


@pytest.mark.parametrize("killed_s, resumed_s", [(0.0, -3600.0), (3600.0, 0.0)],
                         ids=["clock-stepped-back-before-the-resume", "clock-ahead-in-the-killed-run"])
def test_a_resumed_run_scores_fresh_what_its_killed_attempt_stored_after_the_checkpoint(tmp_path, killed_s,
                                                                                     resumed_s):
    cfg = write_config(tmp_path, tmp_path / "scores.sqlite", checkpoint_every=2)
    run = tmp_path / "run"
    killed(cli("train", "-c", cfg, "--output", run, clock_s=killed_s, die_at=4))  # in step 4, its rows stored
    assert checkpoints(run) == [2] and sorted(split(run)) == [1, 2, 3]
    straight = split(run)[3]  # the killed run was a straight run up to its death
    assert straight[0] > 0  # step 3 stored fresh scores after the checkpoint
    ok(cli("train", "--resume", run, "--steps", "3", clock_s=resumed_s))
    assert split(run)[3] == straight


def test_a_run_killed_before_its_first_checkpoint_restarts_with_its_rows_hidden(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "scores.sqlite", checkpoint_every=0)
    run = tmp_path / "run"
    killed(cli("train", "-c", cfg, "--output", run, die_at=3))  # steps 1 and 2 logged and stored, in step 3
    assert not checkpoints(run)
    straight = split(run)
    assert sorted(straight) == [1, 2] and all(fresh > 0 for fresh, _ in straight.values())
    ok(cli("train", "-c", cfg, "--output", run, "--steps", "2"))  # a fresh start: the attempt is moved aside
    assert split(run) == straight


# --- TTL: a stamp ahead of the clock ---------------------------------------------------------------


def test_a_row_stamped_ahead_of_the_clock_is_expired_under_a_ttl(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "scores.sqlite", policy="ttl", ttl_s=3600.0)
    ahead = ok(cli("train", "-c", cfg, "--output", tmp_path / "ahead", "--steps", "1", clock_s=YEAR_S))
    assert ahead and split(tmp_path / "ahead")[1][0] > 0
    fresh = split(tmp_path / "ahead")[1][0]
    ok(cli("train", "-c", cfg, "--output", tmp_path / "now", "--steps", "1"))
    assert split(tmp_path / "now")[1] == (fresh, 0)  # a year-ahead stamp is no young row: scored again
    ok(cli("train", "-c", cfg, "--output", tmp_path / "later", "--steps", "1"))
    assert split(tmp_path / "later")[1] == (0, fresh)  # re-stamped by this clock: read back while young


# --- a damaged file, corrupt rows -------------------------------------------------------------------


def _damage(store, how):
    if how == "not-a-database":
        store.write_text("these are my notes, not a database\n" * 200)
        return
    cache = ScoreCache("lru", sqlite_path=str(store))
    for i in range(3000):
        cache.put(("tests@1", f"T/{i}", "p" * 64, "c" * 64), Score(1.0, "passed", duration_s=0.1))
    cache.close()  # the last connection checkpoints the WAL into the file
    os.truncate(store, store.stat().st_size // 2)


@pytest.mark.parametrize("how", ["not-a-database", "truncated"])
def test_a_damaged_store_is_refused_in_one_line_and_moved_aside_on_request(tmp_path, how):
    store = tmp_path / "scores.sqlite"
    _damage(store, how)
    damaged = store.read_bytes()
    cfg = write_config(tmp_path, store)
    refused = cli("train", "-c", cfg, "--output", tmp_path / "refused", "--steps", "1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    line = one_line(refused.stderr, "mlx-coach: error:")
    assert f"cache.sqlite_path: {store}" in line and "--set cache.on_corrupt=move-aside" in line
    assert store.read_bytes() == damaged  # refused untouched
    aside = tmp_path / "scores.sqlite.damaged-1"
    moved = ok(cli("train", "-c", cfg, "--output", tmp_path / "moved", "--steps", "1",
                   "--set", "cache.on_corrupt=move-aside"))
    assert f"moved it to {aside}" in one_line(moved.stderr, "cache.sqlite_path:")
    assert aside.read_bytes() == damaged
    fresh, cached = split(tmp_path / "moved")[1]
    assert fresh > 0 and cached == 0
    with sqlite3.connect(store) as db:  # an empty store took its place, and holds this run's scores
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == fresh


def test_corrupt_rows_are_skipped_counted_and_scored_again(tmp_path):
    store = tmp_path / "scores.sqlite"
    cfg = write_config(tmp_path, store, prompts=4)
    ok(cli("train", "-c", cfg, "--output", tmp_path / "first", "--steps", "1"))
    fresh = split(tmp_path / "first")[1][0]
    bad = [("value", "{not json"),
           ("value", json.dumps({"score": {"value": 1.0, "status": "passed", "verdict": "pass"}})),  # unknown field
           ("value", json.dumps({"score": {"value": "1.0", "status": "passed"}})),  # a number as text
           ("created", "yesterday")]
    with sqlite3.connect(store) as db:
        keys = [k for (k,) in db.execute("SELECT key FROM entries")]
        assert len(keys) == fresh >= len(bad)  # one row per text scored: every kind of damage is met
        for key, (column, value) in zip(keys, itertools.cycle(bad)):
            db.execute(f"UPDATE entries SET {column} = ? WHERE key = ?", (value, key))
    db.close()
    ok(cli("train", "-c", cfg, "--output", tmp_path / "second", "--steps", "1"))
    row = step_rows(tmp_path / "second")[1]
    assert (row["reward/fresh_count"], row["reward/cached_count"]) == (fresh, 0)
    assert row["cache/corrupt_rows"] == fresh
    with sqlite3.connect(store) as db:  # each was written again, whole
        assert all(isinstance(decode(v), Score) for (v,) in db.execute("SELECT value FROM entries"))
    db.close()


# --- in-process: what the runs above do not reach ---------------------------------------------------


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def k(name):
    return ("s@1", "T/0", "t", name)


def test_rows_of_other_runs_are_read_and_a_rerun_reads_a_deleted_runs_checkpointed_rows(tmp_path):
    db = tmp_path / "scores.sqlite"
    a = ScoreCache("lru", sqlite_path=str(db), run=tmp_path / "a")
    a.put(k("before"), Score(1.0, "passed"))
    a.checkpointed(a.snapshot())
    a.put(k("after"), Score(0.0, "failed"))  # after a's last checkpoint
    a.close()
    other = ScoreCache("lru", sqlite_path=str(db), run=tmp_path / "b")
    assert other.get(k("before")) is not None and other.get(k("after")) is not None  # the shared store
    rerun = ScoreCache("lru", sqlite_path=str(db), run=tmp_path / "a")  # RUN deleted, started again
    assert rerun.get(k("before")) is not None  # held by a checkpoint of the run that was there
    assert rerun.get(k("after")) is None  # what a restart from step 0 would have had to score
    rerun.put(k("after"), Score(0.0, "failed"))
    rerun.put(k("new"), Score(1.0, "passed"))
    rerun.close()
    again = ScoreCache("lru", sqlite_path=str(db), run=tmp_path / "a")  # its own rows, written after the restart
    assert again.get(k("new")) is None and again.get(k("before")) is not None


def test_a_resume_hides_the_rows_of_every_attempt_since_its_checkpoint(tmp_path):
    db, run = tmp_path / "scores.sqlite", tmp_path / "run"
    wall = Clock(1_700_000_000.0)
    first = ScoreCache("lru", sqlite_path=str(db), run=run, wall=wall)
    first.put(k("checkpointed"), Score(1.0, "passed"))
    snap = json.loads(json.dumps(first.snapshot()))
    first.checkpointed(snap)
    first.put(k("killed-1"), Score(1.0, "passed"))
    first.close()
    for attempt in ("killed-2", "resumed"):  # two resumes from the same checkpoint, the clock going back
        wall.t -= 3600
        cache = ScoreCache("lru", maxsize=1, sqlite_path=str(db), run=run, wall=wall)
        cache.restore(snap)
        assert cache.get(k("checkpointed")) is not None
        assert cache.get(k("killed-1")) is None and cache.get(k("killed-2")) is None
        cache.put(k(attempt), Score(1.0, "passed"))
        cache.put(k("evicts-it"), Score(1.0, "passed"))  # maxsize 1: the attempt's own row leaves memory
        assert cache.get(k(attempt)) is not None  # and is read back from the file
        assert cache.stats()["student"]["disk_hits"] == 1
        cache.close()


def test_a_store_written_before_writer_and_seq_existed_opens_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE entries (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
                   " created REAL NOT NULL, PRIMARY KEY (ns, key)) WITHOUT ROWID")
        db.execute("INSERT INTO entries VALUES ('student', ?, ?, 1.0)",
                   (json.dumps(list(k("old"))), json.dumps({"score": Score(1.0, "passed").to_dict()})))
    db.close()
    run = tmp_path / "run"
    cache = ScoreCache("lru", sqlite_path=str(path), run=run, wall=Clock(2.0))
    assert cache.get(k("old")) == Score(1.0, "passed")  # another run's row, as before
    cache.put(k("new"), Score(0.0, "failed"))
    snap = cache.snapshot()
    cache.close()
    # a checkpoint written before the columns existed (format 1, a wall-clock stamp): which unstamped rows
    # came after it cannot be told without the clock, so none is read back by the resumed run
    old_snap = {k_: v for k_, v in snap.items() if k_ not in ("run", "seq")}
    old_snap.update(format=1, wall=1.5, hidden=[], watermarks={"student": None, "reference": None},
                    entries={"student": [], "reference": []})
    resumed = ScoreCache("lru", sqlite_path=str(path), run=run)
    resumed.restore(old_snap)
    assert resumed.get(k("old")) is None and resumed.get(k("new")) is None
    assert ScoreCache("lru", sqlite_path=str(path), run=tmp_path / "other").get(k("old")) is not None


@pytest.mark.parametrize("text", [
    "{not json", "[1, 2]", '"a string"', '{"text": 3}', '{"score": 1.0}', '{"score": {}, "text": "x"}',
    '{"score": {"value": 1.0}}', '{"score": {"value": 1.0, "status": "passed", "extra": 0}}',
    '{"score": {"value": true, "status": "passed"}}', '{"score": {"value": 1.0, "status": 7}}',
    '{"score": {"value": 1.0, "status": "passed", "cacheable": "yes"}}',
    '{"score": {"value": 0.0, "status": "ok", "fallback": true}}',
])
def test_a_row_that_decode_refuses_is_a_counted_miss(tmp_path, text):
    path = tmp_path / "scores.sqlite"
    ScoreCache("lru", sqlite_path=str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO entries (ns, key, value, created, seq) VALUES ('student', ?, ?, 1.0, 1)",
                   (json.dumps(list(k("x"))), text))
    db.close()
    cache = ScoreCache("lru", sqlite_path=str(path))
    assert cache.get(k("x")) is None
    s = cache.stats()["student"]
    assert (s["corrupt_rows"], s["misses"]) == (1, 1)
    cache.put(k("x"), Score(1.0, "passed"))  # scored again, and written whole
    assert ScoreCache("lru", sqlite_path=str(path)).get(k("x")) == Score(1.0, "passed")


def test_moving_a_damaged_store_aside_takes_its_journal_files(tmp_path):
    path = tmp_path / "scores.sqlite"
    path.write_text("damaged\n" * 100)
    with pytest.raises(DamagedStore, match="not a database"):
        SqliteScores(path)
    assert path.read_text() == "damaged\n" * 100
    (tmp_path / "scores.sqlite.damaged-1").write_text("an earlier one")
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").write_text(f"damaged{suffix}\n" * 100)
    store = SqliteScores(path, "move-aside")
    assert store.moved_to == tmp_path / "scores.sqlite.damaged-2"
    for suffix in ("", "-wal"):
        assert Path(f"{store.moved_to}{suffix}").read_text() == f"damaged{suffix}\n" * 100
    assert Path(f"{store.moved_to}-shm").is_file()  # SQLite's shared-memory index: its bytes are SQLite's
    assert store.last_seq() == 0  # a new, empty store
    store.close()


def test_a_write_the_store_cannot_take_stops_in_one_line_naming_it(tmp_path):
    """On a full disk: a 1 MB tmpfs mounted by the test (root only; skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting is not permitted here: {mounted.stderr.strip()}")
    try:
        store = SqliteScores(disk / "scores.sqlite")
        with open(disk / "filler", "wb", buffering=0) as f:  # the disk full
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
        with pytest.raises(WriteFailed, match=f"cannot write the score store {disk / 'scores.sqlite'} "):
            for i in range(100_000):  # until the pages the file already holds are used up
                store.write("student", k(str(i)), Score(1.0, "passed", error="e" * 200), 1.0, None)
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_another_programs_database_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(UserError, match=f"cache.sqlite_path: cannot use {path} as a score store .*no score table"):
        ScoreCache.from_config(CacheConfig(sqlite_path=str(path), on_corrupt="move-aside"), run=tmp_path / "run")
    assert path.read_bytes() == before and not list(tmp_path.glob("app.db.damaged-*"))
