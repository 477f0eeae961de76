"""Run configuration: one dataclass per section, YAML loading, `--set key=value` overrides, validation.

Each section is the dataclass of the module that uses it (rollout: engine.rollout.RolloutConfig, cache:
rewards.cache.CacheConfig, memory: runtime.memory.MemoryConfig, telemetry: telemetry.writer.TelemetryConfig,
alerts: telemetry.alerts.AlertConfig, rewards[]: rewards.sources.RewardConfig, sandbox:
rewards.scoring.sandbox_config.SandboxConfig, teacher_server: rewards.teacher_server.TeacherServerConfig);
the trainer's own sections (model, data, algo, optim, train) are defined here. A field's type comes from
its annotation, its range or choices from `settings.setting(...)`. Unknown keys, wrong types and
out-of-range values raise `UserError` naming the dotted key, so the CLI prints one line and exits 2.
"""

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from mlx_coach.telemetry.alerts import AlertConfig
from mlx_coach.rewards.cache import CacheConfig
from mlx_coach.core.errors import UserError
from mlx_coach.runtime.memory import MemoryConfig
from mlx_coach.runtime.micro_batches import AUTO
from mlx_coach.data.procedural import DEFAULT_COUNT, DEFAULT_HELDOUT, check_families
from mlx_coach.rewards.sources import RewardConfig
from mlx_coach.engine.rollout import RolloutConfig
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
from mlx_coach.core.settings import check_range, coerce, setting as _f
from mlx_coach.config.dependent import check_dependent, check_store_folder, check_template
from mlx_coach.config.yaml_reader import check_finite, read_mapping
from mlx_coach.rewards.teacher_server import TeacherServerConfig
from mlx_coach.telemetry.writer import TelemetryConfig


@dataclass
class ModelConfig:
    path: str = _f("builtin:tiny", help="builtin:tiny[-4bit|-8bit][@SEED], builtin:smollm2[-4bit], a local HF "
                                        "folder, a hub id, or a .gguf file")
    dtype: Optional[str] = _f(None, choices=("float32", "bfloat16", "float16"),
                              help="compute dtype of the float parameters (a quantized layer computes in its "
                                   "scales' dtype); null = what the model folder says (config.json torch_dtype)")
    fine_tune: str = _f("lora", choices=("lora", "full"))
    lora_rank: int = _f(8, lo=1)
    lora_alpha: float = _f(16.0, lo=0.0, lo_open=True)
    lora_dropout: float = _f(0.0, lo=0.0, hi=0.9)
    lora_layers: int = _f(-1, lo=-1, help="how many of the last layers get adapters; -1 = all")
    lora_keys: Optional[list] = _f(None, help="module paths inside a layer, e.g. [self_attn.q_proj, self_attn.v_proj]")


@dataclass
class DataConfig:
    tasks: str = _f("builtin", help="builtin | humaneval | mbpp:PATH | PATH.jsonl | procedural | hf:NAME[:SPLIT]")
    val_fraction: float = _f(0.2, lo=0.0, hi=0.9, help="ignored by procedural (its held-out split is generated)")
    split_seed: int = _f(0)
    limit: int = _f(0, lo=0, help="use only the first N tasks (0 = all; procedural: N training tasks)")
    categories: Optional[list] = _f(None, help="keep only tasks whose category tag is listed")
    interleave_by: Optional[str] = _f(None, help="a task tag (procedural: template, category, difficulty): each "
                                                 "epoch takes the tasks round-robin over its values, so consecutive "
                                                 "steps cover different ones; null = one seeded shuffle")
    # procedural tasks (data.procedural): generated functions in five families, difficulty levels 1-5
    procedural_count: int = _f(DEFAULT_COUNT, lo=1, help="procedural: training tasks generated")
    procedural_heldout: int = _f(DEFAULT_HELDOUT, lo=0, help="procedural: held-out tasks (the validation split), "
                                                             "none with a training prompt")
    procedural_seed: int = _f(0, help="procedural: instance i of a split is a function of (seed, split, i)")
    difficulty_min: int = _f(1, lo=1, hi=5, help="procedural: easiest template level used")
    difficulty_max: int = _f(5, lo=1, hi=5, help="procedural: hardest template level used")
    families: Optional[list] = _f(None, help="procedural: strings, lists, arithmetic, dicts, parsing (null = all)")


@dataclass
class AlgoConfig:
    advantage: str = _f("grpo", choices=("grpo", "dr_grpo", "reinforce"))
    scale_rewards: str = _f("group", choices=("group", "batch", "none"))
    baseline_decay: float = _f(0.9, lo=0.0, hi=1.0)
    epsilon: float = _f(0.2, lo=0.0)
    epsilon_high: Optional[float] = _f(None, lo=0.0)
    num_iterations: int = _f(1, lo=1)
    aggregation: str = _f("auto", choices=("auto", "token", "sequence", "constant"),
                          help="what the policy loss averages over; auto: constant (B x max_new_tokens) under "
                               "advantage dr_grpo, token otherwise")
    importance_level: str = _f("token", choices=("token", "sequence"),
                               help="the PPO ratio per token, or per sequence as GSPO (length-normalised, "
                                    "clipped per sequence; GSPO uses a much smaller epsilon, e.g. 3e-4 / 4e-4)")
    sampler_correction: str = _f("none", choices=("none", "tis"),
                                 help="tis: weigh each token by min(pi_train / pi_sampler, algo.tis_cap) for the "
                                      "gap between the sampler's log-probs and the training forward's")
    tis_cap: float = _f(3.0, lo=1.0, help="sampler_correction tis: the largest importance weight")
    beta: float = _f(0.04, lo=0.0)
    kl_estimator: str = _f("k3", choices=("k1", "k2", "k3"))
    kl_in: str = _f("loss", choices=("loss", "reward"))
    kl_target: Optional[float] = _f(None, lo=0.0, lo_open=True, help="adaptive beta toward this KL")
    kl_horizon: int = _f(256, lo=1, help="adaptive beta: samples over which a KL error of x moves beta by 0.2x at most")
    kl_observe_every: int = _f(10, lo=0, help="with beta 0 and no kl_target nothing needs the reference pass: it runs "
                                              "(and kl/mean, kl/max, the kl_high alert with it) at step 1 and every "
                                              "N-th step only; 0 = never")
    entropy_coef: float = _f(0.0, lo=0.0, help="weight of the entropy bonus (raises entropy); 0 = off")
    mask_truncated: bool = _f(False)
    # signal in every batch (rl.dynamic_sampling)
    dynamic_sampling: bool = _f(False, help="drop prompt groups whose rewards are all equal and draw more prompts "
                                            "until the step holds rollout.prompts_per_step groups with signal (DAPO)")
    max_draw_factor: float = _f(3.0, lo=1.0, help="dynamic sampling: a step draws at most prompts_per_step x this "
                                                  "many prompts; then it trains on what it has")
    difficulty_weighting: bool = _f(False, help="take each task of the epoch order with a probability favouring "
                                                "running pass rates away from 0 and 1 (a task never scored: its level's "
                                                "rate, see difficulty_by_level, else always)")
    difficulty_floor: float = _f(0.1, lo=0.0, hi=1.0, lo_open=True,
                                 help="difficulty weighting: the lowest probability of taking a task")
    difficulty_by_level: bool = _f(True, help="difficulty weighting: a task not seen yet takes its level's recent "
                                              "pass rate (procedural tasks: family and difficulty) instead of "
                                              "always being taken, so the walk moves past saturated levels")
    difficulty_pool: str = _f("level", choices=("level", "template"),
                              help="difficulty_by_level: what a level is: family and difficulty, or the task's "
                                   "template (procedural tasks), which saturates on its own when learned")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, lo=0.0, lo_open=True)
    weight_decay: float = _f(0.0, lo=0.0)
    warmup_steps: int = _f(0, lo=0)
    schedule: str = _f("constant", choices=("constant", "cosine"))
    min_lr_ratio: float = _f(0.0, lo=0.0, hi=1.0)
    schedule_steps: int = _f(0, lo=0, help="length of the learning-rate schedule in steps; 0 = train.steps. "
                             "`mlx-coach train` fixes it when a run starts (the larger of train.steps and "
                             "--steps), so --steps and --resume only say where to stop")
    grad_clip: float = _f(1.0, lo=0.0, help="max global grad norm; 0 = off")
    grad_accum: object = _f("auto", help="micro-batches the reference pass and the update split a step's rows into: "
                            "an integer >= 1, or auto: each step the fewest whose predicted working memory each stays "
                            "within micro_batch_gb (runtime/micro_batches.py)")
    micro_batch_gb: float = _f(1.5, lo=0.0, lo_open=True, help="grad_accum auto: the memory plan's working memory "
                               "(activations and logits) one micro-batch may take, in GB")
    share_prompts: bool = _f(True, help="compute each group's prompt once for its G samples in the reference pass "
                             "and the update (models whose head splits off: llama, mistral, qwen2, qwen3)")


@dataclass
class TrainConfig:
    steps: int = _f(20, lo=1)
    seed: int = _f(0)
    checkpoint_every: int = _f(10, lo=0, help="0 = only at the end")
    output: str = _f("runs/tiny")
    epochs_val: bool = _f(True, help="score the validation split fresh at each epoch end")
    val_limit: int = _f(0, lo=0, help="score at most N validation tasks (0 = all)")
    val_max_new_tokens: int = _f(0, lo=0, help="0 = rollout.max_new_tokens")
    val_every: int = _f(0, lo=0, help="also score the validation split every N steps (logged as eval/pass@1, for "
                                      "learning curves of runs shorter than an epoch); 0 = at epoch ends only")
    debug_nan_steps: list = _f([], help="fault injection: make the loss NaN at these steps (tests the guard)")
    checksum_every: int = _f(10, lo=0, help="distributed runs: compare the ranks' parameter checksums every N "
                                            "steps and alert on drift (0 = never; ignored on one rank)")
    health_every: int = _f(10, lo=0, help="gradient norms by module group and grad/update_ratio at step 1 and "
                                          "every N-th step (two extra passes over the parameters); 0 = never")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    rewards: list = field(default_factory=lambda: [RewardConfig()])
    cache: CacheConfig = field(default_factory=CacheConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    teacher_server: TeacherServerConfig = field(default_factory=TeacherServerConfig)


# list fields whose items are dataclasses
_LIST_ITEMS = {("rewards",): RewardConfig}


# keys that moved to another section: a config that still uses them gets one line saying where
MOVED = {
    "model.chat_template": "rollout.chat_template",
    "model.extract_code": "rollout.extract_code",
    "telemetry.kl_max": "alerts.kl_max",
    "telemetry.lr_adjust": "alerts.lr_adjust",
    "telemetry.alerts": "alerts.enabled",
}


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if key in MOVED:
            raise UserError(f"config key '{key}' moved to '{MOVED[key]}'")
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
            kwargs[name] = coerce(value, tp, key)
            check_range(kwargs[name], fields[name].metadata, key)
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
    data = read_mapping(path) if path is not None else {}
    if overrides:
        # overrides may address keys that only defaults provide (e.g. rewards.0.weight)
        data = _merge(to_dict(Config()), data)
        apply_overrides(data, overrides)
    check_finite(data)
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
    a = cfg.algo
    if a.advantage in ("grpo", "dr_grpo") and cfg.rollout.group_size < 2:
        raise UserError("config key 'rollout.group_size' must be >= 2 for group-relative advantages")
    if a.epsilon_high is not None and a.epsilon_high < a.epsilon:
        raise UserError("config key 'algo.epsilon_high' must be >= algo.epsilon")
    if a.kl_in == "loss" and a.kl_estimator == "k1" and (a.beta > 0 or a.kl_target is not None):
        # E[grad k1] = E[grad log pi] = 0 under on-policy samples: the term would pull nowhere
        raise UserError("config key 'algo.kl_estimator': k1 in the loss has zero expected gradient; use k2 "
                        "(reverse-KL gradient) or k3 (forward-KL gradient) in the loss, or k1 with algo.kl_in: reward")
    if a.dynamic_sampling and a.advantage == "reinforce":
        raise UserError("config key 'algo.dynamic_sampling' needs group-relative advantages (algo.advantage: grpo "
                        "or dr_grpo): under reinforce an all-equal group still has non-zero advantages")
    if a.difficulty_weighting and not any(r.type == "tests" for r in cfg.rewards):
        raise UserError("config key 'algo.difficulty_weighting' weighs tasks by their test pass rate; add a "
                        "rewards item of type: tests")
    served = cfg.teacher_server.model is not None
    for i, r in enumerate(cfg.rewards):
        r.validate(f"rewards[{i}]", served)
    d = cfg.data
    if d.difficulty_min > d.difficulty_max:
        raise UserError(f"config key 'data.difficulty_min' ({d.difficulty_min}) must be <= data.difficulty_max "
                        f"({d.difficulty_max})")
    if d.families is not None:
        check_families(d.families)
    if cfg.model.lora_layers == 0:
        raise UserError("config key 'model.lora_layers' must be -1 (all) or a positive number of layers")
    if cfg.model.lora_keys is not None and not all(isinstance(k, str) for k in cfg.model.lora_keys):
        raise UserError("config key 'model.lora_keys' must be a list of strings")
    check_grad_accum(cfg.optim)
    check_template(cfg.rollout.user_template)
    check_dependent(cfg)
    check_store_folder(cfg.cache.sqlite_path)


def check_grad_accum(optim):
    """optim.grad_accum is auto or a whole number of micro-batches >= 1 (2.0 is read as 2)."""
    value = optim.grad_accum
    if value == AUTO:
        return
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"config key 'optim.grad_accum' must be auto or an integer >= 1; got {value!r}")
    optim.grad_accum = value


def save_config(cfg, path):
    """Write atomically (temporary file, fsync, rename): a kill leaves the old file or the new one,
    never an empty one that a resume would read as "all defaults"."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_run_config(path, overrides=None):
    """A run's own resolved config.yaml: like load_config, but an empty, unreadable or non-mapping
    file is refused (it would otherwise resume silently on the built-in defaults)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--resume: cannot read {path} ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or not data:
        raise UserError(f"--resume: {path} is empty or not a config (damaged?); restore it or start a new run")
    return load_config(path, overrides)
