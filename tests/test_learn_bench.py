"""`mlx-coach bench learn` end to end on the builtin tiny model: the report's structure, before/after
numbers that equal separate `mlx-coach eval` runs of the base model and of the run's final adapters,
the lift over seeds with its interval, and the per-step share of informative groups it reports."""

import dataclasses
import json

import mlx.core as mx
import pytest

from mlx_coach.cli import main
from mlx_coach.commands import stats
from mlx_coach.commands.learn_report import FAILURES, boot_p_text, learning_curve, over_seeds, quarter_means
from mlx_coach.rl.loop import train
from mlx_coach.rl.setup import select_tasks
from mlx_coach.telemetry.passk import pass_at_k
from test_sampling import drawn_ids, dyn_cfg
from test_trainer import step_rows


def _eval_rows(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["eval", "--model", "builtin:tiny", "--tasks", "builtin:val", "--limit", "4",
                 "--max-new-tokens", "24", "--output", str(out), *extra]) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_bench_learn_reports_the_paired_change_of_separate_evals(tmp_path, capsys):
    out = tmp_path / "learn"
    argv = ["bench", "learn", "-c", "configs/tiny.yaml", "--steps", "2", "--heldout", "builtin:val",
            "--heldout-limit", "4", "--samples", "2", "--humaneval-limit", "2", "--humaneval-samples", "3",
            "--eval-max-new-tokens", "24",
            "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "train.epochs_val=false",
            "--set", "telemetry.tensorboard=false", "--set", "rollout.temperature=1.0", "--set", "rollout.top_p=1.0",
            "--output", str(out)]  # the sampling of the separate evals below (`--temperature 1.0`, top_p 1)
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["steps"] == 2 and report["samples"] == 2 and report["humaneval_subset"] is True
    assert set(report["sets"]) == {"heldout", "humaneval"}
    for name, n_tasks in (("heldout", 4), ("humaneval", 2)):
        block = report["sets"][name]
        before, after, per = block["before"], block["after"], report["per_task"][name]
        assert before["tasks"] == after["tasks"] == n_tasks
        for when, s in (("before", before), ("after", after)):
            assert s["pass@1"] == pytest.approx(sum(per[when]["greedy"]) / n_tasks)
        change = block["change"]
        gained = sum(1 for b, a in zip(per["before"]["greedy"], per["after"]["greedy"]) if a and not b)
        assert change["fail_to_pass"] == gained and 0.0 <= change["mcnemar_p"] <= 1.0
        assert change["bootstrap_pass@1"]["delta"] == pytest.approx(after["pass@1"] - before["pass@1"])
        # builtin and HumanEval tasks carry no template: each is its own cluster
        assert change["bootstrap_pass@1"]["clusters"] == n_tasks
    # each set's sampled pass@k has its own n: pass@3 on HumanEval, pass@2 held out
    assert "sampled_pass@2" in report["sets"]["heldout"]["before"]
    assert report["humaneval_samples"] == 3 and "sampled_pass@3" in report["sets"]["humaneval"]["after"]
    assert "bootstrap_sampled_pass@3" in report["sets"]["humaneval"]["change"]
    # report.md has a greedy pass@1 row for each set, showing before and after as report.json holds them
    md = [[c.strip() for c in line.strip().strip("|").split("|")] for line in
          (out / "report.md").read_text().splitlines() if line.startswith("|")]
    before_col, after_col = md[0].index("before"), md[0].index("after")
    for name, block in report["sets"].items():
        (row,) = [r for r in md[2:] if r[0].startswith(name) and "pass@1" in r[1] and "greedy" in r[1]]
        shown = [float(row[col].rstrip("%")) for col in (before_col, after_col)]
        assert shown == [pytest.approx(100 * block[when]["pass@1"], abs=0.05) for when in ("before", "after")], name
    assert any(r[0].startswith("humaneval") and r[1] == "pass@3 (n=3)" for r in md[2:])
    assert (out / "learning_curve.png").stat().st_size > 0
    curve = learning_curve(out / "run")
    assert curve["fresh reward"][0] == [1, 2] and len(curve["KL"][1]) == 2 and len(curve["truncation share"][1]) == 2
    # one seed: its lift, and no interval
    (only,) = report["over_seeds"]["sets"]["heldout"]["per_seed"]
    heldout = report["sets"]["heldout"]
    assert only["lift"] == pytest.approx(heldout["after"]["pass@1"] - heldout["before"]["pass@1"])
    assert report["over_seeds"]["sets"]["heldout"]["lift_ci_low"] is None

    # the same answers as separate evals of the base model and of the final checkpoint's adapters
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # every greedy failure has one kind, and the report counts samples.jsonl's
    for name, block in report["sets"].items():
        for when in ("before", "after"):
            kinds = [r["failure"] for r in rows if (r["when"], r["set"], r["mode"]) == (when, name, "greedy")]
            assert sum(k is not None for k in kinds) == block[when]["tasks"] - block[when]["passed"]
            assert block[when]["failures"] == {k: kinds.count(k) for k in FAILURES}
    ckpt = report["training"]["checkpoint"]
    for when, extra in (("before", ()), ("after", ("--adapter", ckpt))):
        greedy = _eval_rows(tmp_path, f"{when}-greedy", *extra)
        mine = [r for r in rows if r["when"] == when and r["set"] == "heldout" and r["mode"] == "greedy"]
        assert [(r["task_id"], r["completion"], r["passed"]) for r in mine] == \
               [(r["task_id"], r["completion"], r["passed"]) for r in greedy]
        sampled = _eval_rows(tmp_path, f"{when}-sampled", "--samples", "2", "--temperature", "1.0", *extra)
        mine = [r for r in rows if r["when"] == when and r["set"] == "heldout" and r["mode"] == "sampled"]
        assert [r["completion"] for r in mine] == [r["completion"] for r in sampled]
        counts = {}
        for r in sampled:
            counts[r["task_id"]] = counts.get(r["task_id"], 0) + bool(r["passed"])
        assert report["sets"]["heldout"][when]["sampled_pass@2"] == pytest.approx(
            sum(pass_at_k(2, c, 2) for c in counts.values()) / 4)


def test_bench_learn_rejects_bad_arguments_in_one_line(tmp_path, capsys):
    assert main(["bench", "learn", "-c", "configs/tiny.yaml", "--minutes", "-1"]) == 2
    assert "--minutes" in capsys.readouterr().err
    assert main(["bench", "learn", "-c", "configs/tiny.yaml", "--heldout", "nope:x",
                 "--output", str(tmp_path / "o")]) == 2
    assert "nope:x" in capsys.readouterr().err
    assert main(["bench", "learn", "-c", "configs/tiny.yaml", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_a_bootstrap_p_of_no_resample_is_reported_as_below_the_resolution():
    """A p-value of 0 from 10,000 resamples says p < 1e-4, not that the change cannot be chance."""
    assert boot_p_text({"p": 0.0, "resamples": 10000}) == "< 1e-04"
    assert boot_p_text({"p": 0.0, "resamples": 200}) == "< 5e-03"
    assert boot_p_text({"p": 0.0778, "resamples": 10000}) == "0.0778"


def test_bench_learn_over_seeds_reports_each_seed_and_the_interval_of_their_lifts(tmp_path):
    out = tmp_path / "learn"
    argv = ["bench", "learn", "-c", "configs/tiny.yaml", "--seeds", "2", "--steps", "2", "--heldout", "builtin:val",
            "--heldout-limit", "4", "--samples", "0", "--humaneval-limit", "2", "--eval-max-new-tokens", "16",
            "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "train.epochs_val=false",
            "--set", "telemetry.tensorboard=false", "--set", "train.seed=7", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    summary, runs = report["over_seeds"], report["runs"]
    assert summary["seeds"] == [r["seed"] for r in runs] == [7, 8]
    for name in ("heldout", "humaneval"):
        s = summary["sets"][name]
        assert [row["seed"] for row in s["per_seed"]] == [7, 8]
        for row, r in zip(s["per_seed"], runs):
            per = r["per_task"][name]
            assert row["lift"] == pytest.approx(
                (sum(per["after"]["greedy"]) - sum(per["before"]["greedy"])) / len(per["before"]["greedy"]))
            assert row["p"] == stats.mcnemar_exact_p(*stats.discordant_counts(per["before"]["greedy"],
                                                                                per["after"]["greedy"]))
        ci = stats.mean_ci([row["lift"] for row in s["per_seed"]])
        assert (s["lift_mean"], s["lift_ci_low"], s["lift_ci_high"]) == pytest.approx((ci["mean"], ci["lo"], ci["hi"]))
        assert s["lift_ci_low"] <= s["lift_mean"] <= s["lift_ci_high"]
    # the base model was evaluated once: one "before" answer per task, one "after" answer per task and seed
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sum(r["when"] == "before" for r in rows) == 4 + 2
    assert sorted(r["seed"] for r in rows if r["when"] == "after") == [7] * 6 + [8] * 6
    # each seed trained its own run: its own train.seed and adapters
    weights = []
    for r in runs:
        assert r["training"]["steps"] == 2 and f"seed: {r['seed']}" in (tmp_path / r["run"] / "config.yaml").read_text()
        weights.append(mx.load(str(tmp_path / r["training"]["checkpoint"] / "adapters.safetensors")))
        informative = [row["groups/informative_frac"] for row in step_rows(tmp_path / r["run"])]
        assert r["training"]["informative_frac_by_quarter"] == quarter_means(informative)
        assert (out / f"learning_curve-seed{r['seed']}.png").stat().st_size > 0
    assert weights[0].keys() == weights[1].keys()
    assert any(not mx.array_equal(weights[0][k], weights[1][k]).item() for k in weights[0])
    md = (out / "report.md").read_text()
    assert "| heldout | 7 |" in md and "| heldout | 8 |" in md and "mean lift over 2 seeds" in md


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_informative_share_counts_every_group_the_step_drew(tmp_path, dynamic):
    """Odd tasks give groups of differing rewards, even tasks all-equal ones: the logged share is the odd
    tasks' share of the prompts drawn, also when dynamic sampling trains on the odd tasks only."""
    cfg = dyn_cfg(tmp_path, "odd_tasks_signal", algo={"dynamic_sampling": dynamic}, train={"steps": 2})
    train(cfg, tmp_path / "run")
    rows = step_rows(tmp_path / "run")
    train_tasks, _ = select_tasks(cfg.data)
    if not dynamic:
        for row in rows:
            row["sampling/draws"] = cfg.rollout.prompts_per_step
    for row, ids in zip(rows, drawn_ids(train_tasks, cfg.train.seed, rows)):
        odd = sum(int(t.rsplit("/", 1)[1]) % 2 for t in ids)
        assert row["groups/informative_frac"] == pytest.approx(odd / len(ids))
    assert len(rows) == 2


def test_the_interval_over_seeds_is_the_t_interval_of_the_per_seed_lifts():
    """Three seeds of unequal lift (on 10 tasks: +1, +3 and +2 tasks): the bounds are mean_ci's of the lifts."""
    before = [False] * 10

    def run_block(seed, gained):
        after = [i < gained for i in range(10)]
        block = {"before": {"pass@1": 0.0}, "after": {"pass@1": gained / 10},
                 "change": {"mcnemar_p": stats.mcnemar_exact_p(gained, 0), "fail_to_pass": gained, "pass_to_fail": 0,
                            "bootstrap_pass@1": stats.paired_bootstrap(before, after, seed=seed)}}
        assert stats.discordant_counts(before, after) == (gained, 0)
        return {"seed": seed, "training": {"informative_frac_by_quarter": [0.5, 0.5, 0.25, None]},
                "sets": {"heldout": block}}

    summary = over_seeds([run_block(0, 1), run_block(1, 3), run_block(2, 2)], ["heldout"])
    s = summary["sets"]["heldout"]
    assert [row["lift"] for row in s["per_seed"]] == pytest.approx([0.1, 0.3, 0.2])
    assert [row["p"] for row in s["per_seed"]] == [1.0, 0.25, 0.5]
    # each seed's own interval is its bootstrap's, around its lift
    assert all(row["ci_low"] <= row["lift"] <= row["ci_high"] for row in s["per_seed"])
    ci = stats.mean_ci([0.1, 0.3, 0.2])
    assert (s["lift_mean"], s["lift_ci_low"], s["lift_ci_high"]) == pytest.approx((ci["mean"], ci["lo"], ci["hi"]))
    assert s["lift_mean"] == pytest.approx(0.2) and s["lift_ci_low"] < s["lift_mean"] < s["lift_ci_high"]
    assert summary["informative_frac_by_quarter"] == [0.5, 0.5, 0.25, None]


def _answer(text, reason="stop", extract=True, timeout_s=5.0):
    """An evaluated answer as generate_and_score records it, scored by the real sandbox."""
    from mlx_coach.engine.text import extract_code
    from mlx_coach.rewards.scoring.sandbox import run_sample
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
    from test_sandbox import ADD

    # the stub as the recipes' tasks give it: a docstring, so that an answer's own definition follows it
    task = dataclasses.replace(ADD, prompt='def add(a, b):\n    """The sum of a and b."""\n')
    code = extract_code(text) if extract else text
    score = run_sample(task, code, SandboxConfig(timeout_s=timeout_s))
    return {"text": text, "completion": code, "finish_reason": reason, "passed": score.passed,
            "status": score.status, "error": score.error}


@pytest.mark.parametrize("text, reason, extract, kind", [
    ("```python\ndef add(a, b):\n    return a + b\n```", "stop", True, None),
    ("```python\ndef add(a, b):\n    return a - b\n```", "stop", True, "wrong answer"),
    ("```python\ndef add(a, b):\n    return a / 0\n```", "stop", True, "error"),
    ("```python\ndef add(a, b):\n    return a +\n```", "stop", True, "error"),
    ("Add a and b with the plus operator.", "stop", True, "format"),
    # a fenced block that never defines add: the tests call the stub's add, which returns None
    ("```python\ndef plus(a, b):\n    return a + b\n```", "stop", True, "format"),
    ("```python\ndef add(a, b):\n    return (a +", "length", True, "truncation"),
    ("    return a - b\n", "stop", False, "wrong answer"),
    ("", "eos", False, "format"),
])
def test_an_answer_failure_is_classified_from_the_real_sandbox_verdict(text, reason, extract, kind):
    from mlx_coach.commands.learn_report import answer_failure

    assert answer_failure(_answer(text, reason, extract), "add", extract) == kind


def test_an_answer_the_sandbox_could_not_judge_is_unjudged_not_a_failure_of_the_code():
    from mlx_coach.commands.learn_report import answer_failure

    record = _answer("```python\ndef add(a, b):\n    while True:\n        pass\n```", timeout_s=0.5)
    assert record["status"] == "timeout" and answer_failure(record, "add", True) == "unjudged"


def test_a_bench_stopped_between_seeds_keeps_the_finished_seeds_report(tmp_path, monkeypatch):
    """Ctrl-C in the second seed's training: report.json, report.md and samples.jsonl hold the base model's
    evaluation and the first seed's, with its lift."""
    from mlx_coach.rl import loop

    real, calls = loop.train, []

    def dies_the_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train", dies_the_second_time)
    out = tmp_path / "learn"
    assert main(["bench", "learn", "-c", "configs/tiny.yaml", "--seeds", "2", "--steps", "1", "--heldout",
              "builtin:val", "--heldout-limit", "3", "--samples", "0", "--no-humaneval", "--eval-max-new-tokens",
              "8", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set",
              "train.epochs_val=false", "--set", "telemetry.tensorboard=false", "--output", str(out)]) == 130
    report = json.loads((out / "report.json").read_text())
    assert report["seeds_planned"] == [0, 1] and report["seeds_done"] == [0]
    (row,) = report["over_seeds"]["sets"]["heldout"]["per_seed"]
    per = report["runs"][0]["per_task"]["heldout"]
    assert row["seed"] == 0 and row["lift"] == pytest.approx((sum(per["after"]["greedy"]) - sum(per["before"]["greedy"])) / 3)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["when"], r.get("seed")) for r in rows] == [("before", None)] * 3 + [("after", 0)] * 3
    assert "Seeds finished: 1 of 2" in (out / "report.md").read_text()


def test_procedural_tasks_cluster_by_their_template_and_others_stand_alone():
    from mlx_coach.commands.learn_bench import task_cluster
    from mlx_coach.data.procedural import procedural_split
    from mlx_coach.data.tasks import load_tasks

    _, heldout = procedural_split(count=50, val_count=120, difficulty=(1, 2))
    clusters = {task_cluster(t) for t in heldout}
    templates = {t.tags["template"] for t in heldout}
    assert clusters == templates and 1 < len(clusters) < len(heldout)
    builtin = load_tasks("builtin")
    assert len({task_cluster(t) for t in builtin}) == len(builtin)
