"""What every scorer returns, the one method every scorer has, and the number check their settings share.

A scorer turns (task, completion) pairs into `Score`s. Scores carry their own status so
that a failure of the *scorer* (infrastructure, transport, a judge that answered noise) is
never confused with a judgement of the *completion*, and is never cached.
"""

from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

# Statuses of the sandboxed test scorer. Only "passed" counts as a pass.
TEST_STATUSES = ("passed", "failed", "error", "timeout", "killed", "infra_error")
# Test statuses that are no verdict on the program: the sandbox ran out of time or failed itself.
UNJUDGED_STATUSES = ("timeout", "infra_error")
# Statuses of judge-style scorers (HTTP judge, local teacher).
JUDGE_STATUSES = ("ok", "parse_error", "transport_error", "timeout", "circuit_open")


@dataclass
class Score:
    value: float  # the reward this scorer gives, e.g. 1.0/0.0, a fraction of asserts, a grade
    status: str  # one of TEST_STATUSES or JUDGE_STATUSES
    duration_s: float = 0.0
    error: str = ""  # truncated message, empty when none
    cacheable: bool = True  # False when the value does not judge the completion (infra, load, transport)
    fallback: bool = False  # True when value is a configured fallback, not a real judgement

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


class Scorer(Protocol):
    name: str
    version: str

    def score_batch(self, items: Sequence[tuple]) -> list[Score]:
        """items: (task, completion) pairs; returns one Score per item, in order."""
        ...


def is_number(v) -> bool:
    """An int or a float, not a bool: what a scorer's numeric setting must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)
