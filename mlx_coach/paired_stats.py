"""Paired before/after statistics on one task set: exact McNemar test and a paired bootstrap.

Both compare the same tasks scored twice (before and after training), so a task that is easy
or hard for both models cancels out: only the tasks that changed carry evidence.
pass@k itself is `metrics.pass_at_k` (the unbiased estimator); this module only compares.
"""

from __future__ import annotations

import math

import numpy as np


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


def paired_bootstrap(before, after, *, resamples=10000, seed=0, level=0.95):
    """Bootstrap of mean(after - before) over tasks resampled with replacement (pairs kept together).

    Returns {delta, se, ci_low, ci_high, p}: the observed mean difference, the bootstrap standard
    error, a percentile interval at `level`, and a two-sided p-value 2 * min(P(d* <= 0), P(d* >= 0))
    (the share of resampled differences on the far side of zero), capped at 1.
    Values may be 0/1 verdicts or per-task pass@k estimates.
    """
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty 1-D sequences")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    p = 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0)))
    return {"delta": float(d.mean()), "se": float(means.std(ddof=1)),
            "ci_low": float(np.quantile(means, alpha)), "ci_high": float(np.quantile(means, 1 - alpha)),
            "p": min(1.0, p), "resamples": resamples}
