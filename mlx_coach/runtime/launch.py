"""Starting the ranks of a data-parallel run (`mlx-coach launch`) and seeing every one of them end.

What a ring-backend rank needs (mx.distributed.init() reads it): MLX_RANK, its place in the ring, and
MLX_HOSTFILE, a JSON file listing for each rank, in rank order, the "ip:port" addresses it listens on
(`[["10.0.0.1:5000"], ["10.0.0.2:5001"]]`). Rank r connects to rank r+1's addresses and accepts rank
r-1's, so every address must be reachable from the neighbouring ranks' hosts.

`run_ranks` starts one process per `Rank`, each in its own session (a signal to the launcher reaches
a rank once, forwarded, never twice) with its stdin a pipe that only the launcher writes: the notice
channel runtime/watchdog.py reads. Output: rank 0's lines pass through as they come, other ranks'
lines with a "[rank r] " prefix; the closing one-liners (`mlx-coach: ...`) are held back, and once
every rank has ended the launcher prints exactly one: the failing rank's (so a config error every
rank reports is one line), or its own when the failing rank said nothing (killed by a signal).

When a rank fails (non-zero exit), the others are told to stop (a `stop` notice: they exit at once
with PEER_GONE_EXIT, even inside a collective), sent SIGTERM after GRACE_S, SIGKILL after another
GRACE_S; so no rank outlives a failed one by more than 2 x GRACE_S. The launcher's exit code is the
failing rank's (128 + signal number for a rank killed by a signal); a rank that stopped only because
another one failed is never the one reported.
"""

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from mlx_coach.core.errors import UserError
from mlx_coach.runtime.watchdog import LAUNCH_ENV, PEER_GONE_EXIT, STOP

GRACE_S = 10.0
CLOSING = b"mlx-coach: "  # the CLI's closing one-liners (error, stopped, write failed)
LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")


@dataclass
class Rank:
    """One rank to start: `argv` run as is (prefixed with `ip netns exec NS` or `ssh HOST` by the
    caller), with `env` added to the launcher's environment."""

    rank: int
    argv: list
    env: dict = field(default_factory=dict)


def ring_hostfile(addresses):
    """MLX_HOSTFILE's JSON for one "ip:port" address per rank, in rank order."""
    return json.dumps([[a] for a in addresses])


def free_ports(n):
    """n TCP ports free on 127.0.0.1 a moment ago (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def rank_env(rank, hostfile_path):
    """The variables a ring rank needs, plus ours: the notice channel's flag and unbuffered output (a pipe
    would otherwise hold a rank's lines back until it exits)."""
    env = {"MLX_RANK": str(rank), LAUNCH_ENV: str(rank), "PYTHONUNBUFFERED": "1"}
    return {**env, "MLX_HOSTFILE": hostfile_path} if hostfile_path else env  # 1 rank: no group to join


def ssh_argv(host, argv, env, hostfile_json, cwd):
    """`ssh HOST 'cd CWD && VAR=... exec ARGV'` for a rank on another machine; MLX_HOSTFILE's content is
    written to a temporary file there. `-T`: no terminal, so ssh passes the notice pipe's end-of-file on."""
    env = {k: v for k, v in env.items() if k != "MLX_HOSTFILE"}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    script = (f"cd {shlex.quote(cwd)} && f=$(mktemp) && printf %s {shlex.quote(hostfile_json)} > \"$f\" && "
              f"MLX_HOSTFILE=\"$f\" {exports} exec {shlex.join(argv)}")
    return ["ssh", "-T", "-o", "BatchMode=yes", host, script]


def signal_exit(code):
    """A Popen returncode as a shell reports it: -N (killed by signal N) becomes 128 + N."""
    return 128 - code if code < 0 else code


def describe_exit(code):
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Output:
    """Passes ranks' lines on as they come, holding back each rank's closing one-liners."""

    def __init__(self):
        self.closing = {}  # rank -> [closing lines]
        self._lock = threading.Lock()

    def pump(self, rank, stream, to):
        """Pass `stream`'s lines on to `to` (a binary stream). A rank stopped mid-write leaves its last line
        unterminated: it is ended here, so that the next line, another rank's or the launcher's, starts its own."""
        prefix = b"" if rank == 0 else f"[rank {rank}] ".encode()
        for line in iter(stream.readline, b""):
            line = line if line.endswith(b"\n") else line + b"\n"
            if line.startswith(CLOSING):
                with self._lock:
                    self.closing.setdefault(rank, []).append(line)
                continue
            with self._lock:
                to.write(prefix + line)
                to.flush()
        stream.close()


class _Ranks:
    """The started processes: exits arrive on a queue (one waiter thread each), signals are forwarded."""

    def __init__(self, ranks, cwd, stdout):
        self.output, self.exits, self.procs, self.threads = _Output(), queue.Queue(), {}, []
        self.forwarded = []  # the signals the launcher passed on to the ranks
        for r in ranks:
            try:
                proc = subprocess.Popen(r.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env={**os.environ, **r.env}, cwd=cwd, start_new_session=True)
            except OSError as e:  # no such program (ip, ssh, the interpreter): the ranks started so far end
                self.signal(signal.SIGKILL)
                raise UserError(f"launch: cannot start rank {r.rank}: {r.argv[0]}: {e.strerror}") from None
            self.procs[r.rank] = proc
            for stream, to in ((proc.stdout, stdout or sys.stdout.buffer), (proc.stderr, sys.stderr.buffer)):
                self._thread(self.output.pump, r.rank, stream, to)
            self._thread(lambda rank, p: self.exits.put((rank, p.wait())), r.rank, proc)

    def _thread(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def alive(self):
        return [r for r, p in self.procs.items() if p.returncode is None]

    def notify(self, reason):
        for r in self.alive():
            try:
                self.procs[r].stdin.write(STOP + reason.encode() + b"\n")
                self.procs[r].stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # already gone

    def signal(self, sig):
        for r in self.alive():
            try:
                os.kill(self.procs[r].pid, sig)
            except ProcessLookupError:
                pass


def run_ranks(ranks, cwd=None, grace_s=GRACE_S, stdout=None):
    """Start `ranks`, pass their output on (their stdout to `stdout`, a binary stream, default this
    process's), and return the launcher's exit code (module docstring)."""
    state = _Ranks(ranks, cwd, stdout)
    handlers = _forward_signals(state)
    order, escalations = [], [signal.SIGTERM, signal.SIGKILL]
    deadline = None  # set when a rank failed: when the next escalation is due
    try:
        while len(order) < len(state.procs):
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                rank, code = state.exits.get(timeout=wait)
            except queue.Empty:  # the others outlived the grace period
                state.signal(escalations.pop(0))
                deadline = time.monotonic() + grace_s if escalations else None
                continue
            order.append((rank, code))
            if code != 0 and deadline is None and escalations and not state.forwarded:
                # a forwarded Ctrl-C or SIGTERM ends every rank by itself, rank 0 saving its checkpoint
                state.notify(f"rank {rank} {describe_exit(code)}")
                deadline = time.monotonic() + grace_s
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        for t in state.threads:
            t.join(timeout=grace_s)
    return _report(order, state.output.closing)


def _report(order, closing):
    """Print the one closing line and return the exit code (module docstring)."""
    failures = [(r, c) for r, c in order if c != 0]
    if not failures:
        for line in closing.get(0, []):
            sys.stderr.buffer.write(line)
        sys.stderr.flush()
        return 0
    causes = [(r, c) for r, c in failures if c != PEER_GONE_EXIT] or failures
    code = causes[0][1]
    same = sorted(r for r, c in causes if c == code)  # ranks that failed alike: the lowest one speaks
    said = next((closing[r][-1] for r in same if closing.get(r)), None)
    if said is not None:
        sys.stderr.buffer.write(said)
    else:
        stopped = ", the other ranks were stopped" if len(order) > 1 else ""
        sys.stderr.buffer.write(f"mlx-coach: error: rank {same[0]} {describe_exit(code)}{stopped}\n".encode())
    sys.stderr.flush()
    return signal_exit(code)


def _forward_signals(state):
    """SIGINT, SIGTERM and SIGHUP to the launcher go to every rank once (each rank then checkpoints and
    stops as it would alone); a second one kills the ranks. Returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    def forward(signum, frame):
        state.forwarded.append(signum)
        state.signal(signum if len(state.forwarded) == 1 else signal.SIGKILL)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def read_hostfile(path):
    """[(ssh host, ip), ...] of a hostfile: {"hosts": [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, ...]}
    (mlx.launch's format; a bare list of hosts is accepted too); bad content raises UserError naming it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"--hostfile: cannot read {path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--hostfile: {path} is not JSON (line {e.lineno}: {e.msg})") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or len(hosts) < 1:
        raise UserError(f"--hostfile: {path}: expected {{\"hosts\": [{{\"ssh\": HOST, \"ips\": [IP]}}, ...]}}")
    out = []
    for i, h in enumerate(hosts):
        ips = h.get("ips") if isinstance(h, dict) else None
        if not (isinstance(ips, list) and ips and all(isinstance(ip, str) and ip for ip in ips)):
            raise UserError(f"--hostfile: {path}: hosts[{i}].ips must be a non-empty list of IP addresses "
                            f"(the ring backend connects to addresses, not host names)")
        ssh = h.get("ssh") or ""
        if not isinstance(ssh, str):
            raise UserError(f"--hostfile: {path}: hosts[{i}].ssh must be a host name")
        out.append((ssh, ips[0]))
    return out
