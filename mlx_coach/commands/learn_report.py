"""`bench learn`'s report: the run's learning curve, quarter means of its per-step metrics, the lift over
seeds (each seed's lift and McNemar p, the across-seed mean with its t interval from `commands.stats.mean_ci`,
the code path `ab --seeds` reports with) and the markdown tables.

A lift is after - before greedy pass@1 on one task set, as a fraction (0.155 = +15.5 points).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from mlx_coach.commands import stats

CURVE_KEYS = {"reward/fresh_mean": "fresh reward", "eval/pass@1": "validation pass@1",
              "gen/truncated_frac": "truncation share", "groups/informative_frac": "informative share",
              "kl/mean": "KL", "policy/entropy": "entropy"}
LEVEL = 0.95  # of the across-seed interval
# why an answer failed, in the order the report lists them (answer_failure)
FAILURES = ("format", "truncation", "wrong answer", "error", "unjudged")


def answer_failure(record, entry_point, extract_code):
    """Why one evaluated answer (a `generate_and_score` record) failed, or None when it passed:
    - unjudged: the sandbox gave no verdict (timeout, infrastructure);
    - truncation: cut at the token limit;
    - format: nothing to run, or (rollout.extract_code) no fenced block, or code that never defines the
      task's function (the stub's own definition, which returns None, is then what the tests call);
    - wrong answer: the program ran and a test's assert failed;
    - error: the program raised anything else (a syntax error included) or was killed."""
    from mlx_coach.engine.text import has_fenced_block
    from mlx_coach.rewards.scoring.base import UNJUDGED_STATUSES

    if record["passed"]:
        return None
    if record["status"] in UNJUDGED_STATUSES:
        return "unjudged"
    if record["finish_reason"] == "length":
        return "truncation"
    code = record["completion"]
    defines = re.search(rf"^[ \t]*(async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", code, re.M)
    if not code.strip() or (extract_code and not (has_fenced_block(record["text"]) and defines)):
        return "format"
    return "wrong answer" if record["status"] == "failed" else "error"


def failure_counts(failures):
    """{kind: answers} over FAILURES, from a list of answer_failure results (None: passed)."""
    return {kind: sum(f == kind for f in failures) for kind in FAILURES}


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

    rates = {k: curve[k] for k in ("fresh reward", "validation pass@1", "truncation share", "informative share")}
    return line_panels(path, title, [
        dict(left=rates, left_label="reward / share", left_limits=(-0.02, 1.02)),
        dict(left={"KL": curve["KL"]}, right={"entropy": curve["entropy"]}, left_label="KL (k3, per token)",
             right_label="entropy (nats per token)"),
    ])


def quarter_means(values):
    """Means of the finite values over the four quarters of the run's steps (np.array_split: the first
    quarters take the remainder), rounded to 4 places; None for a quarter with no value."""
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return [round(float(np.mean(q)), 4) if len(q) else None for q in np.array_split(np.asarray(vals, float), 4)]


def first_last(quarters):
    """(first, last) quarter that has a value: with fewer than 4 steps, the first and the last step."""
    present = [q for q in quarters if q is not None]
    return (present[0], present[-1]) if present else (None, None)


def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else x


def over_seeds(runs, set_names):
    """{"seeds", "sets": {name: {"before", "per_seed": [{"seed", "lift", "p", "ci_low", "ci_high", "fail_to_pass",
    "pass_to_fail", "after"}], "lift_mean", "lift_ci_low", "lift_ci_high", "level"}}, "informative_frac_by_quarter"}.

    runs: one block per seed ({"seed", "training", "sets"}). The interval is `stats.mean_ci` of the per-seed
    lifts (None with one seed); the informative share per quarter is its mean over the seeds."""
    out = {"seeds": [r["seed"] for r in runs], "sets": {}}
    for name in set_names:
        per_seed = []
        for r in runs:
            block = r["sets"][name]
            boot = block["change"]["bootstrap_pass@1"]
            per_seed.append({"seed": r["seed"], "lift": block["after"]["pass@1"] - block["before"]["pass@1"],
                             "p": block["change"]["mcnemar_p"], "ci_low": boot["ci_low"], "ci_high": boot["ci_high"],
                             "fail_to_pass": block["change"]["fail_to_pass"],
                             "pass_to_fail": block["change"]["pass_to_fail"], "after": block["after"]["pass@1"]})
        ci = stats.mean_ci([s["lift"] for s in per_seed], LEVEL)
        out["sets"][name] = {"before": runs[0]["sets"][name]["before"]["pass@1"], "per_seed": per_seed,
                             "lift_mean": _finite_or_none(ci["mean"]), "lift_ci_low": _finite_or_none(ci["lo"]),
                             "lift_ci_high": _finite_or_none(ci["hi"]), "level": LEVEL}
    quarters = [r["training"]["informative_frac_by_quarter"] for r in runs]
    out["informative_frac_by_quarter"] = [
        round(float(np.mean(col)), 4) if all(v is not None for v in col) else None for col in zip(*quarters)]
    return out


# ------------------------------------------------------------------------------------------ markdown


def pct_text(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def pts_text(x):
    return "-" if x is None else f"{100 * x:+.1f} pts"


def boot_p_text(boot):
    """A bootstrap p-value as text: 0 of the resamples is "< 1/resamples", not 0."""
    return f"< {1 / boot['resamples']:.0e}" if boot["p"] == 0 else f"{boot['p']:.3g}"


def _quarters_text(quarters):
    return " / ".join(pct_text(q) for q in quarters)


def training_line(t):
    return (f"Training: {t['steps']} steps in {t['minutes']:.1f} min; fresh reward {t['fresh_reward_first']} "
            f"(first quarter of steps) -> {t['fresh_reward_last']} (last quarter); truncation share "
            f"{t['truncated_first']} -> {t['truncated_last']}; informative groups (rewards not all equal) by "
            f"quarter {_quarters_text(t['informative_frac_by_quarter'])}.")


def set_samples(report):
    """Sampled answers per task of each set (1: greedy only)."""
    return {"heldout": report["samples"], "humaneval": report["humaneval_samples"]}


def run_table(sets, samples):
    """One run's table: per set, greedy pass@1 with its paired tests, sampled pass@1 and pass@k, truncation."""
    lines = ["| set | metric | before | after | change | fail->pass | pass->fail | p |",
             "|---|---|---|---|---|---|---|---|"]
    for name, block in sets.items():
        b, a, c = block["before"], block["after"], block["change"]
        boot = c["bootstrap_pass@1"]
        grouped = f", {boot['clusters']} templates" if boot["clusters"] < b["tasks"] else ""
        label = f"{name} ({b['tasks']} tasks{grouped})"
        lines.append(f"| {label} | pass@1 greedy | {pct_text(b['pass@1'])} | {pct_text(a['pass@1'])} | "
                     f"{100 * boot['delta']:+.1f} pts (95% CI {100 * boot['ci_low']:+.1f}..{100 * boot['ci_high']:+.1f}) | "
                     f"{c['fail_to_pass']} | {c['pass_to_fail']} | McNemar {c['mcnemar_p']:.3g}, bootstrap "
                     f"{boot_p_text(boot)} |")
        k = samples[name]
        if f"sampled_pass@{k}" in b and f"sampled_pass@{k}" in a:
            lines.append(f"| {label} | pass@1 sampled (n={k}) | {pct_text(b['sampled_pass@1'])} | "
                         f"{pct_text(a['sampled_pass@1'])} | {100 * (a['sampled_pass@1'] - b['sampled_pass@1']):+.1f} pts | | | |")
            if k > 1:
                bk = c[f"bootstrap_sampled_pass@{k}"]
                lines.append(f"| {label} | pass@{k} (n={k}) | {pct_text(b[f'sampled_pass@{k}'])} | "
                             f"{pct_text(a[f'sampled_pass@{k}'])} | {100 * bk['delta']:+.1f} pts (95% CI "
                             f"{100 * bk['ci_low']:+.1f}..{100 * bk['ci_high']:+.1f}) | | | bootstrap {boot_p_text(bk)} |")
        lines.append(f"| {label} | truncated (greedy) | {pct_text(b['truncated_frac'])} | "
                     f"{pct_text(a['truncated_frac'])} | | | | |")
        for kind in FAILURES:
            nb, na = b["failures"][kind], a["failures"][kind]
            lines.append(f"| {label} | failed: {kind} (greedy) | {nb} | {na} | {na - nb:+d} | | | |")
    return lines


def seeds_table(summary):
    """Each seed's greedy pass@1 lift with its McNemar p and clustered bootstrap interval, then the mean lift
    with its t interval, per set."""
    lines = ["| set | seed | before | after | lift | 95% bootstrap CI | fail->pass | pass->fail | McNemar p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["sets"].items():
        for row in s["per_seed"]:
            lines.append(f"| {name} | {row['seed']} | {pct_text(s['before'])} | {pct_text(row['after'])} | "
                         f"{pts_text(row['lift'])} | {100 * row['ci_low']:+.1f}..{100 * row['ci_high']:+.1f} | "
                         f"{row['fail_to_pass']} | {row['pass_to_fail']} | {row['p']:.3g} |")
    n = len(summary["seeds"])
    lines += ["", f"| set | mean lift over {n} seeds | {round(100 * LEVEL)}% t interval |", "|---|---|---|"]
    for name, s in summary["sets"].items():
        interval = ("-" if s["lift_ci_low"] is None else
                    f"{100 * s['lift_ci_low']:+.1f}..{100 * s['lift_ci_high']:+.1f} pts")
        lines.append(f"| {name} | {pts_text(s['lift_mean'])} | {interval} |")
    return lines


def markdown(report):
    """One seed: the run's table and training line. Several: the per-seed lifts and their interval, then
    each seed's table and training line."""
    if "runs" not in report:
        return "\n".join(run_table(report["sets"], set_samples(report)) + ["", training_line(report["training"])]) + "\n"
    summary = report["over_seeds"]
    lines = seeds_table(summary)
    if len(report["seeds_done"]) < len(report["seeds_planned"]):
        lines = [f"Seeds finished: {len(report['seeds_done'])} of {len(report['seeds_planned'])} (the bench stopped "
                 f"or is still running).", ""] + lines
    lines += ["", f"Informative groups by quarter, mean over seeds: {_quarters_text(summary['informative_frac_by_quarter'])}."]
    for r in report["runs"]:
        lines += ["", f"### seed {r['seed']}", ""] + run_table(r["sets"], set_samples(report))
        lines += ["", training_line(r["training"])]
    return "\n".join(lines) + "\n"
