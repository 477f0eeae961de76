"""`mlx-coach launch -n N [--hostfile F | --netns [--shape S]] -- <mlx-coach args...>`: the ranks of a
data-parallel run over MLX's ring backend, started and watched by runtime/launch.py.

Three placements: N ranks on this machine over loopback (the default); two ranks in two network
namespaces joined by a veth pair (--netns, root only; runtime/netns.py); one rank per host of a
hostfile (--hostfile; ranks on other machines are started over ssh, those on this one directly).
"""

import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from mlx_coach.commands.argtypes import positive_int
from mlx_coach.core.errors import UserError
from mlx_coach.runtime.launch import (
    LOCAL_HOSTS,
    Rank,
    free_ports,
    rank_env,
    read_hostfile,
    ring_hostfile,
    run_ranks,
    ssh_argv,
)
from mlx_coach.runtime.netns import LinkPair, parse_shape

DEFAULT_PORT = 32323  # the first rank's port with --netns or --hostfile; rank r listens on port + r


def add_arguments(p):
    p.add_argument("-n", "--ranks", type=positive_int, help="ranks to start (default: 2 with --netns, one per host "
                   "with --hostfile, else 1)")
    p.add_argument("--hostfile", help='JSON: {"hosts": [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, ...]}, one '
                   "rank per host in order; hosts other than this one are reached over ssh")
    p.add_argument("--netns", action="store_true", help="run 2 ranks in two network namespaces joined by a veth "
                   "pair (root only), so the ring backend talks over a real network stack")
    p.add_argument("--shape", help='with --netns: shape the link, e.g. "rate=10gbit,delay=1ms" (tc tbf/netem)')
    p.add_argument("--port", type=positive_int, help=f"first rank's port (default: free ports on loopback, "
                   f"{DEFAULT_PORT} otherwise); rank r uses port + r")
    p.add_argument("rank_command", nargs="...", metavar="COMMAND", help="the mlx-coach command each rank runs, after --, e.g. "
                   "-- train -c configs/tiny.yaml")


def _command(args):
    command = list(args.rank_command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UserError("launch: give the command each rank runs after --, e.g. "
                        "mlx-coach launch -n 2 -- train -c configs/tiny.yaml")
    if command[0] == "launch":
        raise UserError("launch: the ranks cannot themselves be `launch`")
    return [sys.executable, "-m", "mlx_coach", *command]


def _check(args):
    if args.netns and args.hostfile:
        raise UserError("launch: --netns and --hostfile exclude each other (--netns makes its own two hosts)")
    if args.shape and not args.netns:
        raise UserError("--shape: only with --netns (on real hosts, the network is what it is)")
    if args.netns and args.ranks not in (None, 2):
        raise UserError(f"--netns: runs exactly 2 ranks, one per namespace; got -n {args.ranks}")
    if args.port is not None and args.port + (args.ranks or 1) > 65535:
        raise UserError(f"--port: {args.port} + one port per rank passes 65535")


def run(args):
    _check(args)
    argv = _command(args)
    shape = parse_shape(args.shape) if args.shape else None
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    if hosts is not None and args.ranks not in (None, len(hosts)):
        raise UserError(f"-n: {args.ranks} ranks, but {args.hostfile} lists {len(hosts)} hosts (one rank per host)")
    n = 2 if args.netns else len(hosts) if hosts else args.ranks or 1
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlx-coach-launch-")))
        if args.netns:
            link = stack.enter_context(LinkPair(shape))
            ips, prefixes, remote = list(link.addresses), [link.exec_prefix(i) for i in range(2)], [None, None]
        elif hosts:
            ips = [ip for _, ip in hosts]
            remote = [None if ssh in LOCAL_HOSTS else ssh for ssh, _ in hosts]
            prefixes = [[] for _ in hosts]
        else:
            ips, prefixes, remote = ["127.0.0.1"] * n, [[] for _ in range(n)], [None] * n
        ports = ([args.port + r for r in range(n)] if args.port else free_ports(n) if not (args.netns or hosts)
                 else [DEFAULT_PORT + r for r in range(n)])
        hostfile_json = ring_hostfile([f"{ip}:{port}" for ip, port in zip(ips, ports)])
        hostfile = tmp / "hostfile.json"
        hostfile.write_text(hostfile_json)
        ranks = []
        for r in range(n):
            env = rank_env(r, str(hostfile) if n > 1 else None)
            if remote[r]:
                ranks.append(Rank(r, ssh_argv(remote[r], argv, env, hostfile_json, os.getcwd())))
            else:
                ranks.append(Rank(r, prefixes[r] + argv, env))
        return run_ranks(ranks)
