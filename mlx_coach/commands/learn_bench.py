"""`mlx-coach bench learn`: did training make the model better? Evaluate, train for a budget, evaluate again.

Both evaluations score the same held-out tasks and HumanEval with the same prompts, decoding and
sandbox as the run's own validation (`engine.generate.generate_and_score`, at the config's rollout settings):
greedy pass@1, and pass@k from n sampled answers per task at the rollout temperature (the unbiased
estimator, `telemetry.passk.pass_at_k`). The change is judged per task (paired): tasks that went fail->pass and
pass->fail, the exact McNemar p-value (which takes the tasks as independent), and a paired bootstrap interval
(`commands.stats`) that resamples whole templates of procedural tasks, whose instances flip together, and
single tasks otherwise (`task_cluster`). The run's own
metrics.jsonl gives the learning curve (fresh reward, validation pass@1, truncation share, informative share,
KL, entropy).

The default is the short version (a few minutes for configs/tiny.yaml on a 2-core CPU): at most
`SHORT["steps"]` training steps and the first `SHORT[...]` held-out and HumanEval tasks; `--full` trains
the config's train.steps and evaluates every task. An explicit flag wins over both. Progress lines
(which evaluation, how many tasks) go to stderr.

`--seeds N` trains N runs (train.seed = the config's seed + 0..N-1) from the same base model, whose
evaluation is done once (greedy decoding and the sampled draws' --seed do not depend on train.seed), and
evaluates each run's final checkpoint. report.json:
- "over_seeds": {"seeds": [...], "sets": {SET: {"before", "per_seed": [{"seed", "lift", "p", "ci_low", "ci_high",
  "fail_to_pass", "pass_to_fail", "after"}], "lift_mean", "lift_ci_low", "lift_ci_high", "level"}},
  "informative_frac_by_quarter"}: SET is heldout or humaneval, lift = after - before greedy pass@1 (a fraction),
  p its exact McNemar p-value, ci_low..ci_high its clustered bootstrap interval,
  the interval the t interval of the per-seed lifts (`commands.stats.mean_ci`; None with one seed);
- one seed: the run's "training", "sets" ({SET: {"before", "after", "change", "seconds"}}), "per_task" and
  "curve" at the top level; several: "runs", a list of {"seed", "run", "training", "sets", "per_task", "curve"}.
"training" carries the share of informative groups (rewards not all equal, the per-step
`groups/informative_frac`) by quarter of the run. Each set's "before" and "after" count the greedy answers
that failed by kind ("failures": format, truncation, wrong answer, error, unjudged; `learn_report.answer_failure`).

Writes OUTPUT/report.json, OUTPUT/report.md, OUTPUT/samples.jsonl (every answer with its text, the code
scored, its verdict and, greedy, why it failed; "after" rows name their seed), and per seed its learning
curve and run: OUTPUT/learning_curve.png and OUTPUT/run with one seed, OUTPUT/learning_curve-seedS.png and
OUTPUT/run-seedS with several. The report is written again after each seed ("seeds_done" of
"seeds_planned"), so a bench stopped between seeds keeps its finished seeds' figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_coach.commands.evaluate import eval_rollout
from mlx_coach.commands.learn_report import (answer_failure, failure_counts, first_last, learning_curve, markdown,
                                             over_seeds, plot_curve, quarter_means)
from mlx_coach.commands.stats import discordant_counts, mcnemar_exact_p, paired_bootstrap
from mlx_coach.core.errors import UserError
from mlx_coach.core.keys import draw_seed
from mlx_coach.telemetry.passk import pass_at_k
from mlx_coach.telemetry.progress import bench_note

# the default's caps; --full lifts them (0 = no cap, as the flags take it)
SHORT = {"steps": 20, "heldout_limit": 20, "humaneval_limit": 20}
# the tag whose tasks are resampled together in the bootstrap (procedural tasks carry their template)
CLUSTER_TAG = "template"


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
    p.add_argument("--humaneval-samples", type=int, default=0, help="sampled answers per HumanEval task for "
                   "pass@k (at rollout.temperature; 0 = greedy only)")
    p.add_argument("--no-humaneval", action="store_true", help="skip HumanEval")
    p.add_argument("--eval-max-new-tokens", type=int, default=0,
                   help="answer length for the evaluations (0 = train.val_max_new_tokens, else rollout.max_new_tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled evaluation and the bootstrap")
    p.add_argument("--seeds", type=int, default=1, help="training runs, train.seed = the config's seed + 0..N-1; "
                   "the report gives each seed's lift and the mean lift's 95%% interval over seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--output", default="runs/bench-learn", help="report folder; the run goes in OUTPUT/run")
    args = p.parse_args(argv)
    if args.minutes < 0:
        raise UserError("bench learn: --minutes must be >= 0")
    if args.seeds < 1:
        raise UserError(f"bench learn: --seeds must be >= 1; got {args.seeds}")
    for flag in ("steps", "heldout_limit", "samples", "humaneval_limit", "humaneval_samples", "eval_max_new_tokens"):
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


def _sample_rows(records, mode, failures=None):
    """samples.jsonl's rows: each answer's text, the code scored, its verdict and (greedy) why it failed."""
    failures = failures or [None] * len(records)
    return [{"mode": mode, "task_id": r["task_id"], "completion_index": r["completion_index"], "passed": r["passed"],
             "status": r["status"], "error": r["error"], "finish_reason": r["finish_reason"], "text": r["text"],
             "completion": r["completion"], **({"failure": f} if mode == "greedy" else {})}
            for r, f in zip(records, failures)]


def task_cluster(task):
    """The group a task's verdict is not independent of: a procedural task's template (its instances share
    one solution idea and flip together when training learns it), else the task alone."""
    return str(task.tags.get(CLUSTER_TAG, task.task_id))


def evaluate_set(model, tokenizer, tasks, cfg, scorer, *, max_new_tokens, samples, seed):
    """Per-task results on one task set: greedy verdicts and (samples > 1) sampled pass counts;
    "rows" holds every answer (written to samples.jsonl, not to the report)."""
    from mlx_coach.engine.generate import generate_and_score

    t0 = time.perf_counter()
    greedy = generate_and_score(model, tokenizer, tasks, eval_rollout(cfg, max_new_tokens), scorer)
    failures = [answer_failure(r, t.entry_point, cfg.rollout.extract_code) for r, t in zip(greedy, tasks)]
    out = {"tasks": [t.task_id for t in tasks], "clusters": [task_cluster(t) for t in tasks],
           "greedy": [bool(r["passed"]) for r in greedy],
           "greedy_truncated": [r["finish_reason"] == "length" for r in greedy],
           "greedy_statuses": [r["status"] for r in greedy],
           "greedy_failures": failures, "rows": _sample_rows(greedy, "greedy", failures)}
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
         "passed": int(sum(result["greedy"])), "truncated_frac": float(np.mean(result["greedy_truncated"])),
         "failures": failure_counts(result["greedy_failures"])}
    if "sampled_correct" in result:
        for k in sorted({1, samples}):
            s[f"sampled_pass@{k}"] = float(np.mean([pass_at_k(samples, c, k) for c in result["sampled_correct"]]))
        s["sampled_truncated_frac"] = result["sampled_truncated_frac"]
    return s


def compare(before, after, samples, seed):
    """The paired change on one task set: counts, McNemar exact p (tasks taken as independent) and a
    bootstrap of greedy pass@1 over the tasks' clusters (`task_cluster`); a bootstrap of sampled pass@k
    when there are samples."""
    gained, lost = discordant_counts(before["greedy"], after["greedy"])
    clusters = before["clusters"]
    out = {"fail_to_pass": gained, "pass_to_fail": lost, "mcnemar_p": mcnemar_exact_p(gained, lost),
           "bootstrap_pass@1": paired_bootstrap(before["greedy"], after["greedy"], clusters=clusters, seed=seed),
           "gained_tasks": [t for t, b, a in zip(before["tasks"], before["greedy"], after["greedy"]) if a and not b],
           "lost_tasks": [t for t, b, a in zip(before["tasks"], before["greedy"], after["greedy"]) if b and not a]}
    if "sampled_correct" in before and "sampled_correct" in after:
        k = samples
        est = lambda res: [pass_at_k(samples, c, k) for c in res["sampled_correct"]]  # noqa: E731
        out[f"bootstrap_sampled_pass@{k}"] = paired_bootstrap(est(before), est(after), clusters=clusters, seed=seed)
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


# ------------------------------------------------------------------------------------------ run


def seed_config(args, seed, run_dir):
    """The config of one seed's run: --set overrides, then train.seed = seed and the run's folder; the
    schedule's length is fixed here, as `mlx-coach train` does (with --minutes the step count is unknown
    in advance, so the schedule follows the config: a constant rate suits a time budget)."""
    from mlx_coach.config.tree import load_config

    cfg = load_config(args.config, [*args.set, f"train.seed={seed}"])
    if not cfg.optim.schedule_steps:
        cfg.optim.schedule_steps = max(cfg.train.steps, args.steps or 0)
    cfg.train.output = str(run_dir)
    return cfg


def train_and_evaluate(cfg, run_dir, steps, args, evaluate_all):
    """Train one seed for the budget, then evaluate its final checkpoint: (training block, after, curve)."""
    from mlx_coach.models.loader import load_policy
    from mlx_coach.rl.loop import train
    from mlx_coach.rl.setup import schedule_steps
    from mlx_coach.runtime.checkpoint import latest_checkpoint

    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes if args.minutes else None
    train(cfg, run_dir, steps=steps, deadline=deadline)
    train_minutes = (time.monotonic() - t0) / 60
    ckpt = latest_checkpoint(run_dir)
    base, tokenizer, _ = load_policy(cfg.model.path, dtype=cfg.model.dtype)
    model, trained_steps = trained_policy(cfg, base, ckpt)
    after = evaluate_all(model, tokenizer)
    curve = learning_curve(run_dir)
    rq, tq = first_last(quarter_means(curve["fresh reward"][1])), first_last(quarter_means(curve["truncation share"][1]))
    informative = quarter_means(curve["informative share"][1])
    training = {"steps": trained_steps, "minutes": round(train_minutes, 2), "budget_minutes": args.minutes,
                "schedule_steps": schedule_steps(cfg), "checkpoint": str(ckpt),
                "fresh_reward_first": rq[0], "fresh_reward_last": rq[1],
                "truncated_first": tq[0], "truncated_last": tq[1], "informative_frac_by_quarter": informative,
                "informative_frac_mean": (round(float(np.mean(curve["informative share"][1])), 4)
                                          if curve["informative share"][1] else None)}
    return training, after, curve


def run(argv):
    from mlx_coach.runtime.rundir import writable_dir, written_whole
    from mlx_coach.models.loader import load_policy
    from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer
    from mlx_coach.data.tasks import load_tasks
    from mlx_coach.config.tree import load_config

    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    out = writable_dir(args.output, "--output")
    seeds = [cfg.train.seed + i for i in range(args.seeds)]
    run_dirs = {s: out / ("run" if args.seeds == 1 else f"run-seed{s}") for s in seeds}
    for run_dir in run_dirs.values():
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
    # sampled answers per task, per set (1: greedy only)
    n_of = {"heldout": samples, "humaneval": max(args.humaneval_samples, 1)}
    if args.steps is None and not (args.full or args.minutes):
        steps = min(cfg.train.steps, SHORT["steps"])
    else:
        steps = args.steps or (10**9 if args.minutes else cfg.train.steps)

    note = bench_note("learn")
    phases = len(sets) + len(seeds) * (1 + len(sets))
    done = 0

    def evaluate_all(model, tokenizer, when):
        nonlocal done
        res = {}
        for name, tasks in sets.items():
            n = n_of[name]
            done += 1
            note(f"[{done}/{phases}] {when} training: evaluating {name}, {len(tasks)} tasks "
                 f"(greedy{f' + {n} sampled' if n > 1 else ''} answers each)")
            res[name] = evaluate_set(model, tokenizer, tasks, cfg, scorer, max_new_tokens=max_new,
                                     samples=n, seed=args.seed)
            print(f"{when} {name}: " + json.dumps(summary(res[name], n)), file=sys.stderr, flush=True)
        return res

    runs, after, curves = [], {}, {}
    head = {"config": args.config, "overrides": args.set, "model": cfg.model.path, "samples": samples,
            "humaneval_samples": n_of["humaneval"],
            "eval_max_new_tokens": max_new, "heldout_spec": args.heldout, "heldout_overlap_with_train": overlap,
            "humaneval_subset": bool(args.humaneval_limit) and "humaneval" in sets}

    def write_report():
        """report.json and report.md of the seeds finished so far, each file replaced whole: a run stopped
        between seeds keeps what its finished seeds measured ("seeds_done" < "seeds_planned")."""
        report = {**head, "seeds_planned": seeds, "seeds_done": [r["seed"] for r in runs],
                  "over_seeds": over_seeds(runs, list(sets))}
        if len(seeds) == 1:
            report.update({k: v for k, v in runs[0].items() if k not in ("seed", "run")})
        else:
            report["runs"] = runs
        md = markdown(report)
        for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", md)):
            with written_whole(out / name) as tmp:
                tmp.write_text(text)
        return report, md

    def append_samples(when, results, seed=None):
        with open(out / "samples.jsonl", "a" if when == "after" else "w") as f:
            for name in sets:
                for row in results[name]["rows"]:
                    f.write(json.dumps({"when": when, **({"seed": seed} if when == "after" else {}), "set": name,
                                        **row}) + "\n")

    with SandboxScorer(cfg.sandbox) as scorer:
        # the base model's evaluation is the same for every seed (the decoding's seed is --seed): once
        model, tokenizer, _ = load_policy(cfg.model.path, dtype=cfg.model.dtype)
        model.eval()
        before = evaluate_all(model, tokenizer, "before")
        append_samples("before", before)
        del model
        for seed in seeds:
            done += 1
            note(f"[{done}/{phases}] training" + (f" seed {seed}" if len(seeds) > 1 else "") + " "
                 + (f"for {args.minutes:g} minutes" if steps == 10**9 else f"{steps} steps")
                 + (f" (at most {args.minutes:g} minutes)" if args.minutes and steps != 10**9 else "")
                 + (f"; --full for the config's {cfg.train.steps}" if args.steps is None and steps < cfg.train.steps
                    else ""))
            seed_cfg = seed_config(args, seed, run_dirs[seed])
            training, after[seed], curves[seed] = train_and_evaluate(
                seed_cfg, run_dirs[seed], steps, args, lambda m, t: evaluate_all(m, t, "after"))
            runs.append({"seed": seed, "run": str(run_dirs[seed]), "training": training, "sets": {}, "per_task": {}})
            for name in sets:
                n = n_of[name]
                a = after[seed]
                runs[-1]["sets"][name] = {"before": summary(before[name], n), "after": summary(a[name], n),
                                          "change": compare(before[name], a[name], n, args.seed),
                                          "seconds": {"before": before[name]["seconds"], "after": a[name]["seconds"]}}
                # rows go to samples.jsonl; clusters follow from the task ids
                runs[-1]["per_task"][name] = {when: {k: v for k, v in res[name].items() if k not in ("rows", "clusters")}
                                              for when, res in (("before", before), ("after", a))}
            runs[-1]["curve"] = {k: {"steps": xs, "values": ys} for k, (xs, ys) in curves[seed].items()}
            append_samples("after", after[seed], seed)
            report, md = write_report()

    pngs = [plot_curve(out / ("learning_curve.png" if len(seeds) == 1 else f"learning_curve-seed{r['seed']}.png"),
                       curves[r["seed"]], f"{cfg.model.path}: learning curve ({r['training']['steps']} steps"
                       + (f", seed {r['seed']})" if len(seeds) > 1 else ")")) for r in runs]
    print(md)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {', '.join(str(p) for p in pngs)}")
    return report
