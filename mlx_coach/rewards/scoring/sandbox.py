"""Run one completion against its task's tests in a sandbox (the "tests" scorer is sandbox_scorer.py).

Each sample is one interpreter, `_launch.py`, that forks into two processes (protocol in
docs/ARCHITECTURE.md): a worker that runs prompt + completion and answers calls, and a judge that
runs the task's prompt and test with `candidate` as a proxy and alone decides the verdict. Values
cross as plain data (_wire.py); a call the worker cannot answer that way, or a worker that dies,
hangs or sends malformed bytes, is a failed call and never passes. This (the parent) process:

- starts the interpreter in its own session and process group, kills the group with SIGKILL at
  the wall-clock deadline and again when the sample ends;
- hands the judge its request and reads the verdict over socket pairs the worker never holds;
  verdict lines carry a per-sample nonce, and no verdict is never a pass;
- gives both a private temporary working directory (HOME, TMPDIR; owned by the worker's user),
  deleted afterwards; stdin on /dev/null; stdout and stderr read concurrently with a size cap.

The worker's rlimits and OS confinement come from sandbox_config.py; what held is reported in
SampleRun.guards and logged once.

Statuses: passed; failed (an assert failed); error (any other exception, a syntax error, a failed
call, no verdict); timeout (the sample's or a call's deadline); killed (a resource limit:
MemoryError, file size, SIGXCPU, SIGKILL); infra_error (the sandbox itself failed). timeout and
infra_error are not cacheable. With `partial_credit` the value is the fraction of check()'s
top-level assert statements (a loop of asserts is one statement) that depend on the candidate and
passed on an answer: an assert that passes when every answer is a poison is not counted, and a
None answer tested for truth (`assert not candidate(x)`) is no answer; the status is unchanged,
and with no counted assert the value is the status's (rules: _judge.py). Samples see the
standard library only unless `site_packages=True`.
"""

from __future__ import annotations

import logging
import marshal
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlx_coach.data.tasks import answer_key_paths
from mlx_coach.rewards.scoring.base import Score
from mlx_coach.rewards.scoring.sandbox_config import (SANDBOX_EXEC, SandboxConfig, confine_argv, rlimits_for,
                                                      tasks_in_use, worker_uid)

LAUNCHER = str(Path(__file__).with_name("_launch.py"))
HELPERS = ("_judge.py", "_credit.py", "_worker.py", "_wire.py", "_errors.py", "_confine.py", "_guards.py",
           "_namespaces.py")
PACKAGE_DIR = str(Path(__file__).resolve().parents[2])
_compiled = False
ERROR_CHARS = 500
_CHANNEL_CAP = 1 << 18  # bytes kept from the verdict pipe; a sample flooding it only hurts itself
_KERNEL_KILLS = {signal.SIGKILL: "SIGKILL", signal.SIGXCPU: "SIGXCPU (CPU time limit)",
                 signal.SIGXFSZ: "SIGXFSZ (file size limit)"}
log = logging.getLogger("mlx_coach.sandbox")
_unset_seen: set[str] = set()
_guards_seen: set[tuple] = set()


@dataclass
class SampleRun:
    """Everything one run produced; `score` is what scorers hand on."""

    score: Score
    stdout: bytes = b""
    stderr: bytes = b""
    returncode: int | None = None
    unset_limits: list[str] = field(default_factory=list)
    workdir: str = ""  # the private directory it ran in (already deleted)
    dropped_output: int = 0  # bytes of stdout + stderr beyond max_output_bytes, read and discarded
    guards: dict = field(default_factory=dict)  # OS confinement of the worker: {name: "yes..." | "no: why"}


def build_program(task, completion: str) -> str:
    return f"{task.prompt}{completion}\n{task.test}\ncheck({task.entry_point})\n"


def _socket_fds() -> tuple[int, int]:
    a, b = socket.socketpair()
    return a.detach(), b.detach()


def unset_limits() -> set[str]:
    """Every limit the sandbox could not set so far in this process (also logged once each)."""
    return set(_unset_seen)


def _child_env(root: str) -> dict:
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": root, "TMPDIR": root,
           "LANG": os.environ.get("LANG", "C.UTF-8"), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return env  # no LD_PRELOAD: a preloaded BLAS would cost start-up time and address space


def _exited(proc) -> bool:
    """Has the child exited? Where waitid exists it stays unreaped, so its group id stays ours."""
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(proc, in_w: int, payload: bytes, out_r: int, deadline: float, cap: int):
    """Feed the request, drain stdout/stderr/channel until the child exits or the deadline.

    Returns (channel, stdout, stderr, dropped_bytes, timed_out). Never blocks on a full pipe.
    """
    sel = selectors.DefaultSelector()
    os.set_blocking(in_w, False)
    sel.register(in_w, selectors.EVENT_WRITE, "in")
    bufs = {"out": bytearray(), "err": bytearray(), "chan": bytearray()}
    caps = {"out": cap, "err": cap, "chan": _CHANNEL_CAP}
    for fd, name in ((proc.stdout.fileno(), "out"), (proc.stderr.fileno(), "err"), (out_r, "chan")):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    sent, dropped, channel_open, exited = 0, 0, True, False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bufs["chan"], bufs["out"], bufs["err"], dropped, not exited
            # Once the verdict is in (or the channel closed), poll for exit: a leftover child of
            # the sample may hold the pipes open. A forged verdict only makes us poll sooner.
            polling = not channel_open or b" verdict " in bufs["chan"]
            ready = sel.select(min(left, 0.02) if polling else left)
            for key, _ in ready:
                if key.data == "in":
                    try:
                        sent += os.write(in_w, payload[sent:sent + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        sent = len(payload)
                    if sent >= len(payload):
                        sel.unregister(in_w)
                        os.close(in_w)
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    channel_open = channel_open and key.data != "chan"
                    continue
                buf = bufs[key.data]
                room = max(0, caps[key.data] - len(buf))
                buf += chunk[:room]
                dropped += len(chunk) - min(room, len(chunk))
            if polling and not exited and _exited(proc):
                exited = True
                deadline = min(deadline, time.monotonic() + 0.05)  # last bytes in flight
        return bufs["chan"], bufs["out"], bufs["err"], dropped, False
    finally:
        for key in list(sel.get_map().values()):
            if key.data == "in":
                os.close(in_w)
        sel.close()


def _wait_exit(proc, deadline: float) -> bool:
    delay = 0.0005
    while not _exited(proc):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)
    return True


def _parse_channel(data: bytes, nonce: str):
    """(unset limits or None if the harness never said ready, verdict fields or None)."""
    ready, verdict, key = None, None, nonce.encode()
    for line in bytes(data).split(b"\n"):
        parts = line.split(b" ")
        if parts[0] != key or len(parts) < 3:
            continue
        try:
            if parts[1] == b"ready" and ready is None:
                text = bytes.fromhex(parts[2].decode()).decode() if parts[2] != b"-" else ""
                ready = [u for u in text.split("\n") if u]
            elif parts[1] == b"verdict" and verdict is None and len(parts) == 6:
                error = bytes.fromhex(parts[5].decode()).decode() if parts[5] != b"-" else ""
                verdict = (parts[2].decode(), int(parts[3]), int(parts[4]), error)
        except ValueError:
            continue
    return ready, verdict


def _log_guards_once(guards: dict) -> None:
    key = tuple(sorted(guards.items()))
    if guards and key not in _guards_seen:
        _guards_seen.add(key)
        log.info("sandbox worker confinement: %s", "; ".join(f"{k}: {v}" for k, v in key))


def _last_line(data: bytes) -> str:
    lines = [ln for ln in bytes(data).decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _judge(verdict, ready, timed_out, returncode, stderr, cfg) -> tuple[str, float, str]:
    if verdict is not None:
        status, n_ok, total, error = verdict
        if status not in ("passed", "failed", "error", "killed", "timeout", "infra_error"):
            return "infra_error", 0.0, f"harness sent an unknown status {status!r}"
        if cfg.partial_credit and total > 0:
            return status, n_ok / total, error
        return status, float(status == "passed"), error
    if timed_out:
        return "timeout", 0.0, f"no verdict within {cfg.timeout_s:g} s"
    if ready is None:
        why = _last_line(stderr) or f"exit code {returncode}"
        return "infra_error", 0.0, f"the sandbox harness did not start: {why}"
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig in _KERNEL_KILLS:
            return "killed", 0.0, f"killed by {_KERNEL_KILLS[sig]}"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return "error", 0.0, f"died of signal {name}"
    tail = _last_line(stderr)
    error = f"no verdict: exited with code {returncode} before reporting"
    return "error", 0.0, error + (f": {tail}" if tail else "")


def _request(task, completion, cfg, nonce, root, limits, uid, hidden=()) -> dict:
    """What the judge reads from the trainer (the worker never sees it)."""
    call_timeout_s = cfg.call_timeout_s if cfg.call_timeout_s is not None else cfg.timeout_s
    setup = {"uid": uid, "root": root, "limits": limits, "network": bool(cfg.isolate_network),
             "filesystem": bool(cfg.isolate_filesystem), "processes": bool(cfg.isolate_processes),
             "site_packages": bool(cfg.site_packages), "hidden": [PACKAGE_DIR, *hidden]}
    return {"nonce": nonce, "prompt": task.prompt, "completion": completion, "test": task.test,
            "entry_point": task.entry_point, "partial": bool(cfg.partial_credit), "root": root,
            "judge_limits": {k: v for k, v in limits.items() if k != "RLIMIT_NPROC"},
            "timeout_s": float(cfg.timeout_s), "call_timeout_s": float(call_timeout_s), "setup": setup}


def _compile_helpers() -> None:
    """Write the bytecode of the judge's and worker's modules once (they run under -B, which reads
    __pycache__ but never writes it); skipped where the package folder is read-only."""
    global _compiled
    if not _compiled:
        import compileall

        for name in HELPERS:
            compileall.compile_file(str(Path(__file__).with_name(name)), quiet=2)
        _compiled = True


def execute(task, completion: str, cfg: SandboxConfig | None = None) -> SampleRun:
    """Run one sample in the sandbox; never raises for anything the sample does."""
    cfg = cfg or SandboxConfig()
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    _compile_helpers()
    t0 = time.monotonic()
    root = os.path.realpath(tempfile.mkdtemp(prefix="mlx-coach-sandbox-"))
    nonce = secrets.token_hex(16)
    limits = rlimits_for(sys.platform, cfg, tasks_in_use())
    uid = worker_uid(cfg)
    if uid is not None:
        os.chown(root, uid, uid)  # the worker's private directory must be its own
    answer_keys = answer_key_paths()
    payload = marshal.dumps(_request(task, completion, cfg, nonce, root, limits, uid, answer_keys))
    # Socket pairs, not pipes: a process of the same user can reopen another's pipe through
    # /proc/PID/fd, but not a socket.
    in_r, in_w = _socket_fds()
    out_w, out_r = _socket_fds()
    argv = [cfg.interpreter, "-I", "-B"] + ([] if cfg.site_packages else ["-S"]) + [LAUNCHER, str(in_r), str(out_w)]
    argv, macos_guard = confine_argv(argv, root, cfg, sys.platform, shutil.which(SANDBOX_EXEC), answer_keys)
    try:
        proc = subprocess.Popen(argv, cwd=root, env=_child_env(root), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(in_r, out_w),
                                start_new_session=True)
    except (OSError, ValueError) as e:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
        error = f"could not start {cfg.interpreter}: {e}"[:ERROR_CHARS]
        score = Score(0.0, "infra_error", time.monotonic() - t0, error, cacheable=False)
        return SampleRun(score, workdir=root)
    os.close(in_r)
    os.close(out_w)
    deadline = t0 + cfg.timeout_s
    try:
        chan, out, err, dropped, timed_out = _pump(proc, in_w, payload, out_r, deadline, cfg.max_output_bytes)
        if not timed_out:
            timed_out = not _wait_exit(proc, deadline)
    finally:
        _kill_group(proc.pid)  # the leader is not reaped yet, so this group id cannot be reused
        returncode = proc.wait()
        os.close(out_r)
        proc.stdout.close()
        proc.stderr.close()
        shutil.rmtree(root, ignore_errors=True)
    duration = time.monotonic() - t0
    ready, verdict = _parse_channel(chan, nonce)
    guards = dict(item[len("guard "):].split(": ", 1) for item in ready or () if item.startswith("guard "))
    if macos_guard is not None:
        guards["macos_profile"] = macos_guard
    unset = [item for item in ready or () if not item.startswith("guard ")]
    for item in unset:
        if item not in _unset_seen:  # facts about this OS, the same for every sample: `mlx-coach doctor`
            _unset_seen.add(item)   # lists them; at info level they stay off every command's stderr
            log.info("sandbox limit not enforced: %s", item)
    _log_guards_once(guards)
    status, value, error = _judge(verdict, ready, timed_out, returncode, err, cfg)
    score = Score(value, status, duration, error[:ERROR_CHARS], cacheable=status not in ("timeout", "infra_error"))
    return SampleRun(score, bytes(out), bytes(err), returncode, unset, root, dropped, guards)


def run_sample(task, completion: str, cfg: SandboxConfig | None = None) -> Score:
    """Score one sample; a failure of the sandbox itself comes back as status infra_error."""
    try:
        return execute(task, completion, cfg).score
    except Exception as e:  # a broken scorer must not stop a training run
        log.exception("sandbox failed")
        return Score(0.0, "infra_error", 0.0, f"sandbox failed: {type(e).__name__}: {e}"[:ERROR_CHARS],
                     cacheable=False)
