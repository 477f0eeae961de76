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

Files are only ever written under the claim; `release()` (or process exit) gives it back. What a run
writes at its start (the marker, config.yaml, the starting weights, a builtin base model's copy) is
written whole or not at all (`written_whole`): a write the disk refuses (full, read-only, no
permission) leaves nothing half-written and raises WriteFailed naming the file, as a failed checkpoint
does. A run directory that cannot be created or opened at all is bad input (`--output`, UserError)
unless the disk refused it (DISK_ERRNOS: WriteFailed).
"""

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

from mlx_coach.core.errors import UserError
from mlx_coach.runtime.stops import DISK_ERRNOS, write_failed

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
        if e.errno in DISK_ERRNOS:
            raise write_failed(e.filename or run_dir, e) from None
        raise UserError(f"--output: cannot write the run directory {run_dir} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f" (pid {holder})" if holder else ""
        raise UserError(f"{run_dir} is in use by another trainer{who}; wait for it or choose another --output") from None
    try:  # the holder's pid, for the line a second trainer gets; the lock holds without it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        os.close(fd)
        raise write_failed(run_dir / LOCK, e) from None
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
    n = 1
    while (root / str(n)).exists():
        n += 1
    target = root / str(n)
    try:
        target.mkdir(parents=True)
        for p in items:
            os.replace(p, target / p.name)
    except OSError as e:  # what was moved stays in target: the next start moves the rest after it
        raise write_failed(target, e) from None
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
    with written_whole(path) as tmp:
        tmp.write_text(json.dumps({"format": 1, "created": time.time(), "pid": os.getpid()}) + "\n")


@contextlib.contextmanager
def written_whole(path):
    """`with written_whole(RUN/name) as tmp:` write a file, or a folder, at `tmp`; it is renamed to
    `path` when the block ends (a file there is replaced), so `path` is never seen half-written, even
    after a kill. `tmp` lies in a hidden scratch folder beside `path`, removed with everything in it
    if the block fails: an OSError becomes WriteFailed naming `path`, anything else passes through.
    Under the run's claim: a scratch folder of another process is a killed writer's, swept first."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        scratch.mkdir()
        yield scratch / path.name
        os.replace(scratch / path.name, path)
    except BaseException as e:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_failed(path, e) from None
        raise
    with contextlib.suppress(OSError):
        scratch.rmdir()


def copy_folder(src, dst):
    """Copy folder `src` to `dst` (created), file by file; the first file that cannot be written raises
    its own OSError (shutil.copytree goes on and gathers every failure into one shutil.Error)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir()
    for item in sorted(src.rglob("*")):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir()
        else:
            shutil.copyfile(item, target)


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
