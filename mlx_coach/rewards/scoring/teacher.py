"""Teacher scorers: an OpenAI-compatible HTTP judge and a local MLX teacher.

HttpJudge asks a chat model to grade each completion and parses one strict grade line,
`SCORE: N/10`. A request that fails (timeout, connection error, HTTP error, malformed reply) is
retried with exponential backoff and jitter; consecutive failures open a circuit breaker. Any
sample the judge could not judge gets the configured fallback value, fallback=True and
cacheable=False, so it is never cached and never mistaken for a grade. Every request has an overall
deadline (`deadline_s`): a reply that trickles in byte by byte is cut there, however short each
socket read. A reference solution is pinned only when it parses as Python and defines the task's
entry point. When the judge is unreachable (`on_outage`): `fallback` scores with the fallback value,
`pause` waits for it to answer again, `stop` raises JudgeOutage; the breaker's openings and
closings are kept as events for the trainer to alert on.

LocalTeacher scores a completion by its mean per-token log-probability under a second model.
"""

from __future__ import annotations

import ast
import http.client
import json
import sys
import os
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from mlx_coach.core.errors import UserError
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.rewards.scoring.base import Score

PROMPT_VERSION = "grade-v1"
DIGIT_PROMPT_VERSION = "grade-digit-v1"
SOLVE_VERSION = "solve-v1"

GRADE_SYSTEM = "You are a strict reviewer of Python code. You judge whether code solves a task correctly."
_GRADE_TASK = """Task: complete this Python function.
```python
{prompt}
```

Candidate completion (the code that follows the task above):
```python
{completion}
```
{reference}
"""
GRADE_TEMPLATE = _GRADE_TASK + """How likely is it that the candidate is correct, from 0 (certainly wrong) to 10 (certainly correct)?
Reply with exactly one line and nothing else, in this format:
SCORE: <an integer from 0 to 10>/10"""
# grade: digit -- for judges too small to follow a format (a tiny local model): the reply's first
# character is the grade; with logit_bias on the ten digit tokens and max_tokens 1 the judge can say
# nothing else, and at a temperature > 0 its grade of one program is a draw from a distribution
GRADE_DIGIT_TEMPLATE = _GRADE_TASK + """How likely is it that the candidate is correct, from 0 (certainly wrong) to 9 (certainly correct)?
Reply with one digit and nothing else."""
REFERENCE_BLOCK = """
A reference solution, for comparison (it may itself be imperfect):
```python
{code}
```
"""
SOLVE_SYSTEM = "You are an expert Python programmer."
SOLVE_TEMPLATE = """Complete this Python function. Reply with the complete function in one ```python code block and nothing else.
```python
{prompt}
```"""

_GRADE_LINE = re.compile(r"SCORE:[ \t]*(\d{1,2})[ \t]*/[ \t]*10")
_GRADE_MENTION = re.compile(r"score\s*:", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def parse_grade(text: str) -> float:
    """The grade in a judge's reply, in [0, 1]. Strict: the reply must contain exactly one
    `score:` (any case) and its last non-empty line must be exactly `SCORE: N/10` with N an
    integer 0..10 (spaces around N and '/' allowed). Reasoning lines above it are allowed.
    Anything else raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("reply content is not a string")
    n = len(_GRADE_MENTION.findall(text))
    if n != 1:
        raise ValueError(f"expected exactly one 'SCORE: N/10' line, found {n}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    m = _GRADE_LINE.fullmatch(lines[-1])
    if m is None:
        raise ValueError(f"last line is not 'SCORE: N/10': {lines[-1][:80]!r}")
    grade = int(m.group(1))
    if grade > 10:
        raise ValueError(f"grade {grade} is out of 0..10")
    return grade / 10


def parse_digit_grade(text: str) -> float:
    """The grade of a `grade: digit` reply, in [0, 1]: its first non-blank character must be a
    digit d (0..9), read as d / 9; what follows is ignored. Anything else raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("reply content is not a string")
    head = text.lstrip()[:1]
    if not head or head not in "0123456789":
        raise ValueError(f"reply does not start with a digit: {text[:40]!r}")
    return int(head) / 9


def check_reference(code: str, task) -> None:
    """A reference solution worth pinning: Python that parses and defines the task's entry point.
    An empty reply or "upstream overloaded, try again" is not; raises _Failure("parse_error")."""
    if not code.strip():
        raise _Failure("parse_error", "reference solution is empty", retryable=False)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:
        raise _Failure("parse_error", f"reference solution is not Python ({e})", retryable=False) from None
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if task.entry_point and task.entry_point not in names:
        raise _Failure("parse_error", f"reference solution does not define {task.entry_point}", retryable=False)


def extract_code(text: str) -> str:
    """The first fenced code block of a reply, or the whole reply when there is none."""
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip("\n")


# ---------------------------------------------------------------------------------------------
# HTTP judge


@dataclass
class JudgeConfig:
    """An OpenAI-compatible judge's settings: the fields of an `http-judge` item under `rewards:`."""

    base_url: Optional[str] = setting(None, help="POST {base_url}/chat/completions, e.g. http://127.0.0.1:8080/v1")
    model: Optional[str] = setting(None, help="judge model name (http-judge) or teacher model path (local-teacher)")
    api_key_env: Optional[str] = setting(None, help="name of the env var holding the API key; null = no key")
    timeout_s: float = setting(30.0, lo=0.0, lo_open=True, help="per socket operation (connect, each read)")
    deadline_s: float = setting(120.0, lo=0.0, lo_open=True, help="per request, whole: connect, send and the full reply")
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

    def validate(self, prefix: str = "judge", served: bool = False) -> "JudgeConfig":
        """Checks an http-judge needs beyond the field ranges; UserError names f"{prefix}.{field}".
        served: a `teacher_server` will provide base_url and model when they are null."""
        check_fields(self, prefix)
        if self.logit_bias is not None:
            ok = isinstance(self.logit_bias, dict) and all(
                str(k).isdigit() and _num(v) and -100 <= v <= 100 for k, v in self.logit_bias.items())
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


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# failures that say the judge could not be reached, as opposed to a reply that was not a grade
OUTAGE_STATUSES = ("transport_error", "timeout", "circuit_open")


class JudgeOutage(Exception):
    """on_outage: stop, and the judge could not be reached."""


class _Failure(Exception):
    def __init__(self, status: str, message: str, retryable: bool = True):
        super().__init__(message)
        self.status, self.message, self.retryable = status, message, retryable


class CircuitBreaker:
    """closed -> (threshold consecutive failures) -> open -> (reset_s) -> half-open: one trial
    request; its success closes the circuit, its failure opens it again."""

    def __init__(self, threshold: int, reset_s: float, timer=time.monotonic):
        self.threshold, self.reset_s, self._timer = threshold, reset_s, timer
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at = None  # None when closed
        self._trial = False  # a half-open trial is in flight
        self.events: list = []  # ("open" | "closed", failures) at each transition, drained by the owner

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self._trial or self._timer() - self._opened_at < self.reset_s:
                return False
            self._trial = True
            return True

    def record(self, ok: bool) -> None:
        with self._lock:
            self._trial = False
            if ok:
                if self._opened_at is not None:
                    self.events.append(("closed", self._failures))
                self._failures, self._opened_at = 0, None
                return
            self._failures += 1  # not reset while open, so a failed trial re-opens
            if self._failures >= self.threshold:
                if self._opened_at is None:
                    self.events.append(("open", self._failures))
                self._opened_at = self._timer()

    def drain(self) -> list:
        with self._lock:
            out, self.events = self.events, []
            return out


class HttpJudge:
    """Scorer grading completions with an OpenAI-compatible chat endpoint.

    cache: a ScoreCache whose pinned "reference" namespace holds the judge's reference solution
    per task (use_reference); a private one is made when None. sleep, rng and timer are
    injectable for tests (backoff sleeps, jitter, breaker clock). config_key prefixes the field
    names in config errors.
    """

    name = "http-judge"

    def __init__(self, config: JudgeConfig, cache=None, *, sleep=time.sleep, rng=None, timer=time.monotonic,
                 config_key: str = "judge"):
        from mlx_coach.rewards.cache import ScoreCache

        self.config = c = config.validate(config_key)
        prompt_version = DIGIT_PROMPT_VERSION if c.grade == "digit" else PROMPT_VERSION
        self.version = f"{prompt_version}:{c.model}:ref={int(c.use_reference)}"
        self.cache = cache if cache is not None else ScoreCache("none")
        self._sleep, self._rng = sleep, rng or random.Random()
        self.breaker = CircuitBreaker(c.breaker_threshold, c.breaker_reset_s, timer)
        self._slots = threading.BoundedSemaphore(c.concurrency)
        self._api_key = os.environ.get(c.api_key_env) if c.api_key_env else None
        u = urlsplit(c.base_url)
        self._conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = u.hostname, u.port
        self._path = u.path.rstrip("/") + "/chat/completions"
        self._lock = threading.Lock()
        self._ref_locks: dict = {}
        self._counts = {"requests": 0, "retries": 0, "errors": 0, "references": 0}
        self._request_s = 0.0  # all requests' latencies, summed (they overlap when concurrency > 1)
        self._errors_by_status = {s: 0 for s in ("parse_error", "transport_error", "timeout", "circuit_open")}
        self._latencies: list = []  # of the HTTP requests of the last score_batch call

    # -- scoring ---------------------------------------------------------------------------------

    def score_batch(self, items) -> list[Score]:
        items = list(items)
        with self._lock:
            self._latencies = []
        if not items:
            return []
        scores = self._score_all(items)
        outage = [i for i, s in enumerate(scores) if s.fallback and s.status in OUTAGE_STATUSES]
        if outage and self.config.on_outage == "stop":
            raise JudgeOutage(f"{self.name}: the judge at {self.config.base_url} is unreachable "
                              f"({scores[outage[0]].error[:120]}); rewards.on_outage is stop")
        if outage and self.config.on_outage == "pause":
            print(f"{self.name}: the judge at {self.config.base_url} is unreachable; pausing until it answers",
                  file=sys.stderr, flush=True)
            while outage:  # wait out the breaker, then ask again for the samples it could not judge
                self._sleep(self.config.breaker_reset_s)
                again = self._score_all([items[i] for i in outage])
                for i, s in zip(outage, again):
                    scores[i] = s
                outage = [i for i in outage if scores[i].fallback and scores[i].status in OUTAGE_STATUSES]
            print(f"{self.name}: the judge answers again; resuming", file=sys.stderr, flush=True)
        return scores

    def _score_all(self, items) -> list[Score]:
        with ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="judge") as pool:
            refs = {}
            if self.config.use_reference:
                tasks = {t.task_id: t for t, _ in items}
                refs = dict(zip(tasks, pool.map(self._reference_or_failure, tasks.values())))
            return list(pool.map(lambda it: self._score_one(it[0], it[1], refs.get(it[0].task_id)), items))

    def _score_one(self, task, completion, ref) -> Score:
        t0 = time.perf_counter()
        try:
            if isinstance(ref, _Failure):
                raise _Failure(ref.status, f"reference solution: {ref.message}")
            digit = self.config.grade == "digit"
            reply = self._chat(GRADE_SYSTEM, (GRADE_DIGIT_TEMPLATE if digit else GRADE_TEMPLATE).format(
                prompt=task.prompt.rstrip("\n"), completion=completion.rstrip("\n"),
                reference=REFERENCE_BLOCK.format(code=ref) if ref is not None else ""))
            try:
                value = parse_digit_grade(reply) if digit else parse_grade(reply)
            except ValueError as e:
                raise _Failure("parse_error", str(e), retryable=False) from None
            return Score(value, "ok", time.perf_counter() - t0)
        except _Failure as f:
            with self._lock:
                self._counts["errors"] += 1
                self._errors_by_status[f.status] += 1
            return Score(self.config.fallback, f.status, time.perf_counter() - t0, f.message[:300],
                         cacheable=False, fallback=True)

    def _reference_or_failure(self, task):
        """The pinned reference solution of a task, asked for once; a _Failure if that failed."""
        from mlx_coach.rewards.cache import reference_key

        key = reference_key(f"{self.name}:{SOLVE_VERSION}:{self.config.model}", task)
        with self._lock:
            lock = self._ref_locks.setdefault(key, threading.Lock())
        with lock:  # one request per task, even with concurrent score_batch calls
            code = self.cache.get(key, "reference")
            if isinstance(code, str):
                return code
            try:
                code = extract_code(self._chat(SOLVE_SYSTEM, SOLVE_TEMPLATE.format(prompt=task.prompt.rstrip("\n"))))
                check_reference(code, task)  # never pin a failure: the namespace is never evicted
            except _Failure as f:
                return f
            with self._lock:
                self._counts["references"] += 1
            self.cache.put(key, code, "reference")
            return code

    # -- transport -------------------------------------------------------------------------------

    def _chat(self, system: str, user: str) -> str:
        """The reply content of one chat completion, retried; raises _Failure."""
        c = self.config
        request = {
            "model": c.model, "max_tokens": c.max_tokens, "temperature": c.temperature, "stream": False,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
        if c.logit_bias:
            request["logit_bias"] = {str(k): float(v) for k, v in c.logit_bias.items()}
        body = json.dumps(request).encode()
        for attempt in range(c.max_retries + 1):
            if not self.breaker.allow():
                raise _Failure("circuit_open", "circuit breaker open", retryable=False)
            with self._slots:
                t0 = time.perf_counter()
                try:
                    content = self._post(body)
                except _Failure as f:
                    failure = f
                else:
                    failure = None
                finally:
                    with self._lock:
                        self._counts["requests"] += 1
                        self._latencies.append(time.perf_counter() - t0)
                        self._request_s += self._latencies[-1]
            self.breaker.record(failure is None)
            if failure is None:
                return content
            if not failure.retryable or attempt == c.max_retries:
                raise failure
            with self._lock:
                self._counts["retries"] += 1
            self._sleep(self._backoff(attempt))  # outside the slot: waiting is not in flight
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        """Equal jitter: half of the capped exponential delay, plus up to the other half at random."""
        d = min(self.config.max_backoff_s, self.config.backoff_s * 2**attempt)
        return d / 2 + self._rng.uniform(0, d / 2)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        conn = self._conn_cls(self._host, self._port, timeout=self.config.timeout_s)
        # timeout_s bounds each socket operation only, so a reply that trickles a byte at a time
        # never trips it; at the deadline a timer shuts the socket down, which ends any blocked read
        cut = threading.Event()

        def at_deadline():
            cut.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.config.deadline_s, at_deadline)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", self._path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
            if cut.is_set():  # a shut-down socket may read as a short, clean end
                raise TimeoutError("deadline")
        except TimeoutError as e:  # socket.timeout is TimeoutError
            if cut.is_set():
                raise _Failure("timeout", f"no complete reply within the {self.config.deadline_s} s deadline") from None
            raise _Failure("timeout", f"timed out after {self.config.timeout_s} s: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            if cut.is_set():
                raise _Failure("timeout", f"no complete reply within the {self.config.deadline_s} s deadline") from None
            raise _Failure("transport_error", f"{type(e).__name__}: {e}") from None
        finally:
            timer.cancel()
            conn.close()
        if resp.status != 200:
            # 429 and 5xx may pass; other 4xx (bad key, unknown model or path) will not
            retry = resp.status == 429 or resp.status >= 500
            raise _Failure("transport_error", f"HTTP {resp.status}: {data[:200]!r}", retryable=retry)
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Failure("transport_error", f"malformed response ({type(e).__name__}): {data[:200]!r}") from None
        if not isinstance(content, str):
            raise _Failure("transport_error", f"malformed response: content is {type(content).__name__}")
        return content

    # -- stats -----------------------------------------------------------------------------------

    def stats(self) -> dict:
        """teacher/requests (HTTP requests sent, retries included), teacher/retries,
        teacher/errors (samples that got the fallback) and teacher/errors/<status>,
        teacher/references (reference solutions fetched), teacher/latency_s (mean request
        latency of the last score_batch call), teacher/request_s (all requests' latencies summed),
        teacher/cost (requests x price_per_call, when a price is set), teacher/circuit_open (0/1)."""
        with self._lock:
            out = {f"teacher/{k}": v for k, v in self._counts.items()}
            out["teacher/request_s"] = self._request_s
            if self.config.price_per_call:
                out["teacher/cost"] = self._counts["requests"] * self.config.price_per_call
            out.update({f"teacher/errors/{k}": v for k, v in self._errors_by_status.items()})
            lat = self._latencies
            out["teacher/latency_s"] = sum(lat) / len(lat) if lat else 0.0
        out["teacher/circuit_open"] = int(self.breaker.is_open)
        return out

    def drain_events(self) -> list:
        """Breaker transitions since the last call: ("open" | "closed", consecutive failures)."""
        return self.breaker.drain()


# ---------------------------------------------------------------------------------------------
# Local MLX teacher


class LocalTeacher:
    """Scores a completion by its mean per-token log-probability under a teacher model given
    the prompt, mapped to [0, 1] by clip((mean_logp - low) / (high - low), 0, 1).

    The teacher tokenizes prompt and prompt + completion with its own tokenizer; the completion's
    tokens are those after the two token sequences' common prefix. Items are sorted by length and
    scored `batch_size` at a time, one padded forward pass per batch.
    """

    name = "local-teacher"

    def __init__(self, model, tokenizer, *, model_id: str = "model", low: float = -6.0, high: float = 0.0,
                 batch_size: int = 8, max_tokens: int = 4096):
        if not (_num(low) and _num(high) and low < high):
            raise UserError(f"config key 'teacher.low' must be < 'teacher.high'; got low={low!r}, high={high!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"config key 'teacher.batch_size' must be an integer >= 1; got {batch_size!r}")
        self.model, self.tokenizer = model, tokenizer
        self.low, self.high, self.batch_size, self.max_tokens = float(low), float(high), batch_size, max_tokens
        self.version = f"logp-v1:{model_id}:{self.low:g}:{self.high:g}"

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> "LocalTeacher":
        from mlx_coach.models.loader import load_policy

        model, tokenizer, _ = load_policy(spec)
        model.eval()
        return cls(model, tokenizer, model_id=spec, **kwargs)

    def split(self, task, completion) -> tuple[list, list]:
        """(prompt ids, completion ids) from the teacher's tokenization of prompt + completion."""
        p = list(self.tokenizer.encode(task.prompt))
        full = list(self.tokenizer.encode(task.prompt + completion))[: self.max_tokens]
        n = 0
        while n < min(len(p), len(full)) and p[n] == full[n]:
            n += 1
        n = max(n, 1)  # the first token has no prediction
        return full[:n], full[n:]

    def mean_logprobs(self, items) -> list:
        """Mean log-prob per completion token for each (task, completion); None when empty."""
        import mlx.core as mx

        from mlx_coach.engine.logprobs import sequence_logprobs

        pairs = [self.split(t, c) for t, c in items]
        out = [None] * len(pairs)
        order = sorted((i for i, (_, c) in enumerate(pairs) if c), key=lambda i: sum(map(len, pairs[i])))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            logp, mask, _ = sequence_logprobs(self.model, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
            mean = logp.sum(axis=1) / mask.sum(axis=1)
            mx.eval(mean)
            for i, v in zip(idx, mean.tolist()):
                out[i] = v
        return out

    def score_batch(self, items) -> list[Score]:
        items = list(items)
        t0 = time.perf_counter()
        means = self.mean_logprobs(items)
        per_item = (time.perf_counter() - t0) / max(1, len(items))
        out = []
        for m in means:
            if m is None:
                out.append(Score(0.0, "ok", per_item, "empty completion"))
            else:
                out.append(Score(min(1.0, max(0.0, (m - self.low) / (self.high - self.low))), "ok", per_item))
        return out
