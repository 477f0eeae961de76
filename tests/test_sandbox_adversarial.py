"""Adversarial corpus: wrong programs that try to pass anyway, each run through the real sandbox.

Every probe is a completion whose honest answer is wrong; each carries the reason it must fail.
Probes that need ctypes run twice where possible: with this interpreter (on a root machine whose
interpreter other users cannot read, the worker stays root) and with /usr/bin/python3 as uid 65534.
"""

import os
import shutil
import sys
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
