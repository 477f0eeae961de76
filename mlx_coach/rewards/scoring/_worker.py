"""The untrusted side: runs prompt + completion and answers the judge's calls, nothing more.

Forked by _launch.py before the judge has read anything from the trainer, so this process never
holds the nonce, the verdict channel or the test; its only channel is the socket to the judge.

Messages (plain data, _wire.py), judge -> worker:
    ("setup", {"uid", "network", "filesystem", "processes", "hidden", "site_packages", "limits", "root"})  once
    ("load", source, entry_point)                              once
    ("call", seq, args, kwargs)                                any number
and worker -> judge:
    ("hello", unset_limits, {guard: what holds})               after setup, before any sample code
    ("loaded",) | ("raised", builtin_name, args, text)         after load
    ("return", seq, value, {arg_index: new_value})             list/dict/set arguments it changed
    ("raise", seq, builtin_name, args, text) | ("bad", seq, why)
The worker leaves when the judge closes the socket.
"""

import builtins
import os
import sys

import _confine
import _errors
import _guards
import _namespaces
import _wire

_MUTABLE = (list, dict, set)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the sample may have replaced or closed them
            pass


def _exception_reply(head, exc, filename, lines):
    try:
        args = exc.args
        try:
            _wire.encode(args)
        except _wire.WireError:
            args = ()
        return head + (_errors.builtin_name(exc), args, _errors.describe(exc, filename, lines))
    except BaseException:  # noqa: BLE001 - an exception whose str() or args misbehave
        return head + ("Exception", (), "an exception that could not be described")


def main(fd):
    exit_now = os._exit  # bound before the guards replace it
    _, setup = _wire.recv(fd)
    # Namespaces first: building the new root needs the privileges the user switch gives up.
    held = _namespaces.isolate(setup["root"], setup["hidden"], setup["site_packages"], setup["filesystem"],
                               setup["processes"], setup["network"], keep_fds=(fd,))
    held |= _confine.confine_worker(setup["uid"], setup["root"])
    unset = _confine.apply_limits(setup["limits"])
    _wire.send(fd, ("hello", unset, held))

    _, source, entry_point = _wire.recv(fd)
    lines = source.splitlines()
    _guards.install_guards(setup["root"])
    namespace = {"__name__": "__sample__", "__builtins__": builtins}
    try:
        exec(compile(source, "<sample>", "exec"), namespace)  # noqa: S102 - the sample, in the worker only
        fn = namespace[entry_point]
        reply = ("loaded",)
    except BaseException as e:  # noqa: BLE001 - reported to the judge, which decides
        reply = _exception_reply(("raised",), e, "<sample>", lines)
    _flush()
    _wire.send(fd, reply)
    if reply[0] != "loaded":
        exit_now(0)

    while True:
        try:
            _, seq, args, kwargs = _wire.recv(fd)
        except _wire.WireError:
            break
        before = [_wire.encode(a) if type(a) in _MUTABLE else None for a in args]
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            reply = _exception_reply(("raise", seq), e, "<sample>", lines)
        else:
            try:
                changed = {}
                for i, (a, old) in enumerate(zip(args, before)):
                    if old is not None and _wire.encode(a) != old:
                        changed[i] = a
                payload = _wire.encode(("return", seq, value, changed))
            except _wire.WireError as e:
                reply = ("bad", seq, f"the candidate's result: {e}")
            except BaseException as e:  # noqa: BLE001 - e.g. RecursionError on a self-containing list
                reply = ("bad", seq, f"the candidate's result could not be sent: {type(e).__name__}")
            else:
                _flush()
                _wire.write_all(fd, _wire.frame(payload))
                continue
        _flush()
        _wire.send(fd, reply)
    _flush()
    exit_now(0)
