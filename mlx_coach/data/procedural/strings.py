"""Procedural family `strings`: templates over one string argument (affixes, case, counting, replacing, ciphers,
run-length encoding).
"""

from mlx_coach.data.procedural.template import (Spec, Template, WORDS, pick_name, random_sentence, random_text,
                                                random_word)


def _affix(rng):
    p = rng.choice(WORDS[:12]) + rng.choice(("_", "-", ":", ""))
    if rng.random() < 0.5:
        return Spec(pick_name(rng, "add_prefix", "with_prefix", "prepend_tag"), "s",
                    f"Return the string s with {p!r} added at its start.",
                    f"return {p!r} + s", f"return s + {p!r}", [("",), ("x",)], lambda r: (random_word(r),))
    return Spec(pick_name(rng, "add_suffix", "with_suffix", "append_tag"), "s",
                f"Return the string s with {p!r} added at its end.",
                f"return s + {p!r}", f"return {p!r} + s", [("",), ("x",)], lambda r: (random_word(r),))


def _case(rng):
    op, bad, text = rng.choice((("upper", "return s.capitalize()", "every letter in upper case"),
                                ("lower", "return s[:1] + s[1:].lower()", "every letter in lower case"),
                                ("swapcase", "return s.upper()", "the case of every letter swapped"),
                                ("title", "return s.capitalize()", "the first letter of every word in upper "
                                                                   "case and the other letters in lower case")))
    return Spec(pick_name(rng, f"to_{op}", f"{op}_case", f"make_{op}"), "s", f"Return s with {text}.",
                f"return s.{op}()", bad, [("",), ("Hello World",), ("aBc dEf 12",)], lambda r: (random_text(r),))


def _count_char(rng):
    c = rng.choice("aeiorst")
    return Spec(pick_name(rng, f"count_{c}", "count_letter", "occurrences"), "s",
                f"Return how many times the lower-case letter {c!r} occurs in s (upper case {c.upper()!r} "
                f"does not count).",
                f"return s.count({c!r})", f"return s.lower().count({c!r})",
                [("",), (c * 3,), (c.upper() + c,)], lambda r: ("".join(r.choice(c + c.upper() + "xyz ")
                                                                         for _ in range(r.randint(0, 9))),))


def _replace_char(rng):
    a, b = rng.sample("abcdeilmnorst", 2)
    return Spec(pick_name(rng, f"replace_{a}", "swap_letter", "substitute"), "s",
                f"Return s with every {a!r} replaced by {b!r}.",
                f"return s.replace({a!r}, {b!r})", f"return s.replace({a!r}, {b!r}, 1)",
                [("",), (a + "x" + a,), (a * 3,)],
                lambda r: ("".join(r.choice(a + "xyz") for _ in range(r.randint(0, 8))),))


def _palindrome(rng):
    return Spec(pick_name(rng, "is_palindrome", "reads_same_backwards"), "s",
                "Return True if s reads the same forwards and backwards, else False.",
                "return s == s[::-1]", "return s[:len(s) // 2] == s[len(s) // 2:][::-1]",
                [("",), ("a",), ("aba",), ("abba",), ("ab",)],
                lambda r: (r.choice((random_word(r), (lambda w: w + w[-2::-1])(random_word(r)))),))


def _every_kth(rng):
    k = rng.randint(2, 4)
    start = rng.randint(0, k - 1)
    return Spec(pick_name(rng, "every_kth", "take_every", "stride_chars"), "s",
                f"Return every {('', '', '2nd', '3rd', '4th')[k]} character of s, starting with the character at "
                f"index {start}.",
                f"return s[{start}::{k}]", f"return s[{start + 1}::{k}]",
                [("",), ("abcdefghij",)], lambda r: (random_word(r, 0, 12),))


def _reverse_words(rng):
    sep = rng.choice((" ", ",", "-", ";", "/"))
    return Spec(pick_name(rng, "reverse_words", "flip_words", "words_backwards"), "s",
                f"s holds words separated by {sep!r}. Return them in reverse order, separated by {sep!r}.",
                f"return {sep!r}.join(s.split({sep!r})[::-1])", "return s[::-1]",
                [("",), ("one",), (sep.join(("ab", "cd", "ef")),)], lambda r: (random_sentence(r, sep),))


def _remove_chars(rng):
    chars = "".join(sorted(rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(2, 4))))
    return Spec(pick_name(rng, "remove_chars", "strip_letters", "drop_letters"), "s",
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
    return Spec(pick_name(rng, "caesar", "shift_letters", "rotate_letters"), "s",
                f"Shift every lower-case letter of s {k} places forward in the alphabet, wrapping from 'z' "
                f"to 'a'; leave every other character as it is.",
                body, wrong, [("",), ("xyz",), ("Hi z!",)], lambda r: (random_sentence(r),))


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
    return Spec(pick_name(rng, "run_length", "encode_runs", "compress"), "s",
                "Encode s as runs: each run of one repeated character becomes the character followed by "
                "the run's length, e.g. 'aaab' -> 'a3b1'.",
                body, wrong, [("",), ("a",), ("aaabcc",)],
                lambda r: ("".join(r.choice("ab") * r.randint(1, 3) for _ in range(r.randint(1, 4))),))


STRINGS = [Template("affix", 1, _affix), Template("case", 1, _case), Template("count_char", 2, _count_char),
           Template("replace_char", 2, _replace_char), Template("palindrome", 2, _palindrome),
           Template("every_kth", 3, _every_kth), Template("reverse_words", 3, _reverse_words),
           Template("remove_chars", 4, _remove_chars), Template("caesar", 5, _caesar),
           Template("run_length", 5, _run_length)]
