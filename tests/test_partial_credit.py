"""Partial credit pays only for asserts that depend on the candidate, and only for answers: an assert
that passes whatever the candidate does leaves both counts, and a None tested for truth is no answer."""

import pytest

from mlx_coach.data.task import Task
from mlx_coach.rewards.scoring.sandbox import execute
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig

NONE = "    return None\n"


def score(task, completion, partial=True):
    return execute(task, completion, SandboxConfig(partial_credit=partial, timeout_s=10.0)).score


def test_assert_true_lines_are_not_counted():
    task = Task("t/true", "def ident(x):\n", "ident",
                "def check(candidate):\n"
                "    assert True\n"
                "    assert candidate(1) == 1\n"
                "    assert True, 'This prints if this assert fails'\n"
                "    assert candidate(2) == 2\n")
    s = score(task, NONE)
    assert (s.status, s.value) == ("failed", 0.0)  # the two constant asserts passed, and pay nothing
    s = score(task, "    return 1\n")
    assert (s.status, s.value) == ("failed", 0.5)  # one of the two counted asserts
    assert score(task, "    return x\n").value == 1.0


def test_a_loop_of_asserts_counts_once_and_a_loop_of_constants_not_at_all():
    task = Task("t/loop", "def ident(x):\n", "ident",
                "def check(candidate):\n"
                "    for x in [1, 2, 3]:\n"
                "        assert candidate(x) == x\n"
                "    for _ in range(3):\n"
                "        assert 1 + 1 == 2\n"
                "    assert candidate(0) == 0\n")
    s = score(task, "    return x if x != 3 else -1\n")
    assert (s.status, s.value) == ("failed", 0.5)  # the first loop failed on 3; the constant loop is not counted
    assert score(task, NONE).value == 0.0
    assert score(task, "    return x\n").value == 1.0


def test_asserts_that_pass_without_an_answer_are_not_counted():
    task = Task("t/independent", "def ident(x):\n", "ident",
                "DATA = [1, 2, 3]\n\n\n"
                "def check(candidate):\n"
                "    assert len(DATA) == 3\n"  # the test's own data
                "    got = candidate(5)\n"  # an answer kept, not used yet
                "    assert sorted(DATA) == DATA\n"
                "    assert got == 5\n"  # depends on the answer through a name: counted
                "    assert candidate(6) is not None or True\n")  # passes whatever the answer
    s = score(task, NONE)
    assert (s.status, s.value) == ("failed", 0.0)
    s = score(task, "    return 5\n")
    assert (s.status, s.value) == ("passed", 1.0)
    s = score(task, "    return 4\n")
    assert (s.status, s.value) == ("failed", 0.0)  # one counted assert, failed


def test_a_none_tested_for_truth_is_not_an_answer():
    task = Task("t/truth", "def decide(x):\n", "decide",
                "def check(candidate):\n"
                "    assert candidate(1)\n"
                "    assert not candidate(2)\n"
                "    assert candidate(3) == None\n"
                "    r = candidate(4)\n"
                "    assert not r\n"
                "    assert all(not candidate(x) for x in (5, 6))\n"
                "    assert candidate(7) is None\n")
    s = score(task, NONE)
    # Counted: all six. Paid: the two that expect None; `not None` passes where False is expected.
    assert (s.status, s.value) == ("failed", pytest.approx(2 / 6))
    right = "    return {1: True, 2: False, 3: None, 4: False, 5: False, 6: False, 7: None}[x]\n"
    assert score(task, right).value == 1.0
    s = score(task, "    return x == 1\n")  # False, not None, where False is expected
    assert (s.status, s.value) == ("failed", pytest.approx(4 / 6))


def test_the_status_is_the_same_with_and_without_partial_credit():
    task = Task("t/status", "def decide(x):\n", "decide",
                "def check(candidate):\n"
                "    assert not candidate(1)\n"
                "    assert not candidate(2)\n"
                "    assert True\n")
    for completion in (NONE, "    return False\n", "    return x\n"):
        with_credit, without = score(task, completion), score(task, completion, partial=False)
        assert with_credit.status == without.status
    s = score(task, NONE)  # the test cannot tell None from False: it passes, and pays nothing for it
    assert (s.status, s.value) == ("passed", 0.0)
    assert score(task, "    return False\n").value == 1.0


def test_a_correct_none_answer_is_paid_in_full():
    task = Task("t/in-place", "def sort_in_place(xs):\n", "sort_in_place",
                "def check(candidate):\n"
                "    xs = [3, 1, 2]\n"
                "    assert candidate(xs) is None\n"
                "    assert candidate(xs) is None and xs == [1, 2, 3]\n"  # called again on the sorted list
                "    ys = [2, 1]\n"
                "    candidate(ys)\n"
                "    assert ys == [1, 2]\n")
    s = score(task, "    xs.sort()\n")
    assert (s.status, s.value) == ("passed", 1.0)
    s = score(task, NONE)  # None is the expected answer of the first assert only
    assert (s.status, s.value) == ("failed", pytest.approx(1 / 3))


def test_without_a_counted_assert_the_value_is_the_verdict():
    task = Task("t/none-counted", "def f(x):\n", "f",
                "def check(candidate):\n"
                "    assert True\n"
                "    assert candidate(1) is not None or True\n"
                "    candidate(2)\n")
    s = score(task, "    if x == 2:\n        raise ValueError('no')\n")
    assert (s.status, s.value) == ("error", 0.0)  # both asserts passed, neither is counted
    s = score(task, NONE)
    assert (s.status, s.value) == ("passed", 1.0)
