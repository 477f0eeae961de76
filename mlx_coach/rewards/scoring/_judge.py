"""The trusted side: runs the task's prompt and test, calls the candidate through a proxy, and
alone decides the verdict.

The judge executes the task author's code (the prompt, for its imports and helpers, and the
test), never the completion. `candidate` in the test is a proxy: each call is sent to the worker
as plain data and the answer decoded by _wire.decode, which builds built-in values only, so the
`==` in an assert is always the built-in one. A call that cannot be answered with plain data, a
worker that dies, hangs or sends malformed bytes is a failed call (CallFailed, a BaseException the
test cannot absorb: once one happened, the verdict is not passed whatever the test does next).

Partial credit (request["partial"]): check()'s asserting top-level statements are wrapped (a loop
of asserts is one statement). TOTAL counts those that depend on the candidate, PASSED those of
them that passed on an answer; the status is the real run's either way (credit):
- check() runs once more here with every answer a poison that raises on any use: a statement
  that passes anyway (`assert True`, one that uses no answer) leaves both counts. One the poison
  run did not reach (a statement outside the asserts stopped it) stays counted.
- A None answer tested for truth (`assert x`, `not x`, `if x`, any, all) is no answer: on
  `assert not candidate(...)` it passes where False is expected. `x == None` and `x is None` are
  answers. When a call returned None, check() is replayed here on the recorded answers (_credit.py);
  a statement in which a None answer was tested for truth, or that the replay cannot vouch for,
  is not credited.
TOTAL 0 (no assert depends on the candidate) leaves the value to the status (sandbox.py).

Verdict lines to the trainer, over a socket the worker never had: `NONCE ready HEX(notes)` and
`NONCE verdict STATUS PASSED TOTAL HEX(error)`, the format sandbox.py parses.
"""

import builtins
import marshal
import os
import sys
import time
from _signal import SIGKILL, SIGXCPU, SIGXFSZ  # not `signal`: it imports enum, which lengthens the start

import _confine
import _errors
import _wire
from _credit import apply_changes, credit

_KILLS = {SIGKILL: "SIGKILL", SIGXCPU: "SIGXCPU (CPU time limit)", SIGXFSZ: "SIGXFSZ (file size limit)"}
# Stubs a prompt may end with before its body; tried in order until the prompt compiles alone.
_STUB_ENDINGS = ("", "    pass\n", "\n    pass\n", "        pass\n")
_LOG_CAP = 16 << 20  # bytes of recorded calls and answers kept for the replay; beyond, no replay


class CallFailed(BaseException):
    """A call the worker did not answer with plain data; `status` is error, timeout or killed."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def read_request(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return marshal.loads(b"".join(chunks))


def compile_prompt(prompt):
    """The prompt as code of its own (stubs made valid), or None where no ending makes it compile."""
    for ending in _STUB_ENDINGS:
        try:
            return compile(prompt + ending, "<prompt>", "exec")
        except SyntaxError:
            continue
    return None


def instrument(tree, rec_name):
    """Wrap the asserting top-level statements of the last `def check`; returns how many."""
    import ast

    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        return 0
    fn, body, count = checks[-1], [], 0
    for stmt in fn.body:
        if not any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            body.append(stmt)
            continue
        wrapper = ast.parse(
            f"try:\n    pass\nexcept BaseException as _e:\n    {rec_name}({count}, _e)\n"
            f"else:\n    {rec_name}({count}, None)\n").body[0]
        wrapper.body = [stmt]
        body.append(ast.copy_location(wrapper, stmt))
        count += 1
    fn.body = body
    ast.fix_missing_locations(tree)
    return count


class Worker:
    """The judge's end of the worker: calls with deadlines; every failure becomes CallFailed.

    With `record_calls`, `calls` keeps each answered call for the Replay, under its segment (kept
    in `segment` by the real run's record): (seq, the encoded request, the answer marshalled).
    """

    def __init__(self, fd, pid, sample_deadline, call_timeout_s, record_calls=False):
        self.fd, self.pid = fd, pid
        self.sample_deadline, self.call_timeout_s = sample_deadline, call_timeout_s
        self.failed = None  # the first CallFailed: later calls raise it again
        self.seq = 0
        self.calls, self.segment, self.logged_bytes, self.answered_none = {} if record_calls else None, 0, 0, False

    def deadline(self):
        return min(self.sample_deadline, time.monotonic() + self.call_timeout_s)

    def exchange(self, message, what):
        if self.failed is not None:
            raise self.failed
        deadline = self.deadline()
        try:
            _wire.send(self.fd, message, deadline)
            return _wire.recv(self.fd, deadline)
        except _wire.Deadline:
            self.fail("timeout", f"no answer from the candidate within the deadline ({what})")
        except _wire.PeerClosed:
            self.fail(*self.death(what))
        except _wire.WireError as e:
            self.fail("error", f"the candidate's process sent a malformed message ({what}): {e}")

    def fail(self, status, message):
        self.failed = CallFailed(status, message[:_errors.ERROR_CHARS])
        self.kill()
        raise self.failed

    def kill(self):
        try:
            os.kill(self.pid, SIGKILL)
        except OSError:
            pass

    def death(self, what):
        """(status, message) for a worker that closed its end."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            pid, code = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.002)
        else:
            return "error", f"the candidate's process closed its connection ({what})"
        if os.WIFSIGNALED(code):
            sig = os.WTERMSIG(code)
            if sig in _KILLS:
                return "killed", f"the candidate's process was killed by {_KILLS[sig]} ({what})"
            return "error", f"the candidate's process died of signal {sig} ({what})"
        return "error", f"the candidate's process exited with code {os.WEXITSTATUS(code)} ({what})"

    def call(self, args, kwargs):
        self.seq += 1
        try:
            message = ("call", self.seq, args, kwargs)
            request = _wire.encode(message)
        except _wire.WireError as e:
            self.failed = CallFailed("error", f"the test passed the candidate an argument that is not plain data: {e}")
            raise self.failed from None
        reply = self.exchange(message, f"call {self.seq}")
        if type(reply) is tuple and len(reply) == 4 and reply[0] == "return" and reply[1] == self.seq \
                and type(reply[3]) is dict:
            self.reflect(args, reply[3])
            self.log(request, ("return", reply[2], reply[3]))
            return reply[2]
        if type(reply) is tuple and len(reply) == 5 and reply[0] == "raise" and reply[1] == self.seq:
            _, _, name, exc_args, text = reply
            exc_args = exc_args if type(exc_args) is tuple else ()
            exc = _errors.rebuild(name, exc_args, str(text))
            if exc is not None:
                self.log(request, ("raise", name, exc_args, str(text)))
                raise exc
            self.fail("error", f"the candidate raised {str(name)[:80]}: {str(text)[:300]}")
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "bad" and reply[1] == self.seq:
            self.fail("error", f"failed call: {str(reply[2])[:400]}")
        self.fail("error", f"the candidate's process answered call {self.seq} out of protocol")

    def reflect(self, args, changed):
        """Apply the worker's in-place changes to the test's own list/dict/set arguments."""
        for i, new in changed.items():
            if type(i) is not int or not 0 <= i < len(args) or type(args[i]) is not type(new) \
                    or type(new) not in (list, dict, set):
                self.fail("error", "the candidate's process reported a change to an argument it was not given")
        apply_changes(args, changed)

    def log(self, request, outcome):
        """Keep one answered call, as bytes: the test may change what it was given."""
        self.answered_none |= outcome[0] == "return" and outcome[1] is None
        if self.calls is not None:
            try:
                blob = marshal.dumps(outcome)  # plain data: only memory can run out
                self.logged_bytes += len(request) + len(blob)
            except (ValueError, MemoryError):
                self.logged_bytes = _LOG_CAP + 1
            if self.logged_bytes > _LOG_CAP:
                self.calls = None  # no replay: nothing is vouched for
            else:
                self.calls.setdefault(self.segment, []).append((self.seq, request, blob))


def make_proxy(call, entry_point):
    """`candidate` as the test sees it: a plain function named after the entry point."""
    def candidate(*args, **kwargs):
        return call(args, kwargs)

    candidate.__name__ = candidate.__qualname__ = entry_point
    return candidate


def main(req_fd, chan_fd, sock_fd, worker_pid):
    started = time.monotonic()
    request = read_request(req_fd)
    nonce = request["nonce"]

    def send(*fields):
        data = ("\n" + " ".join((nonce,) + fields) + "\n").encode()
        while data:
            data = data[os.write(chan_fd, data):]

    def hexed(text):
        return text.encode("utf-8", "replace").hex() or "-"

    def verdict(status, n_ok, total, error):
        send("verdict", status, str(n_ok), str(total), hexed(error[:_errors.ERROR_CHARS]))
        os.close(sock_fd)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)

    notes = []
    _confine.apply_limits(request["judge_limits"])
    worker = Worker(sock_fd, worker_pid, started + request["timeout_s"], request["call_timeout_s"], request["partial"])
    try:
        hello = worker.exchange(("setup", request["setup"]), "setup")
        unset, held = hello[1], hello[2]
        notes += list(unset) + [f"guard {k}: {v}" for k, v in held.items()]
        if not str(held.get("user", "")).startswith("yes") and sys.platform.startswith("linux"):
            # The worker is this process's user: hide this process's memory and descriptors from it
            # (before any sample code runs; a worker that kept root's capabilities still could).
            why = _confine.make_undumpable()
            notes.append("guard judge_undumpable: " + ("yes" if why is None else f"no: {why}"))
    except (CallFailed, Exception) as e:  # noqa: BLE001 - no sample code has run yet: our failure
        send("ready", hexed("\n".join(notes)))
        verdict("infra_error", 0, 0, f"the worker did not start: {e}")
    send("ready", hexed("\n".join(notes)))

    try:
        reply = worker.exchange(("load", request["prompt"] + request["completion"], request["entry_point"]),
                                "loading the completion")
    except CallFailed as e:
        verdict(e.status, 0, 0, str(e))
    if reply != ("loaded",):
        if type(reply) is tuple and len(reply) == 4 and reply[0] == "raised":
            exc = _errors.rebuild(reply[1], reply[2] if type(reply[2]) is tuple else (), str(reply[3]))
            status = _errors.classify(exc) if exc is not None else "error"
            verdict("error" if status == "failed" else status, 0, 0, str(reply[3]))
        verdict("error", 0, 0, "the candidate's process answered the load out of protocol")

    # The task author's code, in this process: the prompt's helpers and imports, then the test.
    results, first_failure, total = {}, [], 0
    rec_name, entry_point = "_mlx_coach_rec_" + os.urandom(6).hex(), request["entry_point"]
    prompt_code = test_code = None

    def record(index, exc):
        worker.segment = index + 1  # the calls from here on belong to the next asserting statement
        results[index] = exc is None
        if exc is not None:
            if not first_failure:
                first_failure.append(exc)
            if isinstance(exc, MemoryError):
                raise exc  # this process is out of memory: running on would not be measuring

    def run(call, rec):
        """check() with `candidate` making its calls through `call`, in a namespace of its own."""
        namespace = {"__name__": "__judge__", "__builtins__": builtins}
        if prompt_code is not None:
            exec(prompt_code, namespace)  # noqa: S102 - the task author's code, by design
        namespace[entry_point] = proxy = make_proxy(call, entry_point)
        namespace[rec_name] = rec
        exec(test_code, namespace)  # noqa: S102 - the task author's code, by design
        namespace["check"](proxy)

    test = request["test"]
    test_lines = test.splitlines()
    failure = None
    try:
        prompt_code = compile_prompt(request["prompt"])
        if request["partial"]:
            import ast

            tree = ast.parse(test, "<test>")
            total = instrument(tree, rec_name)
            test_code = compile(tree, "<test>", "exec")
        else:
            test_code = compile(test, "<test>", "exec")
        run(worker.call, record)
        failure = first_failure[0] if first_failure else None
    except BaseException as e:  # noqa: BLE001
        failure = e
    n_ok = sum(1 for i in range(total) if results.get(i))
    if total and test_code is not None:
        try:
            n_ok, total = credit(run, worker, results, total)
        except MemoryError:  # this process is out of memory: no count can be vouched for
            n_ok = 0
    if worker.failed is not None:
        verdict(worker.failed.status, n_ok, total, str(worker.failed))
    if failure is None:
        verdict("passed", n_ok if total else 1, total, "")
    verdict(_errors.classify(failure), n_ok, total, _errors.describe(failure, "<test>", test_lines))
