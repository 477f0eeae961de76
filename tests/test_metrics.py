from fractions import Fraction
from math import comb

import pytest

from mlx_coach.telemetry.passk import pass_at_k, summarize


def exact(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (10, 0, 10), (10, 1, 10),
                                   (20, 7, 10), (200, 13, 100), (5, 4, 2)])
def test_matches_the_binomial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_known_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # fewer than k wrong samples: every draw holds a correct one


def test_stable_where_the_binomials_overflow_a_float():
    # C(5000, 1000) has ~1,080 digits; the product form needs none of it.
    got = pass_at_k(5000, 3, 1000)
    assert got == pytest.approx(float(exact(5000, 3, 1000)), rel=1e-9)
    assert 0.48 < got < 0.49


@pytest.mark.parametrize("args", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_rejects_impossible_arguments(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)
    with pytest.raises(TypeError):
        pass_at_k(5.0, 2, 1)


def test_summarize_reports_k_up_to_the_fewest_samples():
    results = {"a": [True] * 10 + [False] * 10, "b": [False] * 19 + [True], "c": [False] * 25}
    s = summarize(results, ks=(1, 10, 100))
    assert (s["tasks"], s["samples"], s["samples_per_task"]) == (3, 65, 20)
    assert s["pass@1"] == pytest.approx((0.5 + 0.05 + 0.0) / 3)
    assert s["pass@10"] == pytest.approx((float(exact(20, 10, 10)) + 0.5 + 0.0) / 3)
    assert "pass@100" not in s
    assert summarize({}) == {"tasks": 0, "samples": 0, "samples_per_task": 0}
