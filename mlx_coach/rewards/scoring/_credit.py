"""Partial credit, in the judge: which of check()'s asserts count (the poison run) and which passes
were answers (the replay of the recorded answers); the rules are in _judge.py's docstring.

Imported by the judge only; standard library and the package's stdlib-only helpers, like it.
"""

import marshal

import _errors
import _wire


def apply_changes(args, changed):
    for i, new in changed.items():
        if type(new) is list:
            args[i][:] = new
        else:
            args[i].clear()
            args[i].update(new)




class Poisoned(BaseException):
    """Raised by any use of a poison answer: no `except Exception` in a test expects it."""


def _poisoned(*_):
    raise Poisoned("the poison candidate's answer was used")


def poison_answer():
    """Every answer of the poison run: it raises Poisoned on any use but `is`. Made per run, so that
    no such object lives in a process that imports this module for other ends."""
    return type("Poison", (), {"__slots__": (), **{f"__{name}__": _poisoned for name in (
        "bool len iter reversed contains getitem setitem delitem getattr call eq ne lt le gt ge hash str repr "
        "format int float complex index round trunc floor ceil neg pos abs invert add radd sub rsub mul rmul matmul "
        "rmatmul truediv rtruediv floordiv rfloordiv mod rmod divmod rdivmod pow rpow lshift rlshift rshift "
        "rrshift and rand or ror xor rxor").split()}})()


class Diverged(BaseException):
    """The replay made a call the real run did not make at that point."""


class NoAnswer:
    """A None the candidate returned, in the replay: equal to None and hashed like it, so that the
    test takes the real run's path; each truth test of it is noted against the current segment."""

    __slots__ = ("replay",)

    def __init__(self, replay):
        self.replay = replay

    def __bool__(self):
        self.replay.truth_tested.add(self.replay.segment)
        return False

    def __eq__(self, other):
        return other is None or type(other) is NoAnswer

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(None)

    def __repr__(self):
        return "None"


class Replay:
    """check() once more on the real run's recorded answers (Worker.calls), without the worker.

    A call belongs to the segment of the asserting statement it runs in or, outside the asserts,
    of the next one; each statement's calls are replayed from the start of its segment, and must
    have the real run's arguments. A statement is vouched for when the replay ran it to its end
    without a Diverged: not when a call differed, nor when the replay stopped before it. No
    replay (answers over _LOG_CAP bytes) vouches for nothing.
    """

    def __init__(self, calls):
        self.calls, self.segment, self.next = calls, 0, 0
        self.truth_tested, self.vouched = set(), set()

    def record(self, index, exc):
        if not isinstance(exc, Diverged):
            self.vouched.add(index)
        self.segment, self.next = index + 1, 0

    def call(self, args, kwargs):
        calls = self.calls.get(self.segment, ())
        if self.next >= len(calls):
            raise Diverged("more calls than the real run made here")
        seq, request, blob = calls[self.next]
        self.next += 1
        try:
            same = _wire.encode(("call", seq, args, kwargs)) == request
        except _wire.WireError:  # a NoAnswer passed back in, where the real run passed None
            same = False
        if not same:
            raise Diverged("arguments other than the real run's")
        outcome = marshal.loads(blob)
        if outcome[0] == "raise":
            raise _errors.rebuild(*outcome[1:])
        _, value, changed = outcome
        apply_changes(args, changed)
        return NoAnswer(self) if value is None else value


def credit(run, worker, results, total):
    """(PASSED, TOTAL) under partial credit; `run(call, record)` runs check() in a fresh namespace."""
    independent, poison = {}, poison_answer()
    try:
        run(lambda args, kwargs: poison, lambda index, exc: independent.__setitem__(index, exc is None))
    except BaseException:  # noqa: BLE001, S110 - the statements after the one that stopped it stay counted
        pass
    counted = [i for i in range(total) if not independent.get(i)]
    credited = [i for i in counted if results.get(i)]
    if credited and worker.answered_none:
        replay = Replay(worker.calls if worker.calls is not None else {})
        if worker.calls is not None:
            try:
                run(replay.call, replay.record)
            except BaseException:  # noqa: BLE001, S110 - the statements after the one that stopped it: not vouched for
                pass
        credited = [i for i in credited if i in replay.vouched and i not in replay.truth_tested]
    return len(credited), len(counted)
