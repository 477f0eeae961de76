"""Sample a task set and score every sample: the trainer's validation and `mlx-coach eval` share it."""

from collections import defaultdict

from mlx_coach.engine.rollout import generate_rollouts
from mlx_coach.telemetry.passk import summarize
from mlx_coach.telemetry.progress import bar


def generate_and_score(model, tokenizer, tasks, rc, scorer, *, bypass_cache=True, desc="eval"):
    """rc.group_size samples per task; returns one record per sample, in task order. A progress bar
    (generation by prompts, then scoring by samples) shows on a terminal."""
    with bar(len(tasks), f"{desc}: generate", unit="prompt") as progress:
        rb = generate_rollouts(model, tokenizer, [t.prompt for t in tasks], rc, on_batch=progress.update)
    items = [(tasks[r.prompt_index], r.completion) for r in rb.rollouts]
    with bar(len(items), f"{desc}: score", unit="sample") as progress:
        if hasattr(scorer, "cache"):  # a CachedScorer: validation scores are always fresh
            scores = [s for s, _ in scorer.score_batch(items, bypass=bypass_cache)]
            progress.update(len(items))
        elif not hasattr(scorer, "submit"):
            scores = scorer.score_batch(items)
            progress.update(len(items))
        else:
            futures = [scorer.submit(task, completion) for task, completion in items]
            scores = []
            for f in futures:
                scores.append(f.result())
                progress.update(1)
    records = []
    for r, (task, completion), s in zip(rb.rollouts, items, scores):
        records.append({
            "task_id": task.task_id, "completion_index": r.sample_index, "text": r.text, "completion": completion,
            "status": s.status, "passed": s.passed, "score": s.value, "error": s.error,
            "finish_reason": r.finish_reason, "tokens": len(r.token_ids),
            "category": task.tags.get("category", "none"), "prompt": task.prompt,
        })
    return records


def pass_at_k_summary(records, ks=(1, 10, 100)):
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(r["passed"])
    return summarize(by_task, ks)


