"""Procedural family `lists`: templates over a list of integers (mapping, filtering, running sums, rotation,
runs).
"""

from mlx_coach.data.procedural.template import Spec, Template, pick_name, random_ints


def _scale_shift(rng):
    a, b = rng.randint(2, 5), rng.choice((-3, -2, -1, 1, 2, 3, 4))
    expr = f"x * {a} + {b}" if b > 0 else f"x * {a} - {-b}"
    return Spec(pick_name(rng, "transform", "scale_all", "map_values"), "xs",
                f"Return a new list with every element x of xs replaced by {expr}.",
                f"return [{expr} for x in xs]", f"return [{expr} for x in xs[:-1]]",
                [([],), ([0],)], lambda r: (random_ints(r),))


def _extreme(rng):
    op = rng.choice(("max", "min"))
    word = "largest" if op == "max" else "smallest"
    return Spec(pick_name(rng, f"find_{op}", f"{word}_element", f"list_{op}"), "xs",
                f"Return the {word} element of the non-empty list xs.",
                f"return {op}(xs)", "return xs[0]", [([4],), ([1, 9, 3],), ([9, 1, 3],)],
                lambda r: ([r.randint(-20, 20) for _ in range(r.randint(1, 7))],))


def _filter(rng):
    if rng.random() < 0.5:
        k = rng.randint(2, 5)
        return Spec(pick_name(rng, f"multiples_of_{k}", "keep_multiples", "filter_multiples"), "xs",
                    f"Return the elements of xs that are multiples of {k}, in their order.",
                    f"return [x for x in xs if x % {k} == 0]", f"return [x for x in xs if x % {k} != 0]",
                    [([],), ([0, 1, k],)], lambda r: (random_ints(r, 0, 20),))
    t = rng.randint(-3, 6)
    return Spec(pick_name(rng, "greater_than", "keep_large", "above_threshold"), "xs",
                f"Return the elements of xs that are strictly greater than {t}, in their order.",
                f"return [x for x in xs if x > {t}]", f"return [x for x in xs if x >= {t}]",
                [([],), ([t, t + 1, t - 1],)], lambda r: (random_ints(r),))


def _count_if(rng):
    t = rng.randint(-3, 6)
    return Spec(pick_name(rng, "count_above", "how_many_greater", "count_large"), "xs",
                f"Return how many elements of xs are strictly greater than {t}.",
                f"return sum(1 for x in xs if x > {t})", f"return sum(1 for x in xs if x >= {t})",
                [([],), ([t],), ([t + 1, t + 2],)], lambda r: (random_ints(r),))


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
    return Spec(pick_name(rng, "running_sum", "prefix_sums", "cumulative"), "xs",
                "Return the running sums of xs: element i is xs[0] + ... + xs[i].",
                body, wrong, [([],), ([5],), ([1, 2, 3],)], lambda r: (random_ints(r),))


def _pairwise_diff(rng):
    return Spec(pick_name(rng, "differences", "pairwise_diff", "steps_between"), "xs",
                "Return the list of differences between neighbours: element i is xs[i + 1] - xs[i].",
                "return [xs[i + 1] - xs[i] for i in range(len(xs) - 1)]",
                "return [xs[i] - xs[i + 1] for i in range(len(xs) - 1)]",
                [([],), ([7],), ([1, 4, 2],)], lambda r: (random_ints(r),))


def _rotate(rng):
    body = """\
if not xs:
    return []
k = k % len(xs)
return xs[k:] + xs[:k]"""
    return Spec(pick_name(rng, "rotate_left", "rotate", "shift_left"), "xs, k",
                "Rotate xs left by k places (k >= 0, possibly larger than len(xs)) and return the new list.",
                body, "return xs[k:] + xs[:k]", [([], 3), ([1, 2, 3], 0), ([1, 2, 3], 4), ([1, 2], 2)],
                lambda r: (random_ints(r, n_hi=6), r.randint(0, 8)))


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
    return Spec(pick_name(rng, "second_largest", "runner_up", "second_max"), "xs",
                "Return the second largest distinct value in xs, or None if xs has fewer than two distinct values.",
                body, wrong, [([],), ([3, 3],), ([5, 5, 2],), ([1, 2],)], lambda r: (random_ints(r, 0, 6),))


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
    return Spec(pick_name(rng, "longest_run", "max_streak", "longest_repeat"), "xs",
                "Return the length of the longest run of equal neighbouring elements in xs (0 for an empty list).",
                body, wrong, [([],), ([4],), ([1, 2, 2],), ([3, 3, 1],)], lambda r: (random_ints(r, 0, 2, 8),))


LISTS = [Template("scale_shift", 1, _scale_shift), Template("extreme", 1, _extreme), Template("filter", 2, _filter),
         Template("count_if", 2, _count_if), Template("running_sum", 3, _running_sum),
         Template("pairwise_diff", 3, _pairwise_diff), Template("rotate", 4, _rotate),
         Template("second_largest", 4, _second_largest), Template("longest_run", 5, _longest_run)]
