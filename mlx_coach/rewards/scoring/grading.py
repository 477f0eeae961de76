"""What a teacher is asked and how its reply is read: the judge's prompts and their versions, the strict
grade parsers (`SCORE: N/10`, or one digit for `grade: digit`), and the check a reference solution
must pass before it is pinned.

A template's text and its version go together: the version is part of the cache key of every grade
or reference solution asked with it, so changing the text means changing the version.
"""

from __future__ import annotations

import ast
import re

PROMPT_VERSION = "grade-v1"
DIGIT_PROMPT_VERSION = "grade-digit-v1"
SOLVE_VERSION = "solve-v1"

GRADE_SYSTEM = "You are a strict reviewer of Python code. You judge whether code solves a task correctly."
_GRADE_TASK = """Task: complete this Python function.
```python
{prompt}
```

Candidate completion (the code that follows the task above):
```python
{completion}
```
{reference}
"""
GRADE_TEMPLATE = _GRADE_TASK + """How likely is it that the candidate is correct, from 0 (certainly wrong) to 10 (certainly correct)?
Reply with exactly one line and nothing else, in this format:
SCORE: <an integer from 0 to 10>/10"""
# grade: digit -- for judges too small to follow a format (a tiny local model): the reply's first
# character is the grade; with logit_bias on the ten digit tokens and max_tokens 1 the judge can say
# nothing else, and at a temperature > 0 its grade of one program is a draw from a distribution
GRADE_DIGIT_TEMPLATE = _GRADE_TASK + """How likely is it that the candidate is correct, from 0 (certainly wrong) to 9 (certainly correct)?
Reply with one digit and nothing else."""
REFERENCE_BLOCK = """
A reference solution, for comparison (it may itself be imperfect):
```python
{code}
```
"""
SOLVE_SYSTEM = "You are an expert Python programmer."
SOLVE_TEMPLATE = """Complete this Python function. Reply with the complete function in one ```python code block and nothing else.
```python
{prompt}
```"""

_GRADE_LINE = re.compile(r"SCORE:[ \t]*(\d{1,2})[ \t]*/[ \t]*10")
_GRADE_MENTION = re.compile(r"score\s*:", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def parse_grade(text: str) -> float:
    """The grade in a judge's reply, in [0, 1]. Strict: the reply must contain exactly one
    `score:` (any case) and its last non-empty line must be exactly `SCORE: N/10` with N an
    integer 0..10 (spaces around N and '/' allowed). Reasoning lines above it are allowed.
    Anything else raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("reply content is not a string")
    n = len(_GRADE_MENTION.findall(text))
    if n != 1:
        raise ValueError(f"expected exactly one 'SCORE: N/10' line, found {n}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    m = _GRADE_LINE.fullmatch(lines[-1])
    if m is None:
        raise ValueError(f"last line is not 'SCORE: N/10': {lines[-1][:80]!r}")
    grade = int(m.group(1))
    if grade > 10:
        raise ValueError(f"grade {grade} is out of 0..10")
    return grade / 10


def parse_digit_grade(text: str) -> float:
    """The grade of a `grade: digit` reply, in [0, 1]: its first non-blank character must be a
    digit d (0..9), read as d / 9; what follows is ignored. Anything else raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("reply content is not a string")
    head = text.lstrip()[:1]
    if not head or head not in "0123456789":
        raise ValueError(f"reply does not start with a digit: {text[:40]!r}")
    return int(head) / 9


def check_reference(code: str, task) -> None:
    """A reference solution worth pinning: Python that parses and defines the task's entry point.
    An empty reply or "upstream overloaded, try again" is not; raises ValueError saying why."""
    if not code.strip():
        raise ValueError("reference solution is empty")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"reference solution is not Python ({e})") from None
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if task.entry_point and task.entry_point not in names:
        raise ValueError(f"reference solution does not define {task.entry_point}")


def extract_code(text: str) -> str:
    """The first fenced code block of a reply, or the whole reply when there is none."""
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip("\n")
