"""Settings that mean something only beside another: one set while the other is off is refused.

A value that differs from its field's default while the setting it depends on leaves it unused would
change nothing, so the config says something the run does not do (a `teacher_server` no judge asks, a
judge's `timeout_s` on a tests reward). Also here: the fields a `rollout.user_template` may name,
and a `cache.sqlite_path` whose folder cannot hold the store (refused before any model is loaded).
"""

import dataclasses
import os
import re
from pathlib import Path

from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.judge_config import JudgeConfig

TEMPLATE_FIELDS = ("prompt",)  # what engine.text.encode_prompt replaces in rollout.user_template


def _default(obj, name):
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _set(obj, name):
    return getattr(obj, name) != _default(obj, name)


# A setting that only tunes another (tis_cap, max_draw_factor, difficulty_floor, difficulty_pool, kl_horizon,
# min_lr_ratio, lora_*, procedural_*, ttl_s) stays accepted while that one is off: `mlx-coach ab` turns the other on and
# off across the arms of one base config (`--policies lru,ttl` on a config with ttl_s), and its off arm is
# a valid run. Refused are those no arm would turn: a judge server no reward asks, and a reward item's
# settings of another type.
_SERVER_FIELDS = ("startup_timeout_s", "decode_concurrency")
_JUDGE_FIELDS = tuple(f.name for f in dataclasses.fields(JudgeConfig) if f.name != "model")
_TEACHER_FIELDS = ("low", "high", "batch_size")


def check_dependent(cfg):
    """UserError naming the first setting whose value the rest of the config leaves unused."""
    for name in _SERVER_FIELDS:
        if _set(cfg.teacher_server, name) and cfg.teacher_server.model is None:
            raise UserError(f"config key 'teacher_server.{name}' is used only with teacher_server.model; set that, "
                            f"or remove it")
    for i, r in enumerate(cfg.rewards):
        unused = [n for n in _JUDGE_FIELDS if r.type != "http-judge" and _set(r, n)]
        unused += [n for n in _TEACHER_FIELDS if r.type != "local-teacher" and _set(r, n)]
        unused += [n for n in ("model",) if r.type not in ("http-judge", "local-teacher") and _set(r, n)]
        unused += [n for n in ("function",) if r.type != "function" and _set(r, n)]
        if unused:
            raise UserError(f"config key 'rewards[{i}].{unused[0]}' is not used by a reward of type {r.type}")
    if cfg.teacher_server.model is not None and not any(r.type == "http-judge" and r.base_url is None
                                                        for r in cfg.rewards):
        raise UserError("config key 'teacher_server.model' starts a judge server that no reward asks: add a "
                        "rewards item of type http-judge with base_url null, or remove teacher_server")


def check_template(template, key="rollout.user_template"):
    """Every {field} of the template is one that encode_prompt fills."""
    unknown = [f for f in re.findall(r"\{(\w*)\}", template) if f not in TEMPLATE_FIELDS]
    if unknown:
        raise UserError(f"config key '{key}' names an unknown field {{{unknown[0]}}}; known: "
                        f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")


def check_store_folder(sqlite_path, key="cache.sqlite_path"):
    """The store's file can be created (or opened for writing) where the path says."""
    if sqlite_path is None:
        return
    path = Path(sqlite_path)  # as the store opens it (no ~ expansion)
    if path.is_dir():
        raise UserError(f"config key '{key}': {sqlite_path} is a folder; name a file in it")
    if not path.parent.is_dir():
        raise UserError(f"config key '{key}': the folder {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UserError(f"config key '{key}': cannot write to {path if path.exists() else path.parent}")
