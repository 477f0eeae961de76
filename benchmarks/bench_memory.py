"""Memory policies side by side on an RL-shaped workload: `mlx-coach bench memory [-- ARGS]`.

Each policy is a real `mlx-coach train` run (a fresh process, so no policy inherits another's MLX
cache) of the same config and seed: sampled completions of varying length (stop strings end rows at
different steps), prompts of varying length, a LoRA update each step. MLX's cache limit is raised to
the whole device (`memory.cache_limit: 1.0`) so the buffer cache behaves as it does on Metal, where it
is effectively unbounded; on Linux/CPU it is otherwise capped at 32 MiB.

Policies:
  none              no clears, exact shapes
  clear-every-step  mx.clear_cache() after every step, exact shapes
  ratio             the old default: clear when cache / (active + cache) > 0.5, trimming half
  bucketing         rollout.bucket 32 (padded lengths, power-of-two decode rows), no clears
  bucket+growth     bucketing, and a clear when the cache grew in each of the last 2 steps
  bucket+pressure   bucketing, and a clear when the footprint passes 85% of a limit

Reported per policy (medians over the steps after the first two, which warm up): generation tok/s,
step seconds, peak footprint (the OS's resident size), MLX cache at the end, shapes no earlier step
had asked for (summed after the warm-up), the share of computed positions that were padding in
generation and in the update (bucketing's extra FLOPs), clears and their total milliseconds. JSON (--json) and a PNG of cache and footprint per step (--png).
`--pressure-limit-gb` (default 2) sets the limit the pressure policy clears against (memory.memory_limit):
a small budget, so that on the tiny model the rule has something to act on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFF = ["memory.clear_pressure=null", "memory.clear_growth_steps=0"]
POLICIES = {
    "none": OFF + ["rollout.bucket=0"],
    "clear-every-step": OFF + ["memory.clear_every=1", "memory.clear_fraction=null", "rollout.bucket=0"],
    "ratio": OFF + ["memory.clear_cache_share=0.5", "memory.clear_fraction=0.5", "rollout.bucket=0"],
    "bucketing": OFF + ["rollout.bucket=32"],
    "bucket+growth": ["memory.clear_pressure=null", "memory.clear_growth_steps=2", "memory.clear_min_cache_gb=0",
                      "rollout.bucket=32"],
    "bucket+pressure": ["memory.clear_pressure=0.85", "memory.clear_growth_steps=0", "rollout.bucket=32"],
}


def run_policy(name, overrides, args, out):
    run = out / name
    cmd = [sys.executable, "-m", "mlx_coach", "train", "-c", str(ROOT / "configs/tiny.yaml"), "--output", str(run),
           "--steps", str(args.steps), "--set", "train.epochs_val=false", "--set", "telemetry.progress=false",
           "--set", "alerts.enabled=false", "--set", "memory.cache_limit=1.0", "--set", "train.checkpoint_every=0",
           "--set", f"model.path={args.model}", "--set", f"rollout.max_new_tokens={args.max_new_tokens}",
           "--set", f"rollout.prompts_per_step={args.prompts}", "--set", f"rollout.group_size={args.group}",
           "--set", "rollout.temperature=1.0", "--set", "rollout.top_p=1.0", "--set", "data.limit=0"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: training failed: {proc.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def summarize(rows, warmup=2):
    steady = rows[warmup:] or rows
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    return {
        "tokens_per_sec": med("gen/tokens_per_sec"),
        "step_s": med("time/step_s"),
        "peak_footprint_gb": max(r.get("memory/footprint_gb", float("nan")) for r in rows),
        "final_cache_gb": rows[-1]["memory/cache_gb"],
        "new_shapes": sum(r["memory/new_shapes"] for r in steady),
        "gen_padding": med("gen/padding_frac"),
        "update_padding": med("update/padding_frac"),
        "clears": rows[-1]["memory/clear_events"],
        "clear_ms_total": rows[-1]["memory/clear_ms"],
        "cache_gb": [r["memory/cache_gb"] for r in rows],
        "footprint_gb": [r.get("memory/footprint_gb") for r in rows],
    }


def plot(results, path):
    """Two panels (MLX cache, process footprint) in GB per step, one coloured line per policy."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    w, h, pad = 900, 340, 50
    img = Image.new("RGB", (w, 2 * h), "white")
    draw = ImageDraw.Draw(img)
    for panel, (key, title) in enumerate((("cache_gb", "MLX cache (GB)"), ("footprint_gb", "process footprint (GB)"))):
        top = panel * h
        series = {n: [v for v in r[key] if v is not None] for n, r in results.items()}
        hi = max((max(v) for v in series.values() if v), default=1.0) * 1.1 or 1.0
        n = max(len(v) for v in series.values())
        draw.rectangle([pad, top + pad // 2, w - pad, top + h - pad], outline="black")
        draw.text((pad, top + 5), f"{title}, 0 to {hi:.2f}, per step", fill="black")
        for i, (name, values) in enumerate(series.items()):
            c = colours[i % len(colours)]
            pts = [(pad + (w - 2 * pad) * j / max(n - 1, 1), top + h - pad - (h - 1.5 * pad) * v / hi)
                   for j, v in enumerate(values)]
            if len(pts) > 1:
                draw.line(pts, fill=c, width=2)
            draw.text((w - pad - 150, top + pad // 2 + 5 + 14 * i), name, fill=c)
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--pressure-limit-gb", type=float, default=2.0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--png", metavar="PATH")
    args = p.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for i, name in enumerate(args.policies, 1):
            overrides = list(POLICIES[name])
            if name == "bucket+pressure":
                overrides.append(f"memory.memory_limit={int(args.pressure_limit_gb * 1e9)}")
            print(f"[bench memory] policy {i}/{len(args.policies)}: {name}, {args.steps} training steps ...",
                  file=sys.stderr, flush=True)
            results[name] = summarize(run_policy(name, overrides, args, out))
    base = results.get(args.policies[0])
    print(f"\n{args.model}, {args.steps} steps of {args.prompts} prompts x {args.group} samples, up to "
          f"{args.max_new_tokens} new tokens; medians after 2 warm-up steps; ratios against '{args.policies[0]}'")
    print(f"{'policy':<17} {'tok/s':>8} {'x':>5} {'step s':>7} {'x':>5} {'peak GB':>8} {'cache GB':>9} "
          f"{'new shapes':>10} {'pad gen':>8} {'pad upd':>8} {'clears':>7} {'clear ms':>9}")
    for name, r in results.items():
        print(f"{name:<17} {r['tokens_per_sec']:8.0f} {r['tokens_per_sec'] / base['tokens_per_sec']:5.2f} "
              f"{r['step_s']:7.2f} {r['step_s'] / base['step_s']:5.2f} {r['peak_footprint_gb']:8.3f} "
              f"{r['final_cache_gb']:9.3f} {r['new_shapes']:10d} {r['gen_padding']:8.1%} {r['update_padding']:8.1%} "
              f"{r['clears']:7d} {r['clear_ms_total']:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if args.png:
        plot(results, args.png)
        print(f"wrote {args.png}")
    return results


if __name__ == "__main__":
    main()
