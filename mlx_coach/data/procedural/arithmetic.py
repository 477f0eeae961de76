"""Procedural family `arithmetic`: templates over one integer (linear maps, divisibility, digits, Fibonacci,
primes, Collatz).
"""

from mlx_coach.data.procedural.template import Spec, Template, near_miss, pick_name


def _linear(rng):
    a, b = rng.randint(2, 9), rng.randint(1, 20)
    return Spec(pick_name(rng, "compute", "linear", "scale_and_add"), "x",
                f"Return x times {a}, plus {b}.", f"return x * {a} + {b}", f"return (x + 1) * {a} + {b}",
                [(0,), (-1,)], lambda r: (r.randint(-50, 50),))


def _is_multiple(rng):
    k = rng.randint(2, 9)
    return Spec(pick_name(rng, f"divisible_by_{k}", "is_multiple", "multiple_check"), "n",
                f"Return True if the integer n is a multiple of {k}, else False.",
                f"return n % {k} == 0", f"return n % {k + 1} == 0", [(0,), (k,), (k * (k + 1),), (-k,)],
                lambda r: (r.randint(-60, 60),))


def _clamp(rng):
    lo = rng.randint(-10, 5)
    hi = lo + rng.randint(3, 15)
    return Spec(pick_name(rng, "clamp", "limit", "bound"), "x",
                f"Return x limited to the range {lo} to {hi} inclusive: {lo} if x is below it, {hi} if above.",
                f"return max({lo}, min(x, {hi}))", f"return max({lo}, min(x, {hi - 1}))",
                [(lo,), (hi,), (lo - 1,), (hi + 1,)], lambda r: (r.randint(lo - 10, hi + 10),))


def _digit_sum(rng):
    return Spec(pick_name(rng, "digit_sum", "sum_of_digits", "add_digits"), "n",
                "Return the sum of the decimal digits of the integer n (ignore its sign).",
                "return sum(int(d) for d in str(abs(n)))", "return sum(int(d) for d in str(n))",
                [(0,), (-45,), (909,)], lambda r: (r.randint(-999, 9999),))


def _sum_multiples(rng):
    a, b = rng.sample((2, 3, 4, 5, 7), 2)
    return Spec(pick_name(rng, "sum_multiples", "multiples_total", "add_multiples"), "n",
                f"Return the sum of the non-negative integers below n that are multiples of {a} or {b}.",
                f"return sum(i for i in range(n) if i % {a} == 0 or i % {b} == 0)",
                f"return sum(i for i in range(n + 1) if i % {a} == 0 or i % {b} == 0)",
                [(0,), (1,), (a * b,), (a,)], lambda r: (r.randint(0, 60),))


def _count_divisors(rng):
    return Spec(pick_name(rng, "count_divisors", "num_divisors", "divisor_count"), "n",
                "Return how many positive integers divide the positive integer n exactly.",
                "return sum(1 for d in range(1, n + 1) if n % d == 0)",
                "return sum(1 for d in range(1, n) if n % d == 0)",
                [(1,), (7,), (12,)], lambda r: (r.randint(1, 100),))


def _reverse_digits(rng):
    body = """\
sign = -1 if n < 0 else 1
return sign * int(str(abs(n))[::-1])"""
    return Spec(pick_name(rng, "reverse_digits", "flip_number", "mirror_digits"), "n",
                "Return the integer whose decimal digits are those of n in reverse order, keeping n's sign "
                "(leading zeros vanish, e.g. 120 -> 21).",
                body, "return int(str(n)[::-1].lstrip('-') or 0)", [(0,), (120,), (-34,), (7,)],
                lambda r: (r.randint(-999, 9999),))


def _fibonacci(rng):
    body = """\
a, b = 0, 1
for _ in range(n):
    a, b = b, a + b
return a"""
    wrong = near_miss(body, "a, b = 0, 1", "a, b = 1, 1")
    return Spec(pick_name(rng, "fib", "fibonacci", "nth_fibonacci"), "n",
                "Return the n-th Fibonacci number F(n), with F(0) = 0, F(1) = 1, F(n) = F(n - 1) + F(n - 2).",
                body, wrong, [(0,), (1,), (2,), (10,)], lambda r: (r.randint(0, 25),))


def _count_primes(rng):
    body = """\
count = 0
for m in range(2, n):
    if all(m % d for d in range(2, int(m ** 0.5) + 1)):
        count += 1
return count"""
    wrong = near_miss(body, 'for m in range(2, n):', 'for m in range(2, n + 1):')
    return Spec(pick_name(rng, "count_primes", "primes_below", "prime_count"), "n",
                "Return how many prime numbers are strictly smaller than n.",
                body, wrong, [(0,), (2,), (3,), (11,)], lambda r: (r.randint(0, 80),))


def _collatz(rng):
    body = """\
steps = 0
while n != 1:
    n = n // 2 if n % 2 == 0 else 3 * n + 1
    steps += 1
return steps"""
    wrong = near_miss(body, 'steps = 0', 'steps = 1')
    return Spec(pick_name(rng, "collatz_steps", "steps_to_one", "hailstone_length"), "n",
                "Starting from the positive integer n, repeatedly halve it if it is even or replace it by 3n + 1 "
                "if it is odd. Return how many such steps it takes to reach 1.",
                body, wrong, [(1,), (2,), (6,)], lambda r: (r.randint(1, 60),))


ARITHMETIC = [Template("linear", 1, _linear), Template("is_multiple", 1, _is_multiple), Template("clamp", 2, _clamp),
              Template("digit_sum", 2, _digit_sum), Template("sum_multiples", 3, _sum_multiples),
              Template("count_divisors", 3, _count_divisors), Template("reverse_digits", 4, _reverse_digits),
              Template("fibonacci", 4, _fibonacci), Template("count_primes", 5, _count_primes),
              Template("collatz", 5, _collatz)]
