"""Procedural family `dicts`: templates over dicts (lookups, counting, filtering keys, merging, inverting,
grouping, ranking).
"""

from mlx_coach.data.procedural.template import Spec, Template, WORDS, near_miss, pick_name, random_word


def _small_dict(rng, lo=0, hi=9, n_hi=4, keys=WORDS):
    return {k: rng.randint(lo, hi) for k in rng.sample(keys, rng.randint(0, n_hi))}


def _get_default(rng):
    default = rng.choice((0, -1, "", "none", "missing", []))
    return Spec(pick_name(rng, "lookup", "get_or_default", "fetch"), "d, key",
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
    wrong = near_miss(body, '    counts[ch] = counts.get(ch, 0) + 1', '    counts[ch] = counts.get(ch, 1)')
    return Spec(pick_name(rng, "char_counts", "letter_frequencies", "count_chars"), "s",
                "Return a dict mapping each character of s to the number of times it occurs.", body, wrong,
                [("",), ("aab",)], lambda r: (random_word(r, 0, 8),))


def _keys_above(rng):
    t = rng.randint(0, 6)
    return Spec(pick_name(rng, "keys_above", "big_keys", "select_keys"), "d",
                f"Return the sorted list of the keys of d whose value is strictly greater than {t}.",
                f"return sorted(k for k, v in d.items() if v > {t})",
                f"return sorted(k for k, v in d.items() if v >= {t})",
                [({},), ({"a": t, "b": t + 1},)], lambda r: (_small_dict(r, n_hi=5),))


def _sum_prefixed(rng):
    c = rng.choice("abcdefghlmnoprstw")
    return Spec(pick_name(rng, "sum_for_prefix", "total_with_prefix", "prefix_total"), "d",
                f"Return the sum of the values of d whose key starts with {c!r}.",
                f"return sum(v for k, v in d.items() if k.startswith({c!r}))",
                f"return sum(v for k, v in d.items() if {c!r} in k)",
                [({},), ({c + "x": 2, "x" + c: 5, "q": 1},)],
                lambda r: ({c + random_word(r, 0, 3) if r.random() < 0.5 else random_word(r, 1, 3) + c: r.randint(0, 9)
                            for _ in range(r.randint(0, 4))},))


def _merge_add(rng):
    body = """\
out = dict(a)
for k, v in b.items():
    out[k] = out.get(k, 0) + v
return out"""
    return Spec(pick_name(rng, "merge_add", "combine_counts", "add_dicts"), "a, b",
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
    return Spec(pick_name(rng, "invert", "reverse_mapping", "value_to_key"), "d",
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
    return Spec(pick_name(rng, "group_by_length", "bucket_words", "words_by_size"), "words",
                "Group the strings in the list words by their length: return a dict mapping each length to "
                "the list of words of that length, in their original order.",
                body, "return {len(w): [w] for w in words}", [([],), (["ab", "cd", "e"],)],
                lambda r: ([r.choice(WORDS) for _ in range(r.randint(0, 6))],))


def _top_k(rng):
    k = rng.randint(1, 3)
    return Spec(pick_name(rng, f"top_{k}", "best_keys", "highest_keys"), "d",
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
