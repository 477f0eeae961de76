"""A run directory's ownership: one writer at a time, and a directory that knows it holds a run.

`claim(run_dir, resume=...)` is the first thing a trainer does to its run directory:

- it takes an exclusive `flock` on `RUN/.lock` (the OS drops it when the process dies, even by
  SIGKILL), so a second trainer on the same directory gets one line and exit code 2 instead of
  racing on the base-model copy or sweeping the live run's temporary checkpoint;
- it decides what a start does with what is already there: `--resume` needs a checkpoint; a fresh
  start into a directory holding checkpoints is refused; a fresh start into a directory holding a
  run that died before its first checkpoint moves that attempt's files to `RUN/aborted/N/` and
  says so (its metrics would otherwise be appended to: step 1 twice);
- it writes the marker `RUN/run.json` before anything else, so a directory knows it holds a run
  from its first write.

Files are only ever written under the claim; `release()` (or process exit) gives it back.
"""

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from mlx_coach.core.errors import UserError
from mlx_coach.runtime.stops import write_failed

MARKER = "run.json"
LOCK = ".lock"
ABORTED = "aborted"
# what a run writes at its first step; an older run (before the marker existed) is known by these
RUN_FILES = (MARKER, "config.yaml", "metrics.jsonl", "events.jsonl", "alerts.jsonl", "checkpoints")


class RunClaim:
    """The held lock of one run directory."""

    def __init__(self, run_dir, fd):
        self.run_dir, self._fd = Path(run_dir), fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _lock(run_dir):
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--output: cannot write the run directory {run_dir} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f" (pid {holder})" if holder else ""
        raise UserError(f"{run_dir} is in use by another trainer{who}; wait for it or choose another --output") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_pid(fd):
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""


def _has_checkpoint(run_dir):
    from mlx_coach.runtime.checkpoint import list_checkpoints

    return bool(list_checkpoints(run_dir))


def _leftovers(run_dir):
    return sorted(p for p in run_dir.iterdir() if p.name not in (LOCK, ABORTED))


def _move_aside(run_dir, items):
    root = run_dir / ABORTED
    root.mkdir(exist_ok=True)
    n = 1
    while (root / str(n)).exists():
        n += 1
    target = root / str(n)
    target.mkdir()
    for p in items:
        os.replace(p, target / p.name)
    return target


def claim(run_dir, *, resume=False):
    """Lock `run_dir` and make it ready for a fresh start or a resume; UserError (one line) if not."""
    run_dir = Path(run_dir)
    fd = _lock(run_dir)
    try:
        if resume:
            if not _has_checkpoint(run_dir):
                raise UserError(f"--resume: {run_dir} has no checkpoint (the run stopped before its first one); "
                                f"start it again with --output {run_dir} (its files are moved aside)")
        else:
            _prepare_fresh(run_dir)
        marker = run_dir / MARKER
        if not marker.is_file():
            _write_marker(marker)
    except BaseException:
        os.close(fd)
        raise
    return RunClaim(run_dir, fd)


def _prepare_fresh(run_dir):
    if _has_checkpoint(run_dir):
        raise UserError(f"--output: {run_dir} already holds checkpoints; use --resume {run_dir} or a new --output")
    items = _leftovers(run_dir)
    if not items:
        return
    if not any((run_dir / name).exists() for name in RUN_FILES):
        raise UserError(f"--output: {run_dir} is not empty and holds no mlx-coach run; choose an empty or new folder")
    target = _move_aside(run_dir, items)
    print(f"{run_dir} held a run that stopped before its first checkpoint; moved its files to {target}, "
          f"starting clean", file=sys.stderr)


def _write_marker(path):
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps({"format": 1, "created": time.time(), "pid": os.getpid()}) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_failed(path, e) from None


def writable_dir(path, flag):
    """`path` as a folder this process can write into (created if missing), or UserError naming `flag`."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag}: cannot write to {out} ({e.strerror or e})") from None
    return out
