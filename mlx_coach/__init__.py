"""mlx-coach: reinforcement learning for code-generating language models on MLX.

The packages are floors, lowest first; a module imports only from its own floor or lower ones
(tests/test_layout.py checks it). `cli` and the one-release re-exports (`mlx_coach.trainer`,
`mlx_coach.shaping`) stand above them all.
"""

__version__ = "0.1.0"

FLOORS = ("core", "runtime", "telemetry", "models", "engine", "data", "rewards", "config", "rl", "commands")
