"""Moved to `mlx_coach.rl.trainer`; this name re-exports it for one release."""

from mlx_coach.rl.trainer import Trainer, train

__all__ = ["Trainer", "train"]
