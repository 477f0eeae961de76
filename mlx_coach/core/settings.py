"""One definition per setting: a dataclass field with its range, read by the YAML loader and the modules.

Each config section is a module's own dataclass (rollout.RolloutConfig, cache.CacheConfig, ...), whose
fields are declared with `setting(default, lo=, hi=, choices=)`. `check_fields` validates an instance
against those declarations; config.tree runs the same checks on YAML values with the dotted key in the
message, so a range is written once, next to the field it bounds.
"""

import dataclasses
import types
import typing
from typing import Union

from mlx_coach.core.errors import UserError


def setting(default, *, lo=None, hi=None, choices=None, lo_open=False, hi_open=False, help=""):
    """A dataclass field with its valid range (lo/hi, inclusive unless *_open) or choices."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "hi_open": hi_open, "help": help}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(value, tp, key):
    """`value` as the annotated type (an int is accepted for a float), or UserError naming `key`."""
    tp, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"config key '{key}' may not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    if tp in (list, tuple) or typing.get_origin(tp) in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value) if (tp is list or typing.get_origin(tp) is list) else tuple(value)
        raise UserError(f"config key '{key}' must be a list, got {value!r}")
    return value


def check_range(value, meta, key):
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise UserError(f"config key '{key}' must be {op} {lo}; got {value!r}")
    if hi is not None and (value > hi or (meta.get("hi_open") and value == hi)):
        op = "<" if meta.get("hi_open") else "<="
        raise UserError(f"config key '{key}' must be {op} {hi}; got {value!r}")


def check_fields(obj, prefix):
    """Coerce and range-check every field of dataclass `obj` in place; errors name `prefix.field`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init or dataclasses.is_dataclass(hints[f.name]):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = coerce(getattr(obj, f.name), hints[f.name], key)
        check_range(value, f.metadata, key)
        object.__setattr__(obj, f.name, value)
    return obj
