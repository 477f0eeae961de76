"""A child process that ends when the process that started it is gone, even by SIGKILL; and a rank of
`mlx-coach launch` that ends when the launcher or another rank is gone.

The child is told its parent's pid (never read from getppid() at start: the parent may already be
gone) and a thread polls getppid(): once it differs, the child was reparented (to init or a
subreaper), so its parent is gone, and `on_gone` runs once. Polling, not prctl(PR_SET_PDEATHSIG):
that one is Linux-only and fires when the parent *thread* that started the child exits.

Two users: teacher_server's mlx_lm server exits at once (it holds nothing), and `mlx-coach ab`'s
`train` runs (pid in PARENT_ENV) stop as on SIGTERM: the step in progress finishes and is checkpointed.

A rank started by `mlx-coach launch` (LAUNCH_ENV holds its rank) cannot stop that way: a collective
waiting for a dead peer blocks in C and never returns to Python, so a signal handler would never run.
Its stdin is a pipe whose only writer is the launcher: the launcher writes one `stop <reason>` line
when another rank failed, and the pipe reaches end-of-file when the launcher is gone (even SIGKILLed,
even over ssh to another host). `watch_launcher_from_env` reads it in a thread, prints
`mlx-coach: error: rank R: <reason>` and ends the process with os._exit(PEER_GONE_EXIT). The run
directory's lock is a flock, which the OS drops with the process; checkpoints are written whole or
not at all (runtime/checkpoint.py), so rank 0's finished checkpoints stay intact.
"""

import os
import threading
import time

PARENT_ENV = "MLX_COACH_PARENT_PID"
LAUNCH_ENV = "MLX_COACH_LAUNCH_RANK"
POLL_S = 0.5
PEER_GONE_EXIT = 5  # a rank that stopped because another rank or the launcher is gone
STOP = b"stop "  # the launcher's line: `stop <reason>\n`


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


def watch_launcher_from_env():
    """Under `mlx-coach launch`, start watching the launcher (see the module docstring); else do nothing.
    LAUNCH_ENV is taken out of the environment, so this rank's own children are not ranks. The notice
    pipe is moved off fd 0 (stdin becomes /dev/null) so no child can read the launcher's lines."""
    rank = os.environ.pop(LAUNCH_ENV, None)
    if rank is None:
        return
    notices = os.dup(0)  # not inheritable (PEP 446)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    threading.Thread(target=_read_notices, args=(notices, rank), name="watch-launcher", daemon=True).start()


def _read_notices(fd, rank):
    buffered = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            _stop(rank, "the launcher is gone (its notice pipe closed)")
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            if line.startswith(STOP):
                _stop(rank, line[len(STOP):].decode(errors="replace"))


def _stop(rank, reason):
    # os.write, not print: the main thread may hold sys.stderr's lock while it waits in a collective;
    # stderr may be a pipe to the dead launcher, and the process must end all the same
    try:
        os.write(2, f"mlx-coach: error: rank {rank}: {reason}; stopping this rank\n".encode())
    finally:
        os._exit(PEER_GONE_EXIT)
