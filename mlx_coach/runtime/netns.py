"""Two hosts on one machine: two network namespaces joined by a veth pair (`mlx-coach launch --netns`).

Each rank runs inside its own namespace (`ip netns exec NS ...`), so the ring backend's traffic goes
through a real network stack (10.77.0.1/24 <-> 10.77.0.2/24) instead of loopback. Names carry a random
token, so launches side by side never collide (their addresses live in different namespaces); the
namespaces are deleted when the block ends, failures included (deleting a namespace deletes its veth
end, and with it the pair). Processes see each other across network namespaces (one pid namespace),
so the launcher watches and signals ranks as it does without --netns.

`--shape "rate=10gbit,delay=1ms"` shapes both directions of the link: the netem qdisc when a delay is
asked for (it does rate and delay at once), else tbf (rate only). A kernel built without netem refuses
a delay in one line rather than run unshaped.
"""

import os
import re
import secrets
import shutil
import subprocess

from mlx_coach.core.errors import UserError

ADDRESSES = ("10.77.0.1", "10.77.0.2")
_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit)$")
_DELAY = re.compile(r"^\d+(\.\d+)?(us|ms|s)$")
_RATE_UNIT = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_DELAY_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_shape(text):
    """{"rate": "10gbit", "delay": "1ms"} of `--shape`'s "rate=...,delay=..." (either may be left out)."""
    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip().lower()
        if key not in ("rate", "delay"):
            raise UserError(f"--shape: unknown key {key!r} in {text!r} (rate=RATE, delay=TIME, e.g. "
                            f"\"rate=10gbit,delay=1ms\")")
        if not (_RATE if key == "rate" else _DELAY).match(value):
            example = "10gbit, 800mbit" if key == "rate" else "1ms, 50us"
            raise UserError(f"--shape: {key}={value!r} is not a {key} (e.g. {example})")
        shape[key] = value
    if not shape:
        raise UserError(f"--shape: nothing to shape in {text!r} (e.g. \"rate=10gbit,delay=1ms\")")
    return shape


def rate_bits(rate):
    """Bits per second of a tc rate such as "10gbit"."""
    unit = re.sub(r"^[\d.]+", "", rate)
    return float(rate[: -len(unit)]) * _RATE_UNIT[unit]


def delay_seconds(delay):
    unit = re.sub(r"^[\d.]+", "", delay)
    return float(delay[: -len(unit)]) * _DELAY_UNIT[unit]


def _ip(*args, what):
    p = subprocess.run(args, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        detail = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"--netns: {what}: {' '.join(args)}: {detail}")


class LinkPair:
    """Two namespaces joined by a veth pair, optionally shaped; a context manager that always tears down."""

    def __init__(self, shape=None):
        if os.geteuid() != 0:
            raise UserError("--netns: needs root (it creates network namespaces); run as root or leave --netns out")
        for tool in ("ip", "tc") if shape else ("ip",):
            if shutil.which(tool) is None:
                raise UserError(f"--netns: the `{tool}` command (iproute2) is not installed")
        token = secrets.token_hex(3)
        self.namespaces = [f"mlx-coach-{token}-{i}" for i in range(2)]
        self.links = [f"mc{token}v{i}" for i in range(2)]  # interface names: at most 15 characters
        self.shape = shape
        self.addresses = ADDRESSES

    def exec_prefix(self, i):
        return ["ip", "netns", "exec", self.namespaces[i]]

    def __enter__(self):
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _create(self):
        (ns0, ns1), (v0, v1) = self.namespaces, self.links
        for ns in self.namespaces:
            _ip("ip", "netns", "add", ns, what="creating a namespace")
        _ip("ip", "link", "add", v0, "type", "veth", "peer", "name", v1, what="creating the veth pair")
        for ns, link, address in ((ns0, v0, ADDRESSES[0]), (ns1, v1, ADDRESSES[1])):
            _ip("ip", "link", "set", link, "netns", ns, what="moving a veth end")
            _ip("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", link, what="addressing a veth end")
            _ip("ip", "-n", ns, "link", "set", link, "up", what="bringing a veth end up")
            _ip("ip", "-n", ns, "link", "set", "lo", "up", what="bringing loopback up")
            if self.shape:
                self._shape(ns, link)

    def _shape(self, ns, link):
        rate, delay = self.shape.get("rate"), self.shape.get("delay")
        if delay:
            qdisc = ["netem", "delay", delay] + (["rate", rate] if rate else [])
        else:  # tbf: a bucket of 1 ms at the rate (at least 64 KiB), so a burst never starves the link
            burst = max(int(rate_bits(rate) / 8 * 1e-3), 64 * 1024)
            qdisc = ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
        p = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", link, "root", *qdisc],
                           capture_output=True, text=True, check=False)
        if p.returncode != 0:
            detail = (p.stderr.strip().splitlines() or ["failed"])[-1]
            if delay and "unknown" in detail.lower():
                detail = "this kernel has no netem qdisc (sch_netem), so it cannot add a delay; shape the rate only"
            raise UserError(f"--shape: {' '.join(qdisc)}: {detail}")

    def close(self):
        for ns in self.namespaces:  # deleting a namespace deletes its veth end and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        # a pair created but not yet moved lives in this namespace
        subprocess.run(["ip", "link", "del", self.links[0]], capture_output=True, check=False)
