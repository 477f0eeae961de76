"""The judge/worker codec (_wire.py): exact round trips, refusals, bounded decoding; and the
candidate's values and exceptions across a real judge/worker pair."""

import math
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mlx_coach" / "rewards" / "scoring"))
import _wire

sys.path.pop(0)

from mlx_coach.rewards.scoring.sandbox import execute
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
from mlx_coach.data.task import Task

VALUES = [None, True, False, 0, 1, -1, 2**63 - 1, -2**63, 2**63, -2**200 - 7, 10**400,
          0.0, -0.0, 1.5, 1e308, float("inf"), float("-inf"), "", "héllo \U0001F600", "\ud800",
          b"", b"\x00\xff", [], (), [1, (2, [3.5, "x"])], (1,), {1, 2, (3, 4)}, frozenset({"a"}),
          {}, {1: "a", "b": [2], (1, 2): {3}, None: None, 1.5: b"x", frozenset(): 0}, [[[[]]]]]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_round_trip_is_exact_in_type_and_value(value):
    back = _wire.decode(_wire.encode(value))
    assert back == value and _types(back) == _types(value)
    if isinstance(value, float):
        assert math.copysign(1, back) == math.copysign(1, value)


def _types(x):
    if isinstance(x, (list, tuple)):
        return (type(x), [_types(i) for i in x])
    if isinstance(x, dict):
        return (dict, sorted((repr(k), _types(k), _types(v)) for k, v in x.items()))
    return type(x)


def test_nan_survives_and_bool_stays_bool():
    assert math.isnan(_wire.decode(_wire.encode(float("nan"))))
    assert [type(v) for v in _wire.decode(_wire.encode([True, 1, False, 0]))] == [bool, int, bool, int]


class Eq:
    def __eq__(self, other):
        return True


class MyInt(int):
    pass


@pytest.mark.parametrize("value", [Eq(), MyInt(3), [1, Eq()], {"k": lambda: 0}, print, 1j, bytearray(b"x")],
                         ids=["object-with-eq", "int-subclass", "list-holding-an-object", "dict-holding-a-function",
                              "builtin-function", "complex", "bytearray"])
def test_anything_but_plain_data_is_refused(value):
    with pytest.raises(_wire.WireError, match="not plain data"):
        _wire.encode(value)


def test_nesting_is_bounded_both_ways():
    deep = []
    for _ in range(_wire.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(_wire.WireError):
        _wire.encode(deep)
    crafted = b"l" + struct.pack(">I", 1)
    with pytest.raises(_wire.WireError, match="deeper"):
        _wire.decode(crafted * (_wire.MAX_DEPTH + 5) + b"N")


@pytest.mark.parametrize("data", [
    b"", b"X", b"i\x00", b"s" + struct.pack(">I", 10) + b"abc",  # truncated
    b"l" + struct.pack(">I", 2**31) + b"N",  # a count larger than the bytes left
    b"NN",  # trailing bytes
    b"S" + struct.pack(">I", 1) + b"l" + struct.pack(">I", 0),  # an unhashable set item
    b"d" + struct.pack(">I", 1) + b"l" + struct.pack(">I", 0) + b"N",  # an unhashable key
    b"s" + struct.pack(">I", 1) + b"\xff",  # not utf-8
])
def test_malformed_bytes_raise_wire_error(data):
    with pytest.raises(_wire.WireError):
        _wire.decode(data)


def test_oversized_frame_is_refused_before_reading_it():
    import os

    r, w = os.pipe()
    os.write(w, struct.pack(">I", _wire.MAX_FRAME + 1))
    with pytest.raises(_wire.WireError, match="over the"):
        _wire.recv(r)
    os.close(r)
    os.close(w)


# ---------------------------------------------------------------------------------------------
# Across a real judge and worker


def run(task, completion):
    return execute(task, completion, SandboxConfig(timeout_s=20.0)).score


def test_values_mutation_and_exceptions_cross_the_boundary():
    task = Task("w/echo", "def f(x, *, key=None):\n", "f",
                "from math import inf\n\n"
                "def check(candidate):\n"
                "    for v in " + repr(VALUES) + ":\n"
                "        back = candidate(v)\n"
                "        assert back == v and type(back) is type(v), (v, back)\n"
                "    assert candidate(None, key=(1, 2)) == (1, 2)\n"
                "    xs, d, s = [3, 1, 2], {'a': 1}, {1}\n"
                "    candidate(xs, key='sort'); candidate(d, key='dict'); candidate(s, key='set')\n"
                "    assert xs == [1, 2, 3] and d == {'a': 1, 'b': 2} and s == {1, 2}\n"
                "    try:\n        candidate('boom', key='raise')\n        assert False\n"
                "    except KeyError as e:\n        assert e.args == ('missing',)\n"
                "    try:\n        candidate(0, key='zero')\n        assert False\n"
                "    except ZeroDivisionError:\n        pass\n"
                "    try:\n        candidate(0, key='custom')\n        assert False\n"
                "    except ValueError as e:\n        assert type(e) is ValueError and 'mine' in str(e)\n")
    completion = ("    if key == 'sort':\n        x.sort()\n    elif key == 'dict':\n        x['b'] = 2\n"
                  "    elif key == 'set':\n        x.add(2)\n    elif key == 'raise':\n        raise KeyError('missing')\n"
                  "    elif key == 'zero':\n        return 1 / x\n"
                  "    elif key == 'custom':\n        class Mine(ValueError):\n            pass\n        raise Mine('mine')\n"
                  "    elif key is not None:\n        return key\n"
                  "    return x\n")
    s = run(task, completion)
    assert s.passed, s


def test_test_errors_are_errors_not_passes():
    # A test that itself raises (the task author's bug) is an error.
    broken = Task("w/broken", "def f():\n", "f", "def check(candidate):\n    candidate()\n    undefined_name\n")
    s = run(broken, "    return 1\n")
    assert s.status == "error" and "NameError" in s.error
    nocheck = Task("w/nocheck", "def f():\n", "f", "x = 1\n")
    assert run(nocheck, "    return 1\n").status == "error"
