"""Progress bars show on a terminal and stay silent on files and pipes; train's ETA arithmetic."""

import io
import subprocess
import sys

import pytest

from mlx_coach.telemetry.progress import StepClock, bar, format_eta


def test_no_bar_on_a_stream_that_is_not_a_terminal(tmp_path):
    for stream in (io.StringIO(), open(tmp_path / "log.txt", "w")):
        with bar(10, "work", stream=stream) as progress:
            for _ in range(10):
                progress.update(1)
        if hasattr(stream, "getvalue"):
            assert stream.getvalue() == ""
        else:
            stream.close()
            assert (tmp_path / "log.txt").read_text() == ""


def test_a_bar_with_an_eta_on_a_terminal():
    """On a real pseudo-terminal the bar is drawn (so the silence above is the stream, not a bar that
    never draws). Run in its own session: a terminal opened here could become pytest's own."""
    child = (
        "import os, select\n"
        "from mlx_coach.telemetry.progress import bar, is_terminal\n"
        "master, slave = os.openpty()\n"
        "terminal = os.fdopen(slave, 'w')\n"
        "assert is_terminal(terminal)\n"
        "with bar(4, 'work', stream=terminal) as progress:\n"
        "    for _ in range(4):\n"
        "        progress.update(1)\n"
        "        progress.refresh()\n"
        "terminal.flush()\n"
        # a pty hands written bytes to its master side asynchronously: one read may see only part
        "drawn = b''\n"
        "while b'4/4' not in drawn and select.select([master], [], [], 30)[0]:\n"
        "    drawn += os.read(master, 65536)\n"
        "print(drawn.decode(errors='replace'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    assert "work" in proc.stdout and "4/4" in proc.stdout and "<" in proc.stdout  # tqdm's elapsed<remaining


def test_score_prints_no_bar_when_stderr_is_a_pipe(tmp_path):
    import json

    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"task_id": "a", "prompt": "def f():\n", "entry_point": "f",
                                 "test": "def check(c):\n    assert c() == 1\n"}) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"task_id": "a", "completion": f"    return {i}\n"}) + "\n" for i in range(3)))
    proc = subprocess.run([sys.executable, "-m", "mlx_coach", "score", "--tasks", str(tasks), "--completions",
                           str(samples), "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no bar, and no sandbox notes either (those are doctor's)
    assert "pass@1=" in proc.stdout


@pytest.mark.parametrize("times, left, want", [
    ([2.0, 4.0], 10, 30.0),  # mean 3 s x 10 steps
    ([1.0] * 3 + [5.0] * 10, 2, 10.0),  # only the last 10 steps count: warm-up falls out
    ([3.0], 0, 0.0),
    ([3.0], -4, 0.0),
])
def test_eta_is_steps_left_times_recent_mean(times, left, want):
    clock = StepClock(window=10)
    for t in times:
        clock.add(t)
    assert clock.eta(left) == pytest.approx(want)


def test_eta_is_unknown_before_the_first_step_and_formatted_in_units():
    assert StepClock().eta(5) is None and format_eta(None) == "n/a"
    assert [format_eta(s) for s in (0, 42.4, 59.6, 185, 3600, 3725)] == ["0s", "42s", "1m00s", "3m05s", "1h00m", "1h02m"]
