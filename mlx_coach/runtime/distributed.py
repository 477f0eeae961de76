"""Data parallelism over `mx.distributed`: this process's rank, its share of a step's prompts, and the
collectives that turn per-rank numbers into the global batch's numbers.

`mlx.launch -n 2 --backend ring -- mlx-coach train ...` starts one process per rank; `world()` calls
`mx.distributed.init()` once and keeps the group. Without mlx.launch the group has size 1 and every
helper here returns its input unchanged without running a collective, so a single-process run
computes exactly what it would with no distributed code at all.

Sharding is contiguous: rank r takes the r-th of `size` near-equal slices of the step's prompts
(`np.array_split`), so concatenating the ranks' rollouts in rank order gives the single-process
batch's order. `gather` relies on that to rebuild per-sample columns of the global batch.
"""

import json
import os

import mlx.core as mx
import numpy as np

_WORLD = None


class World:
    """Rank and size of the global group, and the few collectives the trainer needs."""

    def __init__(self, group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    @property
    def is_main(self):
        """Rank 0 alone writes the run directory (metrics, TensorBoard, checkpoints, alerts)."""
        return self.rank == 0

    def shard(self, items):
        """This rank's contiguous slice of `items` (may be empty when len(items) < size)."""
        lo, hi = shard_bounds(len(items), self.size, self.rank)
        return items[lo:hi]

    def all_sum(self, values):
        """Element-wise sum over ranks of a float or a flat list of floats (float32 on the wire)."""
        return self._reduce(mx.distributed.all_sum, values)

    def all_max(self, values):
        return self._reduce(mx.distributed.all_max, values)

    def all_min(self, values):
        return self._reduce(mx.distributed.all_min, values)

    def _reduce(self, op, values):
        if self.size == 1:
            return values
        x = op(mx.array(np.atleast_1d(np.asarray(values, dtype=np.float32))), group=self.group)
        out = np.array(x, dtype=np.float64)
        return float(out[0]) if np.ndim(values) == 0 else out.tolist()

    def gather_columns(self, columns):
        """{name: per-sample list} of every rank, concatenated in rank order (size 1: `columns` itself)."""
        if self.size == 1:
            return columns
        names = list(columns)
        rows = np.array([columns[k] for k in names], dtype=np.float32).T.reshape(-1, len(names))
        merged = self.gather(rows)
        return {k: merged[:, i].tolist() for i, k in enumerate(names)}

    def gather(self, rows):
        """Concatenate every rank's rows (a [n_r, k] float array, n_r may differ, even be 0) in rank order."""
        rows = np.asarray(rows, dtype=np.float32)
        if self.size == 1:
            return rows
        width = rows.shape[1] if rows.ndim == 2 else 1
        rows = rows.reshape(-1, width)
        counts = np.array(self.all_gather_fixed(np.array([[len(rows)]], dtype=np.float32)), dtype=np.int64).ravel()
        padded = np.zeros((max(int(counts.max()), 1), width), dtype=np.float32)
        padded[: len(rows)] = rows
        stacked = np.array(self.all_gather_fixed(padded)).reshape(self.size, -1, width)
        return np.concatenate([stacked[r, : counts[r]] for r in range(self.size)], axis=0)

    def all_gather_fixed(self, x):
        return mx.distributed.all_gather(mx.array(x), group=self.group)

    def gather_bytes(self, blobs):
        """Every rank's list of byte strings, as one list per rank in rank order (lists may differ in
        length, even be empty): how strings (cache keys, encoded verdicts) cross ranks."""
        blobs = [bytes(b) for b in blobs]
        if self.size == 1:
            return [blobs]
        lengths = self.gather(np.array([[len(blobs)], *([len(b)] for b in blobs)], dtype=np.float32)).ravel()
        payload = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.float32)  # bytes are exact in float32
        data = self.gather(payload[:, None]).ravel().astype(np.uint8).tobytes()
        out, i, at = [], 0, 0
        for _ in range(self.size):  # lengths holds, per rank, its count then its blobs' lengths
            count = int(lengths[i])
            sizes = [int(n) for n in lengths[i + 1: i + 1 + count]]
            i += 1 + count
            mine = []
            for n in sizes:
                mine.append(data[at: at + n])
                at += n
            out.append(mine)
        return out

    def from_main(self, value):
        """Rank 0's float on every rank (for decisions only rank 0 may take, e.g. a learning-rate cut)."""
        if self.size == 1:
            return value
        return self.all_sum(value if self.is_main else 0.0)


def shard_bounds(n, size, rank):
    """[lo, hi) of rank's contiguous share of n items; shares differ in length by at most one."""
    sizes = [len(a) for a in np.array_split(np.arange(n), size)]
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def world():
    """The global group's World; `mx.distributed.init()` runs once per process."""
    global _WORLD
    if _WORLD is None:
        _WORLD = World(mx.distributed.init())
    return _WORLD


def launched_backend():
    """The backend mlx.launch set up for this process, read from its environment (None outside mlx.launch)."""
    if os.environ.get("MLX_IBV_DEVICES"):
        return "jaccl"
    if os.environ.get("MLX_HOSTFILE"):
        return "ring"
    if os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE"):
        return "mpi"
    return None


def step_timing(world_, rollout_s, slowest, allreduce_s):
    """The dist/* timing tags of a step on several ranks ({} on one): each rank's rollout time (the
    slowest, which the caller has already reduced for time/generate_s, and the fastest), the gap the
    others wait for the slowest (straggler), and rank 0's time for the gradient all-reduce. Every rank
    takes part in the collectives; rank 0 logs the result."""
    if world_.size == 1:
        return {}
    fastest = world_.all_min(rollout_s)
    return {"dist/rollout_s_max": slowest, "dist/rollout_s_min": fastest, "dist/straggler_s": slowest - fastest,
            "dist/allreduce_s": world_.from_main(allreduce_s)}


GROUP_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR",
             "MLX_JACCL_RING", "MLX_RING_VERBOSE")
GROUP_ENV_PREFIXES = ("OMPI_", "PMI_", "PMIX_")


def outside_group_env(env):
    """`env` without the variables mlx.launch (ring, JACCL) or MPI set for this run's group: a child
    process given it (a judge server: mlx_lm.server calls mx.distributed.init()) does not try to join
    the group as this rank and wait for peers that never come."""
    return {k: v for k, v in env.items() if k not in GROUP_ENV and not k.startswith(GROUP_ENV_PREFIXES)}


def main_host():
    """The address the other ranks reach rank 0 at: its first IP in the ring backend's hostfile
    (MLX_HOSTFILE: a JSON list, per rank, of "ip:port"), else loopback (ranks on one machine)."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        with open(path) as f:
            return json.load(f)[0][0].rsplit(":", 1)[0]
    except (TypeError, OSError, ValueError, IndexError, KeyError, AttributeError):
        return "127.0.0.1"


def tree_checksum(flat_params):
    """A cheap fingerprint of parameters: sum and sum of squares over every array (float32)."""
    total, squares = 0.0, 0.0
    for _, v in flat_params:
        v = v.astype(mx.float32)
        total += float(mx.sum(v).item())
        squares += float(mx.sum(v * v).item())
    return [total, squares]


def checksum_spread(world_, flat_params):
    """Largest relative difference between ranks' parameter checksums (0.0 when identical)."""
    mine = tree_checksum(flat_params)
    if world_.size == 1:
        return 0.0
    hi, lo = world_.all_max(mine), world_.all_min(mine)
    return max(abs(h - low) / max(abs(h), abs(low), 1e-12) for h, low in zip(hi, lo))
