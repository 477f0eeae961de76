"""Moved to `mlx_coach.rewards.shaping`; this name re-exports it for one release, so reward specs such
as `function: mlx_coach.shaping:code_charset` keep working."""

from mlx_coach.rewards.shaping import code_charset, parses

__all__ = ["code_charset", "parses"]
