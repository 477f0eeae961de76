"""The A/B statistics against hand-computed cases and scipy's Student t."""

import math

import numpy as np
import pytest

from mlx_coach.commands import stats as abstats


def test_t_cdf_matches_closed_forms_and_scipy():
    # df 1 is Cauchy: 1/2 + atan(t)/pi; df 2: 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert abstats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert abstats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 16):
        for t in (-6.0, -2.1, -0.3, 0.0, 0.9, 2.5, 12.0):
            assert abstats.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)
        assert abstats.t_ppf(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-9)


def test_mean_ci_is_the_t_interval():
    # 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302652729911275 -> 2 +- 4.3027 / sqrt(3)
    s = abstats.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0)
    assert s["lo"] == pytest.approx(2 - half, abs=1e-9) and s["hi"] == pytest.approx(2 + half, abs=1e-9)
    # NaNs are dropped, one value has no interval, none has no mean
    one = abstats.mean_ci([float("nan"), 5.0])
    assert one["n"] == 1 and one["mean"] == 5.0 and math.isnan(one["lo"])
    assert math.isnan(abstats.mean_ci([])["mean"])


def test_paired_t_against_hand_and_scipy():
    a, b = [1.0, 2.0, 3.5], [1.4, 2.9, 3.6]
    # differences 0.4, 0.9, 0.1: mean 0.4667, sd 0.40415, t = 0.4667 / (0.40415 / sqrt 3) = 2.0 exactly;
    # p (df 2) = 1 - 2/sqrt(6) (the df-2 closed form: P(|T| < t) = t / sqrt(2 + t^2))
    r = abstats.paired_t(a, b)
    assert r["t"] == pytest.approx(2.0, abs=1e-12)
    assert r["p"] == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-12)
    assert r["mean"] == pytest.approx(0.4666666666666667)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=7), rng.normal(0.5, 1.0, size=7)
    ref = stats.ttest_rel(y, x)
    got = abstats.paired_t(x, y)
    assert got["t"] == pytest.approx(ref.statistic, rel=1e-10) and got["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    # pairs with a NaN on either side are left out; identical differences give p 0 (or 1 when zero)
    assert abstats.paired_t([1.0, float("nan"), 3.0], [2.0, 0.0, 4.0])["n"] == 2
    assert abstats.paired_t([1.0, 2.0], [2.0, 3.0])["p"] == 0.0
    assert abstats.paired_t([1.0, 2.0], [1.0, 2.0])["p"] == 1.0


def test_autocorrelation_hand_case():
    # x = 1, -1, 1, -1 (mean 0): lag 1 -> -3/4, lag 2 -> 2/4
    x = [1.0, -1.0, 1.0, -1.0]
    assert abstats.autocorrelation(x, 1) == pytest.approx(-0.75)
    assert abstats.autocorrelation(x, 2) == pytest.approx(0.5)
    assert math.isnan(abstats.autocorrelation([2.0] * 6, 2))


def test_periodicity_tells_an_epoch_pattern_from_none():
    period, epochs = 6, 8
    steps = np.arange(period * epochs)
    positions = (steps % period) / period
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, size=len(steps))
    trend = 0.01 * steps  # learning: taken out before measuring
    saw = trend + 0.3 * positions + noise  # rises within every epoch, drops at each boundary
    flat = trend + noise
    p_saw = abstats.periodicity(list(saw), list(positions), period)
    p_flat = abstats.periodicity(list(flat), list(positions), period)
    assert p_saw["acf_epoch"] > 0.5 and p_saw["phase_r"] > 0.8
    assert abs(p_flat["acf_epoch"]) < 0.3 and abs(p_flat["phase_r"]) < 0.3
    # a step without a value (NaN) is dropped rather than poisoning the numbers
    gappy = list(saw)
    gappy[5] = float("nan")
    assert math.isfinite(abstats.periodicity(gappy, list(positions), period)["phase_r"])
