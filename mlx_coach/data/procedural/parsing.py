"""Procedural family `parsing`: templates that read a string (words, separated numbers, key/value pairs, times,
expressions, Roman numerals).
"""

from mlx_coach.data.procedural.template import (Spec, Template, WORDS, near_miss, pick_name, random_sentence,
                                                 random_text)


def _count_words(rng):
    return Spec(pick_name(rng, "count_words", "word_count", "num_words"), "s",
                "Return the number of words in s, where words are separated by one or more spaces.",
                "return len(s.split())", "return s.count(' ') + 1",
                [("",), ("one",), ("a  b",), (" x y ",)], lambda r: (random_sentence(r),))


def _sum_csv(rng):
    sep = rng.choice((",", ";", " ", "|", "+"))
    return Spec(pick_name(rng, "sum_fields", "add_numbers", "total_of"), "s",
                f"s holds integers separated by {sep!r} (possibly none at all). Return their sum.",
                f"return sum(int(p) for p in s.split({sep!r}) if p)",
                f"return sum(int(p) for p in s.split({sep!r})[1:] if p)",
                [("",), ("5",), (sep.join(("1", "2", "3")),)],
                lambda r: (sep.join(str(r.randint(0, 99)) for _ in range(r.randint(1, 5))),))


def _digits_only(rng):
    return Spec(pick_name(rng, "digits_only", "keep_digits", "extract_digits"), "s",
                "Return the string made of the decimal digits of s, in their order.",
                "return ''.join(ch for ch in s if ch.isdigit())",
                "return ''.join(ch for ch in s if ch.isalnum())",
                [("",), ("a1b2",), ("42",)], lambda r: (random_text(r, 12),))


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
    return Spec(pick_name(rng, "parse_pairs", "parse_settings", "to_dict"), "s",
                f"s holds key{pair}value items separated by {item!r}, where every value is an integer "
                f"(e.g. 'a{pair}1{item}b{pair}2'). Return a dict mapping each key to its integer value.",
                body, wrong, [("",), (f"x{pair}5",)],
                lambda r: (item.join(f"{w}{pair}{r.randint(0, 99)}" for w in r.sample(WORDS, r.randint(1, 4))),))


def _time_to_minutes(rng):
    return Spec(pick_name(rng, "to_minutes", "minutes_since_midnight", "clock_minutes"), "s",
                "s is a time of day as 'HH:MM' (24-hour clock). Return the number of minutes since midnight.",
                "hours, minutes = s.split(':')\nreturn int(hours) * 60 + int(minutes)",
                "return int(s[:2]) * 60 + int(s[-1])", [("00:00",), ("23:59",), ("10:30",)],
                lambda r: (f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}",))


def _parse_ints(rng):
    return Spec(pick_name(rng, "find_integers", "extract_numbers", "parse_ints"), "s",
                "Return the list of integers written in s, in order; a '-' right before digits makes the "
                "number negative (e.g. 'a-12b3' -> [-12, 3]).",
                "import re\nreturn [int(m) for m in re.findall(r'-?[0-9]+', s)]",
                "import re\nreturn [int(m) for m in re.findall(r'[0-9]+', s)]",
                [("",), ("x-5y",), ("7 and 42",)],
                lambda r: ("".join(r.choice(("a", " ", "-", "b", str(r.randint(0, 99))))
                                   for _ in range(r.randint(0, 8))),))


def _valid_name(rng):
    body = """\
if not s or not (s[0].isalpha() or s[0] == '_'):
    return False
return all(ch.isalnum() or ch == '_' for ch in s)"""
    wrong = "return len(s) > 0 and all(ch.isalnum() or ch == '_' for ch in s)"
    return Spec(pick_name(rng, "is_valid_name", "valid_identifier", "good_name"), "s",
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
    wrong = near_miss(body, "return total + sign * number", "return total")
    return Spec(pick_name(rng, "evaluate", "calc", "compute_expression"), "s",
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

    return Spec(pick_name(rng, "roman_to_int", "from_roman", "parse_roman"), "s",
                "Return the value of the Roman numeral s (I=1, V=5, X=10, L=50, C=100, D=500, M=1000; a "
                "smaller symbol before a larger one is subtracted, as in IV = 4).",
                body, wrong, [("I",), ("IV",), ("XIV",), ("MCMXC",)], numeral)


PARSING = [Template("count_words", 1, _count_words), Template("sum_csv", 2, _sum_csv),
           Template("digits_only", 2, _digits_only), Template("parse_kv", 3, _parse_kv),
           Template("time_to_minutes", 3, _time_to_minutes), Template("parse_ints", 4, _parse_ints),
           Template("valid_name", 4, _valid_name), Template("eval_sum", 5, _eval_sum), Template("roman", 5, _roman)]
