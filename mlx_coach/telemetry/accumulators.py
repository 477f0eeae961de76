"""Running statistics kept over a run's steps: epoch phases, per-phase means, exponential moving averages.

Epoch phases: a step whose position in the epoch (fraction of the epoch's batches done before it)
is below 1/3 is "early", below 2/3 "mid", else "late" (telemetry.phase_bounds moves the two bounds).
`PhaseAccumulator` keeps each phase's statistics within the current epoch; its cache hit rate is
sum(hits) / sum(hits + misses) over the phase's steps, not a mean of ratios.

`ema_step` is the one exponential-moving-average rule: `Ema` applies it to a logged series (reward/ema,
loss/total_ema), and the alert rules apply it to the floats they keep in `AlertState`.
"""

import math

from mlx_coach.core.errors import UserError

PHASES = ("early", "mid", "late")

EPOCH_COLUMNS = ("tokens_per_sec", "cache_hit_rate", "cache_share", "fresh_reward_mean", "steps")


def epoch_phase(position, bounds=(1 / 3, 2 / 3)):
    lo, hi = bounds
    if not 0 < lo < hi < 1:
        raise UserError(f"telemetry.phase_bounds must satisfy 0 < early < mid < 1, got {bounds!r}")
    if not 0 <= position <= 1:
        raise ValueError(f"epoch position must be in [0, 1], got {position}")
    return "early" if position < lo else "mid" if position < hi else "late"


def as_float(value):
    """float(value) for numbers (Python, numpy, size-1 mlx arrays); None for anything else."""
    if value is None or isinstance(value, (str, bytes, dict, list, tuple)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class PhaseAccumulator:
    """Running per-phase statistics within the current epoch (call reset() at each epoch start)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.stats = {}

    def add(self, phase, metrics):
        """metrics: tokens_per_sec, hits and misses (this step's lookups, not running totals),
        cache_share, fresh_reward_mean and fresh_count (its weight, default 1); each optional."""
        s = self.stats.setdefault(
            phase,
            {"steps": 0, "toks_sum": 0.0, "toks_n": 0, "hits": 0.0, "misses": 0.0,
             "frag_sum": 0.0, "frag_n": 0, "fresh_sum": 0.0, "fresh_n": 0.0},
        )
        s["steps"] += 1
        toks, frag = as_float(metrics.get("tokens_per_sec")), as_float(metrics.get("cache_share"))
        if _finite(toks):
            s["toks_sum"] += toks
            s["toks_n"] += 1
        if _finite(frag):
            s["frag_sum"] += frag
            s["frag_n"] += 1
        s["hits"] += as_float(metrics.get("hits")) or 0
        s["misses"] += as_float(metrics.get("misses")) or 0
        fresh = as_float(metrics.get("fresh_reward_mean"))
        weight = as_float(metrics.get("fresh_count", 1))
        if _finite(fresh) and weight:
            s["fresh_sum"] += fresh * weight
            s["fresh_n"] += weight

    def _values(self, phase):
        s = self.stats.get(phase)
        if s is None:
            return None
        ratio = lambda num, den: num / den if den else float("nan")  # noqa: E731
        return {
            "tokens_per_sec": ratio(s["toks_sum"], s["toks_n"]),
            "cache_hit_rate": ratio(s["hits"], s["hits"] + s["misses"]),
            "cache_share": ratio(s["frag_sum"], s["frag_n"]),
            "fresh_reward_mean": ratio(s["fresh_sum"], s["fresh_n"]),
            "steps": s["steps"],
        }

    def by_phase_metrics(self, phase):
        """TensorBoard tags for one phase; tags without data yet are left out."""
        v = self._values(phase)
        if v is None:
            return {}
        out = {
            f"gen/tokens_per_sec_by_phase/{phase}": v["tokens_per_sec"],
            f"cache/hit_rate_by_phase/{phase}": v["cache_hit_rate"],
            f"memory/cache_share_by_phase/{phase}": v["cache_share"],
        }
        return {k: x for k, x in out.items() if not math.isnan(x)}

    def epoch_rows(self):
        ordered = [p for p in PHASES if p in self.stats] + [p for p in self.stats if p not in PHASES]
        return {p: self._values(p) for p in ordered}

    def state_dict(self):
        return {p: dict(s) for p, s in self.stats.items()}

    def load(self, state):
        self.stats = {p: dict(s) for p, s in state.items()}


def ema_step(previous, x, alpha):
    """The moving average after x: x itself when there is none yet, else alpha x + (1 - alpha) previous."""
    return x if previous is None else alpha * x + (1 - alpha) * previous


class Ema:
    """Exponential moving average (`ema_step`); the first value initialises it; non-finite values are ignored."""

    def __init__(self, alpha):
        if not 0 < alpha <= 1:
            raise UserError(f"EMA alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value = None
        self.count = 0

    def update(self, x):
        x = as_float(x)
        if x is not None and math.isfinite(x):
            self.value = ema_step(self.value, x, self.alpha)
            self.count += 1
        return self.value

    def state_dict(self):
        return {"alpha": self.alpha, "value": self.value, "count": self.count}

    def load(self, state):
        self.alpha, self.value, self.count = state["alpha"], state["value"], state["count"]
