"""The http-judge's settings (`JudgeConfig`, the fields of an `http-judge` item under `rewards:`) and
which of them can change a grade: those name the judge in its cache keys (`judge_digest`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from mlx_coach.core.errors import UserError
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.rewards.scoring.base import is_number


# deadline_s when unset, in timeouts: a judge's reply has one long wait, the judge's silence while it
# generates (a single read, which timeout_s bounds), and as long again covers connecting, sending and
# reading a reply that arrives without long gaps
DEADLINE_PER_TIMEOUT = 2.0


@dataclass
class JudgeConfig:
    """An OpenAI-compatible judge's settings: the fields of an `http-judge` item under `rewards:`."""

    base_url: Optional[str] = setting(None, help="POST {base_url}/chat/completions, e.g. http://127.0.0.1:8080/v1")
    model: Optional[str] = setting(None, help="judge model name (http-judge) or teacher model path (local-teacher)")
    api_key_env: Optional[str] = setting(None, help="name of the env var holding the API key; null = no key")
    timeout_s: float = setting(30.0, lo=0.0, lo_open=True,
                               help="per socket operation: connecting, sending, each read (the judge's silence "
                                    "before its reply is one read)")
    deadline_s: Optional[float] = setting(None, lo=0.0, lo_open=True,
                                          help="per request, whole: connecting, sending and reading the full reply; "
                                               f"null = {DEADLINE_PER_TIMEOUT:g} x timeout_s")
    max_retries: int = setting(2, lo=0)
    backoff_s: float = setting(0.5, lo=0.0, help="first retry waits ~backoff_s, then doubling, capped at max_backoff_s")
    max_backoff_s: float = setting(8.0, lo=0.0)
    concurrency: int = setting(4, lo=1, help="max requests in flight")
    breaker_threshold: int = setting(5, lo=1, help="consecutive failed requests that open the circuit")
    breaker_reset_s: float = setting(30.0, lo=0.0, lo_open=True, help="open this long, then one half-open trial")
    fallback: float = setting(0.0, lo=0.0, hi=1.0, help="value of a sample the judge could not judge")
    use_reference: bool = setting(False, help="ask the judge for a reference solution per task (pinned in the cache)")
    max_tokens: int = setting(256, lo=1)
    temperature: float = setting(0.0, lo=0.0, help="the judge's sampling temperature")
    on_outage: str = setting("fallback", choices=("fallback", "pause", "stop"),
                             help="judge unreachable: score with `fallback`, pause until it answers, or stop the run")
    grade: str = setting("line", choices=("line", "digit"),
                         help="line: the reply's last line is `SCORE: N/10`; digit: its first character is a "
                              "digit d, grade d/9 (for small judges; see parse_digit_grade)")
    logit_bias: Optional[dict] = setting(None, help="OpenAI logit_bias sent with each request: token id -> bias "
                                                    "(-100..100); a served teacher with grade: digit fills it")
    price_per_call: float = setting(0.0, lo=0.0, help="cost of one judge request (any currency); "
                                                      "teacher/cost = requests x price")

    def request_deadline_s(self) -> float:
        """The wall time one request may take, retries not included: deadline_s, else a multiple of timeout_s."""
        return self.deadline_s if self.deadline_s is not None else DEADLINE_PER_TIMEOUT * self.timeout_s

    def validate(self, prefix: str = "judge", served: bool = False) -> "JudgeConfig":
        """Checks an http-judge needs beyond the field ranges; UserError names f"{prefix}.{field}".
        served: a `teacher_server` will provide base_url and model when they are null."""
        check_fields(self, prefix)
        if self.logit_bias is not None:
            ok = isinstance(self.logit_bias, dict) and all(
                str(k).isdigit() and is_number(v) and -100 <= v <= 100 for k, v in self.logit_bias.items())
            if not ok:
                raise UserError(f"config key '{prefix}.logit_bias' must map token ids to biases in -100..100; "
                                f"got {self.logit_bias!r}")
        if served and self.base_url is None:
            return self
        u = urlsplit(self.base_url or "")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UserError(f"config key '{prefix}.base_url' must be an http:// or https:// URL; got {self.base_url!r}")
        if not self.model:
            raise UserError(f"config key '{prefix}.model' must be a model name; got {self.model!r}")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise UserError(f"config key '{prefix}.api_key_env': environment variable {self.api_key_env} is not set")
        return self


# JudgeConfig fields that can change a grade: who answers (base_url, model), how it samples its reply,
# what it is asked. They name the judge in its version, hence in every cache key of its grades.
GRADE_FIELDS = ("base_url", "model", "max_tokens", "temperature", "logit_bias", "grade", "use_reference")
# Fields that cannot: how requests are sent, retried, bounded in time and paid for, and the value of a
# sample the judge could not grade (a fallback is never cached). A cut or failed reply is no grade.
NOT_GRADE_FIELDS = ("api_key_env", "timeout_s", "deadline_s", "max_retries", "backoff_s", "max_backoff_s",
                    "concurrency", "breaker_threshold", "breaker_reset_s", "fallback", "on_outage", "price_per_call")
# the fields that shape a reply to any request, the reference solution's included
REPLY_FIELDS = ("base_url", "model", "max_tokens", "temperature", "logit_bias")


def request_bias(logit_bias) -> Optional[dict]:
    """logit_bias as a request sends it: {"token id": float bias}, or None when there is none."""
    return {str(k): float(v) for k, v in logit_bias.items()} if logit_bias else None


def judge_digest(config: JudgeConfig, names, served: Optional[str] = None) -> str:
    """sha256 (12 hex digits) of the named fields of config, each as the request sends it. served: who
    answers at a teacher_server's base_url (model and weights); it stands for base_url, whose port
    differs from run to run."""
    values = {name: getattr(config, name) for name in names}
    if "logit_bias" in values:
        values["logit_bias"] = request_bias(values["logit_bias"])
    if served is not None and "base_url" in values:
        values["base_url"] = f"teacher_server:{served}"
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]
