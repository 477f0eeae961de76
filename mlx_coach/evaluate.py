"""pass@k of a model (with or without adapters) on a task set: `mlx-coach eval`.

`generate_and_score` is also the trainer's end-of-epoch validation, so the numbers a run logs
as `eval/pass@1` and the numbers `mlx-coach eval` reports come from one code path.
"""

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from .errors import UserError
from .metrics import summarize


def generate_and_score(model, tokenizer, tasks, rc, scorer, *, bypass_cache=True, desc="eval"):
    """rc.group_size samples per task; returns one record per sample, in task order. A progress bar
    (generation by prompts, then scoring by samples) shows on a terminal."""
    from .progress import bar
    from .rollout import generate_rollouts

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
            "task_id": task.task_id, "completion_index": r.sample_index, "completion": completion,
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


def eval_tasks(spec, limit):
    from .config import DataConfig
    from .tasks import builtin_tasks, load_tasks, split_tasks

    if spec in ("builtin:val", "builtin:train"):  # the split a default training run uses
        d = DataConfig()
        train, val = split_tasks(builtin_tasks(), d.val_fraction, d.split_seed)
        tasks = val if spec == "builtin:val" else train
    else:
        tasks = load_tasks(spec)
    return tasks[:limit] if limit else tasks


def writable_dir(path, flag):
    """`path` as a folder this process can write into (created if missing), or UserError naming it."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag}: cannot write to {out} ({e.strerror or e})") from None
    return out


def run_from_args(args):
    from .models import load_policy
    from .rollout import RolloutConfig
    from .scoring.sandbox import SandboxConfig, SandboxScorer

    if args.samples < 1:
        raise UserError("--samples must be >= 1")
    out = writable_dir(args.output, "--output") if args.output else None  # before any work, not after it
    tasks = eval_tasks(args.tasks, args.limit)
    model, tokenizer, info = load_policy(args.model)
    if args.adapter:
        from mlx_lm.tuner.utils import load_adapters

        from . import base_identity

        adapter = Path(args.adapter)
        if not (adapter / "adapters.safetensors").is_file():
            raise UserError(f"--adapter: no adapters.safetensors in {adapter}")
        base_identity.check(adapter, info, "--adapter")
        try:
            model = load_adapters(model, str(adapter))
        except (ValueError, KeyError, TypeError) as e:  # adapters from mlx-lm (no identity) that do not fit
            raise UserError(f"--adapter: {adapter} does not fit {args.model} ({' '.join(str(e).split())[:200]})") from None
    model.eval()
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.8)
    rc = RolloutConfig(group_size=args.samples, max_new_tokens=args.max_new_tokens, temperature=temperature,
                       stop=None, chat_template=args.chat_template, extract_code=args.chat_template)
    mx.random.seed(args.seed)
    t0 = time.perf_counter()
    with SandboxScorer(SandboxConfig(timeout_s=args.timeout, workers=args.workers)) as scorer:
        records = generate_and_score(model, tokenizer, tasks, rc, scorer)
    summary = pass_at_k_summary(records)
    summary.update({"model": args.model, "adapter": args.adapter, "tasks_spec": args.tasks,
                    "temperature": temperature, "seconds": round(time.perf_counter() - t0, 2)})
    statuses = defaultdict(int)
    for r in records:
        statuses[r["status"]] += 1
    summary["statuses"] = dict(statuses)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
                   if k.startswith("pass@") or k in ("tasks", "samples")))
    if out is not None:
        (out / "report.json").write_text(json.dumps(summary, indent=2))
        with open(out / "samples.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps({k: v for k, v in r.items() if k != "prompt"}) + "\n")
        print(f"wrote {out / 'report.json'} and {out / 'samples.jsonl'}")
    return 0
