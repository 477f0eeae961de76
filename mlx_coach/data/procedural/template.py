"""What a procedural template is, the random inputs templates draw, and `build`, which turns one instance into a Task.

A template has a fixed difficulty level (1 easiest .. 5 hardest) and, given a random generator, makes one
instance (a `Spec`): a function name, constants, a docstring, a canonical body, a near-miss body (a
plausible bug such as an off-by-one), fixed edge-case inputs and a random input drawer. `build` turns that
into a Task in HumanEval's shape: the expected values of the tests and docstring examples are computed by
running the canonical body here, and random inputs are added until at least one test tells the near-miss
apart from the canonical body, so every instance's tests reject its own near-miss by construction
(tests/test_procedural.py checks both verdicts in the real sandbox).
"""

from __future__ import annotations

import copy
import random
import string
import textwrap
from dataclasses import dataclass, field
from typing import Callable

from mlx_coach.data.task import Task

N_RANDOM = 3  # random test inputs on top of a template's edge cases
MIN_CASES = 5  # asserts in check() at least
N_EXAMPLES = 2  # docstring examples (the first random inputs)
MAX_TRIES = 200  # random inputs tried to separate the near-miss from the canonical body
WORDS = ("apple", "banana", "cat", "dog", "echo", "fig", "grape", "hat", "ice", "jam", "kite", "lemon",
         "moon", "nut", "owl", "pear", "quiz", "rose", "sun", "tree", "up", "vine", "wolf", "yak", "zoo")


@dataclass
class Spec:
    """One instance before its tests are computed."""

    name: str  # entry point
    params: str  # "s" or "xs, k"
    doc: str  # what the function does (the docstring's first paragraph)
    body: str  # canonical body, unindented
    wrong: str  # a near miss, unindented
    edges: list  # argument tuples always tested
    draw: Callable[[random.Random], tuple]  # a random argument tuple


@dataclass(frozen=True)
class Template:
    name: str
    level: int
    make: Callable[[random.Random], Spec] = field(compare=False)


# ---------------------------------------------------------------------------------------------
# what templates draw from


def random_word(rng, lo=1, hi=7):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def random_text(rng, hi=10):
    """A short string of mixed-case letters, digits, spaces and a little punctuation."""
    alphabet = string.ascii_letters + string.digits + "  ,.-"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, hi)))


def random_sentence(rng, sep=" ", hi=5):
    return sep.join(rng.choice(WORDS) for _ in range(rng.randint(1, hi)))


def random_ints(rng, lo=-9, hi=9, n_hi=7):
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, n_hi))]


def pick_name(rng, *names):
    return rng.choice(names)


def near_miss(body, line, bug):
    """The canonical body with its one line `line` replaced by `bug` (the template's plausible mistake)."""
    assert body.count(line) == 1, line
    return body.replace(line, bug)


# ---------------------------------------------------------------------------------------------
# building a task from a spec


def _function(name, params, body):
    ns = {}
    exec(f"def {name}({params}):\n{textwrap.indent(body, '    ')}\n", ns)  # our own template code
    return ns[name]


def _call(fn, args):
    try:
        return True, fn(*copy.deepcopy(args))
    except Exception as e:  # a near miss may raise where the canonical body returns
        return False, type(e).__name__


def _args_text(args):
    return ", ".join(repr(a) for a in args)


def build(spec: Spec, rng: random.Random, task_id: str, tags: dict) -> Task:
    """A Task from a spec: tests are its edge cases, N_RANDOM random inputs (more if needed for MIN_CASES
    distinct inputs), and (if none of those separates them) the first random input on which the near miss
    differs from the canonical body."""
    good = _function(spec.name, spec.params, spec.body)
    bad = _function(spec.name, spec.params, spec.wrong)
    randoms = [spec.draw(rng) for _ in range(N_RANDOM)]
    cases = []
    for args in list(spec.edges) + randoms:
        if args not in cases:
            cases.append(args)
    for _ in range(MAX_TRIES):  # small input spaces repeat an edge case: draw until MIN_CASES differ
        if len(cases) >= MIN_CASES:
            break
        args = spec.draw(rng)
        if args not in cases:
            cases.append(args)
            randoms.append(args)
    outcomes = [_call(good, c) for c in cases]
    if not all(ok for ok, _ in outcomes):  # a template bug, never the user's: say which
        failing = [c for c, (ok, _) in zip(cases, outcomes) if not ok]
        raise AssertionError(f"{task_id}: canonical body raised on {failing}")
    if all(_call(bad, c) == out for c, out in zip(cases, outcomes)):
        for _ in range(MAX_TRIES):
            args = spec.draw(rng)
            out = _call(good, args)
            if out[0] and _call(bad, args) != out:
                cases.append(args)
                outcomes.append(out)
                break
        else:
            raise AssertionError(f"{task_id}: no input separates the near miss from the canonical body")
    examples = [(c, o) for c, (_, o) in zip(cases, outcomes) if c in randoms][:N_EXAMPLES]
    doc = textwrap.fill(spec.doc, 92, initial_indent="    ", subsequent_indent="    ").lstrip()
    lines = [f"def {spec.name}({spec.params}):", f'    """{doc}', ""]
    for args, out in examples:
        lines += [f"    >>> {spec.name}({_args_text(args)})", f"    {out!r}"]
    prompt = "\n".join(lines) + '\n    """\n'
    test = "def check(candidate):\n" + "".join(f"    assert candidate({_args_text(c)}) == {o!r}\n"
                                               for c, (_, o) in zip(cases, outcomes))
    solution = textwrap.indent(spec.body, "    ") + "\n"
    return Task(task_id, prompt, spec.name, test, solution, dict(tags))
