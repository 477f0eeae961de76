import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_coach.rewards.cache import CacheConfig, ScoreCache, make_key, reference_key
from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.base import Score
from mlx_coach.rewards.scoring.cached import CachedScorer
from mlx_coach.data.task import Task

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def task(i=0, test="def check(f):\n    assert f(1) == 2\n"):
    return Task(f"T/{i}", f"def inc{i}(x):\n", f"inc{i}", test)


def k(name):
    return ("s@1", "T/0", "t", name)


def ok(v=1.0):
    return Score(v, "passed")


# --- policies -------------------------------------------------------------------------------


def test_ttl_expiry_with_injected_clock():
    clock = Clock()
    c = ScoreCache("ttl", ttl_s=10.0, timer=clock)
    assert c.put(k("a"), ok())
    clock.advance(9.9)
    assert c.get(k("a")) == ok()
    clock.advance(0.1)  # exactly ttl: expired
    assert c.get(k("a")) is None
    s = c.stats()["student"]
    assert (s["hits"], s["misses"], s["expirations"], s["evictions"], s["size"], s["bytes"]) == (1, 1, 1, 0, 0, 0)


def test_lru_eviction_order():
    c = ScoreCache("lru", maxsize=3)
    for name in "abc":
        c.put(k(name), ok())
    assert c.get(k("a")) is not None  # a is now most recent; b is the least recent
    c.put(k("d"), ok())
    assert c.get(k("b")) is None
    assert all(c.get(k(n)) is not None for n in "acd")
    c.put(k("e"), ok())  # after the reads above, the order is a, c, d -> a goes
    assert c.get(k("a")) is None
    s = c.stats()["student"]
    assert (s["evictions"], s["size"], s["hits"], s["misses"]) == (2, 3, 4, 2)


def test_lru_plus_ttl_evicts_and_expires():
    clock = Clock()
    c = ScoreCache("lru+ttl", maxsize=2, ttl_s=5.0, timer=clock)
    c.put(k("a"), ok())
    clock.advance(1)
    c.put(k("b"), ok())
    c.put(k("c"), ok())  # evicts a (LRU)
    clock.advance(4.5)  # b expires at 6.0 after start? b was put at +1 -> expires at +6
    assert c.get(k("b")) is not None
    clock.advance(1)
    assert c.get(k("b")) is None and c.get(k("c")) is None
    s = c.stats()["student"]
    assert (s["evictions"], s["expirations"], s["size"]) == (1, 2, 0)


def test_reference_entries_are_pinned_under_every_policy():
    clock = Clock()
    for policy in ("lru", "ttl", "lru+ttl", "epoch-clear", "none"):
        c = ScoreCache(policy, maxsize=2, ttl_s=5.0, timer=clock)
        for i in range(5):
            assert c.put(reference_key("judge", task(i)), f"def inc{i}(x): return x + 1", "reference")
        for i in range(10):
            c.put(k(str(i)), ok())  # floods the student namespace
        clock.advance(100)  # far past ttl
        assert c.on_epoch_start(1) == (2 if policy == "epoch-clear" else 0)
        for i in range(5):
            assert c.get(reference_key("judge", task(i)), "reference") == f"def inc{i}(x): return x + 1", policy
        r = c.stats()["reference"]
        assert (r["size"], r["evictions"], r["expirations"], r["cleared"]) == (5, 0, 0, 0), policy


def test_epoch_clear_drops_only_student_entries_and_counts():
    c = ScoreCache("epoch-clear", maxsize=100)
    for i in range(7):
        c.put(k(str(i)), ok())
    c.put(("judge", "T/0", "p", "solution"), "code", "reference")
    assert c.on_epoch_start(1) == 7
    assert c.on_epoch_start(2) == 0
    assert c.size("student") == 0 and c.size("reference") == 1
    s = c.stats()["student"]
    assert (s["clears"], s["cleared"], s["bytes"]) == (2, 7, 0)
    lru = ScoreCache("lru")
    lru.put(k("x"), ok())
    assert lru.on_epoch_start(1) == 0 and lru.get(k("x")) is not None


def test_none_policy_stores_nothing():
    c = ScoreCache("none")
    assert not c.put(k("a"), ok())
    assert c.get(k("a")) is None
    s = c.stats()["student"]
    assert (s["size"], s["puts"], s["misses"], s["hits"]) == (0, 0, 1, 0)


def test_stats_numbers_are_exact():
    c = ScoreCache("lru", maxsize=2)
    for n in "ab":
        c.put(k(n), ok())
    c.get(k("a"))
    c.get(k("zz"))
    c.put(k("c"), ok())  # evicts b
    c.get(k("b"))
    c.put(k("bad"), Score(0.0, "infra_error", cacheable=False))
    s = c.stats()["student"]
    expected = dict(hits=1, misses=2, puts=3, rejected=1, evictions=1, expirations=0, clears=0, cleared=0,
                    size=2, disk_hits=0)
    assert {key: s[key] for key in expected} == expected
    assert s["hit_rate"] == pytest.approx(1 / 3) == c.hit_rate()
    assert s["lookup_s"] > 0 and s["mean_lookup_us"] == pytest.approx(1e6 * s["lookup_s"] / 3)
    assert 200 < s["bytes"] < 4000  # two small entries
    before = s["bytes"]
    c.put(k("d"), ok())  # evicts a: the byte count stays that of two entries
    assert c.stats()["student"]["bytes"] == before
    assert c.clear() == 2 and c.stats()["student"]["bytes"] == 0


@pytest.mark.parametrize("score", [
    Score(0.0, "infra_error", cacheable=False),
    Score(0.0, "timeout", cacheable=False),
    Score(0.5, "parse_error", cacheable=False, fallback=True),
    Score(0.5, "ok", fallback=True),
])
def test_non_cacheable_scores_are_refused(score):
    c = ScoreCache("lru")
    assert not c.put(k("a"), score)
    assert c.get(k("a")) is None
    assert c.stats()["student"]["rejected"] == 1
    assert c.put(k("a"), Score(0.0, "failed"))  # a real failure is a real judgement


def test_bad_config_raises_user_error_naming_the_field():
    with pytest.raises(UserError, match="cache.policy"):
        ScoreCache.from_config(CacheConfig(policy="lfu"))
    with pytest.raises(UserError, match="cache.maxsize"):
        ScoreCache("lru", maxsize=0)
    with pytest.raises(UserError, match="cache.ttl_s"):
        ScoreCache("ttl", ttl_s=-1)


# --- keys ------------------------------------------------------------------------------------

BASE = "    y = x + 1  \n    return y\n"

# The scored program is prompt + completion, so a completion's indentation must match the prompt's:
# each of these is the same statement to a reader, and only the first runs under a 4-space prompt.
DOC_TASK = Task("T/doc", 'def inc(x):\n    """Add one to x."""\n', "inc", "def check(f):\n    assert f(1) == 2\n")
INDENT_VARIANTS = ["    return x + 1\n", "  return x + 1\n", "\treturn x + 1\n", "        return x + 1\n"]


def surface_variants(body):
    """Texts a normalising key would merge: indentation width, tabs, trailing spaces, blank lines,
    CRLF, a comment. Some of them change the verdict, some do not."""
    lines = body.splitlines()
    out = {body}
    for width in (1, 2, 3, 4, 8):
        out.add("\n".join(" " * width + ln.lstrip(" ") if ln.startswith("    ") else ln for ln in lines) + "\n")
    out.add(body.replace("    ", "\t"))
    out.add(body.replace("\n", "  \n"))
    out.add(body.replace("\n", "\n\n"))
    out.add("\n" + body)
    out.add(body.replace("\n", "\r\n"))
    out.add(body.replace("\n", "  # note\n", 1))
    out.add(body.replace("\n", " \\\n", 1))
    out.add(body.rstrip("\n"))
    return sorted(out)


KEY_BODIES = [
    "    y = x + 1\n    return y\n",
    "    if x > 0:\n        return x + 1\n    return x + 1\n",
    "    s = 'a  b'\n    return x + 1 if s == 'a  b' else 0\n",
]


def test_keys_differ_whenever_verdicts_differ():
    """Property: for generated surface variants of a completion, two texts whose sandbox verdicts
    differ never share a key (a shared key would pay one text the other's reward)."""
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
    from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer

    t = DOC_TASK
    variants = [v for body in KEY_BODIES for v in surface_variants(body)] + INDENT_VARIANTS
    with SandboxScorer(SandboxConfig(timeout_s=20.0, workers=2)) as scorer:
        verdicts = [s.status for s in scorer.score_batch([(t, v) for v in variants])]
    assert "passed" in verdicts and set(verdicts) - {"passed"}, verdicts  # the corpus has both kinds
    keys = [make_key(scorer.name, scorer.version, t, v) for v in variants]
    for i in range(len(variants)):
        for j in range(i + 1, len(variants)):
            if verdicts[i] != verdicts[j]:
                assert keys[i] != keys[j], (variants[i], variants[j])
    statuses = dict(zip(INDENT_VARIANTS, verdicts[-4:]))
    assert statuses["    return x + 1\n"] == "passed"
    assert all(statuses[v] == "error" for v in INDENT_VARIANTS[1:]), statuses  # IndentationError / TabError


def test_cached_scoring_gives_each_indentation_variant_its_own_verdict():
    """Through the cache, in one batch and across batches, each variant gets the verdict the sandbox
    gives it alone: a broken variant is never paid the reward of the one scored first."""
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
    from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer

    t = DOC_TASK
    with SandboxScorer(SandboxConfig(timeout_s=20.0, workers=2)) as scorer:
        alone = [scorer.score_batch([(t, v)])[0].status for v in INDENT_VARIANTS]
        cached = CachedScorer(scorer, ScoreCache("lru"))
        first = [s.status for s, _ in cached.score_batch([(t, v) for v in INDENT_VARIANTS])]
        again = cached.score_batch([(t, v) for v in reversed(INDENT_VARIANTS)])
    assert first == alone
    assert [s.status for s, _ in again] == alone[::-1] and {p for _, p in again} == {"cached"}


def test_every_sandbox_setting_that_can_change_a_verdict_is_in_the_key():
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
    from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer

    def key(**settings):
        scorer = SandboxScorer(SandboxConfig(**settings))
        try:
            return make_key(scorer.name, scorer.version, task(), BASE)
        finally:
            scorer.close()

    base = key()
    for change in ({"partial_credit": True}, {"memory_mb": 64}, {"timeout_s": 1.0}, {"site_packages": True},
                   {"cpu_s": 2}, {"max_procs": 4}, {"max_open_files": 16}, {"max_file_bytes": 10},
                   {"call_timeout_s": 0.5}, {"worker_uid": None}, {"isolate_network": False}):
        assert key(**change) != base, change
    assert key(workers=1) == key(workers=2) == base  # how many run at once never changes a verdict
    assert key(max_output_bytes=10) == base  # output is read and dropped; the verdict travels apart


def test_key_parts():
    key = make_key("tests", "3", task(), BASE)
    assert key[0] == "tests@3" and key[1] == "T/0" and len(key[2]) == len(key[3]) == 64
    assert make_key("tests", "4", task(), BASE) != key
    assert make_key("tests", "3", task(test="def check(f):\n    pass\n"), BASE) != key
    assert make_key("tests", "3", task(1), BASE) != key
    assert make_key("tests", "3", Task("T/0", "def inc0(x):\n", "other", task().test), BASE) != key  # entry point
    assert make_key("tests", "3", task(), BASE.replace("\n", "\r\n")) != key  # the exact text, nothing normalised



# --- persistence ------------------------------------------------------------------------------


def test_sqlite_survives_a_new_instance_and_is_seen_by_another_process(tmp_path):
    db = str(tmp_path / "scores.sqlite")
    c = ScoreCache("lru", sqlite_path=db)
    key = make_key("tests", "1", task(), BASE)
    c.put(key, Score(1.0, "passed", duration_s=0.25))
    c.put(reference_key("judge", task()), "def inc0(x): return x + 1", "reference")
    c.close()

    c2 = ScoreCache("lru", sqlite_path=db)
    assert c2.get(key) == Score(1.0, "passed", duration_s=0.25)
    assert c2.get(key) is not None  # now from memory
    s = c2.stats()["student"]
    assert (s["hits"], s["disk_hits"], s["size"]) == (2, 1, 1)
    assert c2.get(reference_key("judge", task()), "reference") == "def inc0(x): return x + 1"

    # a second process reads it, and writes one that we then read
    script = textwrap.dedent(f"""
        import json, sys
        from mlx_coach.rewards.cache import ScoreCache
        from mlx_coach.rewards.scoring.base import Score
        c = ScoreCache("lru", sqlite_path={db!r})
        got = c.get(tuple({list(key)!r}))
        c.put(("other", "T/9", "t", "c"), Score(0.5, "failed"))
        print(json.dumps(got.to_dict()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["value"] == 1.0
    assert c2.get(("other", "T/9", "t", "c")) == Score(0.5, "failed")


def test_concurrent_processes_write_one_file(tmp_path):
    db = str(tmp_path / "scores.sqlite")
    script = textwrap.dedent("""
        import sys
        from mlx_coach.rewards.cache import ScoreCache
        from mlx_coach.rewards.scoring.base import Score
        c = ScoreCache("lru", sqlite_path=sys.argv[1])
        for i in range(300):
            c.put(("w" + sys.argv[2], "T", "t", str(i)), Score(float(i), "passed"))
            c.get(("w" + sys.argv[3], "T", "t", str(i)))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, db, a, b], cwd=ROOT, env=env, stderr=subprocess.PIPE)
             for a, b in (("0", "1"), ("1", "0"))]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    c = ScoreCache("lru", sqlite_path=db)
    assert all(c.get((f"w{w}", "T", "t", str(i))) == Score(float(i), "passed") for w in "01" for i in range(300))


def test_ttl_applies_to_persisted_rows(tmp_path):
    db = str(tmp_path / "scores.sqlite")
    mono, wall = Clock(50.0), Clock(1_700_000_000.0)
    c = ScoreCache("ttl", ttl_s=10.0, sqlite_path=db, timer=mono, wall=wall)
    c.put(k("a"), ok())
    wall.advance(6)
    c.put(k("b"), ok())
    c.close()

    mono2 = Clock(5.0)  # another process: an unrelated monotonic clock
    c2 = ScoreCache("ttl", ttl_s=10.0, sqlite_path=db, timer=mono2, wall=wall)
    wall.advance(5)  # a is 11 s old, b 5 s
    assert c2.get(k("a")) is None
    assert c2.get(k("b")) == ok()
    mono2.advance(4.9)  # b keeps its remaining 5 s in memory, not a fresh 10 s
    wall.advance(4.9)
    assert c2.get(k("b")) is not None
    mono2.advance(0.2)
    wall.advance(0.2)
    assert c2.get(k("b")) is None  # expired in memory, and the row is too old to read back
    s = c2.stats()["student"]
    assert (s["hits"], s["disk_hits"], s["misses"], s["expirations"]) == (2, 1, 2, 1)


def test_epoch_clear_hides_persisted_rows_of_earlier_epochs(tmp_path):
    db = str(tmp_path / "scores.sqlite")
    wall = Clock(1_700_000_000.0)  # frozen: the clear and the next put share one instant
    c = ScoreCache("epoch-clear", maxsize=1, sqlite_path=db, wall=wall)
    c.put(k("a"), ok())
    assert c.on_epoch_start(1) == 1
    assert c.get(k("a")) is None  # not read back from the file
    c.put(k("b"), ok())
    c.put(k("c"), ok())  # evicts b from memory (maxsize 1)
    assert c.get(k("b")) == ok()  # written after the clear: read back from the file
    assert c.stats()["student"]["disk_hits"] == 1
    other = ScoreCache("lru", sqlite_path=db)  # other runs sharing the file still see old rows
    assert other.get(k("a")) == ok()


def test_snapshot_restore_round_trip():
    clock = Clock()
    c = ScoreCache("lru+ttl", maxsize=3, ttl_s=10.0, timer=clock)
    c.put(k("a"), Score(1.0, "passed", duration_s=0.5))
    clock.advance(4)
    c.put(k("b"), Score(0.0, "failed", error="AssertionError"))
    c.put(k("c"), ok())
    c.get(k("a"))  # LRU order now b, c, a
    c.get(k("zz"))
    c.put(("judge", "T/0", "p", "solution"), "def f(): pass", "reference")
    snap = json.loads(json.dumps(c.snapshot()))  # must be JSON-serialisable
    assert c.stats()["student"]["hits"] == 1  # snapshot itself is no lookup
    assert snap["config"]["policy"] == "lru+ttl"

    clock2 = Clock(7.0)  # resumed in a new process, unrelated monotonic clock
    r = ScoreCache("lru+ttl", maxsize=3, ttl_s=10.0, timer=clock2)
    r.restore(snap)
    assert (r.size("student"), r.size("reference")) == (3, 1)
    s, s0 = r.stats()["student"], c.stats()["student"]
    assert {x: s[x] for x in ("hits", "misses", "puts", "bytes")} == {x: s0[x] for x in ("hits", "misses", "puts", "bytes")}
    r.put(k("d"), ok())  # evicts the least recently used: b
    assert r.get(k("b", )) is None
    assert r.get(("judge", "T/0", "p", "solution"), "reference") == "def f(): pass"
    clock2.advance(5.5)  # a was 4 s old at the snapshot: 9.5 s now, still alive
    assert r.get(k("a")) == Score(1.0, "passed", duration_s=0.5)
    clock2.advance(0.5)
    assert r.get(k("a")) is None  # 10 s: expired, its age survived the restore
    assert r.get(k("c")) == ok()
    with pytest.raises(UserError):
        r.restore({"format": 99})


def test_snapshot_keeps_live_lru_order():
    c = ScoreCache("lru", maxsize=3)
    for n in "abc":
        c.put(k(n), ok())
    c.get(k("a"))  # order b, c, a
    c.snapshot()
    c.put(k("d"), ok())
    assert c.get(k("b")) is None and c.get(k("a")) is not None


# --- CachedScorer -------------------------------------------------------------------------------


class ExecScorer:
    """A real (in-process) test scorer: runs prompt + completion + test; counts what it sees."""

    name, version = "exec", "1"

    def __init__(self):
        self.calls, self.items = 0, 0

    def score_batch(self, items):
        self.calls += 1
        self.items += len(items)
        out = []
        for t, completion in items:
            env = {}
            try:
                exec(t.prompt + completion + "\n" + t.test + f"\ncheck({t.entry_point})\n", env)
                out.append(Score(1.0, "passed"))
            except Exception as e:
                out.append(Score(0.0, "failed", error=type(e).__name__))
        return out


class FlakyScorer(ExecScorer):
    name = "flaky"

    def score_batch(self, items):
        self.calls += 1
        self.items += len(items)
        return [Score(0.0, "infra_error", cacheable=False) for _ in items]


def test_cached_scorer_provenance_and_dedup():
    scorer, cache = ExecScorer(), ScoreCache("lru")
    cs = CachedScorer(scorer, cache)
    t0, t1 = task(0), task(1)
    good0, good1 = "    return x + 1\n", "    return x + 1\n"
    bad = "    return x\n"
    batch = [(t0, good0), (t0, "    return x+1  # same\n"), (t0, bad), (t1, good1), (t0, good0)]
    out = cs.score_batch(batch)
    assert [s.status for s, _ in out] == ["passed", "passed", "failed", "passed", "passed"]
    assert [p for _, p in out] == ["fresh"] * 4 + ["duplicate"]  # the last is the first's text again
    assert (scorer.calls, scorer.items) == (1, 4)  # one call, four distinct texts (keys are exact)

    out = cs.score_batch([(t0, bad), (t1, "    return 1 + x\n"), (t0, "    return  x  # same as bad\n"), (t0, bad)])
    assert [p for _, p in out] == ["cached", "fresh", "fresh", "duplicate"]  # a copy of a cached text too
    assert [s.value for s, _ in out] == [0.0, 1.0, 0.0, 0.0]
    assert (scorer.calls, scorer.items) == (2, 6)
    assert cs.stats() == dict(items=9, fresh=6, cached=1, duplicate=2, calls=2)  # fresh = the scorer's items
    assert cache.stats()["student"]["hits"] == 1  # duplicates are looked up once

    # bypass: all fresh, the wrapped scorer sees them, and the cache is untouched
    before = cache.stats()
    out = cs.score_batch([(t0, bad), (t0, "    return x - 1\n")], bypass=True)
    assert [p for _, p in out] == ["fresh", "fresh"] and scorer.items == 8
    assert cache.stats() == before
    assert cs.score_batch([(t0, "    return x - 1\n")])[0][1] == "fresh"  # bypass did not write


def test_cached_scorer_never_caches_failures_of_the_scorer():
    scorer, cache = FlakyScorer(), ScoreCache("lru")
    cs = CachedScorer(scorer, cache)
    for _ in range(3):
        out = cs.score_batch([(task(), BASE), (task(), BASE)])
        assert [p for _, p in out] == ["fresh", "duplicate"]
    assert scorer.items == 3 and cache.size() == 0
    assert cache.stats()["student"]["rejected"] == 3


def test_copies_of_a_text_in_a_batch_are_scored_once_and_marked_duplicate():
    scorer = ExecScorer()
    cs = CachedScorer(scorer, ScoreCache("none"))  # no cache: the batch alone dedups
    out = cs.score_batch([(task(), BASE)] * 4)
    assert [p for _, p in out] == ["fresh", "duplicate", "duplicate", "duplicate"]
    assert {s.status for s, _ in out} == {"passed"}
    assert (scorer.calls, scorer.items) == (1, 1)
    assert cs.stats() == dict(items=4, fresh=1, cached=0, duplicate=3, calls=1)
