"""The single-process sandbox harness as it was before issue 9, kept as the benchmark's baseline
and as the adversarial corpus's proof that its probes are real (they pass here).

Runs one sample in a fresh interpreter: `python -I -B [-S] single_process_harness.py IN_FD OUT_FD`.
Started by sandbox.py's parent code (benchmarks/bench_sandbox.py: single_process_design), never
imported by the package, standard library and the package's stdlib-only scoring helpers. Its working
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
import marshal
import os
import sys

# The limits, guards, partial-credit instrumentation and error classes are the same code the
# judge/worker design uses: import them from the package's scoring folder (-I leaves it off the path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mlx_coach", "rewards", "scoring"))
from _confine import apply_limits  # noqa: E402
from _errors import classify  # noqa: E402
from _guards import install_guards  # noqa: E402
from _judge import instrument  # noqa: E402

del sys.path[0]

ERROR_CHARS = 500


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
