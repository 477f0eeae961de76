"""pass@k: the unbiased estimator of Chen et al. (2021), and a per-task summary of it."""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i): no factorials, so it stays exact enough for
    n in the thousands where the binomials overflow a float.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError("pass_at_k takes integers n, c, k")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(results_by_task: dict, ks=(1, 10, 100)) -> dict:
    """{tasks, samples, samples_per_task, pass@k...}: pass@k averaged over tasks, for each k
    no larger than the fewest samples any task has (a k beyond that has no unbiased estimate)."""
    counts = {tid: (len(r), sum(bool(x) for x in r)) for tid, r in results_by_task.items()}
    n_min = min((n for n, _ in counts.values()), default=0)
    out = {"tasks": len(counts), "samples": sum(n for n, _ in counts.values()), "samples_per_task": n_min}
    for k in ks:
        if 1 <= k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    return out
