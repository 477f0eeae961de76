"""What the operating system offers to confine a process: rlimits, another user, no capabilities.

Each function returns what it could not do (a list of strings) instead of raising, so that the
sandbox runs wherever Python does and records which confinement held (`mlx-coach doctor`).
Standard library only; the prctl and capset calls go through ctypes because Python 3.11's `os`
has neither.
"""

import os
import sys

_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_SET_NO_NEW_PRIVS = 38


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


_loaded = None


def _libc():
    """(libc, ctypes), loaded once per process (the worker's namespaces make a dozen calls a sample)."""
    global _loaded
    if _loaded is None:
        import ctypes

        _loaded = ctypes.CDLL(None, use_errno=True), ctypes
    return _loaded


def _call(fn, *args):
    """None on success, else the errno's text."""
    libc, ctypes = _libc()
    if getattr(libc, fn)(*args) == 0:
        return None
    return os.strerror(ctypes.get_errno())


def confine_worker(uid, workdir=None):
    """Linux: user `uid` with no groups, no capabilities and no_new_privs (the namespaces come first,
    from _namespaces.py). Must run before the rlimits (setuid checks RLIMIT_NPROC of the new user).

    Returns {guard: what holds}, each value starting with "yes" or "no".
    """
    held = {}
    linux = sys.platform.startswith("linux")
    unreadable = _first_unreadable(sys.path) if uid is not None else None
    if uid is None:
        held["user"] = "no: same user as the trainer" + ("" if os.geteuid() == 0 else " (not root, cannot switch)")
    elif unreadable:
        held["user"] = f"no: {unreadable} is not readable by other users, so the worker stays root"
    else:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # from root to another uid: every capability is dropped with it
            held["user"] = f"yes: uid {uid}, no groups, no capabilities"
        except OSError as e:
            held["user"] = f"no: setuid({uid}): {e.strerror}"
    if linux and os.geteuid() == 0:
        # still root (no switch, or an interpreter other users cannot read): keep uid 0 but give up
        # every capability, so the worker cannot ptrace or read the undumpable judge's memory, or switch
        # users, namespaces or limits back. Without CAP_DAC_OVERRIDE it must own its directory, which
        # the trainer gave to `uid` in advance.
        if workdir is not None and os.stat(workdir).st_uid != 0:
            os.chown(workdir, 0, 0)
        why = drop_capabilities()
        held["capabilities"] = "yes: none (uid 0 without capabilities)" if why is None else f"no: {why}"
    if linux:
        why = _call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        held["no_new_privs"] = "yes" if why is None else f"no: {why}"
    else:
        held["no_new_privs"] = f"no: Linux only ({sys.platform})"
    return held


def drop_capabilities():
    """Linux: empty the bounding set and the effective, permitted and inheritable sets (capset with
    version 3 headers). None on success, else why not."""
    libc, ctypes = _libc()
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL: past the kernel's last capability
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    if libc.capset(header, data) != 0:
        return f"capset: {os.strerror(ctypes.get_errno())}"
    return None


def _first_unreadable(paths):
    """The first import path another user could not read (a folder on its way lacks o+rx), or None.

    Checked before switching users: after the switch, an import from such a path would fail.
    """
    import stat

    for path in paths:
        if not path or not os.path.exists(path):
            continue
        probe = os.path.abspath(path)
        while True:
            if os.stat(probe).st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
                return probe
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
    return None


def make_undumpable():
    """Linux: no process of the same user may read this one's memory or open its /proc/PID/fd."""
    if sys.platform.startswith("linux"):
        return _call("prctl", _PR_SET_DUMPABLE, 0, 0, 0, 0)
    return f"Linux only ({sys.platform})"
