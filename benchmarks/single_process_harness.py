"""The single-process sandbox harness as it was before issue 9, kept as the benchmark's baseline
and as the adversarial corpus's proof that its probes are real (they pass here).

Runs one sample in a fresh interpreter: `python -I -B [-S] single_process_harness.py IN_FD OUT_FD`.
Started by sandbox.py's parent code (benchmarks/bench_sandbox.py: single_process_design), never
imported by the package, standard library only. Its working
directory is the sample's private temporary directory.

Protocol. The parent writes one marshalled dict to IN_FD and closes its end: nonce, program,
partial, limits, root, max_open_files. The harness reads all of it and closes IN_FD (so the
nonce lives only in this process's memory), moves OUT_FD to a random high descriptor above the
open-files limit, applies the rlimits, writes a "ready" line, installs the guards and runs the
program. Only when the program has returned or raised does it write the "verdict" line, then
it leaves with os._exit so that no atexit handler or thread of the sample runs afterwards.
Lines are `NONCE ready HEX(unset limits)` and `NONCE verdict STATUS PASSED TOTAL HEX(error)`;
the parent ignores lines without the nonce, and without a verdict line the sample did not pass.
"""

import builtins
import io
import marshal
import os
import sys

ERROR_CHARS = 500
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxViolation(PermissionError):
    """A disabled or out-of-sandbox call made by the sample."""


def read_request(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return marshal.loads(b"".join(chunks))


def hide_channel(fd, max_open_files):
    """Move the verdict pipe to a random descriptor above the open-files limit.

    The sample can still find it (/proc/self/fd), but no file it opens can land on it, and a
    write to a guessed small number misses it. What protects the verdict is the nonce.
    """
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    hi = min(soft if soft != resource.RLIM_INFINITY else 4096, 4096)
    lo = max_open_files + 8
    if hi - lo < 2:
        return fd
    target = lo + int.from_bytes(os.urandom(2), "little") % (hi - lo)
    new = os.dup2(fd, target, inheritable=False)
    os.close(fd)
    return new


def apply_limits(limits):
    """setrlimit each (soft, hard); a string value is a reason it was not set. Returns what was not set."""
    import resource

    unset = []
    for name, value in limits.items():
        if isinstance(value, str):
            unset.append(f"{name}: {value}")
            continue
        res = getattr(resource, name, None)
        if res is None:
            unset.append(f"{name}: not available on {sys.platform}")
            continue
        soft, hard = value
        try:
            cur_hard = resource.getrlimit(res)[1]
            if cur_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, cur_hard), min(hard, cur_hard)
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError) as e:
            unset.append(f"{name}: {e}")
    if "RLIMIT_NPROC" in limits and sys.platform.startswith("linux") and os.geteuid() == 0:
        unset.append("RLIMIT_NPROC: set, but Linux does not enforce it for root")
    return unset


# ---------------------------------------------------------------------------------------------
# Partial credit: each top-level statement of check() that contains an assert is run on its own.


def instrument(tree, rec_name):
    """Wrap the asserting top-level statements of the last `def check`; returns how many."""
    import ast

    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        return 0
    fn, body, count = checks[-1], [], 0
    for stmt in fn.body:
        if not any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            body.append(stmt)
            continue
        wrapper = ast.parse(
            f"try:\n    pass\nexcept BaseException as _e:\n    {rec_name}({count}, _e)\n"
            f"else:\n    {rec_name}({count}, None)\n").body[0]
        wrapper.body = [stmt]
        body.append(ast.copy_location(wrapper, stmt))
        count += 1
    fn.body = body
    ast.fix_missing_locations(tree)
    return count


# ---------------------------------------------------------------------------------------------
# Guards: the second line of defence, after the process, session, rlimits and private cwd.


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


# ---------------------------------------------------------------------------------------------


def classify(exc):
    """Status for an exception that ended the program."""
    import errno

    if isinstance(exc, AssertionError):
        return "failed"
    if isinstance(exc, MemoryError):
        return "killed"
    if isinstance(exc, OSError) and exc.errno in (errno.EFBIG, errno.EMFILE, errno.ENFILE, errno.EAGAIN):
        return "killed"  # file size, open files, processes: rlimits hit
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return "killed"
    return "error"


def describe(exc, program_lines):
    """`Type: message [line N: source]`, with N the last line of the program in the traceback."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    tb, lineno = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<sample>":
            lineno = tb.tb_lineno
        tb = tb.tb_next
    if lineno is None and isinstance(exc, SyntaxError):
        lineno = exc.lineno
    if lineno is not None and 0 < lineno <= len(program_lines):
        text += f" [line {lineno}: {program_lines[lineno - 1].strip()}]"
    return text[:ERROR_CHARS]


def main():
    in_fd, out_fd = int(sys.argv[1]), int(sys.argv[2])
    request = read_request(in_fd)
    nonce = request["nonce"]
    out_fd = hide_channel(out_fd, request["max_open_files"])
    unset = apply_limits(request["limits"])

    # Everything used after the sample has run is bound here, out of the sample's reach by name
    # (it could patch builtins, or this module as sys.modules["__main__"]).
    write, exit_now, sum_, Base, exc_info = os.write, os._exit, sum, BaseException, sys.exc_info  # noqa: N806
    classify_, describe_, streams, builtins_dict = classify, describe, (sys.stdout, sys.stderr), vars(builtins)

    def send(*fields):
        data = ("\n" + " ".join((nonce,) + fields) + "\n").encode()
        while data:
            data = data[write(out_fd, data):]

    def hexed(text):
        return text.encode("utf-8", "replace").hex() or "-"

    send("ready", hexed("\n".join(unset)))
    fallback = ("verdict", "killed", "0", "0", hexed("MemoryError while reporting"))

    program = request["program"]
    lines = program.splitlines()
    rec_name = "_mlx_coach_rec_" + os.urandom(6).hex()
    results, first_failure = {}, []  # assert statement index -> passed
    total = 0

    def record(index, exc):
        results[index] = exc is None
        if exc is not None:
            if not first_failure:
                first_failure.append(exc)
            if isinstance(exc, MemoryError):
                raise exc

    try:
        namespace = {"__name__": "__sample__", "__builtins__": builtins, rec_name: record}
        install_guards(request["root"])
    except Base as e:
        send("verdict", "infra_error", "0", "0", hexed(f"installing the guards failed: {e!r}"))
        exit_now(0)

    status, error = "passed", ""
    saved_builtins = dict(builtins_dict)
    try:
        if request["partial"]:
            import ast

            tree = ast.parse(program, "<sample>")
            total = instrument(tree, rec_name)
            code = compile(tree, "<sample>", "exec")
        else:
            code = compile(program, "<sample>", "exec")
        exec(code, namespace)
        failure = first_failure[0] if first_failure else None
    except Base:
        failure = exc_info()[1]
    builtins_dict.clear()
    builtins_dict.update(saved_builtins)
    if failure is not None:
        try:
            status, error = classify_(failure), describe_(failure, lines)
        except Base:
            status, error = "error", "exception while describing the exception"
    try:
        n_ok = sum_(1 for i in range(total) if results.get(i)) if total else (1 if status == "passed" else 0)
        send("verdict", status, f"{n_ok}", f"{total}", hexed(error))
    except Base:
        send(*fallback)
    for stream in streams:  # after the verdict: whatever a replaced stream does cannot change it
        try:
            stream.flush()
        except Base:
            pass
    exit_now(0)


if __name__ == "__main__":
    main()
