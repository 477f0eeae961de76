"""A run report a person can read: `mlx-coach report RUN` writes RUN/report/ (report.md and one PNG
per chart) from the run's metrics.jsonl; the trainer writes the same at each epoch end and logs each
PNG to TensorBoard's Images tab (`report/<chart>`).

TensorBoard's custom-scalar charts have one y-axis, so they only hold series of one unit
(scalar_charts.custom_scalar_layout). The charts that put two units side by side live here, drawn by
plots.line_chart with a second y-axis:

    throughput_vs_hit_rate.png   tok/s (left) and the step's cache hit rate (right), one colour per
                                 epoch phase, the line broken where the phase changes
    throughput_vs_memory.png     tok/s (left) and memory in GB (right): process footprint, MLX active, MLX cache
    reward_fresh_vs_cached.png   fresh and cached reward means per step (left), validation pass@1 (right),
                                 dotted lines at epoch ends
"""

import math
from pathlib import Path

import yaml

from mlx_coach.core.errors import UserError
from mlx_coach.telemetry.plots import line_chart, png_to_hwc
from mlx_coach.telemetry.accumulators import PHASES, epoch_phase
from mlx_coach.telemetry.writer import markdown_table, read_jsonl

CHARTS = ("throughput_vs_hit_rate", "throughput_vs_memory", "reward_fresh_vs_cached")


def add_arguments(p):
    p.add_argument("run", metavar="RUN", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--output", help="folder for report.md and the PNGs (default RUN/report)")


def _phase_bounds(run_dir):
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        bounds = tuple(cfg["telemetry"]["phase_bounds"])
        epoch_phase(0.0, bounds)
        return bounds
    except (OSError, KeyError, TypeError, ValueError, UnicodeDecodeError, yaml.YAMLError, UserError):
        return (1 / 3, 2 / 3)  # the default; a report is still worth drawing without the config


def _num(row, key):
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else math.nan


def load_run(run_dir):
    """(step rows, epoch tables [(epoch, step, rows)], validation [(step, pass@1)]) from metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
    try:
        rows = read_jsonl(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    steps = [r for r in rows if "reward/mean" in r and "epoch/position" in r]
    tables = [(r["epoch"], r["step"], r["epoch_table"]) for r in rows if "epoch_table" in r]
    evals = [(r["step"], r["eval/pass@1"]) for r in rows if "eval/pass@1" in r]
    return steps, tables, evals


def _by_phase(steps, key, bounds):
    """{phase: (xs, ys)}: the value at steps of that phase, NaN at the others (so each phase's line
    breaks where another phase starts, instead of drawing across it)."""
    xs = [r["step"] for r in steps]
    phases = [epoch_phase(min(max(_num(r, "epoch/position"), 0.0), 1.0), bounds) for r in steps]
    return {p: (xs, [_num(r, key) if ph == p else math.nan for r, ph in zip(steps, phases)])
            for p in PHASES if p in phases}


def draw_charts(steps, tables, evals, out, bounds=(1 / 3, 2 / 3)):
    """The PNGs, {chart name: path}; charts without data are left out."""
    out = Path(out)
    xs = [r["step"] for r in steps]
    epoch_ends = [step for _, step, _ in tables]
    charts = {}
    if steps:
        toks = _by_phase(steps, "gen/tokens_per_sec", bounds)
        hits = _by_phase(steps, "cache/hit_rate", bounds)
        charts["throughput_vs_hit_rate"] = line_chart(
            out / "throughput_vs_hit_rate.png", "Generation tok/s vs cache hit rate, by epoch phase",
            {f"tok/s ({p})": s for p, s in toks.items()},
            right={f"hit rate ({p})": s for p, s in hits.items()},
            left_label="decode tokens / s", right_label="cache hit rate (step)", right_limits=(-0.02, 1.02),
            vlines=epoch_ends, vline_label="epoch end")
        memory = {label: (xs, [_num(r, key) for r in steps]) for label, key in (
            ("process footprint (GB)", "memory/footprint_gb"), ("MLX active (GB)", "memory/active_gb"),
            ("MLX cache (GB)", "memory/cache_gb")) if any(key in r for r in steps)}
        charts["throughput_vs_memory"] = line_chart(
            out / "throughput_vs_memory.png", "Generation tok/s vs memory",
            {"tok/s": (xs, [_num(r, "gen/tokens_per_sec") for r in steps])}, right=memory,
            left_label="decode tokens / s", right_label="GB", vlines=epoch_ends, vline_label="epoch end")
        charts["reward_fresh_vs_cached"] = line_chart(
            out / "reward_fresh_vs_cached.png", "Reward: fresh vs cached scores (validation pass@1 at epoch ends)",
            {"fresh reward (mean)": (xs, [_num(r, "reward/fresh_mean") for r in steps]),
             "cached reward (mean)": (xs, [_num(r, "reward/cached_mean") for r in steps])},
            right={"validation pass@1": ([s for s, _ in evals], [v for _, v in evals])} if evals else None,
            left_label="reward", right_label="pass@1", right_limits=(-0.02, 1.02),
            vlines=epoch_ends, vline_label="epoch end")
    return charts


def markdown(run_dir, steps, tables, evals, charts):
    last = steps[-1] if steps else {}
    lines = [f"# Run report: {Path(run_dir).name}", ""]
    if steps:
        lines.append(f"{len(steps)} steps logged (last: step {last['step']}, epoch {last.get('epoch', 0)}); "
                     f"{len(tables)} epoch(s) finished.")
    else:
        lines.append("No training step logged yet.")
    lines.append("")
    if evals:
        lines += ["## Validation", "", "| step | pass@1 |", "|---|---|"]
        lines += [f"| {s} | {v:.4g} |" for s, v in evals]
        lines.append("")
    titles = {"throughput_vs_hit_rate": "Throughput and cache hit rate by epoch phase",
              "throughput_vs_memory": "Throughput and memory",
              "reward_fresh_vs_cached": "Fresh vs cached reward"}
    for name, path in charts.items():
        lines += [f"## {titles[name]}", "", f"![{titles[name]}]({Path(path).name})", ""]
    for epoch, step, rows in tables:
        lines += [f"## Epoch {epoch} by phase (ends at step {step})", "", markdown_table(rows), ""]
    return "\n".join(lines)


def write_report(run_dir, out=None):
    """Write report.md and the PNGs into `out` (default RUN/report); returns {chart: path}."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report"
    steps, tables, evals = load_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(steps, tables, evals, out, _phase_bounds(run_dir))
    (out / "report.md").write_text(markdown(run_dir, steps, tables, evals, charts), encoding="utf-8")
    return charts


def log_images(telemetry, charts, step):
    """Each chart on TensorBoard's Images tab as report/<name>."""
    for name, path in charts.items():
        telemetry.image(f"report/{name}", png_to_hwc(path), step)


def run(args):
    from mlx_coach.runtime.rundir import writable_dir

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UserError(f"RUN: {run_dir} is not a directory")
    out = writable_dir(args.output or run_dir / "report", "--output")
    charts = write_report(run_dir, out)
    print(f"wrote {out / 'report.md'}" + "".join(f"\n      {p}" for p in charts.values()))
    return 0
