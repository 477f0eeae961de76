"""A local teacher for the http-judge: `mlx_lm.server` on a free loopback port, started and stopped
by the run that uses it (the `teacher_server:` config section).

`serve(cfg)` is a context manager around a run: when `teacher_server.model` is set it converts the
model to an HF folder if needed (builtin:tiny, builtin:smollm2, a .gguf), starts
`python -m mlx_coach.rewards.teacher_server` (mlx_lm's server under a watchdog) in its own session, waits
until GET /health answers 200, and stops it on the way out, error or not. Every http-judge reward
whose `base_url` is null then asks that server (`point_at_served`), with `model: default_model`
(the server's loaded model) unless one is named, and, for `grade: digit`, a logit_bias of +100 on
the served tokenizer's ten digit tokens unless one is given, so that every reply starts with a digit.
Such a judge is named in its cache keys by the served model's spec and the fingerprint of its
weights (`Served.identity`), not by its loopback URL, whose port changes from run to run.

The server runs in its own session so that a Ctrl-C at the terminal reaches only the trainer, which
finishes its step (with the judge still answering) and checkpoints. Its watchdog ends it when the
process that started it goes away, even by SIGKILL, so no server outlives its run.

On several ranks one server serves them all: rank 0 alone starts it, on the address the other ranks
reach rank 0 at (`runtime.distributed.main_host`), and hands its url, digit bias and identity to
every rank through a collective; each rank then checks that it can reach /health, and a failure on any
rank (rank 0's start included) is the same one-line error on every rank, so none waits for a server
that is not coming.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Optional

from mlx_coach.core.errors import UserError
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.models.base_identity import fingerprint
from mlx_coach.runtime.distributed import main_host, outside_group_env, world
from mlx_coach.runtime.watchdog import watch_parent

DIGIT_BIAS = 100.0


@dataclass
class TeacherServerConfig:
    """The `teacher_server:` config section."""

    model: Optional[str] = setting(None, help="model the judge server loads: builtin:tiny[@SEED], builtin:smollm2, "
                                              "an HF folder or a .gguf; null = no server")
    startup_timeout_s: float = setting(120.0, lo=0.0, lo_open=True, help="wait this long for /health to answer")
    decode_concurrency: int = setting(32, lo=1, help="requests the server decodes in one batch")

    def __post_init__(self):
        check_fields(self, "teacher_server")


@dataclass
class Served:
    url: str  # base_url for the judge: http://HOST:PORT/v1
    digit_bias: dict  # token id (str) -> DIGIT_BIAS for the served tokenizer's digits 0-9
    identity: str  # the served model: its spec and the fingerprint of its folder's weights, "SPEC@FINGERPRINT"
    process: subprocess.Popen | None = dataclasses.field(repr=False)  # None on ranks other than 0


_LIVE: dict = {}  # id(TeacherServerConfig) -> Served, while its serve() is open


def free_port(host="127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def digit_token_ids(tokenizer) -> list:
    """The token id of each digit 0..9 as the tokenizer writes it alone; UserError if one is not a
    single token (such a judge cannot be restricted to digits by logit_bias)."""
    ids = []
    for d in "0123456789":
        enc = [t for t in tokenizer.encode(d, add_special_tokens=False)]
        if len(enc) != 1:
            raise UserError(f"teacher_server.model: the digit {d!r} is {len(enc)} tokens in its tokenizer; "
                            f"grade: digit needs one token per digit")
        ids.append(enc[0])
    return ids


def _model_folder(spec):
    from mlx_coach.models.loader import load_policy

    _, tokenizer, info = load_policy(spec, dtype=None)
    return info["path"], tokenizer


def _healthy(port, timeout=2.0, host="127.0.0.1") -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _tail(path, n=400):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def start(tc: TeacherServerConfig, host="127.0.0.1") -> Served:
    """Start the server for tc.model on host and wait until it answers; UserError (one line) if it does not."""
    folder, tokenizer = _model_folder(tc.model)
    bias = {str(i): DIGIT_BIAS for i in digit_token_ids(tokenizer)}
    identity = f"{tc.model}@{fingerprint(folder)}"
    port = free_port(host)
    log = tempfile.NamedTemporaryFile(prefix="mlx-coach-teacher-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "mlx_coach.rewards.teacher_server", str(os.getpid()), "--model", folder,
           "--host", host, "--port", str(port), "--log-level", "WARNING",
           "--decode-concurrency", str(tc.decode_concurrency)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=outside_group_env(os.environ))
    log.close()
    deadline = time.monotonic() + tc.startup_timeout_s
    try:
        while not _healthy(port, host=host):
            if proc.poll() is not None:
                raise UserError(f"teacher_server.model: the judge server for {tc.model!r} exited with code "
                                f"{proc.returncode} ({_tail(log.name)})")
            if time.monotonic() > deadline:
                raise UserError(f"teacher_server.startup_timeout_s: the judge server for {tc.model!r} did not "
                                f"answer within {tc.startup_timeout_s} s ({_tail(log.name)})")
            time.sleep(0.2)
    except BaseException:
        stop(proc)
        os.unlink(log.name)
        raise
    os.unlink(log.name)  # the open descriptor keeps the server's output going nowhere visible
    return Served(f"http://{host}:{port}/v1", bias, identity, proc)


def start_shared(tc: TeacherServerConfig, world_) -> Served:
    """The run's one server: started by rank 0 and handed to every rank (module docstring). A start that
    fails on rank 0, or a server some rank cannot reach, raises the same UserError on every rank."""
    if world_.size == 1:
        return start(tc)
    served, failure, message = None, None, []
    if world_.is_main:
        try:
            served = start(tc, host=main_host())
            message = [json.dumps({"url": served.url, "digit_bias": served.digit_bias, "identity": served.identity})]
        except BaseException as e:  # noqa: BLE001 - the others wait for the address: tell them, then raise
            failure = e
            message = [json.dumps({"error": str(e) if isinstance(e, UserError) else
                                   f"teacher_server.model: rank 0 could not start the judge server for {tc.model!r}"})]
    handed = json.loads(world_.gather_bytes([m.encode() for m in message])[0][0])
    if failure is not None:
        raise failure
    if "error" in handed:
        raise UserError(handed["error"])
    served = served or Served(handed["url"], handed["digit_bias"], handed["identity"], None)
    where = urllib.parse.urlsplit(served.url)
    reached = world_.all_min(float(_healthy(where.port, host=where.hostname)))
    if reached < 1.0:
        if served.process is not None:
            stop(served.process)
        raise UserError(f"teacher_server: a rank cannot reach the judge server rank 0 started at {served.url} "
                        f"(rank 0's address from the launcher's hostfile; check the firewall between the hosts)")
    return served


def stop(proc, grace_s=10.0):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve(cfg):
    """The run's judge server, when cfg.teacher_server.model is set (else nothing); stopped on exit."""
    tc = cfg.teacher_server
    if tc.model is None:
        yield None
        return
    served = start_shared(tc, world())
    _LIVE[id(tc)] = served
    try:
        yield served
    finally:
        _LIVE.pop(id(tc), None)
        if served.process is not None:  # rank 0's, which alone started it
            stop(served.process)


def point_at_served(r, cfg, key):
    """(config, served) for an http-judge reward: when its base_url is null, the config aimed at the
    running teacher_server and that server's `identity` (HttpJudge's `served`); else (r, None)."""
    if r.base_url is not None:
        return r, None
    served = _LIVE.get(id(cfg.teacher_server))
    if served is None:
        raise UserError(f"config key '{key}.base_url' is null and no teacher_server is running "
                        f"(set teacher_server.model, or a base_url)")
    bias = r.logit_bias if r.logit_bias is not None else (served.digit_bias if r.grade == "digit" else None)
    aimed = dataclasses.replace(r, base_url=served.url, model=r.model or "default_model", logit_bias=bias)
    return aimed, served.identity


if __name__ == "__main__":  # python -m mlx_coach.rewards.teacher_server PARENT_PID SERVER_ARGS...
    watch_parent(int(sys.argv[1]), lambda: os._exit(0))  # the server holds nothing worth a clean exit
    from mlx_lm import server

    sys.argv = ["mlx_lm.server", *sys.argv[2:]]
    server.main()
