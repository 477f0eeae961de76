"""Reward sources named in the config's `rewards:` list, combined as a weighted sum.

Scorer-backed sources (sandboxed tests, HTTP judge, local teacher) sit behind the shared ScoreCache.
Each sample's reward has one provenance (PROVENANCES), decided in this order:
  "fallback"   some judge could not grade it and gave its configured fallback value;
  "unjudged"   the sandbox could not judge it (status timeout or infra_error): its 0 is no verdict;
  "duplicate"  its (task, completion) already came earlier in the same batch: that sample's scores,
               computed (or read) once, are copied;
  "cached"     every cache-backed source read its score from the cache;
  "fresh"      a scorer judged it now (or only user functions score it).
A sample that is both a judge's fallback and unjudged by the sandbox is "fallback" (its statuses still
say timeout or infra_error). The trainer gives "fallback" and "unjudged" samples no gradient and no
place in their group's statistics, so they are decided per sample: the others in the group keep their
real grades. User functions are always called and do not change the provenance; a source that gives
no value for a sample (a function returning None) contributes 0.
"""

import asyncio
import importlib
import inspect
import math
import sys
from dataclasses import dataclass, field

from typing import Optional

from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.judge_config import JudgeConfig
from mlx_coach.rewards.scoring.base import UNJUDGED_STATUSES
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.data.task import task_columns

REWARD_TYPES = ("tests", "function", "http-judge", "local-teacher")
PROVENANCES = ("fresh", "cached", "duplicate", "fallback", "unjudged")


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
    provenance: str  # one of PROVENANCES
    parts: dict = field(default_factory=dict)  # source name -> value (None = no value)
    statuses: dict = field(default_factory=dict)  # source name -> scorer status
    passed: bool = False  # the tests source said "passed"


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

    def score(self, tasks, prompts, completions, *, bypass_cache=False):
        n = len(completions)
        parts = [dict() for _ in range(n)]
        statuses = [dict() for _ in range(n)]
        origins = [set() for _ in range(n)]  # what the cache-backed sources said: fresh, cached, duplicate
        fallback = [False] * n
        unjudged = [False] * n
        for src in self.sources:
            if src.kind == "function":
                values = _call_function(src.impl, prompts, completions, tasks)
                for i, v in enumerate(values):
                    parts[i][src.name] = v
                continue
            results = src.impl.score_batch(list(zip(tasks, completions)), bypass=bypass_cache)
            for i, (score, origin) in enumerate(results):
                parts[i][src.name] = score.value
                statuses[i][src.name] = score.status
                fallback[i] |= score.fallback
                unjudged[i] |= not score.fallback and score.status in UNJUDGED_STATUSES
                origins[i].add(origin)
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
            out.append(SampleReward(total, provenance(fallback[i], unjudged[i], origins[i]), parts[i], statuses[i],
                                    passed))
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


def provenance(fallback, unjudged, origins):
    """A sample's provenance (module docstring) from its scores: whether some judge gave its fallback,
    whether the sandbox could not judge it, and the cache-backed sources' origins. A copy is a copy in
    every source (each source's first occurrence of a (task, completion) is the same sample)."""
    if fallback:
        return "fallback"
    if unjudged:
        return "unjudged"
    if "duplicate" in origins:
        return "duplicate"
    return "cached" if origins == {"cached"} else "fresh"


_WARNED: set = set()  # what _warn_once has said in this process


def _warn_once(what, line):
    """line on stderr the first time `what` comes up in this process."""
    if what not in _WARNED:
        _WARNED.add(what)
        print(line, file=sys.stderr, flush=True)


def _make_scorer(r, cfg, cache, key):
    if r.type == "tests":
        from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer

        return SandboxScorer(cfg.sandbox)
    if r.type == "http-judge":
        from mlx_coach.rewards.scoring.http_judge import HttpJudge
        from mlx_coach.rewards.teacher_server import point_at_served

        judge_cfg, served = point_at_served(r, cfg, key)
        judge = HttpJudge(judge_cfg, cache=cache, config_key=key, served=served)
        if judge_cfg.temperature > 0 and cache.config.policy != "none":
            _warn_once(judge.version, f"warning: {key}: the http-judge samples at temperature "
                                      f"{judge_cfg.temperature:g} and cache.policy is {cache.config.policy}: each "
                                      f"text keeps the one grade first drawn for it (cache.policy: none draws one "
                                      f"per sample)")
        return judge
    if r.type == "local-teacher":
        from mlx_coach.rewards.scoring.local_teacher import LocalTeacher

        return LocalTeacher.from_spec(r.model, low=r.low, high=r.high, batch_size=r.batch_size)
    raise UserError(f"unknown reward type {r.type!r}")
