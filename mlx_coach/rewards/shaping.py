"""Built-in shaping rewards, usable as `type: function` rewards (e.g. `mlx_coach.rewards.shaping:code_charset`).

Unit tests give a sparse reward: a policy that never passes one sees no learning signal.
A small weighted shaping term gives such a policy (the builtin tiny model, freshly
initialised) a dense gradient toward code-like output. Keep its weight well below the tests'.
"""

import ast
import string

CODE_CHARS = frozenset(string.ascii_letters + string.digits + " \n_()[]{}:.,=+-*/%<>!'\"#")


def code_charset(prompts, completions, **columns):
    """Share of a completion's characters that occur in ordinary Python source (0 for empty)."""
    return [sum(ch in CODE_CHARS for ch in c) / len(c) if c else 0.0 for c in completions]


def parses(prompts, completions, **columns):
    """1.0 when prompt + completion is syntactically valid Python, else 0.0."""
    out = []
    for p, c in zip(prompts, completions):
        try:
            ast.parse(p + c)
            out.append(1.0)
        except (SyntaxError, ValueError):
            out.append(0.0)
    return out
