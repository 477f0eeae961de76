"""How a command stops before its end, other than on bad input, and the exit code the CLI gives each.

- `SignalStop` (exit 128 + the signal's number: 130 SIGINT, 143 SIGTERM, 129 SIGHUP): the process
  was told to stop. It is a KeyboardInterrupt, so every `except KeyboardInterrupt` that passes Ctrl-C
  on (ab to its runs) or cleans up treats SIGTERM and SIGHUP the same way. `mlx-coach train` lets the
  step in progress finish and checkpoints it first (rl/loop.py).
- `WriteFailed` (exit 4): a file the run must keep could not be written (disk full, read-only,
  no permission). Its message names what and where; the writer that raises it has already removed
  what it half wrote (a checkpoint's temporary folder, a metrics row cut short).
"""

import errno
import signal

WRITE_FAILED_EXIT = 4
# an OSError with one of these, wherever a run meets it, is the disk refusing a write
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalStop(KeyboardInterrupt):
    """Stopped by signal `signum`; the message says what was kept (the CLI prints it in one line)."""

    def __init__(self, signum, detail=None):
        super().__init__(detail or signal_name(signum))
        self.signum = signum

    @property
    def exit_code(self):
        return 128 + self.signum


def raise_signal_stop(signum, frame):
    """A signal handler: SIGTERM or SIGHUP stop the command as Ctrl-C does."""
    raise SignalStop(signum)


class WriteFailed(Exception):
    """A write the run depends on failed; the message names the file or folder and the OS's reason."""


def write_failed(what, err):
    """WriteFailed for an OSError met while writing `what` (a file or folder, as the user should read it)."""
    return WriteFailed(f"cannot write {what} ({err.strerror or err})")
