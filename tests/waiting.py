"""Waiting in tests without betting on the machine's speed.

A test waits for an event (a barrier, a condition, a process's exit), never for a fixed time. The
bounds here are failure bounds only: HOLD_S is reached only when the code under test is broken (a
passing run never waits it out, however loaded the machine); GRACE_S is how long a test of an upper
bound (at most N at once) looks for an N + 1st. A correct run passes whatever GRACE_S is; a larger
one only makes a broken bound more certain to show.
"""

import os
import select
import time

HOLD_S = 60.0
GRACE_S = 0.5


def wait_until(predicate, timeout=HOLD_S, interval=0.01):
    """True once predicate() holds, False after `timeout` s: for conditions no event signals."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def wait_exited(pid, timeout=HOLD_S):
    """True once process `pid` has exited (a zombie waiting for its reaper counts), False after `timeout` s.
    Any process, not only a child: its pidfd becomes readable when it exits (Linux); elsewhere, until
    it is gone from the process table."""
    if not hasattr(os, "pidfd_open"):
        return wait_until(lambda: not _in_process_table(pid), timeout)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _in_process_table(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
