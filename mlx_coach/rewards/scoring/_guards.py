"""In-process guards of the worker: destructive calls disabled inside the sample.

A second line of defence after the process boundary, rlimits, the dropped user and the private
directory (_confine.py): they stop accidents and casual reward hacks; a deliberate sample can undo
them (ctypes), which is why nothing the verdict depends on lives in the worker's process.
"""

import builtins
import io
import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxViolation(PermissionError):
    """A disabled or out-of-sandbox call made by the sample."""


def _refuse(name):
    def refused(*args, **kwargs):
        raise SandboxViolation(f"{name} is disabled in the sandbox")

    refused.__name__ = name.rsplit(".", 1)[-1]
    return refused


# Patched where they live: subprocess, shutil, pty and multiprocessing call these through their
# modules, so they are covered without being imported here.
_DISABLED = {
    "os": ["kill", "killpg", "fork", "forkpty", "system", "popen", "execv", "execve", "spawnv", "spawnve",
           "posix_spawn", "posix_spawnp", "chdir", "fchdir", "chroot", "putenv", "unsetenv", "setsid",
           "setpgid", "setpgrp", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid",
           "setresgid", "_exit", "abort", "pidfd_open", "plock", "lchflags", "chflags"],
    "_posixsubprocess": ["fork_exec"],
    "_signal": ["pthread_kill", "pidfd_send_signal"],
    "builtins": ["exit", "quit", "help"],
}
# Path arguments that must lie inside the sandbox directory. Deleting is allowed there only:
# tempfile, for one, cannot work without unlink in its own directory.
_GUARDED_PATHS = {"remove": (0,), "unlink": (0,), "rmdir": (0,), "removedirs": (0,), "mkdir": (0,),
                  "rename": (0, 1), "renames": (0, 1), "replace": (0, 1), "link": (0, 1), "symlink": (1,),
                  "truncate": (0,), "chmod": (0,), "chown": (0,), "lchown": (0,), "lchmod": (0,),
                  "utime": (0,), "mkfifo": (0,), "mknod": (0,)}
# Modules a sample should not reach for; a deliberate attacker can undo this, an accident will not.
_BLOCKED_MODULES = ("ctypes", "_ctypes", "resource", "psutil", "multiprocessing")


def install_guards(root):
    import posix

    # Bound once: a sample that patches builtins or os.path does not switch the checks off.
    realpath, fspath, fsdecode = os.path.realpath, os.fspath, os.fsdecode
    isinstance_, any_, len_ = isinstance, any, len
    prefix = root.rstrip(os.sep) + os.sep

    def inside(path):
        if isinstance_(path, int):
            return True
        p = realpath(fsdecode(fspath(path)))
        return p == root or p.startswith(prefix) or p == os.devnull

    def check(path, what):
        if not inside(path):
            raise SandboxViolation(f"{what} outside the sandbox directory: {path}")

    def guard_args(name, real, positions):
        def guarded(*args, **kwargs):
            for i in positions:
                if i < len_(args):
                    check(args[i], f"os.{name}")
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
                raise SandboxViolation(f"os.{name} with dir_fd is disabled in the sandbox")
            return real(*args, **kwargs)

        return guarded

    real_open, real_os_open, real_fileio = builtins.open, os.open, io.FileIO

    def guarded_open(file, mode="r", *args, **kwargs):
        if any_(c in mode for c in "wax+"):
            check(file, "open for writing")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            if kwargs.get("dir_fd") is not None:
                raise SandboxViolation("os.open with dir_fd is disabled in the sandbox")
            check(path, "os.open for writing")
        return real_os_open(path, flags, *args, **kwargs)

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any_(c in mode for c in "wax+"):
                check(file, "FileIO for writing")
            super().__init__(file, mode, *args, **kwargs)

    for mod in (os, posix):
        mod.open = guarded_os_open
        for name, positions in _GUARDED_PATHS.items():
            if hasattr(mod, name):
                setattr(mod, name, guard_args(name, getattr(mod, name), positions))
    builtins.open = io.open = sys.modules["_io"].open = guarded_open
    io.FileIO = GuardedFileIO
    for module_name, names in _DISABLED.items():
        mods = [os, posix] if module_name == "os" else [sys.modules.get(module_name) or __import__(module_name)]
        for mod in mods:
            for name in names:
                if hasattr(mod, name) or mod is builtins:
                    setattr(mod, name, _refuse(f"{module_name.lstrip('_')}.{name}"))
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None
