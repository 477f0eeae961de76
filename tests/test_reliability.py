"""A run that is stopped, left by its parent or refused a write still ends in a known state (issue 28):
one line on stderr, a documented exit code, its finished steps kept, and `--resume` continues. Real
`python -m mlx_coach` processes, real signals, real filesystems: a small tmpfs filled mid-run and a
read-only bind mount, mounted by the test (skipped where mounting is not permitted)."""

import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlx_coach.telemetry.writer import read_jsonl
from waiting import HOLD_S, wait_exited, wait_until

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["-c", str(ROOT / "configs/tiny.yaml"), "--set", "data.limit=12", "--set", "rollout.max_new_tokens=8",
         "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "train.epochs_val=false",
         "--set", "sandbox.workers=1", "--set", "telemetry.tensorboard=true", "--set", "telemetry.progress=false",
         "--set", "telemetry.report=false"]
DEADLINE_S = 300  # a failure bound: only a hung run reaches it


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_coach", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=DEADLINE_S)


@contextlib.contextmanager
def running(*args):
    """A `python -m mlx_coach` process, killed if the test leaves it running. It starts with SIGHUP at its
    default, as from a terminal: under nohup this process ignores SIGHUP, a child inherits that, and
    mlx-coach leaves an ignored SIGHUP ignored (nohup's meaning)."""
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_coach", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGHUP, hangup)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def steps_logged(run):
    """The steps in metrics.jsonl; read_jsonl fails on a torn line."""
    path = run / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path) if "reward/mean" in r] if path.exists() else []


def checkpoints(run):
    root = run / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []


def wait_for(cond, proc, what):
    ended = []

    def done():
        if proc.poll() is not None:
            ended.append(True)
            return True
        return cond()

    assert wait_until(done, timeout=DEADLINE_S, interval=0.05), f"no {what} within {DEADLINE_S} s"
    assert not ended, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"


def stopped(pid):
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def pause_in_a_step(proc, run):
    """SIGSTOP the trainer (checkpointing every step) inside a step: its last logged step is checkpointed
    and no checkpoint is half-written (no temporary folder). Its next writes are then the step's rows,
    then its checkpoint: the filesystem can be changed under it at a known point. Returns the newest
    checkpoint's step."""

    def paused_in_a_step():
        os.kill(proc.pid, signal.SIGSTOP)
        assert wait_until(lambda: stopped(proc.pid))
        newest = checkpoints(run)
        if newest and steps_logged(run)[-1] == newest[-1] and not any((run / "checkpoints").glob(".*-step-*")):
            return True
        os.kill(proc.pid, signal.SIGCONT)
        return False

    assert wait_until(paused_in_a_step, timeout=DEADLINE_S, interval=0.05)
    return checkpoints(run)[-1]


def mount(*args):
    proc = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting is not permitted here: {proc.stderr.strip()}")


@contextlib.contextmanager
def mounted_tmpfs(path, size):
    path.mkdir()
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk, leave=0):
    """Write a file on `disk` until it is full, then give back `leave` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def ends_in_one_line(proc, err, code, needle):
    """`code`, no traceback, and the stop said in one line on stderr."""
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if needle in ln]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def resumes_from(run, newest):
    """`--resume` continues from checkpoint `newest`, every step logged once, none torn."""
    proc = cli("train", "--resume", str(run), "--steps", str(newest + 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step-{newest} at step {newest}" in proc.stderr
    assert steps_logged(run) == list(range(1, newest + 2))


# --- 1: SIGTERM and SIGHUP are handled like Ctrl-C ----------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_checkpoints_the_step_and_exits_128_plus_its_number(tmp_path, sig):
    run = tmp_path / "run"
    with running("train", *SMALL, "--output", str(run), "--steps", "200", "--set", "train.checkpoint_every=0") as proc:
        wait_for(lambda: len(steps_logged(run)) >= 2, proc, "two logged steps")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=DEADLINE_S)
    line = ends_in_one_line(proc, err, 128 + sig, "mlx-coach: stopped:")
    last = steps_logged(run)[-1]
    assert f"{sig.name} at step {last}: saved" in line and f"--resume {run}" in line
    assert steps_logged(run) == list(range(1, last + 1)) and checkpoints(run) == [last]  # nothing lost
    if sig == signal.SIGTERM:
        resumes_from(run, last)


# --- 1: an ab's runs stop with it, even when it is SIGKILLed --------------------------------------


def _ab_config(tmp_path):
    cfg = {
        "model": {"path": "builtin:tiny"},
        "data": {"tasks": "builtin", "limit": 10, "val_fraction": 0.2},
        "rollout": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8},
        "train": {"steps": 1000, "checkpoint_every": 1, "epochs_val": False},
        "rewards": [{"type": "tests"}],
        "sandbox": {"workers": 1},
        "telemetry": {"progress": False, "tensorboard": False, "report": False},
    }
    path = tmp_path / "ab.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lock_free(path):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_runs_of_a_sigkilled_ab_stop_with_it_and_keep_their_steps(tmp_path):
    out = tmp_path / "ab"
    ab = subprocess.Popen([sys.executable, "-m", "mlx_coach", "ab", "-c", str(_ab_config(tmp_path)),
                           "--vary", "cache.policy=lru,epoch-clear", "--parallel", "2", "--output", str(out)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    runs = [out / "a0-policy-lru" / "seed0", out / "a1-policy-epoch-clear" / "seed0"]
    pids = []
    try:
        wait_for(lambda: all(checkpoints(r) for r in runs), ab, "a checkpoint in both runs")
        pids = [int((r / ".lock").read_text()) for r in runs]  # the trainer writes its pid into its lock
        ab.send_signal(signal.SIGKILL)  # ab runs no cleanup: the runs' watchdogs must act
        ab.wait(timeout=DEADLINE_S)
        gone = [wait_exited(pid, timeout=HOLD_S) for pid in pids]
        assert all(gone), f"runs {[p for p, g in zip(pids, gone) if not g]} outlived their ab"
    finally:
        if ab.poll() is None:
            ab.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for run, log in zip(runs, sorted((out / "logs").glob("*.log"))):
        text = log.read_text()
        assert "is gone: stopping as on SIGTERM" in text and "Traceback" not in text, text[-2000:]
        last = steps_logged(run)[-1]
        assert f"stopped: SIGTERM at step {last}: saved" in text, text[-2000:]
        assert checkpoints(run)[-1] == last  # every logged step kept
        assert _lock_free(run / ".lock")  # the next ab can take the run over at once


# --- 2: a save that fails -------------------------------------------------------------------------


@pytest.mark.parametrize("leave", [256 << 10, 0], ids=["room-for-the-step-not-its-checkpoint", "full"])
def test_a_full_disk_mid_run_ends_in_one_line_and_the_run_resumes(tmp_path, leave):
    """The run directory on a 32 MB tmpfs, filled inside a step. With 256 KB left the step's rows fit
    and its checkpoint (about 1.5 MB) does not: the save fails half-written. With nothing left, its
    metrics row (about 3.8 KB) fails, after the disk took the few hundred bytes left in the file's
    last page: a row cut short."""
    with mounted_tmpfs(tmp_path / "disk", "32m") as disk:
        run = disk / "run"
        with running("train", *SMALL, "--output", str(run), "--steps", "200",
                     "--set", "train.checkpoint_every=1") as proc:
            wait_for(lambda: checkpoints(run), proc, "the first checkpoint")
            newest = pause_in_a_step(proc, run)
            filler = fill(disk, leave)
            os.kill(proc.pid, signal.SIGCONT)
            _, err = proc.communicate(timeout=DEADLINE_S)
        line = ends_in_one_line(proc, err, 4, "mlx-coach: write failed:")
        assert "No space left on device" in line and str(run) in line
        assert f"newest checkpoint is step-{newest}; once {run} can be written, continue with --resume {run}" in line
        if leave:
            assert f"cannot save checkpoint step-{newest + 1} in {run / 'checkpoints'}" in line
        else:
            assert f"cannot write {run / 'metrics.jsonl'}" in line
        assert not list((run / "checkpoints").glob(".*-step-*"))  # no temporary folder left
        assert checkpoints(run)[-1] == newest  # the intact one stays the newest
        assert (run / "metrics.jsonl").read_bytes().endswith(b"\n")  # and steps_logged parses every row
        assert steps_logged(run) == list(range(1, len(steps_logged(run)) + 1))
        filler.unlink()
        resumes_from(run, newest)


def test_a_read_only_checkpoints_folder_ends_in_one_line_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    with running("train", *SMALL, "--output", str(run), "--steps", "200",
                 "--set", "train.checkpoint_every=1") as proc, contextlib.ExitStack() as mounts:
        wait_for(lambda: checkpoints(run), proc, "the first checkpoint")
        newest = pause_in_a_step(proc, run)
        mount("--bind", ckpts, ckpts)
        mounts.callback(subprocess.run, ["umount", "-l", str(ckpts)], capture_output=True)
        mount("-o", "remount,bind,ro", ckpts)  # root ignores permissions, not a read-only mount
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=DEADLINE_S)
    line = ends_in_one_line(proc, err, 4, "mlx-coach: write failed:")
    assert f"cannot save checkpoint step-{newest + 1} in {ckpts} (Read-only file system)" in line
    assert f"newest checkpoint is step-{newest}; once {run} can be written, continue with --resume {run}" in line
    assert not list(ckpts.glob(".*-step-*")) and checkpoints(run)[-1] == newest
    resumes_from(run, newest)


def test_tensorboard_events_that_cannot_be_written_stop_the_run_in_the_main_thread(tmp_path):
    """tensorboardX writes events in a thread of its own: a full disk there is raised by the next
    log() as WriteFailed, with no thread traceback and no hang on the writer's queue."""
    script = (
        "import sys\n"
        "from mlx_coach.runtime.stops import WriteFailed\n"
        "from mlx_coach.telemetry.writer import Telemetry\n"
        "t = Telemetry(sys.argv[1], console=False)\n"
        "try:\n"
        "    for step in range(1, 100000):\n"
        "        t.log(step, {f'tag{i}': float(i) for i in range(50)})\n"
        "except WriteFailed as e:\n"
        "    print(f'failed at step {step}: {e}')\n"
        "try:\n"
        "    t.close()\n"
        "except WriteFailed:  # close says it again: the event file is short of what was logged\n"
        "    print('closed')\n"
    )
    with mounted_tmpfs(tmp_path / "disk", "256k") as disk:
        (disk / "run").mkdir()  # its rows go to the roomy disk: only the event file meets the full one
        (tmp_path / "metrics.jsonl").touch()
        (disk / "run" / "metrics.jsonl").symlink_to(tmp_path / "metrics.jsonl")
        proc = subprocess.run([sys.executable, "-c", script, str(disk / "run")], cwd=ROOT, capture_output=True,
                              text=True, timeout=HOLD_S)  # a writer blocked on its queue hangs
        assert proc.returncode == 0 and "Traceback" not in proc.stderr and "in thread" not in proc.stderr, \
            proc.stderr[-3000:]
        assert "cannot write" in proc.stdout and "No space left on device" in proc.stdout, proc.stdout
        assert proc.stdout.rstrip().endswith("closed")  # closing after the failure does not hang
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(disk / "run"), size_guidance={"scalars": 0})
        acc.Reload()  # the file was cut back to its last whole record: every step it holds is read back
        steps = [e.step for e in acc.Scalars("tag0")]
        assert steps and steps == list(range(1, len(steps) + 1))
        assert "metrics.jsonl" not in proc.stdout and "events.out.tfevents" in proc.stdout
