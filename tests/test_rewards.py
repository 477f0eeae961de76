"""Reward sources combined: weights, user functions (sync/async, None), provenance through the cache,
samples the scorers could not judge kept apart one by one."""

import math

import pytest
from test_teacher import completion, server, task  # noqa: F401 (fixture)

from mlx_coach.rewards import sources
from mlx_coach.rewards.cache import ScoreCache
from mlx_coach.config.tree import from_dict
from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.base import Score
from mlx_coach.rewards.sources import PROVENANCES, RewardSet
from mlx_coach.data.tasks import builtin_tasks


def reward_set(rewards, policy="lru", **sandbox):
    cfg = from_dict({"rewards": rewards, "sandbox": {"timeout_s": 5.0, "workers": 2, **sandbox}})
    return RewardSet(cfg, ScoreCache(policy=policy))


def test_weighted_sum_of_tests_and_functions():
    task = builtin_tasks()[0]
    rs = reward_set([{"type": "tests", "weight": 2.0},
                     {"type": "function", "function": "reward_fns:async_length", "weight": 0.5, "name": "len"}])
    try:
        good, empty = task.canonical_solution, ""
        out = rs.score([task, task], [task.prompt] * 2, [good, empty])
        assert out[0].passed and out[0].parts["tests"] == 1.0
        assert out[0].total == pytest.approx(2.0 + 0.5 * min(len(good), 10) / 10)
        assert out[1].parts["len"] is None and not out[1].passed  # None contributes nothing
        assert out[1].total == pytest.approx(0.0)
        assert [o.provenance for o in out] == ["fresh", "fresh"]
        again = rs.score([task], [task.prompt], [good])
        assert again[0].provenance == "cached" and again[0].total == out[0].total
        other_text = rs.score([task], [task.prompt], [good + "\n\n# same program\n"])
        assert other_text[0].provenance == "fresh"  # another text: scored, never assumed equal
        fresh = rs.score([task], [task.prompt], [good], bypass_cache=True)
        assert fresh[0].provenance == "fresh"
    finally:
        rs.close()


def test_non_finite_function_reward_is_surfaced_not_hidden():
    task = builtin_tasks()[0]
    rs = reward_set([{"type": "function", "function": "reward_fns:nan_reward"},
                     {"type": "function", "function": "reward_fns:zero"}])
    out = rs.score([task], [task.prompt], ["x"])
    assert math.isnan(out[0].total)  # the trainer's non-finite guard then skips the step


def test_bad_function_spec_is_a_user_error():
    with pytest.raises(UserError, match=r"rewards\[0\].function"):
        reward_set([{"type": "function", "function": "no_such_module_xyz:f"}])
    with pytest.raises(UserError, match="not a callable"):
        reward_set([{"type": "function", "function": "reward_fns:TARGET"}])
    with pytest.raises(UserError, match="duplicate reward name"):
        reward_set([{"type": "tests"}, {"type": "tests"}])


def test_local_teacher_source_from_config():
    task = builtin_tasks()[0]
    rs = reward_set([{"type": "tests"}, {"type": "local-teacher", "model": "builtin:tiny", "weight": 0.5,
                                         "low": -8.0, "high": 0.0}])
    try:
        out = rs.score([task, task], [task.prompt] * 2, [task.canonical_solution, "    return 1\n"])
        for o in out:
            assert o.statuses["local-teacher"] == "ok" and 0.0 <= o.parts["local-teacher"] <= 1.0
            assert o.total == pytest.approx(o.parts["tests"] + 0.5 * o.parts["local-teacher"])
        again = rs.score([task], [task.prompt], [task.canonical_solution])
        assert again[0].provenance == "cached"  # both cache-backed sources served it
    finally:
        rs.close()


def test_sandbox_sees_site_packages_only_when_configured():
    from mlx_coach.data.task import Task

    task = Task("tp/1", "def f():\n", "f", "def check(candidate):\n    assert candidate() == 3\n")
    completion = "    import cachetools\n    return cachetools.LRUCache(maxsize=3).maxsize\n"
    for allowed, status in ((False, "error"), (True, "passed")):
        cfg = from_dict({"rewards": [{"type": "tests"}], "sandbox": {"site_packages": allowed, "workers": 1}})
        rs = RewardSet(cfg, ScoreCache(policy="none"))
        try:
            assert rs.score([task], [task.prompt], [completion])[0].statuses["tests"] == status
        finally:
            rs.close()


def test_copies_of_a_completion_are_duplicates_scored_once():
    task0 = builtin_tasks()[0]
    rs = reward_set([{"type": "tests"}])
    try:
        good = task0.canonical_solution
        out = rs.score([task0] * 5, [task0.prompt] * 5, [good, good, "    return None\n", good, good])
        assert [o.provenance for o in out] == ["fresh", "duplicate", "fresh", "duplicate", "duplicate"]
        assert [o.passed for o in out] == [True, True, False, True, True]  # a copy carries the verdict
        assert rs.tests.impl.stats() == dict(items=5, fresh=2, cached=0, duplicate=3, calls=1)
        again = rs.score([task0] * 2, [task0.prompt] * 2, [good, good])
        assert [o.provenance for o in again] == ["cached", "duplicate"]
    finally:
        rs.close()


def test_a_sandbox_timeout_is_unjudged_and_the_group_keeps_its_verdicts():
    """A real sandbox deadline for one sample of a group: no verdict on that program, so it is
    "unjudged"; the other samples' verdicts stand."""
    task0 = builtin_tasks()[0]
    rs = reward_set([{"type": "tests"}], timeout_s=2.0)
    try:
        good, stuck = task0.canonical_solution, "    import time\n    time.sleep(60)\n"
        out = rs.score([task0] * 4, [task0.prompt] * 4, [good, stuck, good + "\n", "    return None\n"])
        assert [o.statuses["tests"] for o in out] == ["passed", "timeout", "passed", "failed"]
        assert [o.provenance for o in out] == ["fresh", "unjudged", "fresh", "fresh"]
        assert [o.total for o in out] == [1.0, 0.0, 1.0, 0.0]
    finally:
        rs.close()


def test_a_busy_loop_is_a_verdict_not_unjudged():
    """The worker's CPU limit sits below the wall deadline by default, so a program that computes
    forever is killed for it (a failing verdict, with its gradient); only a worker the machine
    starved of CPU reaches the wall deadline and is unjudged."""
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig, rlimits_for

    for timeout in (2.0, 3.0, 5.0, 30.0):
        soft, _ = rlimits_for("linux", SandboxConfig(timeout_s=timeout), tasks_in_use=1)["RLIMIT_CPU"]
        assert 1 <= soft <= timeout / 2
    task0 = builtin_tasks()[0]
    rs = reward_set([{"type": "tests"}], timeout_s=30.0, cpu_s=1)
    try:
        out = rs.score([task0] * 2, [task0.prompt] * 2, ["    while True:\n        pass\n", task0.canonical_solution])
        assert [o.statuses["tests"] for o in out] == ["killed", "passed"]
        assert [o.provenance for o in out] == ["fresh", "fresh"]
    finally:
        rs.close()


class BrokenSandbox:
    """A tests scorer (the Scorer protocol) whose sandbox fails itself on the texts in `broken` and
    passes every other text."""

    name, version = "tests", "stub"

    def __init__(self, broken):
        self.broken, self.seen = set(broken), []

    def score_batch(self, items):
        self.seen += [c for _, c in items]
        return [Score(0.0, "infra_error", error="the sandbox failed", cacheable=False) if c in self.broken
                else Score(1.0, "passed") for _, c in items]


def with_sandbox(monkeypatch, stub):
    """RewardSets built from now on get `stub` for their tests source."""
    make = sources._make_scorer
    monkeypatch.setattr(sources, "_make_scorer", lambda r, *a: stub if r.type == "tests" else make(r, *a))


def test_an_infra_error_in_one_sample_is_unjudged_and_only_that_sample(monkeypatch):
    stub = BrokenSandbox(["    return x  # broken\n"])
    with_sandbox(monkeypatch, stub)
    rs = reward_set([{"type": "tests"}])
    texts = ["    return x + 1\n", "    return x  # broken\n", "    return x + 1  # again\n", "    return 1 + x\n"]
    out = rs.score([task()] * 4, [task().prompt] * 4, texts)
    assert [o.provenance for o in out] == ["fresh", "unjudged", "fresh", "fresh"]
    assert [o.passed for o in out] == [True, False, True, True] and [o.total for o in out] == [1.0, 0.0, 1.0, 1.0]
    again = rs.score([task()] * 2, [task().prompt] * 2, texts[:2])
    assert [o.provenance for o in again] == ["cached", "unjudged"]  # never cached, asked again
    assert stub.seen == texts + texts[1:2]


def judge_reward(url, **extra):
    return {"type": "http-judge", "base_url": url, "model": "judge", "weight": 0.5, "timeout_s": 5.0,
            "max_retries": 0, "fallback": 0.3, "breaker_threshold": 10, "concurrency": 1, **extra}


def test_a_judge_fallback_for_one_sample_leaves_its_group_graded(server):
    s = server([None, ("drop",), None, None])  # the group's second request fails
    rs = reward_set([judge_reward(s.url)])
    out = rs.score([task(0)] * 4, [task(0).prompt] * 4, [completion(g) for g in (2, 4, 6, 8)])
    assert [o.provenance for o in out] == ["fresh", "fallback", "fresh", "fresh"]
    assert [o.parts["http-judge"] for o in out] == [0.2, 0.3, 0.6, 0.8]  # the others keep their real grades
    assert [o.statuses["http-judge"] for o in out] == ["ok", "transport_error", "ok", "ok"]


def test_a_sample_both_judges_fail_on_is_a_fallback(server, monkeypatch):
    """The rule when both apply: "fallback" (its statuses still say the sandbox failed)."""
    with_sandbox(monkeypatch, BrokenSandbox([completion(4), completion(6)]))
    s = server([None, ("drop",), None])  # the judge fails on completion(4) only
    rs = reward_set([{"type": "tests"}, judge_reward(s.url)])
    out = rs.score([task(0)] * 3, [task(0).prompt] * 3, [completion(g) for g in (2, 4, 6)])
    assert [o.provenance for o in out] == ["fresh", "fallback", "unjudged"]
    assert out[1].statuses == {"tests": "infra_error", "http-judge": "transport_error"}
    assert {o.provenance for o in out} <= set(PROVENANCES)
