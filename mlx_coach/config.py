"""Run configuration: dataclasses, YAML loading, `--set key=value` overrides, validation.

Every field's type comes from its annotation; ranges and choices come from field metadata
(`_f(default, lo=, hi=, choices=)`). Unknown keys, wrong types and out-of-range values raise
`UserError` naming the dotted key, so the CLI can print one line and exit 2.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from .errors import UserError


def _f(default, *, lo=None, hi=None, choices=None, lo_open=False, help=""):
    meta = {"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f("builtin:tiny", help="builtin:tiny[@SEED], a local HF folder, a hub id, or a .gguf file")
    fine_tune: str = _f("lora", choices=("lora", "full"))
    lora_rank: int = _f(8, lo=1)
    lora_alpha: float = _f(16.0, lo=0.0, lo_open=True)
    lora_dropout: float = _f(0.0, lo=0.0, hi=0.9)
    lora_layers: int = _f(-1, lo=-1, help="how many of the last layers get adapters; -1 = all")
    lora_keys: Optional[list] = _f(None, help="module paths inside a layer, e.g. [self_attn.q_proj, self_attn.v_proj]")
    chat_template: bool = _f(False)
    extract_code: bool = _f(False, help="score the code of the first fenced block of the answer")


@dataclass
class DataConfig:
    tasks: str = _f("builtin", help="builtin | humaneval | mbpp:PATH | PATH.jsonl")
    val_fraction: float = _f(0.2, lo=0.0, hi=0.9)
    split_seed: int = _f(0)
    limit: int = _f(0, lo=0, help="use only the first N tasks (0 = all)")
    categories: Optional[list] = _f(None, help="keep only tasks whose category tag is listed")


@dataclass
class RolloutSettings:
    group_size: int = _f(4, lo=1)
    prompts_per_step: int = _f(4, lo=1)
    max_new_tokens: int = _f(64, lo=1)
    temperature: float = _f(1.0, lo=0.0)
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    max_batch_tokens: int = _f(16384, lo=1)
    stop: Optional[list] = _f(None, help="stop strings; null = HumanEval-style defaults")


@dataclass
class AlgoConfig:
    advantage: str = _f("grpo", choices=("grpo", "dr_grpo", "reinforce"))
    scale_rewards: str = _f("group", choices=("group", "batch", "none"))
    baseline_decay: float = _f(0.9, lo=0.0, hi=1.0)
    epsilon: float = _f(0.2, lo=0.0)
    epsilon_high: Optional[float] = _f(None, lo=0.0)
    num_iterations: int = _f(1, lo=1)
    aggregation: str = _f("token", choices=("token", "sequence", "constant"))
    beta: float = _f(0.04, lo=0.0)
    kl_estimator: str = _f("k3", choices=("k1", "k2", "k3"))
    kl_in: str = _f("loss", choices=("loss", "reward"))
    kl_target: Optional[float] = _f(None, lo=0.0, lo_open=True, help="adaptive beta toward this KL")
    kl_horizon: int = _f(10000, lo=1)
    entropy_coef: float = _f(0.0)
    mask_truncated: bool = _f(False)


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, lo=0.0, lo_open=True)
    weight_decay: float = _f(0.0, lo=0.0)
    warmup_steps: int = _f(0, lo=0)
    schedule: str = _f("constant", choices=("constant", "cosine"))
    min_lr_ratio: float = _f(0.0, lo=0.0, hi=1.0)
    grad_clip: float = _f(1.0, lo=0.0, help="max global grad norm; 0 = off")
    grad_accum: int = _f(1, lo=1)


@dataclass
class TrainConfig:
    steps: int = _f(20, lo=1)
    seed: int = _f(0)
    checkpoint_every: int = _f(10, lo=0, help="0 = only at the end")
    output: str = _f("runs/tiny")
    epochs_val: bool = _f(True, help="score the validation split fresh at each epoch end")
    val_limit: int = _f(0, lo=0, help="score at most N validation tasks (0 = all)")
    val_max_new_tokens: int = _f(0, lo=0, help="0 = rollout.max_new_tokens")
    debug_nan_steps: list = _f([], help="fault injection: make the loss NaN at these steps (tests the guard)")


@dataclass
class SandboxSettings:
    timeout_s: float = _f(5.0, lo=0.0, lo_open=True)
    memory_mb: int = _f(1024, lo=16)
    workers: int = _f(0, lo=0, help="0 = CPU count")
    partial_credit: bool = _f(False)
    site_packages: bool = _f(False, help="let samples import third-party packages (slower start-up)")


@dataclass
class RewardConfig:
    type: str = _f("tests", choices=("tests", "function", "http-judge", "local-teacher"))
    weight: float = _f(1.0)
    name: Optional[str] = _f(None)
    function: Optional[str] = _f(None, help="module:function for type=function")
    # http-judge
    base_url: Optional[str] = _f(None)
    model: Optional[str] = _f(None, help="judge model name (http-judge) or teacher model path (local-teacher)")
    api_key_env: Optional[str] = _f(None)
    timeout_s: float = _f(30.0, lo=0.0, lo_open=True)
    max_retries: int = _f(2, lo=0)
    backoff_s: float = _f(0.5, lo=0.0)
    max_backoff_s: float = _f(8.0, lo=0.0)
    breaker_threshold: int = _f(5, lo=1)
    breaker_reset_s: float = _f(30.0, lo=0.0)
    max_tokens: int = _f(256, lo=1)
    concurrency: int = _f(4, lo=1)
    fallback: float = _f(0.0)
    use_reference: bool = _f(False)
    # local-teacher
    low: float = _f(-6.0)
    high: float = _f(0.0)
    batch_size: int = _f(8, lo=1)


@dataclass
class CacheSettings:
    policy: str = _f("lru", choices=("none", "lru", "ttl", "lru+ttl", "epoch-clear"))
    maxsize: int = _f(100_000, lo=1)
    ttl_s: float = _f(3600.0, lo=0.0, lo_open=True)
    sqlite_path: Optional[str] = _f(None)


@dataclass
class MemorySettings:
    cache_limit: Optional[float] = _f(None, lo=0.0, help="bytes, or a fraction (0,1] of device memory")
    memory_limit: Optional[float] = _f(None, lo=0.0)
    wired_limit: Optional[float] = _f(None, lo=0.0)
    clear_fragmentation: float = _f(0.5, lo=0.0, hi=1.0)
    clear_cache_gb: Optional[float] = _f(None, lo=0.0)
    clear_every: int = _f(0, lo=0)
    clear_fraction: float = _f(0.5, lo=0.0, hi=1.0)


@dataclass
class TelemetrySettings:
    tensorboard: bool = _f(True)
    phase_bounds: list = _f([1 / 3, 2 / 3])
    progress: bool = _f(True)
    alerts: bool = _f(True)
    kl_max: float = _f(1.0, lo=0.0)
    lr_adjust: bool = _f(False)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    rewards: list = field(default_factory=lambda: [RewardConfig()])
    cache: CacheSettings = field(default_factory=CacheSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)


# list fields whose items are dataclasses
_LIST_ITEMS = {("rewards",): RewardConfig}


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value, tp, key):
    tp, optional = _unwrap_optional(tp)
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
    if tp is list or typing.get_origin(tp) is list:
        if isinstance(value, list):
            return value
        raise UserError(f"config key '{key}' must be a list, got {value!r}")
    return value


def _check_range(value, meta, key):
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise UserError(f"config key '{key}' must be {op} {lo}; got {value!r}")
    if hi is not None and value > hi:
        raise UserError(f"config key '{key}' must be <= {hi}; got {value!r}")


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise UserError(f"unknown config key '{key}'")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        path = tuple(key.split("."))
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key)
        elif path in _LIST_ITEMS:
            if not isinstance(value, list) or not value:
                raise UserError(f"config key '{key}' must be a non-empty list")
            kwargs[name] = [_build(_LIST_ITEMS[path], v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, tp, key)
            _check_range(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def _parse_scalar(text):
    """A --set value is read as YAML, so 3 is an int, 1e-4 a float, [a, b] a list, null None."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 1e-4 as a string; accept it as a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data, overrides):
    """Apply `section.key=value` strings to a nested dict (before validation)."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set expects section.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise UserError(f"--set has an empty key in {item!r}")
        node = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, ".".join(parts[: i + 1]))
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"--set: '{'.'.join(parts[:i + 1])}' is not a section")
        if isinstance(node, list):
            raise UserError(f"--set: '{dotted}' names a list item, not a key")
        node[parts[-1]] = _parse_scalar(text)
    return data


def _list_item(node, part, key):
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set: '{key}' is not an item of the list (0..{len(node) - 1})")
    return node[int(part)]


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(data):
    return _build(Config, data or {}, "")


def load_config(path=None, overrides=None):
    """Load YAML (or defaults when path is None), apply overrides, validate."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if overrides:
        # overrides may address keys that only defaults provide (e.g. rewards.0.weight)
        data = _merge(to_dict(Config()), data)
        apply_overrides(data, overrides)
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def _merge(base, top):
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg):
    """Cross-field checks that single-field metadata cannot express."""
    lo, hi = (cfg.telemetry.phase_bounds + [None, None])[:2]
    if len(cfg.telemetry.phase_bounds) != 2 or not (0 < lo < hi < 1):
        raise UserError("config key 'telemetry.phase_bounds' must be two fractions 0 < early < late < 1")
    if cfg.algo.advantage in ("grpo", "dr_grpo") and cfg.rollout.group_size < 2:
        raise UserError("config key 'rollout.group_size' must be >= 2 for group-relative advantages")
    if cfg.algo.epsilon_high is not None and cfg.algo.epsilon_high < cfg.algo.epsilon:
        raise UserError("config key 'algo.epsilon_high' must be >= algo.epsilon")
    for i, r in enumerate(cfg.rewards):
        key = f"rewards[{i}]"
        if r.type == "function" and (not r.function or ":" not in r.function):
            raise UserError(f"config key '{key}.function' must be module:function")
        if r.type == "http-judge" and (not r.base_url or not r.model):
            raise UserError(f"config key '{key}.base_url' and '{key}.model' are required for http-judge")
        if r.type == "local-teacher" and not r.model:
            raise UserError(f"config key '{key}.model' is required for local-teacher")
        if r.type == "local-teacher" and not r.low < r.high:
            raise UserError(f"config key '{key}.low' must be < '{key}.high'")
    if cfg.model.lora_layers == 0:
        raise UserError("config key 'model.lora_layers' must be -1 (all) or a positive number of layers")
    if cfg.model.lora_keys is not None and not all(isinstance(k, str) for k in cfg.model.lora_keys):
        raise UserError("config key 'model.lora_keys' must be a list of strings")
    if cfg.rollout.stop is not None and not all(isinstance(s, str) and s for s in cfg.rollout.stop):
        raise UserError("config key 'rollout.stop' must be a list of non-empty strings")


def save_config(cfg, path):
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
