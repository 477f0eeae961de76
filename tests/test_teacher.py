import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mlx_coach.rewards.cache import ScoreCache, reference_key
from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.base import Score
from mlx_coach.rewards.scoring.cached import CachedScorer
from mlx_coach.rewards.scoring.grading import SOLVE_VERSION, parse_grade
from mlx_coach.rewards.scoring.http_judge import HttpJudge
from mlx_coach.rewards.scoring.judge_config import JudgeConfig
from mlx_coach.rewards.scoring.local_teacher import LocalTeacher
from mlx_coach.data.task import Task
from waiting import GRACE_S, HOLD_S, wait_until


class Clock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def task(i=0):
    return Task(f"T/{i}", f"def inc{i}(x):\n    \"\"\"Return x + 1.\"\"\"\n", f"inc{i}", "def check(f):\n    assert f(1) == 2\n")


def completion(grade, tag=""):
    """A completion the scripted server grades `grade`/10 (it reads the marker back)."""
    return f"    return x + 1  # grade={grade} {tag}\n"


# --- a scripted OpenAI-compatible server -------------------------------------------------------


def chat_reply(content):
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


def grade_from(request):
    """The default behaviour: solve requests get a reference solution, grade requests the grade
    marked in the completion."""
    user = request["messages"][-1]["content"]
    if "expert Python programmer" in request["messages"][0]["content"]:
        name = re.search(r"def (\w+)", user).group(1)
        return ("reply", f"Here it is:\n```python\ndef {name}(x):\n    return x + 1\n```\n")
    m = re.search(r"# grade=(\d+)", user)
    return ("reply", f"The code adds one.\nSCORE: {m.group(1) if m else 0}/10")


class ScriptedServer:
    """Loopback server. `script` is a list of actions consumed one per request (then `default`):
    ("reply", content) | ("status", code) | ("raw", bytes) | ("json", obj) | ("drop",) |
    ("hold", event, action): no answer until the test sets `event` (or HOLD_S passes), then `action` |
    ("trickle", seconds per byte, content[, event set once the reply has begun]) | None (= default(request)).
    `in_flight` counts requests not yet answered; wait_in_flight waits for it to reach a number."""

    def __init__(self, script=(), default=grade_from, port=0):
        self.script, self.default = list(script), default
        self.requests, self.lock = [], threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    action = outer.script.pop(0) if outer.script else None
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    outer.changed.notify_all()
                self.counted = True
                try:
                    self.act(action or outer.default(body), body)
                finally:
                    self.leave()

            def leave(self):
                # before the reply is written: the client sends its next request only after a reply, so
                # a count taken after writing would overlap the next request's (seen under CPU load)
                with outer.lock:
                    if self.counted:
                        outer.in_flight -= 1
                        self.counted = False
                        outer.changed.notify_all()

            def act(self, action, body):
                kind = action[0]
                if kind == "hold":
                    action[1].wait(HOLD_S)
                    return self.act(action[2] or outer.default(body), body)
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, data = 200, None
                if kind == "reply":
                    data = json.dumps(chat_reply(action[1])).encode()
                elif kind == "json":
                    data = json.dumps(action[1]).encode()
                elif kind == "raw":
                    data = action[1]
                elif kind == "status":
                    status, data = action[1], b'{"error": "scripted"}'
                elif kind == "trickle":  # ("trickle", seconds per byte, content): a reply that never stalls long
                    data = json.dumps(chat_reply(action[2])).encode()
                self.leave()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if kind == "trickle":
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            if len(action) > 3:
                                action[3].set()
                            time.sleep(action[1])
                    else:
                        self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_in_flight(self, n, timeout):
        """True once `n` requests are in flight at once, False if that has not happened within `timeout` s."""
        with self.changed:
            return self.changed.wait_for(lambda: self.in_flight >= n, timeout)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, kind):
        solve = [r for r in self.requests if "expert Python programmer" in r["body"]["messages"][0]["content"]]
        return len(solve) if kind == "solve" else len(self.requests) - len(solve)


@pytest.fixture
def server():
    servers = []

    def make(*args, **kwargs):
        s = ScriptedServer(*args, **kwargs)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def judge(url, cache=None, timer=None, **overrides):
    cfg = JudgeConfig(base_url=url, model="m", timeout_s=5.0, max_retries=0, backoff_s=0.5, max_backoff_s=0.8,
                      concurrency=2, breaker_threshold=100, breaker_reset_s=10.0, fallback=0.25)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    sleeps = Sleeps()
    j = HttpJudge(cfg, cache, sleep=sleeps, rng=random.Random(0), timer=timer or Clock())
    j.sleeps = sleeps
    return j


# --- parsing -------------------------------------------------------------------------------------

GOOD = [("SCORE: 7/10", 0.7), ("SCORE:0/10", 0.0), ("Looks right.\n\nSCORE: 10/10\n", 1.0),
        ("  SCORE:  3 / 10  ", 0.3)]
BAD = ["SCORE: 11/10", "SCORE: 7/10\nSCORE: 8/10", "score: 7/10", "SCORE: 7.5/10", "SCORE: 7/10 because",
       "I'd give it 7/10", "", "**SCORE: 7/10**", "SCORE: 7/10\nThanks", '{"score": 0.7}', "SCORE: -1/10",
       "SCORE: 7/100", "The score: high\nSCORE: 9/10"]


@pytest.mark.parametrize("text,value", GOOD)
def test_parse_grade_accepts(text, value):
    assert parse_grade(text) == pytest.approx(value)


@pytest.mark.parametrize("text", BAD)
def test_parse_grade_rejects(text):
    with pytest.raises(ValueError):
        parse_grade(text)


def test_bad_config_is_a_user_error(monkeypatch):
    with pytest.raises(UserError, match="judge.base_url"):
        HttpJudge(JudgeConfig(base_url="127.0.0.1:80"))
    url = "http://127.0.0.1:9/v1"
    with pytest.raises(UserError, match="judge.model"):
        HttpJudge(JudgeConfig(base_url=url))
    with pytest.raises(UserError, match="judge.concurrency"):
        HttpJudge(JudgeConfig(base_url=url, model="m", concurrency=0))
    with pytest.raises(UserError, match=r"'rewards\[1\]\.fallback'"):
        HttpJudge(JudgeConfig(base_url=url, model="m", fallback=2.0), config_key="rewards[1]")
    monkeypatch.delenv("MLX_COACH_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="judge.api_key_env"):
        HttpJudge(JudgeConfig(base_url=url, model="m", api_key_env="MLX_COACH_TEST_KEY"))


# --- the judge against the scripted server -----------------------------------------------------------


def test_grades_come_back_in_order_with_the_api_key(server, monkeypatch):
    s = server()
    monkeypatch.setenv("MLX_COACH_TEST_KEY", "sekrit")
    j = judge(s.url, api_key_env="MLX_COACH_TEST_KEY", concurrency=4)
    scores = j.score_batch([(task(i), completion(g)) for i, g in enumerate([3, 10, 0, 7, 5])])
    assert [sc.value for sc in scores] == [0.3, 1.0, 0.0, 0.7, 0.5]
    assert all(sc.status == "ok" and sc.cacheable and not sc.fallback for sc in scores)
    assert {r["path"] for r in s.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in s.requests} == {"Bearer sekrit"}
    body = s.requests[0]["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("m", 0.0, 256)
    st = j.stats()
    assert (st["teacher/requests"], st["teacher/errors"], st["teacher/retries"], st["teacher/circuit_open"]) == (5, 0, 0, 0)
    assert st["teacher/latency_s"] > 0


def test_timeout(server):
    answer = threading.Event()
    s = server([("hold", answer, None)] * 2)  # both attempts: no reply until the judge has given up on them
    j = judge(s.url, timeout_s=0.2, max_retries=1)
    try:
        (sc,) = j.score_batch([(task(), completion(9))])
    finally:
        answer.set()
    # a judge that waited for the reply would get it only after HOLD_S, graded "ok" 0.9
    assert (sc.status, sc.value, sc.fallback, sc.cacheable) == ("timeout", 0.25, True, False)
    st = j.stats()
    assert (st["teacher/requests"], st["teacher/retries"], st["teacher/errors/timeout"]) == (2, 1, 1)
    assert len(j.sleeps) == 1


def test_http_500s_then_success_backs_off(server):
    s = server([("status", 500), ("status", 503)])
    j = judge(s.url, max_retries=2)
    (sc,) = j.score_batch([(task(), completion(8))])
    assert (sc.status, sc.value) == ("ok", 0.8)
    assert len(j.sleeps) == 2
    assert 0.25 <= j.sleeps[0] <= 0.5  # equal jitter of 0.5 s
    assert 0.4 <= j.sleeps[1] <= 0.8  # 1.0 s capped at max_backoff_s = 0.8
    st = j.stats()
    assert (st["teacher/requests"], st["teacher/retries"], st["teacher/errors"]) == (3, 2, 0)


def test_retries_are_bounded(server):
    s = server([("status", 500)] * 10)
    j = judge(s.url, max_retries=3)
    (sc,) = j.score_batch([(task(), completion(8))])
    assert (sc.status, sc.fallback, sc.cacheable) == ("transport_error", True, False)
    assert "HTTP 500" in sc.error and len(s.requests) == 4 and len(j.sleeps) == 3


def test_client_errors_are_not_retried(server):
    s = server([("status", 404)])
    j = judge(s.url, max_retries=3)
    (sc,) = j.score_batch([(task(), completion(8))])
    assert sc.status == "transport_error" and len(s.requests) == 1 and not j.sleeps


@pytest.mark.parametrize("action", [
    ("raw", b"{not json"),
    ("json", {"choices": []}),
    ("json", {"choices": [{"message": {}}]}),
    ("json", {"error": "no choices"}),
    ("json", {"choices": [{"message": {"content": None}}]}),
    ("drop",),
], ids=["malformed-json", "no-choices", "no-content", "no-choices-key", "null-content", "dropped-connection"])
def test_broken_replies_are_transport_errors_and_retried(server, action):
    s = server([action, action])
    j = judge(s.url, max_retries=2)
    (sc,) = j.score_batch([(task(), completion(6))])
    assert (sc.status, sc.value) == ("ok", 0.6)  # the third attempt got a real reply
    st = j.stats()
    assert (st["teacher/requests"], st["teacher/retries"], st["teacher/errors"]) == (3, 2, 0)
    s.script = [action]
    j2 = judge(s.url, max_retries=0)
    (sc,) = j2.score_batch([(task(), completion(6))])
    assert (sc.status, sc.fallback, sc.cacheable) == ("transport_error", True, False)
    assert j2.stats()["teacher/errors/transport_error"] == 1


def test_unparseable_grade_is_a_parse_error_and_not_retried(server):
    s = server([("reply", "I think it is fine, 8 out of 10.")])
    j = judge(s.url, max_retries=3)
    (sc,) = j.score_batch([(task(), completion(6))])
    assert (sc.status, sc.value, sc.fallback, sc.cacheable) == ("parse_error", 0.25, True, False)
    assert len(s.requests) == 1 and j.stats()["teacher/errors/parse_error"] == 1
    assert j.stats()["teacher/circuit_open"] == 0  # the endpoint works; the answer was bad


def test_circuit_breaker_opens_then_recovers_half_open(server):
    clock = Clock()
    s = server([("status", 500)] * 3)
    j = judge(s.url, timer=clock, concurrency=1, breaker_threshold=3, breaker_reset_s=10.0)
    scores = j.score_batch([(task(i), completion(7)) for i in range(6)])
    assert [sc.status for sc in scores] == ["transport_error"] * 3 + ["circuit_open"] * 3
    assert all(sc.fallback and not sc.cacheable and sc.value == 0.25 for sc in scores)
    assert len(s.requests) == 3  # no request while open
    st = j.stats()
    assert (st["teacher/circuit_open"], st["teacher/errors"], st["teacher/errors/circuit_open"]) == (1, 6, 3)

    clock.advance(9.9)
    assert j.score_batch([(task(), completion(7))])[0].status == "circuit_open"
    clock.advance(0.1)  # half-open: the one trial fails, the circuit opens again
    s.script = [("status", 500)]
    assert [sc.status for sc in j.score_batch([(task(), completion(7))] * 2)] == ["transport_error", "circuit_open"]
    assert len(s.requests) == 4 and j.stats()["teacher/circuit_open"] == 1

    clock.advance(10.0)  # half-open again: the trial succeeds and closes the circuit
    scores = j.score_batch([(task(i), completion(i)) for i in range(4)])
    assert [sc.status for sc in scores] == ["ok"] * 4 and [sc.value for sc in scores] == [0.0, 0.1, 0.2, 0.3]
    assert j.stats()["teacher/circuit_open"] == 0


def test_half_open_allows_a_single_trial(server):
    clock = Clock()
    trial_answer = threading.Event()
    s = server([("status", 500), ("hold", trial_answer, None), ("hold", trial_answer, None)])
    j = judge(s.url, timer=clock, concurrency=2, breaker_threshold=1, breaker_reset_s=10.0, timeout_s=2 * HOLD_S)
    assert j.score_batch([(task(), completion(1))])[0].status == "transport_error"
    clock.advance(10.0)
    scores = []
    scoring = threading.Thread(target=lambda: scores.extend(j.score_batch([(task(), completion(2)),
                                                                           (task(), completion(3))])))
    scoring.start()
    try:  # the trial is held unanswered until the other sample has been turned away (or sent a second request)
        wait_until(lambda: j.stats()["teacher/errors/circuit_open"] == 1 or len(s.requests) == 3)
    finally:
        trial_answer.set()
        scoring.join(HOLD_S)
    assert sorted(sc.status for sc in scores) == ["circuit_open", "ok"]  # the other waited on the trial
    assert len(s.requests) == 2 and j.stats()["teacher/circuit_open"] == 0


def test_concurrency_limit_is_respected(server):
    """concurrency bounds the judge's requests in flight, across concurrent score_batch calls too: the
    server answers nothing until it has seen the judge fill its three slots and looked for a fourth."""
    answer = threading.Event()
    s = server([("hold", answer, None)] * 12)
    j = judge(s.url, concurrency=3, timeout_s=2 * HOLD_S)  # a held request is never given up on
    batches = [[(task(i), completion(i % 11)) for i in range(k, 12, 2)] for k in (0, 1)]
    scores = [None, None]
    callers = [threading.Thread(target=lambda k=k: scores.__setitem__(k, j.score_batch(batches[k]))) for k in (0, 1)]
    for t in callers:
        t.start()
    try:
        assert s.wait_in_flight(3, HOLD_S)  # three at once: the limit is used...
        assert not s.wait_in_flight(4, GRACE_S)  # ...and not passed, though two batches want six
    finally:
        answer.set()
        for t in callers:
            t.join(HOLD_S)
    assert [[sc.value for sc in batch] for batch in scores] == [[(i % 11) / 10 for i in range(k, 12, 2)]
                                                                 for k in (0, 1)]
    assert s.max_in_flight == 3 and len(s.requests) == 12


def test_reference_solution_is_requested_once_per_task_and_pinned(server):
    s = server()
    cache = ScoreCache("lru", maxsize=2)
    j = judge(s.url, cache, use_reference=True, concurrency=3)
    for rnd in range(3):
        items = [(task(t), completion(g, f"r{rnd}")) for t in range(2) for g in (2, 5, 9)]
        assert [sc.value for sc in j.score_batch(items)] == [0.2, 0.5, 0.9] * 2
        for i in range(5):
            cache.put(("flood", str(rnd), "t", str(i)), Score(1.0, "passed"))
    assert s.count("solve") == 2 and s.count("grade") == 18
    assert j.stats()["teacher/references"] == 2
    key = reference_key(j.reference_owner, task(1))
    assert j.reference_owner.startswith(f"http-judge:{SOLVE_VERSION}:m:")
    assert cache.get(key, "reference") == "def inc1(x):\n    return x + 1"
    assert cache.stats()["reference"]["size"] == 2 and cache.stats()["student"]["evictions"] > 0
    grade_prompt = [r for r in s.requests if "# grade=" in r["body"]["messages"][-1]["content"]][-1]
    assert "A reference solution" in grade_prompt["body"]["messages"][-1]["content"]
    assert j.version != judge(s.url).version and ":m:" in j.version  # another judge: other keys


def test_reference_failure_fails_the_samples_and_is_not_pinned(server):
    s = server([("status", 500)])
    cache = ScoreCache("lru")
    j = judge(s.url, cache, use_reference=True, concurrency=1)
    scores = j.score_batch([(task(), completion(4)), (task(), completion(6))])
    assert [sc.status for sc in scores] == ["transport_error"] * 2 and "reference" in scores[0].error
    assert cache.size("reference") == 0
    assert [sc.value for sc in j.score_batch([(task(), completion(4))])] == [0.4]
    assert s.count("solve") == 2 and cache.size("reference") == 1


def test_nothing_false_is_cached(server):
    script = [None, ("status", 500), ("reply", "no idea"), None, ("drop",), ("raw", b"[")]
    s = server(script)
    cache = ScoreCache("lru")
    cs = CachedScorer(judge(s.url, concurrency=1), cache)
    items = [(task(i), completion(i)) for i in range(6)]
    first = cs.score_batch(items)
    assert [sc.status for sc, _ in first] == ["ok", "transport_error", "parse_error", "ok", "transport_error",
                                              "transport_error"]
    assert cache.size() == 2 and cache.stats()["student"]["rejected"] == 4
    second = cs.score_batch(items)
    assert [p for _, p in second] == ["cached", "fresh", "fresh", "cached", "fresh", "fresh"]
    assert [sc.value for sc, _ in second] == [i / 10 for i in range(6)]
    assert cache.size() == 6 and len(s.requests) == 10


def test_server_stopped_mid_sequence_then_back(server):
    clock = Clock()
    s = server()
    j = judge(s.url, timer=clock, concurrency=1, breaker_threshold=3, breaker_reset_s=5.0)
    assert [sc.value for sc in j.score_batch([(task(i), completion(i)) for i in range(3)])] == [0.0, 0.1, 0.2]
    port = s.port
    s.stop()
    scores = j.score_batch([(task(i), completion(i)) for i in range(5)])
    assert [sc.status for sc in scores] == ["transport_error"] * 3 + ["circuit_open"] * 2
    assert "ConnectionRefused" in scores[0].error
    st = j.stats()
    assert (st["teacher/errors/transport_error"], st["teacher/circuit_open"]) == (3, 1)
    s2 = server(port=port)  # back on the same port
    clock.advance(5.0)
    assert [sc.value for sc in j.score_batch([(task(i), completion(i)) for i in range(3)])] == [0.0, 0.1, 0.2]
    assert j.stats()["teacher/circuit_open"] == 0 and len(s2.requests) == 3


# --- mlx-lm's own server with the builtin tiny model (its answers are noise) --------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from mlx_coach.models.builtin_tiny import save_builtin_tiny

    return save_builtin_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def test_mlx_lm_server_noise_is_a_parse_error(tiny_folder, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(tiny_folder),
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, open(tmp_path / "server.log").read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlx_lm.server did not become ready in 60 s"
            time.sleep(0.2)
        cache = ScoreCache("lru")
        j = judge(f"http://127.0.0.1:{port}/v1", model="default_model", max_tokens=24, timeout_s=60.0)
        cs = CachedScorer(j, cache)
        out = cs.score_batch([(task(0), completion(7)), (task(1), completion(3))])
        assert [(sc.status, sc.value, sc.fallback, sc.cacheable, p) for sc, p in out] == \
            [("parse_error", 0.25, True, False, "fresh")] * 2
        st = j.stats()
        assert (st["teacher/requests"], st["teacher/errors"], st["teacher/errors/parse_error"]) == (2, 2, 2)
        assert cache.size() == 0 and cache.stats()["student"]["rejected"] == 2
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# --- the local MLX teacher --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tiny_folder):
    from mlx_coach.models.loader import load_policy

    model, tokenizer, _ = load_policy(str(tiny_folder))
    return model, tokenizer


def greedy_ascii(model, tokenizer, prompt, n):
    """The teacher's own greedy continuation, restricted to printable ASCII so that it decodes
    to text that tokenizes back to the same bytes."""
    import mlx.core as mx

    ids = list(tokenizer.encode(prompt))
    allowed = mx.array([32 <= b < 127 for b in range(model.args.vocab_size)])
    out = []
    for _ in range(n):
        logits = model(mx.array([ids + out]))[0, -1]
        out.append(int(mx.argmax(mx.where(allowed, logits, -1e9)).item()))
    return bytes(out).decode("ascii")


def test_local_teacher_prefers_its_own_greedy_text_over_random_bytes(tiny_teacher):
    model, tokenizer = tiny_teacher
    teacher = LocalTeacher(model, tokenizer, model_id="tiny", low=-8.0, high=0.0, batch_size=4)
    rng = random.Random(0)
    items = []
    for i in range(3):
        t = task(i)
        items.append((t, greedy_ascii(model, tokenizer, t.prompt, 12)))
        items.append((t, "".join(chr(rng.randrange(32, 127)) for _ in range(12))))
    scores = teacher.score_batch(items)
    means = teacher.mean_logprobs(items)
    for i in range(3):
        assert means[2 * i] > means[2 * i + 1] + 0.5, means
        assert scores[2 * i].value > scores[2 * i + 1].value
    assert all(sc.status == "ok" and sc.cacheable and 0.0 <= sc.value <= 1.0 for sc in scores)
    assert teacher.name == "local-teacher" and "tiny" in teacher.version


def test_local_teacher_batched_equals_unbatched(tiny_teacher, tiny_folder):
    model, tokenizer = tiny_teacher
    items = [(task(i % 3), "    return x + 1\n" * (1 + i % 4) + "#" * i) for i in range(7)] + [(task(0), "")]
    batched = LocalTeacher(model, tokenizer, batch_size=8).mean_logprobs(items)
    single = LocalTeacher(model, tokenizer, batch_size=1).mean_logprobs(items)
    assert batched[-1] is None and single[-1] is None
    assert batched[:-1] == pytest.approx(single[:-1], abs=1e-4)
    loaded = LocalTeacher.from_spec(str(tiny_folder), batch_size=3)
    assert loaded.mean_logprobs(items[:4]) == pytest.approx(batched[:4], abs=1e-4)
    assert str(tiny_folder) in loaded.version
    sc = LocalTeacher(model, tokenizer).score_batch(items[-1:])[0]
    assert (sc.value, sc.status, sc.error) == (0.0, "ok", "empty completion")


def test_local_teacher_normalisation_and_config(tiny_teacher):
    model, tokenizer = tiny_teacher
    items = [(task(), "    return x + 1\n")]
    (m,) = LocalTeacher(model, tokenizer).mean_logprobs(items)
    assert LocalTeacher(model, tokenizer, low=m - 1, high=m + 1).score_batch(items)[0].value == pytest.approx(0.5, abs=1e-4)
    assert LocalTeacher(model, tokenizer, low=m + 1, high=m + 2).score_batch(items)[0].value == 0.0
    assert LocalTeacher(model, tokenizer, low=m - 2, high=m - 1).score_batch(items)[0].value == 1.0
    with pytest.raises(UserError, match="teacher.low"):
        LocalTeacher(model, tokenizer, low=0.0, high=-1.0)
