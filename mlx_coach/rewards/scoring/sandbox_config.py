"""The `sandbox:` settings and what they become for the operating system: the rlimits of the sample's
processes, the user the worker switches to, and on macOS the sandbox-exec profile around the interpreter.

The worker applies the rlimits (address space, or data segment on macOS; CPU seconds; file size;
processes; open files; no core files) and, on Linux, its own network, mount and PID namespaces
(_namespaces.py; as another user than root, inside a user namespace), uid `worker_uid` (as root) and
no_new_privs (_confine.py). On Linux RLIMIT_NPROC counts every thread of the user and
is not enforced for root; it is set to the system's thread count plus `max_procs`.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

from mlx_coach.core.settings import check_fields, setting

SANDBOX_EXEC = "/usr/bin/sandbox-exec"


@dataclass
class SandboxConfig:
    """The `sandbox:` config section."""

    timeout_s: float = setting(5.0, lo=0.0, lo_open=True, help="wall clock, from spawn to verdict, interpreter start included")
    memory_mb: int = setting(1024, lo=16, help="address space (Linux) or data segment (macOS) of the worker")
    cpu_s: Optional[int] = setting(None, lo=1, help="CPU seconds; null: half of timeout_s, at least 1, so a program "
                                   "that computes past its budget is killed (a verdict) before the wall deadline, "
                                   "which is left for a worker the machine starved (unjudged)")
    max_output_bytes: int = setting(64_000, lo=0, help="kept of each of stdout and stderr; the rest is read and dropped")
    max_file_bytes: int = setting(10_000_000, lo=0)
    max_procs: int = setting(64, lo=1, help="threads/processes the sample may add (Linux counts threads)")
    max_open_files: int = setting(64, lo=8)
    partial_credit: bool = setting(False, help="value = share of check()'s top-level asserts that depend on "
                                   "the answers and passed on one (rules: _judge.py)")
    workers: int = setting(0, lo=0, help="samples scored at once; 0 = CPU count")
    site_packages: bool = setting(False, help="let samples import installed packages (slower start, ~+30 ms)")
    python: Optional[str] = setting(None, help="interpreter for judge and worker; null: the one running mlx-coach")
    call_timeout_s: Optional[float] = setting(None, lo=0.0, lo_open=True, help="per call of the candidate; null: timeout_s")
    worker_uid: Optional[int] = setting(65534, lo=0, help="Linux, trainer running as root: the worker's user (null: stay root)")
    isolate_network: bool = setting(True, help="Linux: the worker gets an empty network namespace")
    isolate_filesystem: bool = setting(True, help="Linux: the worker gets its own mount namespace: the system and the "
                                       "interpreter read-only, its directory writable, nothing else (no tasks files, "
                                       "no benchmark data, no checkout)")
    isolate_processes: bool = setting(True, help="Linux: the worker is process 1 of its own PID namespace, with a "
                                      "fresh /proc: it can neither see nor signal any other process")
    macos_profile: bool = setting(True, help="macOS: run judge and worker under sandbox-exec (no network, writes "
                                             "only in the sample's directory)")

    def __post_init__(self):
        check_fields(self, "sandbox")

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable

    def verdict_settings(self) -> dict:
        """Every setting that can change a verdict (not workers, not the output cap): part of the cache key."""
        keep = ("timeout_s", "memory_mb", "cpu_s", "max_file_bytes", "max_procs", "max_open_files", "partial_credit",
                "site_packages", "call_timeout_s", "worker_uid", "isolate_network", "isolate_filesystem",
                "isolate_processes", "macos_profile")
        return {name: getattr(self, name) for name in keep} | {"python": self.interpreter}


def rlimits_for(platform: str, cfg: SandboxConfig, tasks_in_use: int | None = None) -> dict:
    """{RLIMIT_NAME: (soft, hard)} for the sandbox child, or a string saying why a limit is not set.

    macOS refuses RLIMIT_AS, so memory is bounded there by RLIMIT_DATA, the closest limit it has
    (`mlx-coach doctor` shows whether each limit could be set). RLIMIT_NPROC is per user, not per
    process: it is set to the tasks in use now plus `max_procs`, left unset where that count is
    unknown.
    """
    mem = cfg.memory_mb * 1024 * 1024
    cpu = cfg.cpu_s if cfg.cpu_s is not None else max(1, math.floor(cfg.timeout_s / 2))
    limits = {"RLIMIT_DATA" if platform == "darwin" else "RLIMIT_AS": (mem, mem),
              "RLIMIT_CPU": (cpu, cpu + 1),  # soft: SIGXCPU; hard, a second later: SIGKILL
              "RLIMIT_FSIZE": (cfg.max_file_bytes, cfg.max_file_bytes),
              "RLIMIT_NOFILE": (cfg.max_open_files, cfg.max_open_files),
              "RLIMIT_CORE": (0, 0)}
    if tasks_in_use is None:
        limits["RLIMIT_NPROC"] = f"the user's process count is unknown on {platform}; not set"
    else:
        n = tasks_in_use + cfg.max_procs
        limits["RLIMIT_NPROC"] = (n, n)
    return limits


def tasks_in_use() -> int | None:
    """Threads on the whole system (>= the user's), from /proc/loadavg; None where there is none."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[1])
    except (OSError, IndexError, ValueError):
        return None


def worker_uid(cfg: SandboxConfig) -> int | None:
    """The user the worker switches to: cfg.worker_uid on Linux when this process is root, else None."""
    if cfg.worker_uid is None or not sys.platform.startswith("linux") or os.geteuid() != 0:
        return None
    return int(cfg.worker_uid)


def _sbpl_string(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def macos_profile(root: str, unreadable=()) -> str:
    """A sandbox-exec (SBPL) profile: everything the interpreter needs, but no network, no writes
    outside the sample's private directory (and /dev/null), and no reading `unreadable` (the tasks
    files and benchmark data: the answer key). Later rules win in SBPL, so the denials follow the
    default allow."""
    profile = ("(version 1)\n(allow default)\n(deny network*)\n(deny file-write*)\n"
               f"(allow file-write* (subpath {_sbpl_string(root)}) (literal \"/dev/null\"))\n")
    if unreadable:
        profile += "(deny file-read* " + " ".join(f"(subpath {_sbpl_string(p)})" for p in unreadable) + ")\n"
    return profile


def confine_argv(argv: list, root: str, cfg: SandboxConfig, platform: str, sandbox_exec: str | None, unreadable=()):
    """(argv, what held) for the sample's interpreter: on macOS, wrapped in sandbox-exec with
    `macos_profile` (judge and worker both run under it: the judge needs neither network nor writes,
    and reads the task from its request, not from the tasks file). Elsewhere argv unchanged and None
    (Linux confines the worker itself, see _namespaces.py and _confine.py)."""
    if platform != "darwin":
        return argv, None
    if not cfg.macos_profile:
        return argv, "no: sandbox.macos_profile is off"
    if not sandbox_exec:
        return argv, f"no: {SANDBOX_EXEC} not found"
    return ([sandbox_exec, "-p", macos_profile(root, unreadable), *argv],
            "yes: sandbox-exec, no network, writes only in its directory, tasks files and benchmark data unreadable")
