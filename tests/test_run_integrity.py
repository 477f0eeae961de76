"""A run directory that survives its own faults, tried as a user would: real `python -m mlx_coach`
processes, SIGKILLed or interrupted at a real moment, a second trainer on the same directory,
damaged files. Each test names the failure it reproduces (issue 10)."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlx_coach.config.tree import load_config, save_config
from mlx_coach.telemetry.writer import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["-c", str(ROOT / "configs/tiny.yaml"), "--set", "data.limit=12", "--set", "rollout.max_new_tokens=8",
         "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "train.epochs_val=false",
         "--set", "sandbox.workers=1", "--set", "telemetry.tensorboard=true"]
DEADLINE_S = 600  # generous: only a hung run reaches it


def cli(*args, timeout=DEADLINE_S):
    return subprocess.run([sys.executable, "-m", "mlx_coach", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "mlx_coach", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def steps_logged(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in read_jsonl(path) if "reward/mean" in r]


def wait_for(cond, proc, what):
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s"
        time.sleep(0.1)


def one_line_error(proc):
    """Exit 2 and one line on stderr, no traceback (the CLI's contract for bad input)."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with a checkpoint at each step; tests damage copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = cli("train", *SMALL, "--output", str(run), "--steps", "2", "--set", "train.checkpoint_every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def copy_of(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# --- 1: a crash before the first checkpoint ----------------------------------------------------


def test_a_crash_before_the_first_checkpoint_is_restarted_clean_not_appended_to(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = start("train", *SMALL, "--output", str(run), "--steps", "50", "--set", "train.checkpoint_every=0")
    wait_for(lambda: len(steps_logged(run)) >= 1, proc, "a logged step")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints").exists() and steps_logged(run)
    first_attempt = steps_logged(run)

    resumed = cli("train", "--resume", str(run))  # nothing to resume from: one line saying what to do
    assert "no checkpoint" in one_line_error(resumed) and f"--output {run}" in resumed.stderr

    again = cli("train", *SMALL, "--output", str(run), "--steps", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "moved its files to" in again.stderr
    assert steps_logged(run) == [1, 2]  # not step 1 twice
    assert steps_logged(run / "aborted/1") == first_attempt  # the crashed attempt is kept, aside
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2]
    assert json.loads((run / "run.json").read_text())["format"] == 1  # the directory knows it holds a run
    over = cli("train", *SMALL, "--output", str(run), "--steps", "2")  # now it holds checkpoints
    assert "already holds checkpoints" in one_line_error(over) and steps_logged(run) == [1, 2]


def test_a_folder_that_holds_no_run_is_not_taken_over(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = cli("train", *SMALL, "--output", str(tmp_path), "--steps", "1")
    assert "holds no mlx-coach run" in one_line_error(proc)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == ["notes.txt"]


# --- 4: two trainers on one --output ---------------------------------------------------------


def test_a_second_trainer_on_a_live_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    live = start("train", *SMALL, "--output", str(run), "--steps", "200", "--set", "train.checkpoint_every=1")
    try:
        wait_for(lambda: (run / "checkpoints/step-1/state.json").is_file(), live, "the first checkpoint")
        fresh = cli("train", *SMALL, "--output", str(run), "--steps", "2")
        # as many steps as the live run was given, so only the lock can refuse it, wherever that run is
        resume = cli("train", "--resume", str(run), "--steps", "200")
        for proc in (fresh, resume):
            assert "in use by another trainer" in one_line_error(proc)
        # the live run was not disturbed: it keeps checkpointing
        n = len(steps_logged(run))
        wait_for(lambda: len(steps_logged(run)) >= n + 1, live, "a step after the refused writers")
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    # the OS released the lock with the killed process: the run resumes, one seed, no step twice
    last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    resumed = cli("train", "--resume", str(run), "--steps", str(last + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(run) == list(range(1, last + 2))


def test_two_fresh_starts_at_once_one_runs_and_the_other_gets_one_line(tmp_path):
    run = tmp_path / "run"
    procs = [start("train", *SMALL, "--output", str(run), "--steps", "1") for _ in range(2)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=DEADLINE_S)
        results.append((p.returncode, err.strip()))
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert steps_logged(run) == [1]


# --- 9: config.yaml ------------------------------------------------------------------------------


def test_config_yaml_is_never_seen_empty_or_half_written(tmp_path):
    """A reader racing a writer sees exactly what a kill at that moment would leave on disk."""
    path = tmp_path / "config.yaml"
    cfg = load_config(ROOT / "configs/tiny.yaml")
    save_config(cfg, path)
    whole = path.read_text()
    done, seen = threading.Event(), []

    def writer():
        for _ in range(400):
            save_config(cfg, path)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        text = path.read_text()
        if text != whole:
            seen.append(text)
    t.join()
    assert not seen, f"{len(seen)} torn reads, e.g. {seen[0][:80]!r}"
    assert not [p for p in tmp_path.iterdir() if p.name != "config.yaml"]  # no temporary files left


@pytest.mark.parametrize("content", ["", "\n", "[not, a, mapping]\n", "model: {path: [\n"])
def test_an_empty_or_unreadable_config_yaml_is_refused_not_replaced_by_defaults(finished_run, tmp_path, content):
    run = copy_of(finished_run, tmp_path)
    (run / "config.yaml").write_text(content)
    proc = cli("train", "--resume", str(run), "--steps", "3")
    assert "config.yaml" in one_line_error(proc)
    assert (run / "config.yaml").read_text() == content  # not overwritten with the defaults
    assert steps_logged(run) == [1, 2]


# --- 10: a damaged run directory -----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate adapters", "corrupt state"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(finished_run, tmp_path, damage):
    run = copy_of(finished_run, tmp_path)
    ckpt = run / "checkpoints/step-2"
    if damage == "truncate adapters":
        data = (ckpt / "adapters.safetensors").read_bytes()
        (ckpt / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (ckpt / "state.json").write_text('{"step": 2, "epoch"')
    proc = cli("train", "--resume", str(run), "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-2 is damaged" in proc.stderr and "using step-1" in proc.stderr
    assert "step-1 at step 1" in proc.stderr
    assert steps_logged(run) == [1, 2, 3]  # step 2 redone from step 1, not logged twice
    assert (run / "checkpoints/damaged-step-2").is_dir()  # kept for inspection
    assert json.loads((run / "checkpoints/step-3/state.json").read_text())["step"] == 3


def test_no_intact_checkpoint_is_one_line(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    for state in (run / "checkpoints").glob("step-*/state.json"):
        state.write_text("{")
    assert "no intact checkpoint" in one_line_error(cli("train", "--resume", str(run), "--steps", "3"))


def test_a_failed_resume_leaves_config_yaml_as_it_was(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    before = (run / "config.yaml").read_bytes()
    proc = cli("train", "--resume", str(run), "--steps", "3", "--set", f"model.path={tmp_path / 'nope'}")
    one_line_error(proc)
    assert (run / "config.yaml").read_bytes() == before
    good = cli("train", "--resume", str(run), "--steps", "3")  # the run is still resumable
    assert good.returncode == 0, good.stderr[-3000:]


@pytest.mark.parametrize("command", ["train", "eval"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # a folder under a regular file cannot be created
    if command == "train":
        proc = cli("train", *SMALL, "--output", str(out), "--steps", "1")
    else:
        proc = cli("eval", "--model", "builtin:tiny", "--tasks", "builtin:val", "--limit", "1",
                   "--max-new-tokens", "4", "--output", str(out))
    assert str(out) in one_line_error(proc)
    assert "pass@1" not in proc.stdout  # refused before the work, not after it


def test_ctrl_c_checkpoints_the_last_step_before_exiting(tmp_path):
    run = tmp_path / "run"
    proc = start("train", *SMALL, "--output", str(run), "--steps", "200", "--set", "train.checkpoint_every=0")
    wait_for(lambda: len(steps_logged(run)) >= 2, proc, "two logged steps")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 130, err[-3000:]
    logged = steps_logged(run)
    last = logged[-1]
    assert last >= 2 and logged == list(range(1, last + 1))
    state = json.loads((run / f"checkpoints/step-{last}/state.json").read_text())
    assert state["step"] == last  # every logged step is in the checkpoint: nothing lost
    resumed = cli("train", "--resume", str(run), "--steps", str(last + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{last} at step {last}" in resumed.stderr
    assert steps_logged(run) == list(range(1, last + 2))


# --- 3: SQLite cache entries written after the last checkpoint -----------------------------------


def test_scores_a_killed_run_cached_after_its_checkpoint_do_not_come_back_as_cached(tmp_path):
    """The killed run wrote SQLite rows for steps after its last checkpoint; the resumed run must
    report the same fresh/cached split (and baseline) as a straight run (issue 10, item 3)."""
    args = [*SMALL, "--set", "train.checkpoint_every=3", "--set", "rollout.temperature=0.0"]
    run = tmp_path / "run"
    killed = start("train", *args, "--output", str(run), "--steps", "50",
                   "--set", f"cache.sqlite_path={tmp_path / 'killed.sqlite'}")
    wait_for(lambda: (run / "checkpoints/step-3/state.json").is_file() and 4 in steps_logged(run), killed,
             "a step after the checkpoint")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (run / "checkpoints/step-6").exists()  # steps after the checkpoint were scored, not saved
    resumed = cli("train", "--resume", str(run), "--steps", "6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    done = cli("train", *args, "--output", str(straight), "--steps", "6",
               "--set", f"cache.sqlite_path={tmp_path / 'straight.sqlite'}")
    assert done.returncode == 0, done.stderr[-3000:]

    def split(d):
        return [(r["step"], r["reward/fresh_count"], r["reward/cached_count"]) for r in read_jsonl(d / "metrics.jsonl")
                if "reward/mean" in r]

    assert split(run) == split(straight)
    assert sum(c for _, _, c in split(straight)) > 0  # the comparison covers cached scores too
