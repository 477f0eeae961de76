"""Exceptions across the boundary, and how an exception becomes a status and a message.

The worker names the first built-in class in its exception's MRO and sends the exception's args
(when they are plain data) and its text; the judge rebuilds only classes from ALLOWED, an
allow-list of built-in Exception subclasses, so no class the sample defined is ever constructed
in the judge.
"""

import builtins

ERROR_CHARS = 500
# SystemExit, KeyboardInterrupt and GeneratorExit are not here: a candidate raising one of them
# is a failed call, not an exception the test could catch as a normal outcome.
ALLOWED = {name: cls for name, cls in vars(builtins).items()
           if isinstance(cls, type) and issubclass(cls, Exception)}


def builtin_name(exc) -> str:
    for cls in type(exc).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return "BaseException"


def rebuild(name: str, args, text: str):
    """An instance of the allowed built-in class `name`, or None when `name` is not allowed."""
    cls = ALLOWED.get(name)
    if cls is None:
        return None
    for attempt in (lambda c: c(*args), lambda c: c(text)):  # e.g. UnicodeDecodeError needs 5 args
        for c in cls.__mro__:
            if c in ALLOWED.values():
                try:
                    return attempt(c)
                except Exception:  # noqa: BLE001 - a constructor that rejects these args
                    continue
    return Exception(text)


def classify(exc) -> str:
    """Status for an exception that ended the test."""
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


def describe(exc, filename, lines) -> str:
    """`Type: message [line N: source]`, N the last line of `filename` in the traceback."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    tb, lineno = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    if lineno is None and isinstance(exc, SyntaxError) and exc.filename == filename:
        lineno = exc.lineno
    if lineno is not None and 0 < lineno <= len(lines):
        text += f" [line {lineno}: {lines[lineno - 1].strip()}]"
    return text[:ERROR_CHARS]
