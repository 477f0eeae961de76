"""Reward sources combined: weights, user functions (sync/async, None), provenance through the cache."""

import math

import pytest

from mlx_coach.rewards.cache import ScoreCache
from mlx_coach.config.tree import from_dict
from mlx_coach.core.errors import UserError
from mlx_coach.rewards.sources import RewardSet
from mlx_coach.data.tasks import builtin_tasks


def reward_set(rewards, policy="lru"):
    cfg = from_dict({"rewards": rewards, "sandbox": {"timeout_s": 5.0, "workers": 2}})
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
