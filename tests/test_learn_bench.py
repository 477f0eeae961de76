"""`mlx-coach bench learn` end to end on the builtin tiny model: the report's structure, and before/after
numbers that equal separate `mlx-coach eval` runs of the base model and of the run's final adapters."""

import json

import pytest

from mlx_coach.cli import main
from mlx_coach.commands.learn_bench import _boot_p, learning_curve
from mlx_coach.telemetry.passk import pass_at_k


def _eval_rows(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["eval", "--model", "builtin:tiny", "--tasks", "builtin:val", "--limit", "4",
                 "--max-new-tokens", "24", "--output", str(out), *extra]) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_bench_learn_reports_the_paired_change_of_separate_evals(tmp_path, capsys):
    out = tmp_path / "learn"
    argv = ["bench", "learn", "-c", "configs/tiny.yaml", "--steps", "2", "--heldout", "builtin:val",
            "--heldout-limit", "4", "--samples", "2", "--humaneval-limit", "2", "--eval-max-new-tokens", "24",
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
    assert "sampled_pass@2" in report["sets"]["heldout"]["before"]
    # report.md has a greedy pass@1 row for each set, showing before and after as report.json holds them
    md = [[c.strip() for c in line.strip().strip("|").split("|")] for line in
          (out / "report.md").read_text().splitlines() if line.startswith("|")]
    before_col, after_col = md[0].index("before"), md[0].index("after")
    for name, block in report["sets"].items():
        (row,) = [r for r in md[2:] if r[0].startswith(name) and "pass@1" in r[1] and "greedy" in r[1]]
        shown = [float(row[col].rstrip("%")) for col in (before_col, after_col)]
        assert shown == [pytest.approx(100 * block[when]["pass@1"], abs=0.05) for when in ("before", "after")], name
    assert (out / "learning_curve.png").stat().st_size > 0
    curve = learning_curve(out / "run")
    assert curve["fresh reward"][0] == [1, 2] and len(curve["KL"][1]) == 2 and len(curve["truncation share"][1]) == 2

    # the same answers as separate evals of the base model and of the final checkpoint's adapters
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
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


def test_a_bootstrap_p_of_no_resample_is_reported_as_below_the_resolution():
    """A p-value of 0 from 10,000 resamples says p < 1e-4, not that the change cannot be chance."""
    assert _boot_p({"p": 0.0, "resamples": 10000}) == "< 1e-04"
    assert _boot_p({"p": 0.0, "resamples": 200}) == "< 5e-03"
    assert _boot_p({"p": 0.0778, "resamples": 10000}) == "0.0778"
