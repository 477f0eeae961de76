"""Score cache benchmark: per-operation cost, and the saving on a replayed training trace.

    python benchmarks/bench_cache.py [--entries 20000] [--ops 5000] [--full] [--cost-ms 50] [--json PATH]

The default (a 20,000-entry cache, 5,000 operations) finishes in a few minutes on a 2-core CPU; `--full`
is the long version (100,000 entries, 20,000 operations). Progress lines go to stderr, results to stdout.

1. Micro: a cache holding `--entries` entries (lru, ttl, lru+ttl; memory only and with SQLite):
   microseconds for a hit, for a miss + insert (at capacity: the insert evicts), for a hit read
   back from SQLite by a fresh instance, and for make_key on a ~250-character completion.

2. Replay: a synthetic trace through the real CachedScorer + ScoreCache, for each policy.
   Trace model: `--tasks` tasks, `--prompts-per-step` of them per step in a shuffled epoch order,
   `--group` samples each, `--steps` steps of `--step-s` seconds (the TTL clock). For each sample
   the policy either writes a new program, with probability
       p_new(step) = floor + (start - floor) * exp(-step / tau)    (it sharpens as it trains),
   or repeats one of its earlier programs for that task, chosen in proportion to how often it
   has written it (a rich-get-richer mode). A repeat comes out as a surface variant (comment,
   spacing, blank line) with probability `--variant-p`: the same program to a reader, but another
   text, so another cache key (keys are exact: whitespace can change a verdict).
   Calls avoided = samples the wrapped scorer did not see (cache hits + in-batch duplicates);
   seconds saved = calls avoided x `--cost-ms` (the measured per-sample cost of your scorer).
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_coach.commands.argtypes import positive_int  # noqa: E402
from mlx_coach.commands.bench import BenchParser  # noqa: E402
from mlx_coach.rewards.cache import ScoreCache, make_key  # noqa: E402
from mlx_coach.telemetry.progress import bar  # noqa: E402
from mlx_coach.rewards.scoring.base import Score  # noqa: E402
from mlx_coach.rewards.scoring.cached import CachedScorer  # noqa: E402
from mlx_coach.telemetry.progress import bench_note  # noqa: E402


ENTRIES, OPS = 20_000, 5_000  # the default's micro benchmark
FULL_ENTRIES, FULL_OPS = 100_000, 20_000  # --full


note = bench_note("cache")


class _Task:
    def __init__(self, i):
        self.task_id = f"bench/{i}"
        self.prompt = f"def f{i}(xs):\n    \"\"\"Task {i}.\"\"\"\n"
        self.test = f"def check(f):\n    assert f([{i}]) == {i}\n"


def program(task: int, prog: int, variant: int) -> str:
    """A ~250-character completion; `variant` changes only comments and spacing."""
    body = (f"    total = {prog % 7}\n    for x in xs:\n        if x > {prog}:\n"
            f"            total += x * {task + 1}\n        else:\n            total -= {prog // 7}\n"
            f"    return total  # {'ok' if prog % 2 else 'done'}\n")
    if variant == 0:
        return body
    kind = variant % 3
    if kind == 0:
        return body.replace("total = ", "total   =   ").replace("\n    for", f"  # v{variant}\n    for")
    if kind == 1:
        return "\n" + body.replace("    return", f"\n    # variant {variant}\n    return")
    return body.replace("x * ", "x*").rstrip("\n") + "   \n\n"


# ---------------------------------------------------------------------------------------------
# micro benchmark


def _keys(n, tag):
    return [("bench@1", f"T/{i % 997}", tag, f"{i:064x}") for i in range(n)]


def _per_op_us(fn, items):
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return 1e6 * (time.perf_counter() - t0) / len(items)


def print_micro_row(r):
    disk = f"{r['disk_hit_us']:9.1f}" if "disk_hit_us" in r else f"{'-':>9}"
    print(f"{r['policy']:<9} {str(r['sqlite']):<6} {r['hit_us']:8.2f} {r['miss_insert_us']:9.2f} {disk} "
          f"{r['fill_s']:7.2f} {r['bytes_per_entry']:8.0f}", flush=True)


def micro(entries: int, ops: int, tmp: Path) -> list[dict]:
    """Each cache's row, printed as it is measured."""
    print(f"\nScoreCache with {entries:,} entries, {ops:,} ops (microseconds per operation)")
    print(f"{'policy':<9} {'sqlite':<6} {'hit':>8} {'miss+ins':>9} {'disk hit':>9} {'fill s':>7} {'B/entry':>8}")
    rows, score, rng = [], Score(1.0, "passed", duration_s=0.05), random.Random(0)
    configs = [(policy, persist) for policy in ("lru", "ttl", "lru+ttl") for persist in (False, True)]
    with bar(len(configs), "cache micro", unit="config") as progress:
        for i, (policy, persist) in enumerate(configs, 1):
            progress.set_postfix_str(f"{policy}{' + sqlite' if persist else ''}")
            note(f"[1/2] micro: cache {i}/{len(configs)}, {policy}{' + sqlite' if persist else ''}, "
                 f"{entries:,} entries")
            db = str(tmp / f"{policy}.sqlite") if persist else None
            c = ScoreCache(policy, maxsize=entries, ttl_s=3600.0, sqlite_path=db)
            full = _keys(entries, "a")
            t0 = time.perf_counter()
            for k in full:
                c.put(k, score)
            fill_s = time.perf_counter() - t0
            sample = rng.sample(full, min(ops, entries))
            hit = min(_per_op_us(c.get, sample) for _ in range(3))  # best of 3: the machine is shared
            fresh = _keys(3 * ops, "b")
            miss = min(_per_op_us(lambda k: (c.get(k), c.put(k, score)), fresh[i::3]) for i in range(3))
            row = dict(policy=policy, sqlite=persist, entries=entries, hit_us=hit, miss_insert_us=miss,
                       fill_s=fill_s, size=c.size(), bytes_per_entry=c.stats()["student"]["bytes"] / c.size())
            if persist:
                c2 = ScoreCache(policy, maxsize=entries, ttl_s=3600.0, sqlite_path=db)
                row["disk_hit_us"] = _per_op_us(c2.get, fresh[: min(ops, 5000)])
                c2.close()
            c.close()
            rows.append(row)
            print_micro_row(row)
            progress.update(1)
    return rows


# ---------------------------------------------------------------------------------------------
# trace replay


class _CountingScorer:
    name, version = "bench-scorer", "1"

    def __init__(self):
        self.items = 0

    def score_batch(self, items):
        self.items += len(items)
        return [Score(1.0 if len(c) % 2 else 0.0, "passed" if len(c) % 2 else "failed") for _, c in items]


def make_trace(a) -> list[list[tuple[int, int, int]]]:
    """steps x samples of (task, program, variant)."""
    rng = random.Random(a.seed)
    counts = [[] for _ in range(a.tasks)]  # per task: how often each program was written
    order, steps = [], []
    for step in range(a.steps):
        p_new = a.p_floor + (a.p_start - a.p_floor) * math.exp(-step / a.tau)
        batch = []
        for _ in range(a.prompts_per_step):
            if not order:
                order = rng.sample(range(a.tasks), a.tasks)
            t = order.pop()
            for _ in range(a.group):
                seen = counts[t]
                if not seen or rng.random() < p_new:
                    seen.append(1)
                    batch.append((t, len(seen) - 1, 0))
                else:
                    prog = rng.choices(range(len(seen)), weights=seen)[0]
                    seen[prog] += 1
                    variant = rng.randrange(1, 1000) if rng.random() < a.variant_p else 0
                    batch.append((t, prog, variant))
        steps.append(batch)
    return steps


def replay(trace, a) -> list[dict]:
    tasks = [_Task(i) for i in range(a.tasks)]
    steps_per_epoch = math.ceil(a.tasks / a.prompts_per_step)
    n_samples = sum(len(b) for b in trace)
    raw_unique = len({(t, p, v) for b in trace for t, p, v in b})
    norm_unique = len({(t, p) for b in trace for t, p, _ in b})
    policies = [("none", {}), ("epoch-clear", {}), ("lru", {}), ("lru", {"maxsize": a.small}),
                ("ttl", {}), ("lru+ttl", {"maxsize": a.small})]
    rows = []
    progress = bar(len(policies) * len(trace), "cache replay", unit="step")
    for i, (policy, kw) in enumerate(policies, 1):
        progress.set_postfix_str(policy)
        note(f"[2/2] replay: policy {i}/{len(policies)}, {policy}, {len(trace)} steps")
        now = [0.0]
        cache = ScoreCache(policy, **{"maxsize": 100_000, "ttl_s": a.ttl_s, **kw}, timer=lambda: now[0])
        scorer = _CountingScorer()
        cs = CachedScorer(scorer, cache)
        t0 = time.perf_counter()
        for step, batch in enumerate(trace):
            now[0] = step * a.step_s
            if step % steps_per_epoch == 0:
                cache.on_epoch_start(step // steps_per_epoch)
            cs.score_batch([(tasks[t], program(t, p, v)) for t, p, v in batch])
            progress.update(1)
        overhead = time.perf_counter() - t0
        st, s = cs.stats(), cache.stats()["student"]
        avoided = n_samples - scorer.items
        rows.append(dict(policy=policy, maxsize=kw.get("maxsize", 100_000) if policy != "none" else 0,
                         samples=n_samples, scorer_calls=scorer.items, avoided=avoided,
                         avoided_pct=100 * avoided / n_samples, cached=st["cached"], duplicate=st["duplicate"],
                         saved_s=avoided * a.cost_ms / 1e3, evictions=s["evictions"],
                         expirations=s["expirations"], cleared=s["cleared"], final_size=s["size"],
                         overhead_us_per_sample=1e6 * overhead / n_samples))
    progress.close()
    return rows, dict(samples=n_samples, distinct_texts=raw_unique, distinct_programs=norm_unique,
                      steps_per_epoch=steps_per_epoch)


def main(argv=None):
    p = BenchParser("cache", __doc__.split("\n")[0])
    p.add_argument("--entries", type=positive_int, help=f"cache size of the micro benchmark (default {ENTRIES:,}; "
                   f"--full: {FULL_ENTRIES:,})")
    p.add_argument("--ops", type=positive_int,
                   help=f"operations timed per figure (default {OPS:,}; --full: {FULL_OPS:,})")
    p.add_argument("--full", action="store_true", help=f"the long version: {FULL_ENTRIES:,} entries, {FULL_OPS:,} ops")
    p.add_argument("--tasks", type=positive_int, default=80)
    p.add_argument("--prompts-per-step", type=positive_int, default=8)
    p.add_argument("--group", type=positive_int, default=8)
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--step-s", type=float, default=30.0, help="seconds per training step (TTL clock)")
    p.add_argument("--ttl-s", type=float, default=3600.0)
    p.add_argument("--small", type=positive_int, default=1000, help="maxsize of the small LRU variants")
    p.add_argument("--p-start", type=float, default=0.95)
    p.add_argument("--p-floor", type=float, default=0.15)
    p.add_argument("--tau", type=float, default=60.0, help="steps")
    p.add_argument("--variant-p", type=float, default=0.3)
    p.add_argument("--cost-ms", type=float, default=50.0, help="measured per-sample scoring cost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    a.entries = a.entries or (FULL_ENTRIES if a.full else ENTRIES)
    a.ops = a.ops or (FULL_OPS if a.full else OPS)

    result = {"args": vars(a)}
    if not a.skip_micro:
        with tempfile.TemporaryDirectory() as tmp:
            result["micro"] = micro(a.entries, a.ops, Path(tmp))
        texts = [program(1, i, i % 4) for i in range(2000)]
        task = _Task(1)
        key_us = _per_op_us(lambda c: make_key("s", "1", task, c), texts)
        result["make_key_us"] = key_us
        print(f"make_key on a ~250-character completion: {key_us:.1f} us (sha256 of the exact text)")

    trace = make_trace(a)
    rows, info = replay(trace, a)
    result["replay"], result["trace"] = rows, info
    print(f"\nReplay: {a.tasks} tasks, {a.prompts_per_step} prompts x {a.group} samples per step, {a.steps} steps "
          f"({info['samples']:,} samples, {info['steps_per_epoch']} steps/epoch); p_new {a.p_start} -> {a.p_floor} "
          f"(tau {a.tau:g} steps); {info['distinct_texts']:,} distinct texts (cache keys) of "
          f"{info['distinct_programs']:,} distinct programs; scoring cost {a.cost_ms:g} ms/sample; ttl {a.ttl_s:g} s at {a.step_s:g} s/step")
    print(f"{'policy':<12} {'maxsize':>8} {'scorer calls':>12} {'avoided':>8} {'%':>6} {'cached':>7} {'dup':>6} "
          f"{'saved s':>8} {'evict':>6} {'expire':>7} {'cleared':>8} {'us/sample':>9}")
    for r in rows:
        print(f"{r['policy']:<12} {r['maxsize']:>8} {r['scorer_calls']:>12,} {r['avoided']:>8,} {r['avoided_pct']:6.1f} "
              f"{r['cached']:>7,} {r['duplicate']:>6,} {r['saved_s']:8.0f} {r['evictions']:>6,} {r['expirations']:>7,} "
              f"{r['cleared']:>8,} {r['overhead_us_per_sample']:9.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
