"""`mlx-coach ab`: one config, two cache policies, side by side.

Both runs use the same seed, so they sample the same tasks in the same order; what differs is
what the cache serves. The report compares scorer work (misses = scorer calls), scoring time,
hit rate, throughput and the rewards, and the two run directories sit under one folder so
`tensorboard --logdir OUT` overlays them.
"""

import json
import math
from pathlib import Path

import numpy as np

from .config import load_config
from .errors import UserError
from .telemetry import read_jsonl

POLICIES = ("none", "lru", "ttl", "lru+ttl", "epoch-clear")


def add_arguments(p):
    p.add_argument("-c", "--config", help="YAML config; defaults when omitted")
    p.add_argument("--policies", nargs=2, default=["lru+ttl", "epoch-clear"], metavar=("A", "B"),
                   help=f"two cache policies ({', '.join(POLICIES)})")
    p.add_argument("--steps", type=int, help="steps per run (overrides train.steps)")
    p.add_argument("--output", default="runs/ab", help="folder for both runs and report.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def summarize_run(run_dir):
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    steps = [r for r in rows if "reward/mean" in r]
    if not steps:
        raise UserError(f"{run_dir}: no training steps in metrics.jsonl")
    last = steps[-1]
    hits, misses = last["cache/hits"], last["cache/misses"]

    def mean(key, rs=steps):
        vals = [r[key] for r in rs if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    final_epoch = [r for r in steps if r.get("epoch") == last.get("epoch")]
    evals = [r["eval/pass@1"] for r in rows if "eval/pass@1" in r]
    return {
        "steps": len(steps),
        "samples": int(sum(r["reward/count"] for r in steps)),
        "cached_samples": int(sum(r["reward/cached_count"] for r in steps)),
        "scorer_calls": int(misses), "cache_hits": int(hits),
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "score_s_total": float(sum(r["time/score_s"] for r in steps)),
        "rewards_s_total": float(sum(r.get("time/rewards_s", 0.0) for r in steps)),
        "step_s_total": float(sum(r["time/step_s"] for r in steps)),
        "tokens_per_sec_mean": mean("gen/tokens_per_sec"),
        "reward_mean": mean("reward/mean"),
        "fresh_reward_mean": mean("reward/fresh_mean"),
        "cached_reward_mean": mean("reward/cached_mean"),
        "final_epoch_fresh_reward": mean("reward/fresh_mean", final_epoch),
        "eval_pass@1": evals,
        "cache_clears": sum(1 for e in _events(run_dir) if e.get("kind") == "cache/clear" and e.get("removed")),
    }


def _events(run_dir):
    path = Path(run_dir) / "events.jsonl"
    return read_jsonl(path) if path.is_file() else []


def compare(a, b):
    """B relative to A for the numbers where a ratio means something."""
    out = {}
    for key in ("scorer_calls", "rewards_s_total", "score_s_total", "step_s_total", "tokens_per_sec_mean", "hit_rate"):
        x, y = a[key], b[key]
        out[key] = y / x if x else float("nan")
    return out


def format_report(policies, summaries):
    keys = ["steps", "samples", "cached_samples", "scorer_calls", "hit_rate", "rewards_s_total", "score_s_total",
            "step_s_total",
            "tokens_per_sec_mean", "reward_mean", "fresh_reward_mean", "cached_reward_mean",
            "final_epoch_fresh_reward", "cache_clears"]
    a, b = policies
    lines = [f"{'':28s}{a:>16s}{b:>16s}"]
    for k in keys:
        lines.append(f"{k:28s}{_fmt(summaries[a][k]):>16s}{_fmt(summaries[b][k]):>16s}")
    lines.append(f"{'eval_pass@1 by epoch':28s}{_fmt(summaries[a]['eval_pass@1']):>16s}"
                 f"{_fmt(summaries[b]['eval_pass@1']):>16s}")
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, list):
        return ",".join(f"{x:.2f}" for x in v) or "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def run(args):
    from .trainer import train

    a, b = args.policies
    for p in (a, b):
        if p not in POLICIES:
            raise UserError(f"--policies: unknown cache policy {p!r} ({', '.join(POLICIES)})")
    if a == b:
        raise UserError("--policies: give two different policies")
    out = Path(args.output)
    summaries = {}
    for label, policy in (("a", a), ("b", b)):
        cfg = load_config(args.config, [*args.set, f"cache.policy={policy}"])
        if args.steps:
            cfg.train.steps = args.steps
        run_dir = out / f"{label}-{policy.replace('+', '-')}"
        if (run_dir / "checkpoints").exists():
            raise UserError(f"--output: {run_dir} already holds a run; choose a new --output")
        cfg.train.output = str(run_dir)
        print(f"[{label}] cache.policy={policy} -> {run_dir}")
        train(cfg, run_dir)
        summaries[policy] = summarize_run(run_dir)
    report = {"policies": [a, b], "runs": summaries, "b_over_a": compare(summaries[a], summaries[b])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report((a, b), summaries))
    print(f"report: {out / 'report.json'}; dashboards: tensorboard --logdir {out}")
    return 0
