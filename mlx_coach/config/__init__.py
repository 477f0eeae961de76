"""The config tree: every section in one `Config`, read from YAML and `--set`.

Each section is the dataclass of the package that reads it (`RolloutConfig` in engine, `CacheConfig`
in rewards, ...); `tree` assembles them, defines the trainer's own sections (model, data, algo, optim,
train) and checks fields across sections. May import every floor below. The public names of `tree`
are re-exported here.
"""

from mlx_coach.config.tree import (AlgoConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, from_dict,
                                   load_config, load_run_config, save_config, to_dict)

__all__ = ["AlgoConfig", "Config", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "from_dict",
           "load_config", "load_run_config", "save_config", "to_dict"]
