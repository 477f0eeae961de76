"""A child process that ends when the process that started it is gone, even by SIGKILL.

The child is told its parent's pid (never read from getppid() at start: the parent may already be
gone) and a thread polls getppid(): once it differs, the child was reparented (to init or a
subreaper), so its parent is gone, and `on_gone` runs once. Polling, not prctl(PR_SET_PDEATHSIG):
that one is Linux-only and fires when the parent *thread* that started the child exits.

Two users: teacher_server's mlx_lm server exits at once (it holds nothing), and `mlx-coach ab`'s
`train` runs (pid in PARENT_ENV) stop as on SIGTERM: the step in progress finishes and is checkpointed.
"""

import os
import threading
import time

PARENT_ENV = "MLX_COACH_PARENT_PID"
POLL_S = 0.5


def watch_parent(parent_pid, on_gone, interval=POLL_S):
    """Start a daemon thread that calls `on_gone()` once process `parent_pid` is no longer the parent."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(interval)
        on_gone()

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def env_for_child(env=None):
    """The environment for a child that must stop with this process (read there by `parent_from_env`)."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def parent_from_env():
    """The pid PARENT_ENV names, or None; taken out of the environment, so this process's own children
    are not tied to its parent."""
    value = os.environ.pop(PARENT_ENV, None)
    try:
        return int(value) if value else None
    except ValueError:
        return None
