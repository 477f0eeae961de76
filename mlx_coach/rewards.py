"""Reward sources named in the config's `rewards:` list, combined as a weighted sum.

Scorer-backed sources (sandboxed tests, HTTP judge, local teacher) sit behind the shared
ScoreCache, so each of their values is either *fresh* (computed now) or *cached*. A sample's
reward is "cached" only when every cache-backed source served it from the cache; user
functions are always called and do not change the provenance. A source that gives no value
for a sample (a function returning None) contributes 0 and is counted.
"""

import asyncio
import importlib
import inspect
import math
from dataclasses import dataclass, field

from .errors import UserError
from .tasks import task_columns


@dataclass
class SampleReward:
    total: float
    provenance: str  # "fresh" | "cached"
    parts: dict = field(default_factory=dict)  # source name -> value (None = no value)
    statuses: dict = field(default_factory=dict)  # source name -> scorer status
    passed: bool = False  # the tests source said "passed"
    flagged: bool = False  # some source returned a fallback instead of a judgement


def load_function(spec, key="rewards[].function"):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"config key '{key}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"config key '{key}': '{spec}' is not a callable")
    return fn


def _call_function(fn, prompts, completions, tasks):
    columns = {}
    for t in tasks:
        for k, v in task_columns(t).items():
            columns.setdefault(k, []).append(v)
    out = fn(prompts=prompts, completions=completions, **columns)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    out = list(out)
    if len(out) != len(completions):
        raise RuntimeError(f"reward function returned {len(out)} values for {len(completions)} completions")
    return [None if v is None else float(v) for v in out]


async def _await(x):
    return await x


@dataclass
class Source:
    name: str
    weight: float
    kind: str  # "scorer" | "function"
    impl: object  # CachedScorer or callable


class RewardSet:
    """Builds the sources once; `score(tasks, prompts, completions)` per step."""

    def __init__(self, cfg, cache):
        from .scoring.cached import CachedScorer

        self.sources = []
        self.cache = cache
        seen = set()
        for i, r in enumerate(cfg.rewards):
            name = r.name or (r.function.rpartition(":")[2] if r.type == "function" else r.type)
            if name in seen:
                raise UserError(f"config key 'rewards[{i}].name': duplicate reward name '{name}'")
            seen.add(name)
            if r.type == "function":
                self.sources.append(Source(name, r.weight, "function", load_function(r.function, f"rewards[{i}].function")))
                continue
            scorer = _make_scorer(r, cfg, cache, f"rewards[{i}]")
            self.sources.append(Source(name, r.weight, "scorer", CachedScorer(scorer, cache)))
        self.tests = next((s for s in self.sources if s.kind == "scorer" and s.impl.scorer.name == "tests"), None)

    def score(self, tasks, prompts, completions, *, bypass_cache=False):
        n = len(completions)
        parts = [dict() for _ in range(n)]
        statuses = [dict() for _ in range(n)]
        cached = [None] * n  # None: no cache-backed source yet
        flagged = [False] * n
        for src in self.sources:
            if src.kind == "function":
                values = _call_function(src.impl, prompts, completions, tasks)
                for i, v in enumerate(values):
                    parts[i][src.name] = v
                continue
            results = src.impl.score_batch(list(zip(tasks, completions)), bypass=bypass_cache)
            for i, (score, prov) in enumerate(results):
                parts[i][src.name] = score.value
                statuses[i][src.name] = score.status
                flagged[i] |= score.fallback
                cached[i] = (prov == "cached") if cached[i] is None else (cached[i] and prov == "cached")
        out = []
        for i in range(n):
            total = 0.0
            for src in self.sources:
                v = parts[i].get(src.name)
                if v is not None and math.isfinite(v):
                    total += src.weight * v
                elif v is not None:
                    total = float("nan")  # a non-finite reward is surfaced, never hidden
            passed = self.tests is not None and statuses[i].get(self.tests.name) == "passed"
            out.append(SampleReward(total, "cached" if cached[i] else "fresh", parts[i], statuses[i], passed, flagged[i]))
        return out

    def stats(self):
        """Teacher-side counters (errors, latency) of sources that keep them."""
        merged = {}
        for src in self.sources:
            scorer = getattr(src.impl, "scorer", None)
            if scorer is not None and hasattr(scorer, "stats") and scorer.name != "tests":
                merged.update(scorer.stats())
        return merged

    def close(self):
        for src in self.sources:
            scorer = getattr(src.impl, "scorer", None)
            if scorer is not None and hasattr(scorer, "close"):
                scorer.close()


def _make_scorer(r, cfg, cache, key):
    if r.type == "tests":
        from .scoring.sandbox import SandboxConfig, SandboxScorer

        s = cfg.sandbox
        return SandboxScorer(SandboxConfig(timeout_s=s.timeout_s, memory_mb=s.memory_mb, workers=s.workers,
                                           partial_credit=s.partial_credit, site_packages=s.site_packages))
    if r.type == "http-judge":
        from .scoring.teacher import HttpJudge, JudgeConfig

        jc = JudgeConfig(base_url=r.base_url, model=r.model, api_key_env=r.api_key_env, timeout_s=r.timeout_s,
                         max_retries=r.max_retries, backoff_s=r.backoff_s, max_backoff_s=r.max_backoff_s,
                         concurrency=r.concurrency, breaker_threshold=r.breaker_threshold,
                         breaker_reset_s=r.breaker_reset_s, fallback=r.fallback, use_reference=r.use_reference,
                         max_tokens=r.max_tokens)
        return HttpJudge(jc, cache=cache, config_key=key)
    if r.type == "local-teacher":
        from .scoring.teacher import LocalTeacher

        return LocalTeacher.from_spec(r.model, low=r.low, high=r.high, batch_size=r.batch_size)
    raise UserError(f"unknown reward type {r.type!r}")
