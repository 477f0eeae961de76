"""A config file's text to the mapping the config tree is built from, and the numbers every config must hold.

Refused in one line naming the file (and line) or the dotted key: text that is not UTF-8 or not YAML, a key
given twice in one mapping (YAML would keep the last silently), a file with no settings (it would run on
the defaults unnoticed: `{}` asks for them explicitly), a top level that is not a mapping, and NaN or
infinity anywhere (YAML's .nan and .inf pass every range check, as a comparison with NaN is false).
"""

import math
from pathlib import Path

import yaml

from mlx_coach.core.errors import UserError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping, naming the key and both lines."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key, line, first):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


def read_mapping(path):
    """The mapping a YAML config file holds; UserError (file:line) for anything else."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise UserError(f"{path}:{e.line}: duplicate key '{e.key}' (first at line {e.first})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        raise UserError(f"{path}: the config file holds no settings (write {{}} to run on the defaults)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def check_finite(value, key=""):
    """UserError naming the dotted key of the first NaN or infinity in a config's nested mappings and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")
