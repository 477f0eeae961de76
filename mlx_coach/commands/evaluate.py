"""`mlx-coach eval`: pass@k of a model (with or without adapters) on a task set.

The samples come from `engine.generate.generate_and_score`, the trainer's end-of-epoch validation
too, so the numbers a run logs as `eval/pass@1` and the numbers this command reports share one path.
With `-c CONFIG` the config supplies what the flags otherwise do: the model, the rollout section (system
prompt, user template, chat template, stops, code extraction, top-p; greedy for one sample as in
validation, else rollout.temperature), the validation answer length, the sandbox section and, without
--tasks, the validation split the trainer scores; so a trained recipe is evaluated on the prompts it
was trained on. Flags given beside -c override the config.
"""

import json
import time
from collections import defaultdict
from dataclasses import replace
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


def eval_rollout(cfg, max_new_tokens, *, samples=1):
    """The config's rollout settings (prompt, template, stops, code extraction) for an evaluation:
    greedy with one answer, as the trainer's validation, else `samples` answers at the rollout temperature."""
    r = cfg.rollout
    if samples == 1:
        return replace(r, temperature=0.0, group_size=1, max_new_tokens=max_new_tokens)
    return replace(r, group_size=samples, max_new_tokens=max_new_tokens)


FLAG_DEFAULTS = {"max_new_tokens": 128, "timeout": 5.0, "workers": 0}


def _flag(args, name):
    value = getattr(args, name)
    return FLAG_DEFAULTS[name] if value is None else value


def from_flags(args):
    """(model spec, dtype, tasks, rollout config, sandbox config) of the flag form."""
    from mlx_coach.engine.rollout import RolloutConfig
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig

    if args.model is None:
        raise UserError("eval: give --model, or -c CONFIG for the config's model")
    if args.set:
        raise UserError("eval: --set overrides a config's key; give -c CONFIG")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.8)
    rc = RolloutConfig(group_size=args.samples, max_new_tokens=_flag(args, "max_new_tokens"), temperature=temperature,
                       stop=None, chat_template=args.chat_template, extract_code=args.chat_template)
    sandbox = SandboxConfig(timeout_s=_flag(args, "timeout"), workers=_flag(args, "workers"))
    return args.model, args.dtype, eval_tasks(args.tasks or "builtin:val", args.limit), rc, sandbox


def from_config(args):
    """(model spec, dtype, tasks, rollout config, sandbox config) of `-c CONFIG`: the trainer's validation
    settings (eval_rollout), with the flags given on top."""
    from mlx_coach.config.tree import load_config
    from mlx_coach.rl.setup import select_tasks

    if args.chat_template:
        raise UserError("eval: --chat-template is the flag form's; with -c the config's rollout.chat_template "
                        "decides (--set rollout.chat_template=true)")
    cfg = load_config(args.config, args.set)
    if args.tasks is None:  # the validation split exactly as the trainer scores it
        tasks = select_tasks(cfg.data)[1]
        tasks = tasks[: cfg.train.val_limit] if cfg.train.val_limit else tasks
        if not tasks:
            raise UserError(f"eval: the validation split of {args.config} is empty (data.val_fraction); give --tasks")
        tasks = tasks[: args.limit] if args.limit else tasks
    else:
        tasks = eval_tasks(args.tasks, args.limit)
    max_new_tokens = args.max_new_tokens or cfg.train.val_max_new_tokens or cfg.rollout.max_new_tokens
    rc = eval_rollout(cfg, max_new_tokens, samples=args.samples)
    if args.temperature is not None:
        rc = replace(rc, temperature=args.temperature)
    sandbox = replace(cfg.sandbox, **{k: v for k, v in (("timeout_s", args.timeout), ("workers", args.workers))
                                      if v is not None})
    return args.model or cfg.model.path, args.dtype or cfg.model.dtype, tasks, rc, sandbox


def run_from_args(args):
    from mlx_coach.models.loader import load_policy
    from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer

    if args.samples < 1:
        raise UserError("--samples must be >= 1")
    model_spec, dtype, tasks, rc, sandbox = from_config(args) if args.config else from_flags(args)
    out = writable_dir(args.output, "--output") if args.output else None  # before any work, not after it
    model, tokenizer, info = load_policy(model_spec, dtype=dtype)
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
            raise UserError(f"--adapter: {adapter} does not fit {model_spec} ({' '.join(str(e).split())[:200]})") from None
    model.eval()
    # the samples' keys descend from --seed alone, whatever loading the model drew before
    mx.random.seed(draw_seed(args.seed, "eval_sample"))
    t0 = time.perf_counter()
    with SandboxScorer(sandbox) as scorer:
        records = generate_and_score(model, tokenizer, tasks, rc, scorer)
    summary = pass_at_k_summary(records)
    summary.update({"model": model_spec, "config": args.config, "adapter": args.adapter, "tasks_spec": args.tasks,
                    "temperature": rc.temperature, "seconds": round(time.perf_counter() - t0, 2)})
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
