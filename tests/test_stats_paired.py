"""Paired before/after statistics against hand-computed cases."""

import math

import numpy as np
import pytest

from mlx_coach.commands.stats import discordant_counts, mcnemar_exact_p, paired_bootstrap


def test_discordant_counts_count_each_direction():
    before = [True, False, False, True, False, True]
    after = [True, True, True, False, False, True]
    assert discordant_counts(before, after) == (2, 1)
    with pytest.raises(ValueError):
        discordant_counts([True], [True, False])


@pytest.mark.parametrize("gained, lost, expected", [
    # n = 10 discordant, 9 one way: 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024
    (9, 1, 22 / 1024),
    (1, 9, 22 / 1024),
    # n = 6, all one way: 2 * 1 / 64
    (6, 0, 2 / 64),
    # n = 5, 4 vs 1: 2 * (1 + 5) / 32 = 12 / 32
    (4, 1, 12 / 32),
    # balanced: the tail passes 1/2, so p is capped at 1
    (3, 3, 1.0),
    (0, 0, 1.0),
    # n = 1: 2 * 1/2 = 1
    (1, 0, 1.0),
])
def test_mcnemar_exact_matches_the_binomial_by_hand(gained, lost, expected):
    assert mcnemar_exact_p(gained, lost) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_significance_needs_six_one_sided_flips():
    # 5 of 5 one way: 2/32 = 0.0625 is not below 0.05; 6 of 6 is (2/64)
    assert mcnemar_exact_p(5, 0) > 0.05 > mcnemar_exact_p(6, 0)
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def test_bootstrap_of_a_constant_shift_is_that_shift_with_no_spread():
    before = np.linspace(0, 0.5, 40)
    out = paired_bootstrap(before, before + 0.25, resamples=2000)
    assert out["delta"] == pytest.approx(0.25)
    assert out["ci_low"] == pytest.approx(0.25) and out["ci_high"] == pytest.approx(0.25)
    assert out["se"] == pytest.approx(0.0, abs=1e-12)
    assert out["p"] == 0.0


def test_bootstrap_standard_error_matches_the_analytic_one():
    # 100 tasks, 30 gained, 10 lost, 60 unchanged: d has mean 0.2 and population variance
    # E[d^2] - mean^2 = 0.4 - 0.04 = 0.36; the bootstrap SE of the mean is sqrt(0.36 / 100) = 0.06
    before = [False] * 30 + [True] * 10 + [False] * 60
    after = [True] * 30 + [False] * 10 + [False] * 60
    out = paired_bootstrap(before, after, resamples=20000, seed=1)
    assert out["delta"] == pytest.approx(0.2)
    assert out["se"] == pytest.approx(0.06, rel=0.05)
    # the normal approximation: interval 0.2 +- 1.96 * 0.06, p about 2 * Phi(-0.2 / 0.06) = 8.6e-4
    assert out["ci_low"] == pytest.approx(0.2 - 1.96 * 0.06, abs=0.015)
    assert out["ci_high"] == pytest.approx(0.2 + 1.96 * 0.06, abs=0.015)
    assert out["p"] < 0.01


def test_bootstrap_of_no_change_is_not_significant():
    rng = np.random.default_rng(0)
    before = rng.random(60) < 0.4
    out = paired_bootstrap(before, before.copy())
    assert out["delta"] == 0.0 and out["p"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([], [])
    assert math.isfinite(paired_bootstrap([0, 1, 1], [1, 1, 0])["se"])


def test_a_bootstrap_over_single_task_clusters_is_the_bootstrap_over_tasks():
    rng = np.random.default_rng(3)
    before, after = rng.random(50) < 0.4, rng.random(50) < 0.6
    plain = paired_bootstrap(before, after, seed=5)
    single = paired_bootstrap(before, after, clusters=[f"t{i:02d}" for i in range(50)], seed=5)
    assert single == pytest.approx(plain) and plain["clusters"] == 50


def test_a_bootstrap_over_templates_that_flip_whole_is_as_wide_as_the_templates_allow():
    # 10 templates of 10 tasks; training learned 3 templates whole. Over tasks the SE would be
    # sqrt(0.3 * 0.7 / 100) = 0.046; the evidence is 10 templates, 3 of them gained: SE sqrt(0.21 / 10) = 0.145
    clusters = [f"template{i // 10}" for i in range(100)]
    before = [False] * 100
    after = [i < 30 for i in range(100)]
    over_tasks = paired_bootstrap(before, after, resamples=20000, seed=2)
    over_templates = paired_bootstrap(before, after, clusters=clusters, resamples=20000, seed=2)
    assert over_tasks["se"] == pytest.approx(math.sqrt(0.21 / 100), rel=0.05)
    assert over_templates["se"] == pytest.approx(math.sqrt(0.21 / 10), rel=0.05)
    assert over_templates["delta"] == over_tasks["delta"] == pytest.approx(0.3)
    assert over_templates["clusters"] == 10
    # 3 gained clusters of 10 drawn as none with probability 0.7^10 = 2.8%: no longer "p < 1e-4"
    assert over_tasks["p"] < 1e-3 < 0.01 < over_templates["p"] < 0.1
    assert over_templates["ci_low"] < over_tasks["ci_low"] and over_templates["ci_high"] > over_tasks["ci_high"]


def test_a_bootstrap_over_unequal_clusters_weights_each_task_once():
    # two templates of 1 and 3 tasks: the resample "1 + 1" weighs the single task's change double,
    # "3 + 3" gives 0, and the observed difference is the task mean (1/4), not the template mean (1/2)
    out = paired_bootstrap([0, 0, 0, 0], [1, 0, 0, 0], clusters=["a", "b", "b", "b"], resamples=4000, seed=0)
    assert out["delta"] == pytest.approx(0.25) and out["clusters"] == 2
    assert out["ci_low"] == 0.0 and out["ci_high"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([0, 1], [1, 1], clusters=["a"])
