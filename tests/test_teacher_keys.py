"""The http-judge's cache keys: every setting that can change a grade is in them, the others are not; a
served teacher is named by its model and weights, not its port; a judge at temperature > 0 that is
cached says once that it keeps one draw per text."""

import dataclasses

import pytest

from mlx_coach.config.tree import from_dict
from mlx_coach.rewards.cache import ScoreCache
from mlx_coach.rewards.scoring.http_judge import HttpJudge
from mlx_coach.rewards.scoring.judge_config import GRADE_FIELDS, NOT_GRADE_FIELDS, REPLY_FIELDS, JudgeConfig
from mlx_coach.rewards.sources import RewardSet

BASE = JudgeConfig(base_url="http://127.0.0.1:8000/v1", model="m")
# a valid value other than BASE's for every JudgeConfig field: a field added without one fails the walk
OTHER = {"base_url": "http://127.0.0.1:8001/v1", "model": "other", "api_key_env": "MLX_COACH_TEST_JUDGE_KEY",
         "timeout_s": 7.0, "deadline_s": 60.0, "max_retries": 5, "backoff_s": 1.0, "max_backoff_s": 2.0,
         "concurrency": 9, "breaker_threshold": 9, "breaker_reset_s": 3.0, "fallback": 0.5, "use_reference": True,
         "max_tokens": 17, "temperature": 0.7, "on_outage": "pause", "grade": "digit", "logit_bias": {"48": 100.0},
         "price_per_call": 0.01}


def test_every_judge_field_is_classified_and_only_grade_fields_change_the_keys(monkeypatch):
    monkeypatch.setenv("MLX_COACH_TEST_JUDGE_KEY", "secret")
    names = {f.name for f in dataclasses.fields(JudgeConfig)}
    assert set(GRADE_FIELDS) | set(NOT_GRADE_FIELDS) == names and not set(GRADE_FIELDS) & set(NOT_GRADE_FIELDS)
    assert set(REPLY_FIELDS) <= set(GRADE_FIELDS) and set(OTHER) == names
    base = HttpJudge(BASE)
    for name in sorted(names):
        other = dataclasses.replace(BASE, **{name: OTHER[name]})
        assert getattr(other, name) != getattr(BASE, name)
        judge = HttpJudge(other)
        assert (judge.version != base.version) == (name in GRADE_FIELDS), name
        assert (judge.reference_owner != base.reference_owner) == (name in REPLY_FIELDS), name


def test_a_logit_bias_is_keyed_as_it_is_sent():
    ints = HttpJudge(dataclasses.replace(BASE, logit_bias={48: 100, 49: -5}))
    strings = HttpJudge(dataclasses.replace(BASE, logit_bias={"49": -5.0, "48": 100.0}))
    assert ints.version == strings.version  # the same request body, so the same judge


def test_a_served_teacher_is_named_by_its_weights_not_its_port():
    here, there = BASE, dataclasses.replace(BASE, base_url="http://127.0.0.1:39999/v1", model="default_model")
    here = dataclasses.replace(here, model="default_model")
    a = HttpJudge(here, served="builtin:tiny@1@0123456789abcdef")
    assert a.version == HttpJudge(there, served="builtin:tiny@1@0123456789abcdef").version  # another run's port
    assert a.reference_owner == HttpJudge(there, served="builtin:tiny@1@0123456789abcdef").reference_owner
    for other in ("builtin:tiny@2@fedcba9876543210", "builtin:tiny@1@fedcba9876543210"):
        assert HttpJudge(here, served=other).version != a.version  # another model, or other weights
        assert HttpJudge(here, served=other).reference_owner != a.reference_owner
    assert HttpJudge(here).version != a.version  # the server at that URL, unnamed: not the served teacher


def judge_rewards(**judge):
    return {"rewards": [{"type": "http-judge", "base_url": "http://127.0.0.1:8002/v1", "model": "warn-test", **judge}]}


@pytest.mark.parametrize("temperature,policy,warns", [(0.9, "lru", True), (0.9, "none", False), (0.0, "lru", False)])
def test_a_sampling_judge_that_is_cached_warns_once(capfd, temperature, policy, warns):
    cfg = from_dict(judge_rewards(temperature=temperature))
    for _ in range(2):
        RewardSet(cfg, ScoreCache(policy)).close()
    lines = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    if warns:
        assert len(lines) == 1 and "rewards[0]" in lines[0] and "temperature 0.9" in lines[0]
    else:
        assert lines == []
