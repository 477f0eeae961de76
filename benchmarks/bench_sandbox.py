"""Sandbox cost: the judge/worker design vs the single-process design it replaced, and vs bare
interpreter spawns, side by side.

    python benchmarks/bench_sandbox.py [--samples 100] [--workers 2] [--latency-n 20] [--full] [--json PATH]

The default (100 samples, 20 latency rounds) finishes in a few minutes on a 2-core CPU; `--full` is the
long version (500 samples, 40 rounds). Progress lines go to stderr, the results to stdout.

1. Latency, one at a time: a sample through `run_sample` in each design vs `python -c pass` and
   `python -I -B -S -c pass` (the sandbox's interpreter flags), interleaved so that all see the
   same machine load. Overhead = sandbox median - spawn median.
2. Throughput, `--workers` at a time: `--samples` trivial samples through SandboxScorer in each
   design vs as many bare `python -c pass` spawns on a thread pool of the same size, in
   alternating rounds.

The single-process design is `single_process_harness.py` (the harness before issue 9: sample and
test in one interpreter, verdict sent from it) driven by the same parent code in sandbox.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from mlx_coach.commands.argtypes import positive_int  # noqa: E402
from mlx_coach.commands.bench import BenchParser  # noqa: E402
from mlx_coach.rewards.scoring import sandbox  # noqa: E402
from mlx_coach.rewards.scoring.sandbox import run_sample  # noqa: E402
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig  # noqa: E402
from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer  # noqa: E402
from mlx_coach.data.task import Task
from mlx_coach.telemetry.progress import bar, bench_note  # noqa: E402


SAMPLES, LATENCY_N = 100, 20  # the default's workload
FULL_SAMPLES, FULL_LATENCY_N = 500, 40  # --full


note = bench_note("sandbox")


def tqdm_range(n, desc, unit):
    """range(n) with a progress bar on a terminal, else a stderr line every tenth of the way."""
    every = max(1, n // 10)
    with bar(n, desc, unit=unit) as progress:
        for i in range(n):
            if progress.disable and i % every == 0:  # off a terminal the bar is silent
                note(f"{desc}: {unit} {i + 1}/{n}")
            yield i
            progress.update(1)

SINGLE_PROCESS_HARNESS = str(Path(__file__).with_name("single_process_harness.py"))


def _single_process_request(task, completion, cfg, nonce, root, limits, uid, hidden=()):
    return {"nonce": nonce, "program": sandbox.build_program(task, completion), "root": root,
            "partial": bool(cfg.partial_credit), "limits": limits, "max_open_files": int(cfg.max_open_files)}


@contextlib.contextmanager
def single_process_design():
    """Within this block, sandbox.execute runs the pre-judge single-process harness (not thread-safe
    against other sandbox use in this process: for benchmarks and the corpus's baseline test)."""
    saved = sandbox.LAUNCHER, sandbox._request
    sandbox.LAUNCHER, sandbox._request = SINGLE_PROCESS_HARNESS, _single_process_request
    try:
        yield
    finally:
        sandbox.LAUNCHER, sandbox._request = saved

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


# Each arm: how samples run, and the sandbox settings it changes. The namespace arms price each
# guard against the same design without it.
ARMS = {"judge+worker": (contextlib.nullcontext, {}),
        "no mount namespace": (contextlib.nullcontext, {"isolate_filesystem": False}),
        "no PID namespace": (contextlib.nullcontext, {"isolate_processes": False}),
        "no mount, no PID ns": (contextlib.nullcontext, {"isolate_filesystem": False, "isolate_processes": False}),
        "single process": (single_process_design, {})}


def latency(n: int, cfg) -> dict:
    times = {"python -c pass": [], "python -I -B -S -c pass": []} | {f"sandbox, {a}": [] for a in ARMS}
    for _ in tqdm_range(n, "sandbox latency", "round"):
        times["python -c pass"].append(spawn(BARE))
        times["python -I -B -S -c pass"].append(spawn(BARE_FLAGS))
        for arm, (ctx, changes) in ARMS.items():
            with ctx():
                times[f"sandbox, {arm}"].append(sandboxed(dataclasses.replace(cfg, **changes)))
    return {name: {"median_ms": statistics.median(t) * 1000, "mean_ms": statistics.fmean(t) * 1000}
            for name, t in times.items()}


def throughput(samples: int, workers: int, cfg, rounds: int = 5) -> dict:
    per_round = max(1, samples // rounds)
    spent = {"bare": 0.0} | {a: 0.0 for a in ARMS}
    statuses = {a: {} for a in ARMS}
    scorers = {a: SandboxScorer(dataclasses.replace(cfg, **changes)) for a, (_, changes) in ARMS.items()}
    with ThreadPoolExecutor(workers) as pool:
        for r in tqdm_range(rounds, "sandbox throughput", "round"):
            n = per_round if r < rounds - 1 else samples - per_round * (rounds - 1)
            t0 = time.perf_counter()
            list(pool.map(lambda _: spawn(BARE), range(n)))
            spent["bare"] += time.perf_counter() - t0
            for arm, (ctx, _) in ARMS.items():
                with ctx():
                    t0 = time.perf_counter()
                    for s in scorers[arm].score_batch([(TASK, COMPLETION)] * n):
                        statuses[arm][s.status] = statuses[arm].get(s.status, 0) + 1
                    spent[arm] += time.perf_counter() - t0
    for scorer in scorers.values():
        scorer.close()
    return {"workers": workers, "samples": samples, "statuses": statuses,
            "per_s": {name: samples / t for name, t in spent.items()}, "seconds": spent}


def main(argv=None):
    ap = BenchParser("sandbox", __doc__.splitlines()[0])
    ap.add_argument("--samples", type=positive_int, help=f"throughput samples per design (default {SAMPLES}; "
                    f"--full: {FULL_SAMPLES})")
    ap.add_argument("--workers", type=positive_int, default=2)
    ap.add_argument("--latency-n", type=positive_int, help=f"latency rounds (default {LATENCY_N}; --full: "
                    f"{FULL_LATENCY_N})")
    ap.add_argument("--full", action="store_true", help=f"the long version: {FULL_SAMPLES} samples, "
                    f"{FULL_LATENCY_N} latency rounds")
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    args = ap.parse_args(argv)
    args.samples = args.samples or (FULL_SAMPLES if args.full else SAMPLES)
    args.latency_n = args.latency_n or (FULL_LATENCY_N if args.full else LATENCY_N)
    cfg = SandboxConfig(workers=args.workers)

    print(f"sandbox benchmark: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}", flush=True)
    note(f"[1/2] latency: {args.latency_n} rounds of {2 + len(ARMS)} one-at-a-time runs")
    lat = latency(args.latency_n, cfg)
    new, old = lat["sandbox, judge+worker"]["median_ms"], lat["sandbox, single process"]["median_ms"]
    spawn_flags = lat["python -I -B -S -c pass"]["median_ms"]
    print(f"\nlatency, one at a time ({args.latency_n} each, interleaved)")
    print(f"  {'':30} {'median ms':>10} {'mean ms':>10}")
    for name, t in lat.items():
        print(f"  {name:30} {t['median_ms']:10.1f} {t['mean_ms']:10.1f}")
    print(f"  judge+worker / single process:                  {new / old:.2f}x")
    print(f"  overhead vs python -I -B -S -c pass: judge+worker {new - spawn_flags:+.1f} ms, "
          f"single process {old - spawn_flags:+.1f} ms", flush=True)
    note(f"[2/2] throughput: {args.samples} samples through each of {len(ARMS)} designs and bare spawns, "
         f"{args.workers} at a time")
    thr = throughput(args.samples, args.workers, cfg)
    print(f"\nthroughput, {args.workers} workers ({args.samples} each, alternating rounds)")
    print(f"  bare python -c pass spawns      {thr['per_s']['bare']:8.1f} /s")
    for arm in ARMS:
        print(f"  sandbox, {arm:22} {thr['per_s'][arm]:8.1f} /s   statuses {thr['statuses'][arm]}")
    ratio = thr["per_s"]["single process"] / thr["per_s"]["judge+worker"]
    print(f"  per-sample cost, judge+worker / single process: {ratio:.2f}x")
    base = thr["per_s"]["no mount, no PID ns"]
    guards = {arm: base / thr["per_s"][arm] for arm in ("judge+worker", "no mount namespace", "no PID namespace")}
    print(f"  per-sample cost against no mount and no PID namespace: both {guards['judge+worker']:.2f}x, "
          f"PID namespace alone {guards['no mount namespace']:.2f}x, mount namespace alone "
          f"{guards['no PID namespace']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency": lat, "throughput": thr, "latency_ratio": new / old,
                                               "throughput_cost_ratio": ratio, "guard_cost_ratios": guards,
                                               "cpus": os.cpu_count(), "platform": platform.platform()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
