"""`mlx-coach eval`: pass@k of a model (with or without adapters) on a task set.

The samples come from `engine.generate.generate_and_score`, the trainer's end-of-epoch validation
too, so the numbers a run logs as `eval/pass@1` and the numbers this command reports share one path.
"""

import json
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from mlx_coach.core.errors import UserError
from mlx_coach.core.keys import draw_seed
from mlx_coach.engine.generate import generate_and_score, pass_at_k_summary
from mlx_coach.runtime.rundir import writable_dir


def eval_tasks(spec, limit):
    from mlx_coach.config.tree import DataConfig
    from mlx_coach.data.tasks import builtin_tasks, load_tasks, split_tasks

    if spec in ("builtin:val", "builtin:train"):  # the split a default training run uses
        d = DataConfig()
        train, val = split_tasks(builtin_tasks(), d.val_fraction, d.split_seed)
        tasks = val if spec == "builtin:val" else train
    else:
        tasks = load_tasks(spec)
    return tasks[:limit] if limit else tasks


def run_from_args(args):
    from mlx_coach.models.loader import load_policy
    from mlx_coach.engine.rollout import RolloutConfig
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
    from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer

    if args.samples < 1:
        raise UserError("--samples must be >= 1")
    out = writable_dir(args.output, "--output") if args.output else None  # before any work, not after it
    tasks = eval_tasks(args.tasks, args.limit)
    model, tokenizer, info = load_policy(args.model)
    if args.adapter:
        from mlx_lm.tuner.utils import load_adapters

        from mlx_coach.models import base_identity

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
    # the samples' keys descend from --seed alone, whatever loading the model drew before
    mx.random.seed(draw_seed(args.seed, "eval_sample"))
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
