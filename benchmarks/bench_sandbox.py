"""Sandbox cost: trivial samples through the sandbox vs bare interpreter spawns, side by side.

    python benchmarks/bench_sandbox.py [--samples 500] [--workers 2] [--latency-n 40] [--json PATH]

1. Latency, one at a time: a sample through `run_sample` vs `python -c pass` and vs
   `python -I -B -S -c pass` (the interpreter flags the sandbox uses), interleaved so that
   both see the same machine load. Overhead = sandbox median - spawn median.
2. Throughput, `--workers` at a time: `--samples` trivial samples through SandboxScorer vs as many
   bare `python -c pass` spawns on a thread pool of the same size, in alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_coach.scoring.sandbox import SandboxConfig, SandboxScorer, run_sample  # noqa: E402
from mlx_coach.tasks import Task  # noqa: E402

TASK = Task("bench/add", "def add(a, b):\n", "add",
            "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n")
COMPLETION = "    return a + b\n"
BARE = [sys.executable, "-c", "pass"]
BARE_FLAGS = [sys.executable, "-I", "-B", "-S", "-c", "pass"]
# Like the sandbox's children, no preloaded BLAS (`mlx-coach bench` runs under LD_PRELOAD=OpenBLAS).
ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def spawn(argv) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                   check=True)
    return time.perf_counter() - t0


def sandboxed(cfg) -> float:
    t0 = time.perf_counter()
    score = run_sample(TASK, COMPLETION, cfg)
    assert score.passed, score
    return time.perf_counter() - t0


def latency(n: int, cfg) -> dict:
    times = {"python -c pass": [], "python -I -B -S -c pass": [], "sandbox sample": []}
    for _ in range(n):
        times["python -c pass"].append(spawn(BARE))
        times["python -I -B -S -c pass"].append(spawn(BARE_FLAGS))
        times["sandbox sample"].append(sandboxed(cfg))
    return {name: {"median_ms": statistics.median(t) * 1000, "mean_ms": statistics.fmean(t) * 1000}
            for name, t in times.items()}


def throughput(samples: int, workers: int, cfg, rounds: int = 5) -> dict:
    per_round = max(1, samples // rounds)
    spent = {"bare": 0.0, "sandbox": 0.0}
    done = {"bare": 0, "sandbox": 0}
    statuses = {}
    with SandboxScorer(cfg) as scorer, ThreadPoolExecutor(workers) as pool:
        for r in range(rounds):
            n = per_round if r < rounds - 1 else samples - per_round * (rounds - 1)
            t0 = time.perf_counter()
            list(pool.map(lambda _: spawn(BARE), range(n)))
            spent["bare"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for s in scorer.score_batch([(TASK, COMPLETION)] * n):
                statuses[s.status] = statuses.get(s.status, 0) + 1
            spent["sandbox"] += time.perf_counter() - t0
            done["bare"] += n
            done["sandbox"] += n
    return {"workers": workers, "samples": samples, "statuses": statuses,
            "bare_spawns_per_s": done["bare"] / spent["bare"],
            "sandbox_samples_per_s": done["sandbox"] / spent["sandbox"],
            "bare_s": spent["bare"], "sandbox_s": spent["sandbox"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-n", type=int, default=40)
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    args = ap.parse_args(argv)
    cfg = SandboxConfig(workers=args.workers)

    lat = latency(args.latency_n, cfg)
    thr = throughput(args.samples, args.workers, cfg)
    overhead = lat["sandbox sample"]["median_ms"] - lat["python -c pass"]["median_ms"]
    overhead_flags = lat["sandbox sample"]["median_ms"] - lat["python -I -B -S -c pass"]["median_ms"]

    print(f"sandbox benchmark: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    print(f"\nlatency, one at a time ({args.latency_n} each, interleaved)")
    print(f"  {'':26} {'median ms':>10} {'mean ms':>10}")
    for name, t in lat.items():
        print(f"  {name:26} {t['median_ms']:10.1f} {t['mean_ms']:10.1f}")
    print(f"  per-sample overhead vs python -c pass:          {overhead:+.1f} ms")
    print(f"  per-sample overhead vs python -I -B -S -c pass: {overhead_flags:+.1f} ms")
    print(f"\nthroughput, {args.workers} workers ({args.samples} each, alternating rounds)")
    print(f"  bare python -c pass spawns   {thr['bare_spawns_per_s']:8.1f} /s")
    print(f"  sandboxed samples            {thr['sandbox_samples_per_s']:8.1f} /s   statuses {thr['statuses']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency": lat, "throughput": thr, "overhead_ms": overhead,
                                               "overhead_vs_same_flags_ms": overhead_flags,
                                               "cpus": os.cpu_count(), "platform": platform.platform()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
