"""`Task`: one function to write, in HumanEval's format.

`prompt` is a signature plus docstring, the model's completion is the indented body, and `test`
defines `check(candidate)` as plain top-level `assert` lines, so a program to run is
`prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n"`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Task:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str | None = None
    # Excluded from the hash so that tasks stay hashable (a dict is not).
    tags: dict = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict:
        return asdict(self)


def task_columns(task: Task) -> dict:
    """Every field of a task as a plain dict (the keyword columns handed to user reward functions)."""
    return task.to_dict()
