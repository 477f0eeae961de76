"""mlx-coach: reinforcement learning for code-generating language models on MLX."""

__version__ = "0.1.0"
