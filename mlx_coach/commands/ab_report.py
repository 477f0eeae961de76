"""The A/B report: per-run numbers from each run's metrics.jsonl, per-arm means with 95% t-intervals
over seeds, paired differences against the first arm, the epoch-periodic pattern of the logged
reward, and PNG plots (plots.py). Writes OUT/summary.json, OUT/report.md and OUT/*.png.
"""

import json
import math
from pathlib import Path

import numpy as np
import yaml

from mlx_coach.commands import stats
from mlx_coach.telemetry import plots
from mlx_coach.core.errors import UserError
from mlx_coach.telemetry.accumulators import PHASES, epoch_phase
from mlx_coach.telemetry.writer import read_jsonl

# (key, label, digits); every key is a number per run, averaged over seeds
METRICS = [
    ("samples", "samples graded", 0),
    ("scorer_calls", "scorer calls (cache misses)", 1),
    ("cache_hits", "calls saved (cache hits)", 1),
    ("teacher_calls", "teacher calls (HTTP requests)", 1),
    ("teacher_s", "teacher time, s (request latencies summed)", 1),
    ("teacher_cost", "teacher cost (requests x price_per_call)", 3),
    ("rewards_s", "reward time, s (wall, all sources)", 1),
    ("hit_rate", "hit rate", 3),
    *[(f"hit_rate/{p}", f"hit rate, {p} epoch phase", 3) for p in PHASES],
    ("step_s", "step time, s (mean)", 2),
    *[(f"toks/{p}", f"tok/s, {p} epoch phase", 0) for p in PHASES],
    ("reward", "logged reward (reward/mean, mean over steps)", 3),
    ("fresh_reward", "fresh reward (per sample)", 3),
    ("cached_reward", "cached reward (per sample)", 3),
    ("val_pass1", "validation pass@1 (last epoch)", 3),
    ("acf_epoch", "reward autocorrelation at lag = epoch", 3),
    ("phase_r", "reward vs position in epoch, r", 3),
]


def _num(row, key, default=math.nan):
    v = row.get(key, default)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _weighted(rows, mean_key, count_key):
    num = sum(_num(r, mean_key) * _num(r, count_key, 0) for r in rows if _num(r, count_key, 0) > 0)
    den = sum(_num(r, count_key, 0) for r in rows)
    return num / den if den else math.nan


def summarize_run(run_dir) -> dict:
    """Numbers of one finished run (see METRICS) and its per-step series."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (did the run start?)")
    rows = read_jsonl(path)
    steps = [r for r in rows if "reward/mean" in r]
    if not steps:
        raise UserError(f"{run_dir}: no training steps in metrics.jsonl")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    bounds = tuple((cfg.get("telemetry") or {}).get("phase_bounds") or (1 / 3, 2 / 3))
    last = steps[-1]
    phases = [epoch_phase(min(max(_num(r, "epoch/position", 0.0), 0.0), 1.0), bounds) for r in steps]
    out = {
        "steps": len(steps),
        "samples": sum(_num(r, "reward/count", 0) for r in steps),
        "scorer_calls": _num(last, "cache/misses"), "cache_hits": _num(last, "cache/hits"),
        "teacher_calls": _num(last, "teacher/requests"), "teacher_s": _num(last, "teacher/request_s"),
        "teacher_cost": _num(last, "teacher/cost"),
        "rewards_s": sum(_num(r, "time/rewards_s", 0.0) for r in steps),
        "step_s": float(np.mean([_num(r, "time/step_s") for r in steps])),
        "reward": float(np.nanmean([_num(r, "reward/mean") for r in steps])),
        "fresh_reward": _weighted(steps, "reward/fresh_mean", "reward/fresh_count"),
        "cached_reward": _weighted(steps, "reward/cached_mean", "reward/cached_count"),
    }
    lookups = out["scorer_calls"] + out["cache_hits"]
    out["hit_rate"] = out["cache_hits"] / lookups if lookups else math.nan
    for p in PHASES:
        mine = [r for r, q in zip(steps, phases) if q == p]
        h = sum(_num(r, "cache/step_hits", 0) for r in mine)
        m = sum(_num(r, "cache/step_misses", 0) for r in mine)
        out[f"hit_rate/{p}"] = h / (h + m) if h + m else math.nan
        toks = [_num(r, "gen/tokens_per_sec") for r in mine]
        out[f"toks/{p}"] = float(np.nanmean(toks)) if toks else math.nan
    evals = [_num(r, "eval/pass@1") for r in rows if "eval/pass@1" in r]
    out["val_pass1"] = evals[-1] if evals else math.nan
    epochs = [int(_num(r, "epoch", 0)) for r in steps]
    per_epoch = [epochs.count(e) for e in sorted(set(epochs))]
    out["epoch_len"] = max(per_epoch)
    positions = [_num(r, "epoch/position", 0.0) for r in steps]
    out.update(stats.periodicity([_num(r, "reward/mean") for r in steps], positions, out["epoch_len"]))
    out["series"] = {
        "step": [int(r["step"]) for r in steps], "epoch": epochs,
        "reward": [_num(r, "reward/mean") for r in steps],
        "fresh": [_num(r, "reward/fresh_mean") for r in steps],
        "cached": [_num(r, "reward/cached_mean") for r in steps],
        "hit_rate": [_num(r, "cache/hit_rate") for r in steps],
    }
    return out


def aggregate(arms_runs):
    """{arm: {metric: mean_ci over seeds}}; arms_runs: {arm label: [run summary per seed]}."""
    return {arm: {k: stats.mean_ci([r[k] for r in runs]) for k, _, _ in METRICS} for arm, runs in arms_runs.items()}


def compare(arms_runs):
    """{arm: {metric: paired_t(first arm, arm)}} for every arm after the first, paired by seed."""
    labels = list(arms_runs)
    base = arms_runs[labels[0]]
    return {arm: {k: stats.paired_t([r[k] for r in base], [r[k] for r in arms_runs[arm]]) for k, _, _ in METRICS}
            for arm in labels[1:]}


def _fmt(x, digits):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def _cell(s, digits):
    if s["n"] == 0:
        return "n/a"
    if math.isnan(s["lo"]):
        return _fmt(s["mean"], digits)
    return f"{_fmt(s['mean'], digits)} [{_fmt(s['lo'], digits)}, {_fmt(s['hi'], digits)}]"


def _p(x):
    return "n/a" if math.isnan(x) else f"{x:.3f}" if x >= 0.001 else "<0.001"


def _shown(stats):
    """Metrics with a value in some arm (no teacher: no teacher rows)."""
    return [(k, label, d) for k, label, d in METRICS if any(a[k]["n"] for a in stats.values())]


def arms_table(stats, seeds):
    labels = list(stats)
    lines = [f"| metric (mean [95% CI], {seeds} seeds) | " + " | ".join(labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for k, label, d in _shown(stats):
        lines.append(f"| {label} | " + " | ".join(_cell(stats[a][k], d) for a in labels) + " |")
    return "\n".join(lines)


def diff_table(diffs, stats, base):
    lines = []
    for arm, d in diffs.items():
        lines += [f"| {arm} minus {base} | difference [95% CI] | paired t | p |", "|---|---|---|---|"]
        for k, label, digits in _shown(stats):
            s = d[k]
            t = "n/a" if math.isnan(s["t"]) else f"{s['t']:.2f}"
            lines.append(f"| {label} | {_cell(s, digits)} | {t} | {_p(s['p'])} |")
        lines.append("")
    return "\n".join(lines)


def _mean_curve(runs, key):
    n = min(len(r["series"][key]) for r in runs)
    arr = np.array([r["series"][key][:n] for r in runs], dtype=float)
    with np.errstate(all="ignore"):
        counts = np.sum(np.isfinite(arr), axis=0)
        sums = np.nansum(arr, axis=0)
    return runs[0]["series"]["step"][:n], [s / c if c else math.nan for s, c in zip(sums, counts)]


def _boundaries(run):
    s = run["series"]
    return [s["step"][i] + 0.5 for i in range(len(s["step"]) - 1) if s["epoch"][i + 1] != s["epoch"][i]]


def write_plots(out, arms_runs, stats):
    out = Path(out)
    first = next(iter(arms_runs.values()))[0]
    marks = _boundaries(first)
    reward, hits = {}, {}
    for arm, runs in arms_runs.items():
        for key, what in (("reward", "logged"), ("fresh", "fresh"), ("cached", "cached")):
            xs, ys = _mean_curve(runs, key)
            if any(math.isfinite(y) for y in ys):  # a policy that never serves from the cache has no cached curve
                reward[f"{arm}: {what}"] = (xs, ys)
        hits[arm] = _mean_curve(runs, "hit_rate")
    n = len(next(iter(arms_runs.values())))
    files = {
        "reward.png": plots.line_chart(out / "reward.png", f"reward per step: logged, fresh, cached (mean of {n} seeds "
                                       "with a value at that step)", reward, left_label="reward", vlines=marks,
                                       vline_label="epoch boundary"),
        "hit_rate.png": plots.line_chart(out / "hit_rate.png", f"cache hit rate per step (mean of {n} seeds)", hits,
                                         left_label="hit rate", left_limits=(0, 1), vlines=marks,
                                         vline_label="epoch boundary"),
    }
    half = lambda s: (s["hi"] - s["mean"]) if s["n"] > 1 and not math.isnan(s["hi"]) else 0.0  # noqa: E731
    toks = {p: {a: stats[a][f"toks/{p}"]["mean"] for a in stats} for p in PHASES}
    toks_err = {p: {a: half(stats[a][f"toks/{p}"]) for a in stats} for p in PHASES}
    files["toks_phase.png"] = plots.bar_chart(out / "toks_phase.png", "generation tok/s by epoch phase (95% CI)",
                                              toks, ylabel="tok/s", errors=toks_err)
    groups = {"scorer calls": "scorer_calls", "teacher calls": "teacher_calls", "calls saved (cache hits)": "cache_hits"}
    groups = {g: k for g, k in groups.items() if any(stats[a][k]["n"] for a in stats)}
    calls = {g: {a: stats[a][k]["mean"] for a in stats} for g, k in groups.items()}
    calls_err = {g: {a: half(stats[a][k]) for a in stats} for g, k in groups.items()}
    files["calls.png"] = plots.bar_chart(out / "calls.png", "calls per run (95% CI)", calls, ylabel="calls",
                                         errors=calls_err)
    return {name: str(p) for name, p in files.items()}


def arm_label(arm):
    return ", ".join(f"{k}={v}" for k, v in arm)


def write_report(out, runs, manifest) -> dict:
    """Summaries of every run, grouped by arm in order, seeds paired by index; the files; the table."""
    out = Path(out)
    arms_runs = {}
    for r in runs:
        s = summarize_run(r.dir)
        s["seed"] = r.seed
        arms_runs.setdefault(arm_label(r.arm), []).append(s)
    stats = aggregate(arms_runs)
    diffs = compare(arms_runs) if len(arms_runs) > 1 else {}
    seeds = manifest["seeds"]
    files = write_plots(out, arms_runs, stats)
    base = next(iter(arms_runs))
    table = arms_table(stats, seeds)
    epoch_len = next(iter(arms_runs.values()))[0]["epoch_len"]
    vary = " ".join(f"--vary {k}={','.join(vs)}" for k, vs in manifest["vary"])
    md = [
        "# A/B report", "",
        (f"{len(arms_runs)} arms ({vary}), {seeds} seeds each (train.seed {manifest['config']['train']['seed']}.."
        f"{manifest['config']['train']['seed'] + seeds - 1}, paired across arms), {manifest['steps']} steps per run, "
        f"epochs of {epoch_len} steps. Intervals are 95% t-intervals over seeds (none with one seed); differences "
        f"are paired over seeds, against the first arm, with a two-sided paired t-test."), "",
        "## Arms", "", table, "",
        "## Differences", "", diff_table(diffs, stats, base) if diffs else "(one arm: nothing to compare)", "",
        "## Epoch-periodic pattern in the logged reward", "",
        ("Per run, the logged reward (`reward/mean` per step) with its linear trend taken out: its autocorrelation "
        f"at lag = one epoch ({epoch_len} steps), near 0 when nothing repeats each epoch; and its correlation with "
        "the step's position in its epoch (0 at the start, toward 1 at the end), away from 0 when the reward rises or "
        "falls within every epoch. Both rows are in the tables above, per arm and as differences."), "",
        "## Plots", "",
        "![reward per step](reward.png)", "", "![hit rate per step](hit_rate.png)", "",
        "![tok/s by epoch phase](toks_phase.png)", "", "![calls](calls.png)", "",
    ]
    (out / "report.md").write_text("\n".join(md))
    for arm_runs in arms_runs.values():
        for s in arm_runs:
            s.pop("series")
    summary = {"vary": manifest["vary"], "seeds": seeds, "steps": manifest["steps"], "epoch_len": epoch_len,
               "arms": {a: {"runs": arms_runs[a], "stats": stats[a]} for a in arms_runs},
               "differences": {"baseline": base, "arms": diffs}, "plots": files}
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    return {**summary, "table": table}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    return x
