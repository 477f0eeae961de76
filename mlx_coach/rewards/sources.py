"""Reward sources named in the config's `rewards:` list, combined as a weighted sum.

Scorer-backed sources (sandboxed tests, HTTP judge, local teacher) sit behind the shared
ScoreCache, so each of their values is either *fresh* (computed now) or *cached*. A sample's
reward is "cached" only when every cache-backed source served it from the cache; user
functions are always called and do not change the provenance. A sample where some source gave
its fallback instead of a judgement has provenance "fallback", kept out of both. With
`group_size`, a source's fallback is applied to a whole group or to none of it, so an outage
never splits a group between real grades and fallbacks. A source that gives no value for a
sample (a function returning None) contributes 0 and is counted.
"""

import asyncio
import importlib
import inspect
import math
from dataclasses import dataclass, field

from typing import Optional

from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.http_judge import JudgeConfig
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.data.task import task_columns

REWARD_TYPES = ("tests", "function", "http-judge", "local-teacher")


@dataclass
class RewardConfig(JudgeConfig):
    """One item of the `rewards:` list. An http-judge item's own settings are JudgeConfig's fields;
    a local-teacher uses `model`, `low`, `high` and `batch_size`; tests take theirs from `sandbox:`."""

    type: str = setting("tests", choices=REWARD_TYPES)
    weight: float = setting(1.0)
    name: Optional[str] = setting(None, help="default: the function's name, else the type")
    function: Optional[str] = setting(None, help="module:function for type=function")
    low: float = setting(-6.0, help="local-teacher: mean log-prob mapped to reward 0")
    high: float = setting(0.0, help="local-teacher: mean log-prob mapped to reward 1")
    batch_size: int = setting(8, lo=1, help="local-teacher: sequences per forward pass")

    def validate(self, prefix="rewards[]", served=False):
        """served: the config starts a teacher_server, which fills an http-judge's null base_url."""
        check_fields(self, prefix)
        if self.type == "function" and (not self.function or ":" not in self.function):
            raise UserError(f"config key '{prefix}.function' must be module:function")
        if self.type == "http-judge":
            JudgeConfig.validate(self, prefix, served)
        if self.type == "local-teacher" and not self.model:
            raise UserError(f"config key '{prefix}.model' is required for local-teacher")
        if self.type == "local-teacher" and not self.low < self.high:
            raise UserError(f"config key '{prefix}.low' must be < '{prefix}.high'")
        return self


@dataclass
class SampleReward:
    total: float
    provenance: str  # "fresh" | "cached" | "fallback"
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
        from mlx_coach.rewards.scoring.cached import CachedScorer

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

    def score(self, tasks, prompts, completions, *, bypass_cache=False, group_size=None):
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
            if group_size:
                results = _whole_groups(results, group_size)
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
            provenance = "fallback" if flagged[i] else "cached" if cached[i] else "fresh"
            out.append(SampleReward(total, provenance, parts[i], statuses[i], passed, flagged[i]))
        return out

    def stats(self):
        """Teacher-side counters (errors, latency) of sources that keep them."""
        merged = {}
        for src in self.sources:
            scorer = getattr(src.impl, "scorer", None)
            if scorer is not None and hasattr(scorer, "stats") and scorer.name != "tests":
                merged.update(scorer.stats())
        return merged

    def drain_events(self):
        """(source name, event) for each judge circuit-breaker transition since the last call."""
        out = []
        for src in self.sources:
            scorer = getattr(src.impl, "scorer", None)
            if scorer is not None and hasattr(scorer, "drain_events"):
                out.extend((src.name, ev) for ev in scorer.drain_events())
        return out

    def close(self):
        for src in self.sources:
            scorer = getattr(src.impl, "scorer", None)
            if scorer is not None and hasattr(scorer, "close"):
                scorer.close()


def _whole_groups(results, g):
    """A source's (score, provenance) per sample with each group of g consecutive samples all
    judged or all fallback: one fallback in a group turns the group's real grades into that
    fallback too (those grades stay in the cache; only this step's rewards use the fallback)."""
    from dataclasses import replace

    out = list(results)
    for start in range(0, len(out), g):
        group = out[start:start + g]
        failed = next((s for s, _ in group if s.fallback), None)
        if failed is None or all(s.fallback for s, _ in group):
            continue
        for j, (s, prov) in enumerate(group):
            if not s.fallback:
                out[start + j] = (replace(failed, duration_s=s.duration_s), prov)
    return out


def _make_scorer(r, cfg, cache, key):
    if r.type == "tests":
        from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer

        return SandboxScorer(cfg.sandbox)
    if r.type == "http-judge":
        from mlx_coach.rewards.scoring.http_judge import HttpJudge
        from mlx_coach.rewards.teacher_server import point_at_served

        return HttpJudge(point_at_served(r, cfg, key), cache=cache, config_key=key)
    if r.type == "local-teacher":
        from mlx_coach.rewards.scoring.local_teacher import LocalTeacher

        return LocalTeacher.from_spec(r.model, low=r.low, high=r.high, batch_size=r.batch_size)
    raise UserError(f"unknown reward type {r.type!r}")
