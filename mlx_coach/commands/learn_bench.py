"""`mlx-coach bench learn`: did training make the model better? Evaluate, train for a budget, evaluate again.

Both evaluations score the same held-out tasks and HumanEval with the same prompts, decoding and
sandbox as the run's own validation (`engine.generate.generate_and_score`, at the config's rollout settings):
greedy pass@1, and pass@k from n sampled answers per task at the rollout temperature (the unbiased
estimator, `telemetry.passk.pass_at_k`). The change is judged per task (paired): tasks that went fail->pass and
pass->fail, the exact McNemar p-value, and a paired bootstrap interval (`commands.stats`). The run's own
metrics.jsonl gives the learning curve (fresh reward, validation pass@1, truncation share, KL, entropy).

The default is the short version (a few minutes for configs/tiny.yaml on a 2-core CPU): at most
`SHORT["steps"]` training steps and the first `SHORT[...]` held-out and HumanEval tasks; `--full` trains
the config's train.steps and evaluates every task. An explicit flag wins over both. Progress lines
(which evaluation, how many tasks) go to stderr.

Writes OUTPUT/report.json, OUTPUT/report.md, OUTPUT/learning_curve.png, OUTPUT/samples.jsonl (every
answer) and the run in OUTPUT/run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_coach.commands.evaluate import eval_rollout
from mlx_coach.core.errors import UserError
from mlx_coach.core.keys import draw_seed
from mlx_coach.telemetry.passk import pass_at_k
from mlx_coach.telemetry.progress import bench_note
from mlx_coach.commands.stats import discordant_counts, mcnemar_exact_p, paired_bootstrap

# the default's caps; --full lifts them (0 = no cap, as the flags take it)
SHORT = {"steps": 20, "heldout_limit": 20, "humaneval_limit": 20}
CURVE_KEYS = {"reward/fresh_mean": "fresh reward", "eval/pass@1": "validation pass@1",
              "gen/truncated_frac": "truncation share", "kl/mean": "KL", "policy/entropy": "entropy"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"bench learn: {message}")


def parse_args(argv):
    p = _Parser(prog="mlx-coach bench learn", description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True, help="training config (YAML)")
    p.add_argument("--minutes", type=float, default=0.0, help="training budget in wall-clock minutes: no step "
                   "starts after it (0 = use --steps / train.steps)")
    p.add_argument("--steps", type=int, help=f"train at most this many steps (default: train.steps up to "
                   f"{SHORT['steps']}; with --full or --minutes: train.steps, or no cap with --minutes)")
    p.add_argument("--full", action="store_true", help="the long version: the config's train.steps, every "
                   "held-out and HumanEval task (the default caps them, see --steps and the limits)")
    p.add_argument("--heldout", default="val", help="held-out tasks: val (the config's validation split, all of it), "
                   "or any task spec of `mlx-coach eval --tasks`")
    p.add_argument("--heldout-limit", type=int, help=f"first N held-out tasks only (0 = all; default "
                   f"{SHORT['heldout_limit']}, --full: all)")
    p.add_argument("--samples", type=int, default=4, help="sampled answers per held-out task for pass@k "
                   "(at rollout.temperature; 0 = greedy only)")
    p.add_argument("--humaneval-limit", type=int, help=f"first N HumanEval tasks (0 = all 164; default "
                   f"{SHORT['humaneval_limit']}, --full: all)")
    p.add_argument("--no-humaneval", action="store_true", help="skip HumanEval")
    p.add_argument("--eval-max-new-tokens", type=int, default=0,
                   help="answer length for the evaluations (0 = train.val_max_new_tokens, else rollout.max_new_tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled evaluation and the bootstrap")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--output", default="runs/bench-learn", help="report folder; the run goes in OUTPUT/run")
    args = p.parse_args(argv)
    if args.minutes < 0:
        raise UserError("bench learn: --minutes must be >= 0")
    for flag in ("steps", "heldout_limit", "samples", "humaneval_limit", "eval_max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UserError(f"bench learn: --{flag.replace('_', '-')} must be >= 0")
    for flag in ("heldout_limit", "humaneval_limit"):  # unset: the short version's cap, or all with --full
        if getattr(args, flag) is None:
            setattr(args, flag, 0 if args.full else SHORT[flag])
    return args


# ------------------------------------------------------------------------------------------ tasks


def heldout_tasks(cfg, spec, limit):
    """The held-out tasks and the ids of the training tasks they share (should be none)."""
    from mlx_coach.commands.evaluate import eval_tasks
    from mlx_coach.rl.setup import select_tasks

    train, val = select_tasks(cfg.data)
    tasks = val if spec == "val" else eval_tasks(spec, 0)
    tasks = tasks[:limit] if limit else tasks
    if not tasks:
        raise UserError(f"bench learn: --heldout {spec!r} holds no tasks")
    train_ids = {t.task_id for t in train}
    return tasks, sorted(t.task_id for t in tasks if t.task_id in train_ids)


# ------------------------------------------------------------------------------------------ evaluation


def _sample_rows(records, mode):
    return [{"mode": mode, "task_id": r["task_id"], "completion_index": r["completion_index"], "passed": r["passed"],
             "status": r["status"], "finish_reason": r["finish_reason"], "completion": r["completion"]} for r in records]


def evaluate_set(model, tokenizer, tasks, cfg, scorer, *, max_new_tokens, samples, seed):
    """Per-task results on one task set: greedy verdicts and (samples > 1) sampled pass counts;
    "rows" holds every answer (written to samples.jsonl, not to the report)."""
    from mlx_coach.engine.generate import generate_and_score

    t0 = time.perf_counter()
    greedy = generate_and_score(model, tokenizer, tasks, eval_rollout(cfg, max_new_tokens), scorer)
    out = {"tasks": [t.task_id for t in tasks], "greedy": [bool(r["passed"]) for r in greedy],
           "greedy_truncated": [r["finish_reason"] == "length" for r in greedy],
           "greedy_statuses": [r["status"] for r in greedy], "rows": _sample_rows(greedy, "greedy")}
    if samples > 1:
        # the same keys before and after training: the sampled pass@k's are paired draw for draw
        mx.random.seed(draw_seed(seed, "eval_sample"))
        sampled = generate_and_score(model, tokenizer, tasks, eval_rollout(cfg, max_new_tokens, samples=samples),
                                     scorer)
        counts = {t.task_id: 0 for t in tasks}
        for r in sampled:
            counts[r["task_id"]] += bool(r["passed"])
        out["sampled_correct"] = [counts[t] for t in out["tasks"]]
        out["sampled_truncated_frac"] = float(np.mean([r["finish_reason"] == "length" for r in sampled]))
        out["rows"] += _sample_rows(sampled, "sampled")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def summary(result, samples):
    """pass@1 (greedy), pass@1 and pass@k (sampled, unbiased estimator) and the truncation share."""
    s = {"tasks": len(result["tasks"]), "pass@1": float(np.mean(result["greedy"])),
         "passed": int(sum(result["greedy"])), "truncated_frac": float(np.mean(result["greedy_truncated"]))}
    if "sampled_correct" in result:
        for k in sorted({1, samples}):
            s[f"sampled_pass@{k}"] = float(np.mean([pass_at_k(samples, c, k) for c in result["sampled_correct"]]))
        s["sampled_truncated_frac"] = result["sampled_truncated_frac"]
    return s


def compare(before, after, samples, seed):
    """The paired change on one task set: counts, McNemar exact p and bootstrap of greedy pass@1;
    a bootstrap of sampled pass@k per task when there are samples."""
    gained, lost = discordant_counts(before["greedy"], after["greedy"])
    out = {"fail_to_pass": gained, "pass_to_fail": lost, "mcnemar_p": mcnemar_exact_p(gained, lost),
           "bootstrap_pass@1": paired_bootstrap(before["greedy"], after["greedy"], seed=seed),
           "gained_tasks": [t for t, b, a in zip(before["tasks"], before["greedy"], after["greedy"]) if a and not b],
           "lost_tasks": [t for t, b, a in zip(before["tasks"], before["greedy"], after["greedy"]) if b and not a]}
    if "sampled_correct" in before and "sampled_correct" in after:
        k = samples
        est = lambda res: [pass_at_k(samples, c, k) for c in res["sampled_correct"]]  # noqa: E731
        out[f"bootstrap_sampled_pass@{k}"] = paired_bootstrap(est(before), est(after), seed=seed)
    return out


# ------------------------------------------------------------------------------------------ model


def trained_policy(cfg, model, checkpoint):
    """`model` (the base policy) with the run's final weights: adapters set up as the trainer did,
    then the checkpoint's trainable weights loaded."""
    from mlx_coach.runtime.checkpoint import read_checkpoint
    from mlx_coach.models.lora import apply_lora, unfreeze_all

    m = cfg.model
    if m.fine_tune == "lora":
        apply_lora(model, rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout,
                   num_layers=m.lora_layers, keys=m.lora_keys)
    else:
        unfreeze_all(model)
    weights, _, state, _ = read_checkpoint(checkpoint, model)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model, state["step"]


# ------------------------------------------------------------------------------------------ curve


def learning_curve(run_dir):
    """Per-step series of CURVE_KEYS from the run's metrics.jsonl: {label: (steps, values)}."""
    from mlx_coach.telemetry.writer import read_jsonl

    path = Path(run_dir) / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    curve = {}
    for key, label in CURVE_KEYS.items():
        pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
        curve[label] = ([s for s, _ in pts], [v for _, v in pts])
    return curve


def plot_curve(path, curve, title):
    from mlx_coach.telemetry.plots import line_panels

    rates = {k: curve[k] for k in ("fresh reward", "validation pass@1", "truncation share")}
    return line_panels(path, title, [
        dict(left=rates, left_label="reward / share", left_limits=(-0.02, 1.02)),
        dict(left={"KL": curve["KL"]}, right={"entropy": curve["entropy"]}, left_label="KL (k3, per token)",
             right_label="entropy (nats per token)"),
    ])


# ------------------------------------------------------------------------------------------ report


def _pct(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _boot_p(boot):
    """A bootstrap p-value as text: 0 of the resamples is "< 1/resamples", not 0."""
    return f"< {1 / boot['resamples']:.0e}" if boot["p"] == 0 else f"{boot['p']:.3g}"


def markdown(report):
    lines = ["| set | metric | before | after | change | fail->pass | pass->fail | p |",
             "|---|---|---|---|---|---|---|---|"]
    for name, block in report["sets"].items():
        b, a, c = block["before"], block["after"], block["change"]
        label = f"{name} ({b['tasks']} tasks)"
        boot = c["bootstrap_pass@1"]
        lines.append(f"| {label} | pass@1 greedy | {_pct(b['pass@1'])} | {_pct(a['pass@1'])} | "
                     f"{100 * boot['delta']:+.1f} pts (95% CI {100 * boot['ci_low']:+.1f}..{100 * boot['ci_high']:+.1f}) | "
                     f"{c['fail_to_pass']} | {c['pass_to_fail']} | McNemar {c['mcnemar_p']:.3g}, bootstrap {_boot_p(boot)} |")
        k = report["samples"]
        if f"sampled_pass@{k}" in b and f"sampled_pass@{k}" in a:
            lines.append(f"| {label} | pass@1 sampled (n={k}) | {_pct(b['sampled_pass@1'])} | "
                         f"{_pct(a['sampled_pass@1'])} | {100 * (a['sampled_pass@1'] - b['sampled_pass@1']):+.1f} pts | | | |")
            if k > 1:
                bk = c[f"bootstrap_sampled_pass@{k}"]
                lines.append(f"| {label} | pass@{k} (n={k}) | {_pct(b[f'sampled_pass@{k}'])} | "
                             f"{_pct(a[f'sampled_pass@{k}'])} | {100 * bk['delta']:+.1f} pts (95% CI "
                             f"{100 * bk['ci_low']:+.1f}..{100 * bk['ci_high']:+.1f}) | | | bootstrap {_boot_p(bk)} |")
        lines.append(f"| {label} | truncated (greedy) | {_pct(b['truncated_frac'])} | {_pct(a['truncated_frac'])} "
                     f"| | | | |")
    t = report["training"]
    lines.append("")
    lines.append(f"Training: {t['steps']} steps in {t['minutes']:.1f} min; fresh reward {t['fresh_reward_first']} "
                 f"(first quarter of steps) -> {t['fresh_reward_last']} (last quarter); truncation share "
                 f"{t['truncated_first']} -> {t['truncated_last']}.")
    return "\n".join(lines) + "\n"


def _quarter_means(values):
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return None, None
    q = max(1, len(vals) // 4)
    return round(float(np.mean(vals[:q])), 4), round(float(np.mean(vals[-q:])), 4)


def run(argv):
    from mlx_coach.config.tree import load_config
    from mlx_coach.runtime.rundir import writable_dir
    from mlx_coach.models.loader import load_policy
    from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer
    from mlx_coach.data.tasks import load_tasks
    from mlx_coach.rl.setup import schedule_steps
    from mlx_coach.rl.loop import train

    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    out = writable_dir(args.output, "--output")
    run_dir = out / "run"
    if run_dir.exists():
        raise UserError(f"--output: {run_dir} already exists; choose a new --output folder")
    heldout, overlap = heldout_tasks(cfg, args.heldout, args.heldout_limit)
    if overlap:
        print(f"warning: {len(overlap)} held-out tasks are also training tasks ({', '.join(overlap[:5])}...)",
              file=sys.stderr)
    sets = {"heldout": heldout}
    if not args.no_humaneval:
        he = load_tasks("humaneval")
        sets["humaneval"] = he[: args.humaneval_limit] if args.humaneval_limit else he
    max_new = args.eval_max_new_tokens or cfg.train.val_max_new_tokens or cfg.rollout.max_new_tokens
    samples = args.samples if args.samples > 1 else 1
    # the schedule's length is fixed here, as `mlx-coach train` does; with --minutes the step count is
    # unknown in advance, so the schedule follows the config (a constant rate suits a time budget)
    if not cfg.optim.schedule_steps:
        cfg.optim.schedule_steps = max(cfg.train.steps, args.steps or 0)
    cfg.train.output = str(run_dir)
    if args.steps is None and not (args.full or args.minutes):
        steps = min(cfg.train.steps, SHORT["steps"])
    else:
        steps = args.steps or (10**9 if args.minutes else cfg.train.steps)

    note = bench_note("learn")

    def evaluate_all(model, tokenizer, scorer, when):
        res = {}
        for name, tasks in sets.items():
            n = samples if name == "heldout" else 1
            done = (len(sets) + 1) * (when == "after") + list(sets).index(name) + 1
            note(f"[{done}/{2 * len(sets) + 1}] {when} training: evaluating {name}, {len(tasks)} tasks "
                 f"(greedy{f' + {n} sampled' if n > 1 else ''} answers each)")
            res[name] = evaluate_set(model, tokenizer, tasks, cfg, scorer, max_new_tokens=max_new,
                                     samples=n, seed=args.seed)
            print(f"{when} {name}: " + json.dumps(summary(res[name], n)), file=sys.stderr, flush=True)
        return res

    with SandboxScorer(cfg.sandbox) as scorer:
        model, tokenizer, _ = load_policy(cfg.model.path, dtype=cfg.model.dtype)
        model.eval()
        before = evaluate_all(model, tokenizer, scorer, "before")
        del model
        note(f"[{len(sets) + 1}/{2 * len(sets) + 1}] training "
             + (f"for {args.minutes:g} minutes" if steps == 10**9 else f"{steps} steps")
             + (f" (at most {args.minutes:g} minutes)" if args.minutes and steps != 10**9 else "")
             + (f"; --full for the config's {cfg.train.steps}" if args.steps is None and steps < cfg.train.steps
                else ""))
        t0 = time.monotonic()
        deadline = t0 + 60 * args.minutes if args.minutes else None
        train(cfg, run_dir, steps=steps, deadline=deadline)
        train_minutes = (time.monotonic() - t0) / 60
        from mlx_coach.runtime.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(run_dir)
        base, tokenizer, _ = load_policy(cfg.model.path, dtype=cfg.model.dtype)
        model, trained_steps = trained_policy(cfg, base, ckpt)
        after = evaluate_all(model, tokenizer, scorer, "after")

    curve = learning_curve(run_dir)
    rq = _quarter_means(curve["fresh reward"][1])
    tq = _quarter_means(curve["truncation share"][1])
    report = {
        "config": args.config, "overrides": args.set, "model": cfg.model.path, "samples": samples,
        "eval_max_new_tokens": max_new, "heldout_spec": args.heldout, "heldout_overlap_with_train": overlap,
        "humaneval_subset": bool(args.humaneval_limit) and "humaneval" in sets,
        "training": {"steps": trained_steps, "minutes": round(train_minutes, 2), "budget_minutes": args.minutes,
                     "schedule_steps": schedule_steps(cfg), "checkpoint": str(ckpt),
                     "fresh_reward_first": rq[0], "fresh_reward_last": rq[1],
                     "truncated_first": tq[0], "truncated_last": tq[1]},
        "sets": {}, "per_task": {},
    }
    for name in sets:
        n = samples if name == "heldout" else 1
        report["sets"][name] = {"before": summary(before[name], n), "after": summary(after[name], n),
                                "change": compare(before[name], after[name], n, args.seed),
                                "seconds": {"before": before[name]["seconds"], "after": after[name]["seconds"]}}
        report["per_task"][name] = {when: {k: v for k, v in res[name].items() if k != "rows"}
                                    for when, res in (("before", before), ("after", after))}
    report["curve"] = {k: {"steps": xs, "values": ys} for k, (xs, ys) in curve.items()}
    png = plot_curve(out / "learning_curve.png", curve, f"{cfg.model.path}: learning curve ({trained_steps} steps)")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    with open(out / "samples.jsonl", "w") as f:
        for when, res in (("before", before), ("after", after)):
            for name in sets:
                for row in res[name]["rows"]:
                    f.write(json.dumps({"when": when, "set": name, **row}) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    print(md)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {png}")
    return report
