"""The served teacher: a real mlx_lm.server on loopback serving builtin:tiny as a digit-grading judge."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_exited

from mlx_coach.config.tree import from_dict, validate
from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.grading import parse_digit_grade
from mlx_coach.rewards.scoring.http_judge import HttpJudge
from mlx_coach.data.task import Task
from mlx_coach.rewards.teacher_server import point_at_served, serve
from mlx_coach.models.base_identity import fingerprint
from mlx_coach.models.loader import load_policy
from mlx_coach.rewards.cache import ScoreCache
from mlx_coach.rewards.sources import RewardSet

ROOT = Path(__file__).resolve().parent.parent
TASK = Task("T/0", "def inc(x):\n    \"\"\"Return x + 1.\"\"\"\n", "inc", "def check(f):\n    assert f(1) == 2\n")


def served_config(**judge):
    cfg = from_dict({"teacher_server": {"model": "builtin:tiny@1"},
                     "rewards": [{"type": "http-judge", "grade": "digit", "max_tokens": 1, "concurrency": 4,
                                  "max_retries": 0, **judge}]})
    validate(cfg)
    return cfg


@pytest.mark.parametrize("text,value", [("7", 7 / 9), (" 0", 0.0), ("9 because", 1.0), ("\n3x", 3 / 9)])
def test_parse_digit_grade_reads_the_first_character(text, value):
    assert parse_digit_grade(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "  ", "x7", "-1", "SCORE: 7/10", "½"])
def test_parse_digit_grade_rejects_anything_else(text):
    with pytest.raises(ValueError):
        parse_digit_grade(text)


def test_a_null_base_url_needs_a_teacher_server():
    cfg = from_dict({"rewards": [{"type": "http-judge", "grade": "digit"}]})
    with pytest.raises(UserError, match=r"rewards\[0\]\.base_url"):
        validate(cfg)
    served_config()  # with a teacher_server the same reward is valid
    with pytest.raises(UserError, match=r"rewards\[0\]\.logit_bias"):
        served_config(logit_bias={"x": 1})


def test_served_tiny_teacher_grades_vary_with_temperature_and_the_server_stops_on_error():
    cfg = served_config(temperature=1.0)
    items = [(TASK, "    return x + 1\n")] * 24
    with pytest.raises(RuntimeError, match="boom"):
        with serve(cfg) as served:
            r, identity = point_at_served(cfg.rewards[0], cfg, "rewards[0]")
            # the byte-level tiny tokenizer: digits are bytes 48..57, each biased so only digits come out
            assert r.base_url == served.url and r.model == "default_model"
            assert r.logit_bias == {str(48 + d): 100.0 for d in range(10)}
            # its cache keys name the served model and its weights, not the port
            folder = load_policy("builtin:tiny@1")[2]["path"]
            assert identity == served.identity == f"builtin:tiny@1@{fingerprint(folder)}"
            rewards = RewardSet(cfg, ScoreCache("none"))
            assert rewards.sources[0].impl.version == HttpJudge(r, served=identity).version != HttpJudge(r).version
            hot = HttpJudge(r, served=identity).score_batch(items)
            cold = HttpJudge(point_at_served(served_config(temperature=0.0).rewards[0], cfg, "k")[0]).score_batch(items)
            proc = served.process
            raise RuntimeError("boom")
    assert proc.poll() is not None  # stopped on the way out, error or not
    assert all(s.status == "ok" for s in hot + cold)
    assert {round(s.value * 9, 6) for s in hot} <= set(range(10))
    assert len({s.value for s in hot}) > 1  # one program, graded again and again: the grades differ
    assert len({s.value for s in cold}) == 1  # greedy: always the same grade


def alive(pid):
    """Running, not a zombie waiting for a reaper (after reparenting, init may reap it late)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_the_server_dies_with_the_process_that_started_it(tmp_path):
    script = (
        "import json, sys, time\n"
        "from mlx_coach.config.tree import from_dict\n"
        "from mlx_coach.rewards.teacher_server import serve\n"
        "cfg = from_dict({'teacher_server': {'model': 'builtin:tiny@1'}})\n"
        "with serve(cfg) as s:\n"
        "    print(json.dumps({'pid': s.process.pid}), flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        server_pid = json.loads(proc.stdout.readline())["pid"]
        assert alive(server_pid)
        proc.send_signal(signal.SIGKILL)  # no cleanup runs in the parent: the watchdog must act
        proc.wait(timeout=10)
        if not wait_exited(server_pid):
            os.kill(server_pid, signal.SIGKILL)
            pytest.fail("the judge server outlived the process that started it")
    finally:
        if proc.poll() is None:
            proc.kill()
