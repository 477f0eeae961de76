"""Linux namespaces around the worker: its own view of the file system and of the processes.

`isolate(...)` runs in the worker before any sample code. With `filesystem`, the worker gets a new
mount namespace whose root is a fresh tmpfs holding only what an interpreter needs, read-only: the
system's /usr (and /bin, /lib... as the host lays them out), a few files of /etc, the interpreter's
prefix (site-packages and installed benchmark data behind empty folders unless the sample may import
packages), /dev/null, zero, full, random, urandom; writable, only its own directory. Every other path
(the trainer's checkout, tasks files, home folders, /tmp, /dev/shm) does not exist for it. With
`processes`, a new PID namespace holding only the sample's processes, with a fresh /proc, so no other
process can be named, read (/proc/PID/cmdline, environ) or signalled; it starts its own session so
that signalling its process group reaches nothing outside. Three processes: the forking parent (outside,
the pid the judge knows) waits and ends as the sample ended; process 1 reaps orphans and reports the
sample's wait status; the sample runs as process 2, so that its own signals and resource limits'
signals act on it as usual (process 1 of a namespace ignores them).

As root this needs no extra privilege. As another user it runs in a new user namespace (the user's
own uid mapped onto itself) where the kernel allows unprivileged ones. Standard library only
(ctypes for unshare, mount, mount_setattr, prctl), like the rest of the worker's side.
"""

import os
import sys

from _confine import _libc

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
_PR_SET_PDEATHSIG = 1
_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and arm64 (added after the tables were unified)
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_ETC_FILES = ("ld.so.cache", "localtime", "passwd", "group", "nsswitch.conf")
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")


class Refused(Exception):
    """A step of the isolation failed; the message says which and why."""


def _mount(source, target, fstype, flags, data=None, what=None):
    libc, ctypes = _libc()
    enc = (lambda s: None if s is None else os.fsencode(s))
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise Refused(f"{what or f'mount {target}'}: {os.strerror(ctypes.get_errno())}")


def _locked_flags(path):
    """Flags a bind mount of `path` must keep when remounted (the kernel locks them in a user namespace)."""
    flags, f = 0, os.statvfs(path).f_flag
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            flags |= ms
    return flags


def _make_node(new_root, path, like):
    """An empty folder or file at new_root + path (parents 0755), shaped like host path `like`."""
    target = new_root + path
    if os.path.isdir(like):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if not os.path.lexists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    return target


def _bind(new_root, path, writable=False, source=None):
    """Bind host `path` at the same place under new_root: with what is mounted below it, except for
    the sample's folder, which has the new root itself mounted on it."""
    target = _make_node(new_root, path, source or path)
    _mount(source or path, target, None, MS_BIND | (0 if writable else MS_REC), what=f"bind {path}")
    if not writable:
        _read_only(target, path)


def _read_only(target, source):
    libc, ctypes = _libc()

    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr: set, clear, propagation, userns
    if libc.syscall(_SYS_MOUNT_SETATTR, -100, os.fsencode(target), _AT_RECURSIVE, ctypes.byref(attr),
                    ctypes.sizeof(attr)) == 0:
        return
    # Kernels before 5.12: the top mount only (what is mounted below a bound folder stays as it was).
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(source), what=f"read-only {source}")


def _hide(new_root, path):
    """An empty read-only folder over `path` (or /dev/null over a file) where it is visible in new_root."""
    target = new_root + path
    if not os.path.lexists(target):
        return
    if os.path.isdir(target):
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=555",
               what=f"hide {path}")
    else:
        _mount("/dev/null", target, None, MS_BIND, what=f"hide {path}")


def interpreter_paths(site_packages):
    """(visible, hidden) for this interpreter: the system folders and its prefixes, and unless samples
    may import packages, every site-packages folder under them."""
    prefixes = []
    for p in (sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix):
        if p and p not in prefixes:
            prefixes.append(p)
    visible = [p for p in _SYSTEM if os.path.isdir(p) and not os.path.islink(p)]
    visible += [p for p in prefixes if not any(p == v or p.startswith(v + "/") for v in visible)]
    hidden = []
    if not site_packages:
        version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        for p in prefixes + ["/usr", "/usr/local"]:
            for sub in (f"lib/{version}/site-packages", f"lib/{version}/dist-packages", "lib/python3/dist-packages"):
                if os.path.isdir(f"{p}/{sub}") and f"{p}/{sub}" not in hidden:
                    hidden.append(f"{p}/{sub}")
    return visible, hidden


def _layout(workdir, workdir_fd, visible, hidden, with_proc):
    # The new root is a tmpfs over the sample's own folder (so no second folder is needed); the folder
    # itself is bound back in from the descriptor opened before it was covered.
    new_root = workdir
    _mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755", what="tmpfs root")
    for name in sorted(os.listdir("/")):  # merged-/usr systems: /bin, /lib... are links into /usr
        host = "/" + name
        if os.path.islink(host) and os.readlink(host).lstrip("/").startswith("usr/"):
            os.symlink(os.readlink(host), new_root + host)
    for path in visible:
        if os.path.exists(path) and not os.path.islink(path):
            _bind(new_root, path)
    for name in _ETC_FILES:
        if os.path.isfile("/etc/" + name):
            _bind(new_root, "/etc/" + name)
    os.makedirs(new_root + "/dev", mode=0o755, exist_ok=True)
    for name in _DEVICES:  # devices, not files: a read-only mount would refuse writing to /dev/null
        if os.path.exists("/dev/" + name):
            target = _make_node(new_root, "/dev/" + name, "/dev/" + name)
            _mount("/dev/" + name, target, None, MS_BIND, what=f"bind /dev/{name}")
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
        os.symlink(to, f"{new_root}/dev/{name}")
    for path in hidden:
        _hide(new_root, path)
    _bind(new_root, workdir, writable=True, source=f"/proc/self/fd/{workdir_fd}")
    if with_proc:
        os.makedirs(new_root + "/proc", mode=0o555, exist_ok=True)
    _mount(None, new_root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, what="read-only root")


def _map_own_user():
    """In a new user namespace: the same uid and gid inside as outside, so files keep their owners."""
    uid, gid = os.getuid(), os.getgid()

    def write(name, text):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)

    try:
        write("setgroups", "deny")
        write("uid_map", f"{uid} {uid} 1")
        write("gid_map", f"{gid} {gid} 1")
    except OSError as e:
        raise Refused(f"user namespace map: {e.strerror}") from None


def _pass_on(status):
    """End this process as `status` (a wait status) says: the same exit code, or the same signal."""
    if os.WIFSIGNALED(status):
        import resource
        import signal

        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # the two whose action cannot be changed
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _forking_parent(init, status_r):
    """Outside the new namespace: wait for its process 1, then end as the sample did (process 1
    writes the sample's wait status; if it died first, end as it did). Never returns."""
    try:
        _, init_status = os.waitpid(init, 0)
        data = os.read(status_r, 4)
        _pass_on(int.from_bytes(data, "little") if len(data) == 4 else init_status)
    finally:
        os._exit(1)


def _init(sample, status_w):
    """Process 1 of the new namespace: reap every orphan until the sample ends, report its wait
    status, and leave (which ends every process left in the namespace). A signal the sample sends
    process 1 is ignored by the kernel (a namespace's init has no default signal actions)."""
    try:
        while True:
            pid, status = os.wait()
            if pid == sample:
                os.write(status_w, status.to_bytes(4, "little"))
                break
    finally:
        os._exit(0)


def isolate(workdir, hidden, site_packages, filesystem, processes, network, keep_fds):
    """Confine this process (the worker) before any sample code runs. Returns {guard: what holds}.

    `hidden`: paths the trainer names as answer keys (tasks files, benchmark data, the package), shown
    empty wherever they fall inside the visible tree; `keep_fds`: descriptors the forking parent closes
    (the worker's channel), so that only process 1 of the new namespace holds them.
    """
    held = {}
    linux = sys.platform.startswith("linux")
    wanted = {"mount_namespace": filesystem, "pid_namespace": processes}
    if not linux:
        return {name: f"no: Linux only ({sys.platform})" for name, on in wanted.items() if on} | (
            {"network": f"no: network namespaces are Linux only ({sys.platform})"} if network else {})
    flags = (CLONE_NEWNS if filesystem or processes else 0) | (CLONE_NEWPID if processes else 0) | (
        CLONE_NEWNET if network else 0)
    if flags == 0:
        return held
    user_ns = os.geteuid() != 0
    libc, ctypes = _libc()
    if libc.unshare(flags | (CLONE_NEWUSER if user_ns else 0)) != 0:
        why = os.strerror(ctypes.get_errno())
        return {name: f"no: unshare: {why}" for name, on in (("network", network), *wanted.items()) if on}
    how = " (user namespace)" if user_ns else ""
    status_w = None
    try:
        if user_ns:
            _map_own_user()
        if network:
            held["network"] = "yes: empty network namespace" + how
        if processes:
            status_r, status_w = os.pipe()
            init = os.fork()
            if init != 0:
                for fd in (*keep_fds, status_w):
                    os.close(fd)
                _forking_parent(init, status_r)
            os.close(status_r)
            libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL when the forking parent goes
            os.setsid()
        if flags & CLONE_NEWNS:
            _mount(None, "/", None, MS_REC | MS_PRIVATE, what="private mounts")
        if filesystem:
            visible, system_hidden = interpreter_paths(site_packages)
            workdir_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
            _layout(workdir, workdir_fd, visible, system_hidden + list(hidden), with_proc=processes)
            os.close(workdir_fd)
            os.chroot(workdir)
            os.chdir(workdir)
            held["mount_namespace"] = "yes: read-only system and interpreter, writable only its directory" + how
            held["answer_key"] = "yes: tasks files, the package and benchmark data are outside its root"
        if processes:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, what="mount /proc")
            held["pid_namespace"] = "yes: its own PID namespace and session, fresh /proc" + how
            held["signals"] = "yes: no process outside its namespace can be named" + how
    except (Refused, OSError) as e:
        why = str(e) if isinstance(e, Refused) else f"{e.strerror}: {e.filename}"
        for name, on in (*wanted.items(), ("signals", processes), ("answer_key", filesystem)):
            if on and name not in held:
                held[name] = f"no: {why}"
    if status_w is not None:  # in the new PID namespace, as its process 1: the sample runs as process 2
        sample = os.fork()
        if sample != 0:
            for fd in keep_fds:
                os.close(fd)
            _init(sample, status_w)
        os.close(status_w)
    return held
