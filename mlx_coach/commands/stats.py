"""The project's statistics: one module for every comparison a command reports.

- Over seeds (`mlx-coach ab`): t-intervals, the paired t-test, how epoch-periodic a curve is. The
  Student t distribution is computed exactly for integer degrees of freedom (the closed-form finite
  sums of Abramowitz & Stegun 26.7.3-4), so no statistics package is needed; its quantile is found by
  bisection on that CDF.
- Over tasks scored twice (`bench learn`, before and after training): the exact McNemar test and a
  paired bootstrap (over tasks, or over clusters of tasks such as a generator's templates). A task that
  is easy or hard for both models cancels out: only the tasks that changed carry evidence. pass@k
  itself is `telemetry.passk.pass_at_k`; this module only compares.
"""


import math

import numpy as np


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer df >= 1."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: A = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:  # even: A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_ppf(q: float, df: int) -> float:
    """The q-quantile of Student's t with integer df (bisection on t_cdf to ~1e-12)."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def _finite(values):
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values, level=0.95) -> dict:
    """Mean and the t-interval mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) over the finite values
    (NaNs dropped and counted out of n). With one value the interval is undefined (NaN)."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    m = float(np.mean(xs))
    if n == 1:
        return {"mean": m, "lo": math.nan, "hi": math.nan, "n": 1}
    half = t_ppf((1 + level) / 2, n - 1) * float(np.std(xs, ddof=1)) / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def paired_t(a, b, level=0.95) -> dict:
    """Paired t-test of b - a over pairs where both are finite: the mean difference, its t-interval,
    t and the two-sided p-value. All differences equal: t is +-inf (p 0) or, when 0, NaN (p 1)."""
    pairs = [(float(x), float(y)) for x, y in zip(a, b)
             if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    d = [y - x for x, y in pairs]
    out = mean_ci(d, level)
    n = len(d)
    if n < 2:
        return {**out, "t": math.nan, "p": math.nan}
    sd = float(np.std(d, ddof=1))
    if sd == 0:
        t = math.copysign(math.inf, out["mean"]) if out["mean"] else math.nan
        return {**out, "t": t, "p": 0.0 if out["mean"] else 1.0}
    t = out["mean"] / (sd / math.sqrt(n))
    p = 2 * (1 - t_cdf(abs(t), n - 1))
    return {**out, "t": t, "p": p}


def detrend(values):
    """Residuals of a least-squares line through the series (learning's drift, taken out)."""
    y = np.asarray(values, dtype=float)
    x = np.arange(len(y), dtype=float)
    if len(y) < 2:
        return y - y.mean() if len(y) else y
    slope, intercept = np.polyfit(x, y, 1)
    return y - (slope * x + intercept)


def autocorrelation(values, lag: int) -> float:
    """Sample autocorrelation at `lag`: sum (x_t - m)(x_{t+lag} - m) / sum (x_t - m)^2 (the usual
    biased estimator); NaN when the series is shorter than lag + 2 or constant."""
    x = np.asarray(values, dtype=float)
    if lag < 1 or len(x) < lag + 2:
        return math.nan
    d = x - x.mean()
    den = float(np.dot(d, d))
    if den == 0:
        return math.nan
    return float(np.dot(d[:-lag], d[lag:]) / den)


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def periodicity(values, positions, period: int) -> dict:
    """How epoch-periodic a per-step curve is, after taking its linear trend out:
    `acf_epoch`, the autocorrelation at lag = the epoch's length in steps (near 0 for a curve with
    no epoch pattern, toward 1 for one that repeats each epoch), and `phase_r`, the Pearson
    correlation of the curve with the step's position in its epoch (0 at an epoch's start, toward 1
    at its end: a curve that rises or falls within every epoch)."""
    ok = [i for i, v in enumerate(values) if v is not None and math.isfinite(float(v))]
    if len(ok) != len(values):  # a curve with gaps: keep the finite steps (lags then count steps kept)
        values, positions = [values[i] for i in ok], [positions[i] for i in ok]
    r = detrend(values)
    return {"acf_epoch": autocorrelation(r, period), "phase_r": pearson(r, positions)}


# ---------------------------------------------------------------------------------------------
# Paired before/after verdicts on one task set


def discordant_counts(before, after):
    """(fail->pass, pass->fail) over paired boolean verdicts, one pair per task."""
    if len(before) != len(after):
        raise ValueError(f"paired verdicts need equal lengths, got {len(before)} and {len(after)}")
    gained = sum(1 for b, a in zip(before, after) if not b and a)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    return gained, lost


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: under "training changed nothing" each of the n = gained + lost
    discordant tasks flips either way with probability 1/2, so min(gained, lost) ~ Binomial(n, 1/2);
    p = 2 * P(X <= min), capped at 1. No discordant tasks: p = 1."""
    if gained < 0 or lost < 0:
        raise ValueError("discordant counts must be >= 0")
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(before, after, *, clusters=None, resamples=10000, seed=0, level=0.95):
    """Bootstrap of mean(after - before) over tasks resampled with replacement (pairs kept together).

    Returns {delta, se, ci_low, ci_high, p, resamples, clusters}: the observed mean difference, the
    bootstrap standard error, a percentile interval at `level`, and a two-sided p-value
    2 * min(P(d* <= 0), P(d* >= 0)) (the share of resampled differences on the far side of zero), capped
    at 1. Values may be 0/1 verdicts or per-task pass@k estimates.

    `clusters` (one label per task) resamples whole clusters instead: tasks drawn from one template
    succeed or fail together, so treating them as independent would narrow the interval. A resample's
    difference is then the mean over the tasks of the clusters drawn; "clusters" is how many there are.
    """
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty 1-D sequences")
    d = a - b
    labels = np.arange(len(d)) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    if labels.shape != d.shape:
        raise ValueError(f"paired_bootstrap: {len(labels)} cluster labels for {len(d)} tasks")
    sums, sizes = np.bincount(labels, weights=d), np.bincount(labels).astype(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    alpha = (1.0 - level) / 2
    p = 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0)))
    return {"delta": float(d.mean()), "se": float(means.std(ddof=1)),
            "ci_low": float(np.quantile(means, alpha)), "ci_high": float(np.quantile(means, 1 - alpha)),
            "p": min(1.0, p), "resamples": resamples, "clusters": len(sums)}
