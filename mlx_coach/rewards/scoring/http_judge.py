"""The http-judge scorer: an OpenAI-compatible chat endpoint grades each completion.

HttpJudge asks a chat model to grade each completion (prompts and parsers: grading.py). A request that
fails (timeout, connection error, HTTP error, malformed reply) is retried with exponential backoff and
jitter; consecutive failures open a circuit breaker. Any sample the judge could not judge gets the
configured fallback value, fallback=True and cacheable=False, so it is never cached and never mistaken
for a grade. Every request has an overall deadline (`deadline_s`, by default twice `timeout_s`): each
socket operation waits at most the time left until it, so a reply that trickles in byte by byte is
cut there, however short the gaps between its bytes. A reference solution is pinned only when it parses
as Python and defines the task's entry point. When the judge is unreachable (`on_outage`): `fallback`
scores with the fallback value, `pause` waits for it to answer again, `stop` raises JudgeOutage; the
breaker's openings and closings are kept as events for the trainer to alert on.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import random
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional
from urllib.parse import urlsplit

from mlx_coach.rewards.scoring.base import Score
from mlx_coach.rewards.scoring.grading import (DIGIT_PROMPT_VERSION, GRADE_DIGIT_TEMPLATE, GRADE_SYSTEM,
                                               GRADE_TEMPLATE, PROMPT_VERSION, REFERENCE_BLOCK, SOLVE_SYSTEM,
                                               SOLVE_TEMPLATE, SOLVE_VERSION, check_reference, extract_code,
                                               parse_digit_grade, parse_grade)
from mlx_coach.rewards.scoring.judge_config import (GRADE_FIELDS, REPLY_FIELDS, JudgeConfig, judge_digest,
                                                    request_bias)

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


class _Deadline:
    """One request's overall deadline, applied to each socket operation in turn: connecting, sending
    and every read of the reply wait at most timeout_s, and never past the deadline. The reading
    thread stops itself, by its own timeouts: nothing from outside has to reach a blocked read (for a
    `Connection: close` or HTTP/1.0 reply, http.client no longer holds the socket it reads from)."""

    def __init__(self, seconds: float, timeout_s: float):
        self.seconds, self.timeout_s = seconds, timeout_s
        self._at = time.monotonic() + seconds
        self.cut = False  # the last operation was given the time left: its timeout is the deadline's

    def next_timeout(self) -> float:
        """The next operation's timeout; TimeoutError once the deadline has passed."""
        left = self._at - time.monotonic()
        self.cut = left <= self.timeout_s
        if left <= 0:
            raise TimeoutError("deadline")
        return min(left, self.timeout_s)

    def bound(self, sock) -> None:
        sock.settimeout(self.next_timeout())


class _BoundedReads(io.RawIOBase):
    """A response's bytes from `sock`, each read bounded by the deadline. It reads through the
    socket's own reader, which holds a reference: http.client closes its end of a `Connection:
    close` reply before reading the body, and the socket must stay open until the body is in."""

    def __init__(self, sock, deadline: _Deadline):
        super().__init__()
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._deadline.bound(self._sock)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _BoundedResponse(http.client.HTTPResponse):
    """http.client's response, read (status line and headers too) through _BoundedReads."""

    def __init__(self, sock, *args, deadline: _Deadline, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the unbounded reader http.client made, before anything was read through it
        self.fp = io.BufferedReader(_BoundedReads(sock, deadline))


class HttpJudge:
    """Scorer grading completions with an OpenAI-compatible chat endpoint.

    cache: a ScoreCache whose pinned "reference" namespace holds the judge's reference solution
    per task (use_reference); a private one is made when None. sleep, rng and timer are injectable
    for tests (backoff sleeps, jitter, breaker clock). config_key prefixes the field names in config
    errors. served: the model a teacher_server answers with at base_url (its spec and weights'
    fingerprint), which names the judge in place of the loopback URL.

    version: the prompt's version, the model, and a digest of every GRADE_FIELDS value, so two judges
    that could grade one text differently never share a cache key. reference_owner: the same for the
    reference solution (a digest of REPLY_FIELDS), the first part of its pinned key.
    """

    name = "http-judge"

    def __init__(self, config: JudgeConfig, cache=None, *, sleep=time.sleep, rng=None, timer=time.monotonic,
                 config_key: str = "judge", served: Optional[str] = None):
        from mlx_coach.rewards.cache import ScoreCache

        self.config = c = config.validate(config_key)
        prompt_version = DIGIT_PROMPT_VERSION if c.grade == "digit" else PROMPT_VERSION
        self.version = f"{prompt_version}:{c.model}:{judge_digest(c, GRADE_FIELDS, served)}"
        self.reference_owner = f"{self.name}:{SOLVE_VERSION}:{c.model}:{judge_digest(c, REPLY_FIELDS, served)}"
        self.cache = cache if cache is not None else ScoreCache("none")
        self._sleep, self._rng = sleep, rng or random.Random()
        self.breaker = CircuitBreaker(c.breaker_threshold, c.breaker_reset_s, timer)
        self._slots = threading.BoundedSemaphore(c.concurrency)
        self._api_key = os.environ.get(c.api_key_env) if c.api_key_env else None
        u = urlsplit(c.base_url)
        self._conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = u.hostname, u.port or self._conn_cls.default_port
        self._tls = ssl.create_default_context() if u.scheme == "https" else None
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

        key = reference_key(self.reference_owner, task)
        with self._lock:
            lock = self._ref_locks.setdefault(key, threading.Lock())
        with lock:  # one request per task, even with concurrent score_batch calls
            code = self.cache.get(key, "reference")
            if isinstance(code, str):
                return code
            try:
                code = extract_code(self._chat(SOLVE_SYSTEM, SOLVE_TEMPLATE.format(prompt=task.prompt.rstrip("\n"))))
            except _Failure as f:
                return f
            try:
                check_reference(code, task)  # never pin a failure: the namespace is never evicted
            except ValueError as e:
                return _Failure("parse_error", str(e), retryable=False)
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
            request["logit_bias"] = request_bias(c.logit_bias)
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

    def _connect(self, deadline: _Deadline):
        """A socket connected to the judge, TLS set up for https, each step within the deadline."""
        sock = socket.create_connection((self._host, self._port), timeout=deadline.next_timeout())
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as http.client does: no Nagle delay
            if self._tls is not None:
                deadline.bound(sock)
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _backoff(self, attempt: int) -> float:
        """Equal jitter: half of the capped exponential delay, plus up to the other half at random."""
        d = min(self.config.max_backoff_s, self.config.backoff_s * 2**attempt)
        return d / 2 + self._rng.uniform(0, d / 2)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        deadline = _Deadline(self.config.request_deadline_s(), self.config.timeout_s)
        conn = self._conn_cls(self._host, self._port)
        conn.response_class = functools.partial(_BoundedResponse, deadline=deadline)
        try:
            conn.sock = self._connect(deadline)
            deadline.bound(conn.sock)  # the request is sent whole (one sendall) within the time left
            conn.request("POST", self._path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError as e:  # socket.timeout is TimeoutError
            if deadline.cut:
                raise _Failure("timeout", f"no complete reply within the {deadline.seconds} s deadline") from None
            raise _Failure("timeout", f"timed out after {self.config.timeout_s} s: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Failure("transport_error", f"{type(e).__name__}: {e}") from None
        finally:
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
