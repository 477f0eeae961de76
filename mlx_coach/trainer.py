"""Moved to `mlx_coach.rl.trainer` (Trainer) and `mlx_coach.rl.loop` (train); re-exported here for one release."""

from mlx_coach.rl.trainer import Trainer
from mlx_coach.rl.loop import train

__all__ = ["Trainer", "train"]
