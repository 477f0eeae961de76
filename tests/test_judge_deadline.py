"""The http-judge's deadline bounds the wall time of a request (issue 28, item 4).

Against a real loopback server that trickles its reply one byte every 0.3 s, a trickle far longer than
the deadline (at least 30 s), a request ends soon after `deadline_s`: whichever part of the reply
trickles (status line and headers, or the body), however short the gaps between bytes, so no single
read ever reaches `timeout_s`. The bounds are failure bounds: a request cut at its deadline returns
within DEADLINE_S + MARGIN_S on any machine, and one that waits for the trickle to end takes 30 s or
more. The server's threads are released by an event at each test's end.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_teacher import chat_reply, completion, judge, task

from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.http_judge import HttpJudge
from mlx_coach.rewards.scoring.judge_config import JudgeConfig

TRICKLE_S = 0.3  # between two bytes of a trickling reply
TRICKLE_TOTAL_S = 30.0  # a trickling reply lasts at least this long
DEADLINE_S = 2.0
MARGIN_S = 4.0  # a failure bound: far above what a cut request needs, far below TRICKLE_TOTAL_S


def reply_bytes(content, trickled):
    """A whole HTTP reply; the JSON body is padded with spaces so that the part that trickles lasts
    at least TRICKLE_TOTAL_S."""
    body = json.dumps(chat_reply(content)).encode()
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n"
    need = int(TRICKLE_TOTAL_S / TRICKLE_S) + 1
    if trickled == "body":
        body += b" " * max(0, need - len(body))
    else:
        body += b" " * max(0, need - len(head) - len(body))
    return head.format(len(body)).encode(), body


class TricklingServer:
    """Loopback HTTP server answering each request by the next of `parts` (then "none"): which part of
    its reply trickles, "head" (from the status line on), "body" (after the headers) or "none" (the
    whole reply at once); "silent": no byte before the test sets `released`. A trickle stops when the
    client hangs up or the test sets `released`."""

    def __init__(self, parts):
        self.parts, self.requests, self.lock = list(parts), 0, threading.Lock()
        self.released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.requests += 1
                    part = outer.parts.pop(0) if outer.parts else "none"
                if part == "silent":
                    outer.released.wait(TRICKLE_TOTAL_S)
                    return
                head, body = reply_bytes("SCORE: 7/10", part)
                at_once, trickled = {"head": (b"", head + body), "body": (head, body), "none": (head + body, b"")}[part]
                assert len(trickled) * TRICKLE_S >= TRICKLE_TOTAL_S or not trickled
                self.close_connection = True
                try:
                    self.wfile.write(at_once)
                    self.wfile.flush()
                    for i in range(len(trickled)):
                        if outer.released.wait(TRICKLE_S):
                            return
                        self.wfile.write(trickled[i:i + 1])
                        self.wfile.flush()
                except OSError:  # the client hung up: the judge gave up on the reply
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def trickling():
    servers = []

    def make(parts):
        servers.append(TricklingServer(parts))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def timed_score(j):
    t0 = time.monotonic()
    [score] = j.score_batch([(task(), completion(7))])
    return score, time.monotonic() - t0


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_trickling_reply_is_cut_at_the_deadline(trickling, part):
    s = trickling([part])
    # no single read waits anywhere near timeout_s: only the whole-request deadline can end this reply early
    j = judge(s.url, timeout_s=10.0, deadline_s=DEADLINE_S)
    score, took = timed_score(j)
    assert score.status == "timeout" and score.fallback and not score.cacheable
    assert f"within the {DEADLINE_S} s deadline" in score.error
    assert DEADLINE_S <= took < DEADLINE_S + MARGIN_S  # not before the deadline, and not at the trickle's end
    # the deadline belongs to the request, not to the judge: the next request, answered at once, is graded
    again, _ = timed_score(j)
    assert (again.status, again.value) == ("ok", 0.7) and s.requests == 2


def test_each_attempt_has_a_deadline_of_its_own(trickling):
    s = trickling(["body", "body"])
    j = judge(s.url, timeout_s=10.0, deadline_s=DEADLINE_S, max_retries=1)
    score, took = timed_score(j)
    assert score.status == "timeout" and "deadline" in score.error and s.requests == 2
    assert j.stats()["teacher/retries"] == 1 and len(j.sleeps) == 1  # the backoff sleep is injected: no wait
    assert 2 * DEADLINE_S <= took < 2 * DEADLINE_S + MARGIN_S


def test_the_default_deadline_follows_timeout_s(trickling):
    s = trickling(["body"])
    cfg = JudgeConfig(base_url=s.url, model="m", timeout_s=1.0, max_retries=0)
    assert cfg.deadline_s is None and cfg.request_deadline_s() == 2.0
    assert JudgeConfig(timeout_s=1.0, deadline_s=7.0).request_deadline_s() == 7.0  # set: kept as it is
    score, took = timed_score(HttpJudge(cfg))
    assert score.status == "timeout" and "within the 2.0 s deadline" in score.error
    assert 2.0 <= took < 2.0 + MARGIN_S


def test_timeout_s_still_bounds_one_silent_wait(trickling):
    """A judge silent for longer than timeout_s is a timeout of timeout_s, long before the deadline."""
    s = trickling(["silent"])
    j = judge(s.url, timeout_s=0.5, deadline_s=TRICKLE_TOTAL_S)
    score, took = timed_score(j)
    assert score.status == "timeout" and "timed out after 0.5 s" in score.error
    assert took < MARGIN_S  # the server stays silent for TRICKLE_TOTAL_S


def test_a_deadline_that_is_not_a_positive_number_is_refused():
    for bad in (0, -1.0, "soon"):
        with pytest.raises(UserError, match="judge.deadline_s"):
            HttpJudge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", deadline_s=bad))
