"""Procedural tasks: families of small Python functions, generated from a seed, with a difficulty knob.

A *family* (strings, lists, arithmetic, dicts, parsing) holds *templates*; a template has a fixed
difficulty level (1 easiest .. 5 hardest) and, given a random generator, makes one instance: a
function name, constants, a docstring, a canonical body, a near-miss body (a plausible bug such as
an off-by-one), fixed edge-case inputs and a random input drawer. `build` turns that into a Task in
HumanEval's shape: the expected values of the tests and docstring examples are computed by running
the canonical body here, and random inputs are added until at least one test tells the near-miss
apart from the canonical body, so every instance's tests reject its own near-miss by construction
(tests/test_procedural.py checks both verdicts in the real sandbox).

Instance i of a split is a pure function of (seed, split, i): `random.Random` seeded with a string,
no set iteration, no hash(). The training and held-out splits use different split names in their
instance seeds, and an instance whose prompt was already produced (in training, or earlier in its
own split) is passed over, so the held-out split shares no prompt with training.
"""

from __future__ import annotations

import copy
import random
import string
import textwrap
from dataclasses import dataclass, field
from typing import Callable

from mlx_coach.core.errors import UserError
from mlx_coach.data.task import Task

DEFAULT_COUNT = 2000  # training instances (data.procedural_count)
DEFAULT_HELDOUT = 300  # held-out instances (data.procedural_heldout)
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
# random inputs


def _word(rng, lo=1, hi=7):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _mixed(rng, hi=10):
    """A short string of mixed-case letters, digits, spaces and a little punctuation."""
    alphabet = string.ascii_letters + string.digits + "  ,.-"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, hi)))


def _sentence(rng, sep=" ", hi=5):
    return sep.join(rng.choice(WORDS) for _ in range(rng.randint(1, hi)))


def _ints(rng, lo=-9, hi=9, n_hi=7):
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, n_hi))]


def _name(rng, *names):
    return rng.choice(names)


# ---------------------------------------------------------------------------------------------
# strings


def _affix(rng):
    p = rng.choice(WORDS[:12]) + rng.choice(("_", "-", ":", ""))
    if rng.random() < 0.5:
        return Spec(_name(rng, "add_prefix", "with_prefix", "prepend_tag"), "s",
                    f"Return the string s with {p!r} added at its start.",
                    f"return {p!r} + s", f"return s + {p!r}", [("",), ("x",)], lambda r: (_word(r),))
    return Spec(_name(rng, "add_suffix", "with_suffix", "append_tag"), "s",
                f"Return the string s with {p!r} added at its end.",
                f"return s + {p!r}", f"return {p!r} + s", [("",), ("x",)], lambda r: (_word(r),))


def _case(rng):
    op, bad, text = rng.choice((("upper", "return s.capitalize()", "every letter in upper case"),
                                ("lower", "return s[:1] + s[1:].lower()", "every letter in lower case"),
                                ("swapcase", "return s.upper()", "the case of every letter swapped"),
                                ("title", "return s.capitalize()", "the first letter of every word in upper "
                                                                   "case and the other letters in lower case")))
    return Spec(_name(rng, f"to_{op}", f"{op}_case", f"make_{op}"), "s", f"Return s with {text}.",
                f"return s.{op}()", bad, [("",), ("Hello World",), ("aBc dEf 12",)], lambda r: (_mixed(r),))


def _count_char(rng):
    c = rng.choice("aeiorst")
    return Spec(_name(rng, f"count_{c}", "count_letter", "occurrences"), "s",
                f"Return how many times the lower-case letter {c!r} occurs in s (upper case {c.upper()!r} "
                f"does not count).",
                f"return s.count({c!r})", f"return s.lower().count({c!r})",
                [("",), (c * 3,), (c.upper() + c,)], lambda r: ("".join(r.choice(c + c.upper() + "xyz ")
                                                                         for _ in range(r.randint(0, 9))),))


def _replace_char(rng):
    a, b = rng.sample("abcdeilmnorst", 2)
    return Spec(_name(rng, f"replace_{a}", "swap_letter", "substitute"), "s",
                f"Return s with every {a!r} replaced by {b!r}.",
                f"return s.replace({a!r}, {b!r})", f"return s.replace({a!r}, {b!r}, 1)",
                [("",), (a + "x" + a,), (a * 3,)], lambda r: ("".join(r.choice(a + "xyz") for _ in range(r.randint(0, 8))),))


def _palindrome(rng):
    return Spec(_name(rng, "is_palindrome", "reads_same_backwards"), "s",
                "Return True if s reads the same forwards and backwards, else False.",
                "return s == s[::-1]", "return s[:len(s) // 2] == s[len(s) // 2:][::-1]",
                [("",), ("a",), ("aba",), ("abba",), ("ab",)],
                lambda r: (r.choice((_word(r), (lambda w: w + w[-2::-1])(_word(r)))),))


def _every_kth(rng):
    k = rng.randint(2, 4)
    start = rng.randint(0, k - 1)
    return Spec(_name(rng, "every_kth", "take_every", "stride_chars"), "s",
                f"Return every {('', '', '2nd', '3rd', '4th')[k]} character of s, starting with the character at index {start}.",
                f"return s[{start}::{k}]", f"return s[{start + 1}::{k}]",
                [("",), ("abcdefghij",)], lambda r: (_word(r, 0, 12),))


def _reverse_words(rng):
    sep = rng.choice((" ", ",", "-", ";", "/"))
    return Spec(_name(rng, "reverse_words", "flip_words", "words_backwards"), "s",
                f"s holds words separated by {sep!r}. Return them in reverse order, separated by {sep!r}.",
                f"return {sep!r}.join(s.split({sep!r})[::-1])", "return s[::-1]",
                [("",), ("one",), (sep.join(("ab", "cd", "ef")),)], lambda r: (_sentence(r, sep),))


def _remove_chars(rng):
    chars = "".join(sorted(rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(2, 4))))
    return Spec(_name(rng, "remove_chars", "strip_letters", "drop_letters"), "s",
                f"Return s without any of the letters in {chars!r}, whether in lower or upper case.",
                f"return ''.join(ch for ch in s if ch.lower() not in {chars!r})",
                f"return ''.join(ch for ch in s if ch not in {chars!r})",
                [("",), (chars.upper(),), (chars + "xyz",)],
                lambda r: ("".join(r.choice(chars + chars.upper() + "xyz ") for _ in range(r.randint(0, 10))),))


def _caesar(rng):
    k = rng.randint(1, 5)
    body = f"""\
out = []
for ch in s:
    if 'a' <= ch <= 'z':
        out.append(chr((ord(ch) - ord('a') + {k}) % 26 + ord('a')))
    else:
        out.append(ch)
return ''.join(out)"""
    wrong = f"return ''.join(chr(ord(ch) + {k}) if 'a' <= ch <= 'z' else ch for ch in s)"
    return Spec(_name(rng, "caesar", "shift_letters", "rotate_letters"), "s",
                f"Shift every lower-case letter of s {k} places forward in the alphabet, wrapping from 'z' "
                f"to 'a'; leave every other character as it is.",
                body, wrong, [("",), ("xyz",), ("Hi z!",)], lambda r: (_sentence(r),))


def _run_length(rng):
    body = """\
out = []
i = 0
while i < len(s):
    j = i
    while j < len(s) and s[j] == s[i]:
        j += 1
    out.append(s[i] + str(j - i))
    i = j
return ''.join(out)"""
    wrong = """\
out = []
count = 1
for i in range(1, len(s)):
    if s[i] == s[i - 1]:
        count += 1
    else:
        out.append(s[i - 1] + str(count))
        count = 1
return ''.join(out)"""
    return Spec(_name(rng, "run_length", "encode_runs", "compress"), "s",
                "Encode s as runs: each run of one repeated character becomes the character followed by "
                "the run's length, e.g. 'aaab' -> 'a3b1'.",
                body, wrong, [("",), ("a",), ("aaabcc",)],
                lambda r: ("".join(r.choice("ab") * r.randint(1, 3) for _ in range(r.randint(1, 4))),))


STRINGS = [Template("affix", 1, _affix), Template("case", 1, _case), Template("count_char", 2, _count_char),
           Template("replace_char", 2, _replace_char), Template("palindrome", 2, _palindrome),
           Template("every_kth", 3, _every_kth), Template("reverse_words", 3, _reverse_words),
           Template("remove_chars", 4, _remove_chars), Template("caesar", 5, _caesar),
           Template("run_length", 5, _run_length)]


# ---------------------------------------------------------------------------------------------
# lists


def _scale_shift(rng):
    a, b = rng.randint(2, 5), rng.choice((-3, -2, -1, 1, 2, 3, 4))
    expr = f"x * {a} + {b}" if b > 0 else f"x * {a} - {-b}"
    return Spec(_name(rng, "transform", "scale_all", "map_values"), "xs",
                f"Return a new list with every element x of xs replaced by {expr}.",
                f"return [{expr} for x in xs]", f"return [{expr} for x in xs[:-1]]",
                [([],), ([0],)], lambda r: (_ints(r),))


def _extreme(rng):
    op = rng.choice(("max", "min"))
    word = "largest" if op == "max" else "smallest"
    return Spec(_name(rng, f"find_{op}", f"{word}_element", f"list_{op}"), "xs",
                f"Return the {word} element of the non-empty list xs.",
                f"return {op}(xs)", "return xs[0]", [([4],), ([1, 9, 3],), ([9, 1, 3],)],
                lambda r: ([r.randint(-20, 20) for _ in range(r.randint(1, 7))],))


def _filter(rng):
    if rng.random() < 0.5:
        k = rng.randint(2, 5)
        return Spec(_name(rng, f"multiples_of_{k}", "keep_multiples", "filter_multiples"), "xs",
                    f"Return the elements of xs that are multiples of {k}, in their order.",
                    f"return [x for x in xs if x % {k} == 0]", f"return [x for x in xs if x % {k} != 0]",
                    [([],), ([0, 1, k],)], lambda r: (_ints(r, 0, 20),))
    t = rng.randint(-3, 6)
    return Spec(_name(rng, "greater_than", "keep_large", "above_threshold"), "xs",
                f"Return the elements of xs that are strictly greater than {t}, in their order.",
                f"return [x for x in xs if x > {t}]", f"return [x for x in xs if x >= {t}]",
                [([],), ([t, t + 1, t - 1],)], lambda r: (_ints(r),))


def _count_if(rng):
    t = rng.randint(-3, 6)
    return Spec(_name(rng, "count_above", "how_many_greater", "count_large"), "xs",
                f"Return how many elements of xs are strictly greater than {t}.",
                f"return sum(1 for x in xs if x > {t})", f"return sum(1 for x in xs if x >= {t})",
                [([],), ([t],), ([t + 1, t + 2],)], lambda r: (_ints(r),))


def _running_sum(rng):
    body = """\
out = []
total = 0
for x in xs:
    total += x
    out.append(total)
return out"""
    wrong = """\
out = []
total = 0
for x in xs:
    out.append(total)
    total += x
return out"""
    return Spec(_name(rng, "running_sum", "prefix_sums", "cumulative"), "xs",
                "Return the running sums of xs: element i is xs[0] + ... + xs[i].",
                body, wrong, [([],), ([5],), ([1, 2, 3],)], lambda r: (_ints(r),))


def _pairwise_diff(rng):
    return Spec(_name(rng, "differences", "pairwise_diff", "steps_between"), "xs",
                "Return the list of differences between neighbours: element i is xs[i + 1] - xs[i].",
                "return [xs[i + 1] - xs[i] for i in range(len(xs) - 1)]",
                "return [xs[i] - xs[i + 1] for i in range(len(xs) - 1)]",
                [([],), ([7],), ([1, 4, 2],)], lambda r: (_ints(r),))


def _rotate(rng):
    body = """\
if not xs:
    return []
k = k % len(xs)
return xs[k:] + xs[:k]"""
    return Spec(_name(rng, "rotate_left", "rotate", "shift_left"), "xs, k",
                "Rotate xs left by k places (k >= 0, possibly larger than len(xs)) and return the new list.",
                body, "return xs[k:] + xs[:k]", [([], 3), ([1, 2, 3], 0), ([1, 2, 3], 4), ([1, 2], 2)],
                lambda r: (_ints(r, n_hi=6), r.randint(0, 8)))


def _second_largest(rng):
    body = """\
values = sorted(set(xs))
if len(values) < 2:
    return None
return values[-2]"""
    wrong = """\
if len(xs) < 2:
    return None
return sorted(xs)[-2]"""
    return Spec(_name(rng, "second_largest", "runner_up", "second_max"), "xs",
                "Return the second largest distinct value in xs, or None if xs has fewer than two distinct values.",
                body, wrong, [([],), ([3, 3],), ([5, 5, 2],), ([1, 2],)], lambda r: (_ints(r, 0, 6),))


def _longest_run(rng):
    body = """\
best = 0
current = 0
for i, x in enumerate(xs):
    current = current + 1 if i > 0 and x == xs[i - 1] else 1
    best = max(best, current)
return best"""
    wrong = """\
best = 0
current = 1
for i in range(1, len(xs)):
    if xs[i] == xs[i - 1]:
        current += 1
    else:
        best = max(best, current)
        current = 1
return best"""
    return Spec(_name(rng, "longest_run", "max_streak", "longest_repeat"), "xs",
                "Return the length of the longest run of equal neighbouring elements in xs (0 for an empty list).",
                body, wrong, [([],), ([4],), ([1, 2, 2],), ([3, 3, 1],)], lambda r: (_ints(r, 0, 2, 8),))


LISTS = [Template("scale_shift", 1, _scale_shift), Template("extreme", 1, _extreme), Template("filter", 2, _filter),
         Template("count_if", 2, _count_if), Template("running_sum", 3, _running_sum),
         Template("pairwise_diff", 3, _pairwise_diff), Template("rotate", 4, _rotate),
         Template("second_largest", 4, _second_largest), Template("longest_run", 5, _longest_run)]


# ---------------------------------------------------------------------------------------------
# arithmetic


def _linear(rng):
    a, b = rng.randint(2, 9), rng.randint(1, 20)
    return Spec(_name(rng, "compute", "linear", "scale_and_add"), "x",
                f"Return x times {a}, plus {b}.", f"return x * {a} + {b}", f"return (x + 1) * {a} + {b}",
                [(0,), (-1,)], lambda r: (r.randint(-50, 50),))


def _is_multiple(rng):
    k = rng.randint(2, 9)
    return Spec(_name(rng, f"divisible_by_{k}", "is_multiple", "multiple_check"), "n",
                f"Return True if the integer n is a multiple of {k}, else False.",
                f"return n % {k} == 0", f"return n % {k + 1} == 0", [(0,), (k,), (k * (k + 1),), (-k,)],
                lambda r: (r.randint(-60, 60),))


def _clamp(rng):
    lo = rng.randint(-10, 5)
    hi = lo + rng.randint(3, 15)
    return Spec(_name(rng, "clamp", "limit", "bound"), "x",
                f"Return x limited to the range {lo} to {hi} inclusive: {lo} if x is below it, {hi} if above.",
                f"return max({lo}, min(x, {hi}))", f"return max({lo}, min(x, {hi - 1}))",
                [(lo,), (hi,), (lo - 1,), (hi + 1,)], lambda r: (r.randint(lo - 10, hi + 10),))


def _digit_sum(rng):
    return Spec(_name(rng, "digit_sum", "sum_of_digits", "add_digits"), "n",
                "Return the sum of the decimal digits of the integer n (ignore its sign).",
                "return sum(int(d) for d in str(abs(n)))", "return sum(int(d) for d in str(n))",
                [(0,), (-45,), (909,)], lambda r: (r.randint(-999, 9999),))


def _sum_multiples(rng):
    a, b = rng.sample((2, 3, 4, 5, 7), 2)
    return Spec(_name(rng, "sum_multiples", "multiples_total", "add_multiples"), "n",
                f"Return the sum of the non-negative integers below n that are multiples of {a} or {b}.",
                f"return sum(i for i in range(n) if i % {a} == 0 or i % {b} == 0)",
                f"return sum(i for i in range(n + 1) if i % {a} == 0 or i % {b} == 0)",
                [(0,), (1,), (a * b,), (a,)], lambda r: (r.randint(0, 60),))


def _count_divisors(rng):
    return Spec(_name(rng, "count_divisors", "num_divisors", "divisor_count"), "n",
                "Return how many positive integers divide the positive integer n exactly.",
                "return sum(1 for d in range(1, n + 1) if n % d == 0)",
                "return sum(1 for d in range(1, n) if n % d == 0)",
                [(1,), (7,), (12,)], lambda r: (r.randint(1, 100),))


def _reverse_digits(rng):
    body = """\
sign = -1 if n < 0 else 1
return sign * int(str(abs(n))[::-1])"""
    return Spec(_name(rng, "reverse_digits", "flip_number", "mirror_digits"), "n",
                "Return the integer whose decimal digits are those of n in reverse order, keeping n's sign "
                "(leading zeros vanish, e.g. 120 -> 21).",
                body, "return int(str(n)[::-1].lstrip('-') or 0)", [(0,), (120,), (-34,), (7,)],
                lambda r: (r.randint(-999, 9999),))


def _near_miss(body, line, bug):
    """The canonical body with its one line `line` replaced by `bug` (the template's plausible mistake)."""
    assert body.count(line) == 1, line
    return body.replace(line, bug)


def _fibonacci(rng):
    body = """\
a, b = 0, 1
for _ in range(n):
    a, b = b, a + b
return a"""
    wrong = _near_miss(body, "a, b = 0, 1", "a, b = 1, 1")
    return Spec(_name(rng, "fib", "fibonacci", "nth_fibonacci"), "n",
                "Return the n-th Fibonacci number F(n), with F(0) = 0, F(1) = 1, F(n) = F(n - 1) + F(n - 2).",
                body, wrong, [(0,), (1,), (2,), (10,)], lambda r: (r.randint(0, 25),))


def _count_primes(rng):
    body = """\
count = 0
for m in range(2, n):
    if all(m % d for d in range(2, int(m ** 0.5) + 1)):
        count += 1
return count"""
    wrong = _near_miss(body, 'for m in range(2, n):', 'for m in range(2, n + 1):')
    return Spec(_name(rng, "count_primes", "primes_below", "prime_count"), "n",
                "Return how many prime numbers are strictly smaller than n.",
                body, wrong, [(0,), (2,), (3,), (11,)], lambda r: (r.randint(0, 80),))


def _collatz(rng):
    body = """\
steps = 0
while n != 1:
    n = n // 2 if n % 2 == 0 else 3 * n + 1
    steps += 1
return steps"""
    wrong = _near_miss(body, 'steps = 0', 'steps = 1')
    return Spec(_name(rng, "collatz_steps", "steps_to_one", "hailstone_length"), "n",
                "Starting from the positive integer n, repeatedly halve it if it is even or replace it by 3n + 1 "
                "if it is odd. Return how many such steps it takes to reach 1.",
                body, wrong, [(1,), (2,), (6,)], lambda r: (r.randint(1, 60),))


ARITHMETIC = [Template("linear", 1, _linear), Template("is_multiple", 1, _is_multiple), Template("clamp", 2, _clamp),
              Template("digit_sum", 2, _digit_sum), Template("sum_multiples", 3, _sum_multiples),
              Template("count_divisors", 3, _count_divisors), Template("reverse_digits", 4, _reverse_digits),
              Template("fibonacci", 4, _fibonacci), Template("count_primes", 5, _count_primes),
              Template("collatz", 5, _collatz)]


# ---------------------------------------------------------------------------------------------
# dicts


def _small_dict(rng, lo=0, hi=9, n_hi=4, keys=WORDS):
    return {k: rng.randint(lo, hi) for k in rng.sample(keys, rng.randint(0, n_hi))}


def _get_default(rng):
    default = rng.choice((0, -1, "", "none", "missing", []))
    return Spec(_name(rng, "lookup", "get_or_default", "fetch"), "d, key",
                f"Return d[key] if key is in the dict d, else {default!r}.",
                f"return d.get(key, {default!r})", "return d.get(key)",
                [({}, "a"), ({"a": 1}, "a"), ({"a": 1}, "b")],
                lambda r: (_small_dict(r), r.choice(WORDS[:8])))


def _char_counts(rng):
    body = """\
counts = {}
for ch in s:
    counts[ch] = counts.get(ch, 0) + 1
return counts"""
    wrong = _near_miss(body, '    counts[ch] = counts.get(ch, 0) + 1', '    counts[ch] = counts.get(ch, 1)')
    return Spec(_name(rng, "char_counts", "letter_frequencies", "count_chars"), "s",
                "Return a dict mapping each character of s to the number of times it occurs.", body, wrong, [("",), ("aab",)], lambda r: (_word(r, 0, 8),))


def _keys_above(rng):
    t = rng.randint(0, 6)
    return Spec(_name(rng, "keys_above", "big_keys", "select_keys"), "d",
                f"Return the sorted list of the keys of d whose value is strictly greater than {t}.",
                f"return sorted(k for k, v in d.items() if v > {t})",
                f"return sorted(k for k, v in d.items() if v >= {t})",
                [({},), ({"a": t, "b": t + 1},)], lambda r: (_small_dict(r, n_hi=5),))


def _sum_prefixed(rng):
    c = rng.choice("abcdefghlmnoprstw")
    return Spec(_name(rng, "sum_for_prefix", "total_with_prefix", "prefix_total"), "d",
                f"Return the sum of the values of d whose key starts with {c!r}.",
                f"return sum(v for k, v in d.items() if k.startswith({c!r}))",
                f"return sum(v for k, v in d.items() if {c!r} in k)",
                [({},), ({c + "x": 2, "x" + c: 5, "q": 1},)],
                lambda r: ({c + _word(r, 0, 3) if r.random() < 0.5 else _word(r, 1, 3) + c: r.randint(0, 9)
                            for _ in range(r.randint(0, 4))},))


def _merge_add(rng):
    body = """\
out = dict(a)
for k, v in b.items():
    out[k] = out.get(k, 0) + v
return out"""
    return Spec(_name(rng, "merge_add", "combine_counts", "add_dicts"), "a, b",
                "Merge the dicts a and b into a new dict: a key in both gets the sum of its two values.",
                body, "return {**a, **b}", [({}, {}), ({"x": 1}, {"x": 2}), ({"x": 1}, {"y": 2})],
                lambda r: (_small_dict(r, keys=WORDS[:6]), _small_dict(r, keys=WORDS[:6])))


def _invert(rng):
    body = """\
out = {}
for k in sorted(d):
    if d[k] not in out:
        out[d[k]] = k
return out"""
    return Spec(_name(rng, "invert", "reverse_mapping", "value_to_key"), "d",
                "Return a dict mapping each value of d to a key that has it; when several keys share a value, "
                "use the alphabetically smallest key.",
                body, "return {v: k for k, v in d.items()}", [({},), ({"a": 1, "b": 1},), ({"z": 2, "c": 3},)],
                lambda r: (_small_dict(r, 0, 3, 5),))


def _group_by_len(rng):
    body = """\
groups = {}
for w in words:
    groups.setdefault(len(w), []).append(w)
return groups"""
    return Spec(_name(rng, "group_by_length", "bucket_words", "words_by_size"), "words",
                "Group the strings in the list words by their length: return a dict mapping each length to "
                "the list of words of that length, in their original order.",
                body, "return {len(w): [w] for w in words}", [([],), (["ab", "cd", "e"],)],
                lambda r: ([r.choice(WORDS) for _ in range(r.randint(0, 6))],))


def _top_k(rng):
    k = rng.randint(1, 3)
    return Spec(_name(rng, f"top_{k}", "best_keys", "highest_keys"), "d",
                f"Return the keys of the {k} largest values of d, largest first; break ties by key in "
                f"alphabetical order. If d has fewer than {k} keys, return them all.",
                f"return sorted(d, key=lambda k: (-d[k], k))[:{k}]",
                f"return sorted(d, key=lambda k: -d[k])[:{k}]",
                [({},), ({"b": 1, "a": 1, "c": 1},), ({"z": 5, "y": 5, "x": 1},)],
                lambda r: (_small_dict(r, 0, 3, 5),))


DICTS = [Template("get_default", 1, _get_default), Template("char_counts", 2, _char_counts),
         Template("keys_above", 2, _keys_above), Template("sum_prefixed", 3, _sum_prefixed),
         Template("merge_add", 3, _merge_add), Template("invert", 4, _invert),
         Template("group_by_len", 4, _group_by_len), Template("top_k", 5, _top_k)]


# ---------------------------------------------------------------------------------------------
# parsing


def _count_words(rng):
    return Spec(_name(rng, "count_words", "word_count", "num_words"), "s",
                "Return the number of words in s, where words are separated by one or more spaces.",
                "return len(s.split())", "return s.count(' ') + 1",
                [("",), ("one",), ("a  b",), (" x y ",)], lambda r: (_sentence(r),))


def _sum_csv(rng):
    sep = rng.choice((",", ";", " ", "|", "+"))
    return Spec(_name(rng, "sum_fields", "add_numbers", "total_of"), "s",
                f"s holds integers separated by {sep!r} (possibly none at all). Return their sum.",
                f"return sum(int(p) for p in s.split({sep!r}) if p)",
                f"return sum(int(p) for p in s.split({sep!r})[1:] if p)",
                [("",), ("5",), (sep.join(("1", "2", "3")),)],
                lambda r: (sep.join(str(r.randint(0, 99)) for _ in range(r.randint(1, 5))),))


def _digits_only(rng):
    return Spec(_name(rng, "digits_only", "keep_digits", "extract_digits"), "s",
                "Return the string made of the decimal digits of s, in their order.",
                "return ''.join(ch for ch in s if ch.isdigit())",
                "return ''.join(ch for ch in s if ch.isalnum())",
                [("",), ("a1b2",), ("42",)], lambda r: (_mixed(r, 12),))


def _parse_kv(rng):
    pair, item = rng.choice((("=", ";"), ("=", "&"), (":", ","), ("=", ",")))
    body = f"""\
out = {{}}
for part in s.split({item!r}):
    if part:
        key, value = part.split({pair!r})
        out[key] = int(value)
return out"""
    wrong = f"return dict(part.split({pair!r}) for part in s.split({item!r}) if part)"
    return Spec(_name(rng, "parse_pairs", "parse_settings", "to_dict"), "s",
                f"s holds key{pair}value items separated by {item!r}, where every value is an integer "
                f"(e.g. 'a{pair}1{item}b{pair}2'). Return a dict mapping each key to its integer value.",
                body, wrong, [("",), (f"x{pair}5",)],
                lambda r: (item.join(f"{w}{pair}{r.randint(0, 99)}" for w in r.sample(WORDS, r.randint(1, 4))),))


def _time_to_minutes(rng):
    return Spec(_name(rng, "to_minutes", "minutes_since_midnight", "clock_minutes"), "s",
                "s is a time of day as 'HH:MM' (24-hour clock). Return the number of minutes since midnight.",
                "hours, minutes = s.split(':')\nreturn int(hours) * 60 + int(minutes)",
                "return int(s[:2]) * 60 + int(s[-1])", [("00:00",), ("23:59",), ("10:30",)],
                lambda r: (f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}",))


def _parse_ints(rng):
    return Spec(_name(rng, "find_integers", "extract_numbers", "parse_ints"), "s",
                "Return the list of integers written in s, in order; a '-' right before digits makes the "
                "number negative (e.g. 'a-12b3' -> [-12, 3]).",
                "import re\nreturn [int(m) for m in re.findall(r'-?[0-9]+', s)]",
                "import re\nreturn [int(m) for m in re.findall(r'[0-9]+', s)]",
                [("",), ("x-5y",), ("7 and 42",)],
                lambda r: ("".join(r.choice(("a", " ", "-", "b", str(r.randint(0, 99)))) for _ in range(r.randint(0, 8))),))


def _valid_name(rng):
    body = """\
if not s or not (s[0].isalpha() or s[0] == '_'):
    return False
return all(ch.isalnum() or ch == '_' for ch in s)"""
    wrong = "return len(s) > 0 and all(ch.isalnum() or ch == '_' for ch in s)"
    return Spec(_name(rng, "is_valid_name", "valid_identifier", "good_name"), "s",
                "Return True if s is a valid name: non-empty, starting with a letter or '_', and containing "
                "only letters, digits and '_'.", body, wrong,
                [("",), ("_x1",), ("1abc",), ("a-b",)],
                lambda r: ("".join(r.choice("ab_1- ") for _ in range(r.randint(0, 6))),))


def _eval_sum(rng):
    body = """\
total, number, sign = 0, 0, 1
for ch in s:
    if ch.isdigit():
        number = number * 10 + int(ch)
    else:
        total += sign * number
        number, sign = 0, (1 if ch == '+' else -1)
return total + sign * number"""
    wrong = """\
total, number, sign = 0, 0, 1
for ch in s:
    if ch.isdigit():
        number = number * 10 + int(ch)
    else:
        total += sign * number
        number, sign = 0, (1 if ch == '+' else -1)
return total"""
    return Spec(_name(rng, "evaluate", "calc", "compute_expression"), "s",
                "s is an expression of non-negative integers joined by '+' and '-', without spaces "
                "(e.g. '12+3-4'). Return its value.", body, wrong, [("7",), ("12+3-4",), ("0-5",)],
                lambda r: ("".join(f"{r.choice('+-')}{r.randint(0, 40)}" for _ in range(r.randint(1, 4)))[1:],))


def _roman(rng):
    body = """\
values = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}
total = 0
for i, ch in enumerate(s):
    if i + 1 < len(s) and values[ch] < values[s[i + 1]]:
        total -= values[ch]
    else:
        total += values[ch]
return total"""
    wrong = """\
values = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}
return sum(values[ch] for ch in s)"""

    def numeral(r):
        n = r.randint(1, 399)
        out = ""
        for v, sym in ((100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"),
                       (1, "I")):
            while n >= v:
                out, n = out + sym, n - v
        return (out,)

    return Spec(_name(rng, "roman_to_int", "from_roman", "parse_roman"), "s",
                "Return the value of the Roman numeral s (I=1, V=5, X=10, L=50, C=100, D=500, M=1000; a "
                "smaller symbol before a larger one is subtracted, as in IV = 4).",
                body, wrong, [("I",), ("IV",), ("XIV",), ("MCMXC",)], numeral)


PARSING = [Template("count_words", 1, _count_words), Template("sum_csv", 2, _sum_csv),
           Template("digits_only", 2, _digits_only), Template("parse_kv", 3, _parse_kv),
           Template("time_to_minutes", 3, _time_to_minutes), Template("parse_ints", 4, _parse_ints),
           Template("valid_name", 4, _valid_name), Template("eval_sum", 5, _eval_sum), Template("roman", 5, _roman)]

FAMILIES = {"strings": STRINGS, "lists": LISTS, "arithmetic": ARITHMETIC, "dicts": DICTS, "parsing": PARSING}


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
    """A Task from a spec: tests are its edge cases, N_RANDOM random inputs (more if needed for
    MIN_CASES distinct inputs), and (if none of those
    separates them) the first random input on which the near miss differs from the canonical body."""
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
        raise AssertionError(f"{task_id}: canonical body raised on {[c for c, (ok, _) in zip(cases, outcomes) if not ok]}")
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


# ---------------------------------------------------------------------------------------------
# splits


def check_families(names):
    """`names` as a list of known family names without repeats (None: all); else a UserError."""
    if names is None:
        return list(FAMILIES)
    if not all(isinstance(n, str) for n in names):
        raise UserError("config key 'data.families' must be a list of family names")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise UserError(f"config key 'data.families': unknown family {unknown[0]!r}; "
                        f"choose from {', '.join(FAMILIES)}")
    if not names:
        raise UserError("config key 'data.families' is empty; leave it out for all families")
    return list(dict.fromkeys(names))


def _instance_rng(seed, split, index):
    return random.Random(f"mlx-coach-procedural:{seed}:{split}:{index}")


def _instance_spec(seed, split, index, families, difficulty):
    """(spec, tags) of instance `index` of `split`; the family, level and template are drawn first."""
    rng = _instance_rng(seed, split, index)
    lo, hi = difficulty
    choices = [f for f in families if any(lo <= t.level <= hi for t in FAMILIES[f])]
    family = rng.choice(choices)
    levels = sorted({t.level for t in FAMILIES[family] if lo <= t.level <= hi})
    level = rng.choice(levels)
    template = rng.choice([t for t in FAMILIES[family] if t.level == level])
    tags = {"source": "procedural", "category": family, "template": template.name, "difficulty": level,
            "seed": seed, "split": split, "index": index}
    return template.make(rng), tags, rng


def generate_with_near_misses(count, seed, difficulty=(1, 5), families=None, split="train",
                               exclude=frozenset()) -> list[tuple[Task, str]]:
    """`count` (task, near-miss body) pairs with distinct prompts, none of whose prompt is in `exclude`.

    Instance indices run 0, 1, 2, ...; an instance whose prompt was already produced is passed over,
    so ids can skip numbers. Fewer than `count` distinct prompts within 20 x count instances is a
    UserError (the families and levels chosen hold too few distinct tasks)."""
    families = check_families(families)
    lo, hi = difficulty
    if not (1 <= lo <= hi <= 5):
        raise UserError(f"config keys 'data.difficulty_min/max' must satisfy 1 <= min <= max <= 5; got {lo}, {hi}")
    out, seen = [], set(exclude)
    for index in range(20 * count):
        if len(out) == count:
            break
        spec, tags, rng = _instance_spec(seed, split, index, families, difficulty)
        task = build(spec, rng, f"procedural/{split}/{index}", tags)
        if task.prompt in seen:
            continue
        seen.add(task.prompt)
        out.append((task, textwrap.indent(spec.wrong, "    ") + "\n"))
    if len(out) < count:
        raise UserError(f"config key 'data.procedural_count': only {len(out)} distinct {split} tasks from "
                        f"{', '.join(families)} at difficulty {lo}..{hi}; ask for fewer")
    return out


def generate(count, seed, difficulty=(1, 5), families=None, split="train", exclude=frozenset()) -> list[Task]:
    """The tasks of `generate_with_near_misses`."""
    return [task for task, _ in generate_with_near_misses(count, seed, difficulty, families, split, exclude)]


def procedural_split(count=DEFAULT_COUNT, val_count=DEFAULT_HELDOUT, seed=0, difficulty=(1, 5),
                     families=None) -> tuple[list[Task], list[Task]]:
    """(training tasks, held-out tasks): disjoint instance seeds (split names "train" and "heldout")
    and no held-out prompt equal to a training prompt."""
    train = generate(count, seed, difficulty, families, "train")
    heldout = generate(val_count, seed, difficulty, families, "heldout",
                       exclude=frozenset(t.prompt for t in train)) if val_count else []
    return train, heldout
