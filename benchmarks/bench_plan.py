"""The memory plan against measured peaks: `mlx-coach bench plan [--calibration] [--steps N] [--only NAME]`.

Each configuration (default: the six held out in benchmarks/plan_holdout.yaml; `--calibration`: the ones the
plan's constants were fitted on, listed below) is trained for a few steps in a fresh process, which reports
its MLX peak over the whole run (mx.get_peak_memory, never reset: the trainer's per-step resets are turned
off in that process) and its peak RSS (getrusage ru_maxrss). Beside them: `mlx-coach plan`'s prediction for
the prompts those steps drew (the first steps x prompts_per_step tasks of the epoch's order), and the error.
Validation is off in these runs (the plan is of the training steps).

The plan is of the run's worst case: every completion max_new_tokens long. A model that stops early (EOS, a stop
string, rollout.stop_after_code) peaks lower; `--full-length` measures that worst case instead, the stop rules
switched off in the measuring process, so that the prediction and the measurement are of the same run shape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_coach.commands.argtypes import positive_int  # noqa: E402
from mlx_coach.commands.bench import BenchParser  # noqa: E402
from mlx_coach.core.errors import UserError  # noqa: E402
from mlx_coach.runtime.watchdog import env_for_child  # noqa: E402
HOLDOUT = ROOT / "benchmarks" / "plan_holdout.yaml"
QUIET = ["train.epochs_val=false", "train.val_every=0", "train.checkpoint_every=0", "telemetry.tensorboard=false",
         "telemetry.progress=false"]

# what the constants of runtime/memory_plan.py were fitted on; none of them is a held-out configuration
CALIBRATION = [
    {"name": "cal-tiny-fp32-lora16", "config": "configs/tiny.yaml", "model": "builtin:tiny",
     "set": ["rollout.group_size=8", "rollout.prompts_per_step=2", "rollout.max_new_tokens=64", "model.lora_rank=16"]},
    {"name": "cal-tiny-fp32-full", "config": "configs/tiny.yaml", "model": "builtin:tiny",
     "set": ["model.fine_tune=full", "rollout.group_size=4", "rollout.prompts_per_step=4",
             "rollout.max_new_tokens=32"]},
    {"name": "cal-tiny-bf16-accum2", "config": "configs/tiny.yaml", "model": "builtin:tiny",
     "set": ["model.dtype=bfloat16", "rollout.group_size=4", "rollout.prompts_per_step=4",
             "rollout.max_new_tokens=96", "optim.grad_accum=2"]},
    {"name": "cal-tiny-4bit-fp32", "config": "configs/tiny.yaml", "model": "builtin:tiny-4bit",
     "set": ["rollout.group_size=8", "rollout.prompts_per_step=4", "rollout.max_new_tokens=48"]},
    {"name": "cal-smollm2-default-dtype", "config": "configs/smollm2.yaml", "model": "builtin:smollm2",
     "set": ["rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=96", "model.lora_layers=8"]},
    {"name": "cal-smollm2-fp32-l4", "config": "configs/smollm2.yaml", "model": "builtin:smollm2",
     "set": ["model.dtype=float32", "rollout.group_size=8", "rollout.prompts_per_step=1",
             "rollout.max_new_tokens=48", "model.lora_layers=4"]},
    # half precision and quantized matmuls in half precision are slow on MLX's CPU backend: few rows and tokens
    {"name": "cal-smollm2-bf16-short", "config": "configs/smollm2.yaml", "model": "builtin:smollm2",
     "set": ["model.dtype=bfloat16", "rollout.group_size=4", "rollout.prompts_per_step=1",
             "rollout.max_new_tokens=24", "model.lora_layers=4"]},
    {"name": "cal-tiny-4bit-fp16-short", "config": "configs/tiny.yaml", "model": "builtin:tiny-4bit",
     "set": ["model.dtype=float16", "rollout.group_size=4", "rollout.prompts_per_step=2",
             "rollout.max_new_tokens=24"]},
    {"name": "cal-tiny-8bit-bf16-short", "config": "configs/tiny.yaml", "model": "builtin:tiny-8bit",
     "set": ["model.dtype=bfloat16", "rollout.group_size=4", "rollout.prompts_per_step=2",
             "rollout.max_new_tokens=24", "model.lora_rank=16"]},
    {"name": "cal-tiny-fp16-full", "config": "configs/tiny.yaml", "model": "builtin:tiny",
     "set": ["model.dtype=float16", "model.fine_tune=full", "rollout.group_size=4", "rollout.prompts_per_step=4",
             "rollout.max_new_tokens=48", "optim.grad_accum=2"]},
]


def overrides(entry):
    return [f"model.path={entry['model']}", *entry["set"], *QUIET]


@contextlib.contextmanager
def run_to_length():
    """In this process, decoding ignores EOS, stop strings and rollout.stop_after_code: every completion runs to
    max_new_tokens."""
    from mlx_coach.engine.decoding import _Seq

    add = _Seq.add

    def to_length(s, token, lp, ent, table, eos, stops, max_stop, max_new):
        s.fence = False
        return add(s, token, lp, ent, table, (), [], max_stop, max_new)

    _Seq.add = to_length
    try:
        yield
    finally:
        _Seq.add = add


def child(spec):
    """In the measuring process: train, then print the run's MLX peak and peak RSS as JSON."""
    import mlx.core as mx

    mx.reset_peak_memory = lambda: None  # the trainer resets the peak each step; here it is the run's
    from mlx_coach.cli import main

    entry = json.loads(spec)
    if entry.get("full_length"):
        run_to_length().__enter__()  # for the life of this process
    argv = ["train", "-c", str(ROOT / entry["config"]), "--steps", str(entry["steps"]), "--output", entry["output"]]
    for item in overrides(entry):
        argv += ["--set", item]
    code = main(argv)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"code": code, "mlx_peak": mx.get_peak_memory(), "rss_peak": rss}))


def predicted(entry, steps):
    from mlx_coach.config.tree import load_config
    from mlx_coach.models.size import plan_run
    from mlx_coach.rl.setup import run_order, select_tasks

    cfg = load_config(ROOT / entry["config"], overrides(entry))
    tasks, _ = select_tasks(cfg.data)
    order = run_order(tasks, cfg, 0)[: steps * cfg.rollout.prompts_per_step]
    return plan_run(cfg, [tasks[i] for i in order])[2]


def measure(entry, steps, out):
    spec = dict(entry, steps=steps, output=str(out / entry["name"]))
    # env_for_child: the run stops as on SIGTERM when this process is gone (killed by a timeout, say)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, env=env_for_child())
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise SystemExit(f"{entry['name']}: the run failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None):
    p = BenchParser("plan", __doc__.splitlines()[0])
    p.add_argument("--calibration", action="store_true", help="the calibration configurations, not the held-out")
    p.add_argument("--steps", type=positive_int, default=3, help="training steps per configuration (default 3)")
    p.add_argument("--only", action="append", default=[], help="run only this configuration (repeatable)")
    p.add_argument("--full-length", action="store_true",
                   help="switch off EOS and stop rules in the runs, so every completion is max_new_tokens long")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = {e["name"] for e in CALIBRATION} | {e["name"] for e in yaml.safe_load(HOLDOUT.read_text())["holdout"]}
    if set(args.only) - known:
        raise UserError(f"mlx-coach bench plan: --only: unknown configuration {sorted(set(args.only) - known)[0]!r}")
    if args.child:
        return child(args.child)
    entries = CALIBRATION if args.calibration else yaml.safe_load(HOLDOUT.read_text())["holdout"]
    if args.only:
        entries = [e for e in entries if e["name"] in args.only]
    entries = [dict(e, full_length=args.full_length) for e in entries]
    rows = []
    print(f"{'configuration':28} {'MLX pred':>9} {'MLX meas':>9} {'err':>6} {'RSS pred':>9} {'RSS meas':>9} {'err':>6}"
          "  (GB)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, entry in enumerate(entries):
            print(f"[{i + 1}/{len(entries)}] {entry['name']}: training {args.steps} steps ...", file=sys.stderr,
                  flush=True)
            plan = predicted(entry, args.steps)
            got = measure(entry, args.steps, Path(tmp))
            row = {"name": entry["name"], "mlx_pred": plan.mlx_peak, "mlx_meas": got["mlx_peak"],
                   "rss_pred": plan.rss_peak, "rss_meas": got["rss_peak"], "phase": plan.phase,
                   "full_length": args.full_length,
                   "parts": plan.parts}
            rows.append(row)
            print(f"{entry['name']:28} {row['mlx_pred'] / 1e9:9.3f} {row['mlx_meas'] / 1e9:9.3f} "
                  f"{row['mlx_pred'] / row['mlx_meas'] - 1:+6.0%} {row['rss_pred'] / 1e9:9.3f} "
                  f"{row['rss_meas'] / 1e9:9.3f} {row['rss_pred'] / row['rss_meas'] - 1:+6.0%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
