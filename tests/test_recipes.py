"""The Mac recipes (not run here: no Mac, no hub) load through the same config path as every run."""

from pathlib import Path

import pytest

from mlx_coach.config.tree import load_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name, hub_id, rows_per_micro_batch", [
    ("qwen2.5-coder-0.5b.yaml", "mlx-community/Qwen2.5-Coder-0.5B-Instruct-4bit", 4),
    ("qwen2.5-coder-1.5b.yaml", "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit", 4),
])
def test_mac_recipes_load_and_match_their_memory_notes(name, hub_id, rows_per_micro_batch):
    path = CONFIGS / name
    cfg = load_config(path)
    assert cfg.model.path == hub_id and cfg.model.fine_tune == "lora"
    # the memory estimate in the file's header assumes this many rows per micro-batch of the update
    rows = cfg.rollout.group_size * cfg.rollout.prompts_per_step
    assert rows / cfg.optim.grad_accum == rows_per_micro_batch
    assert f"grad_accum {cfg.optim.grad_accum} ({rows_per_micro_batch} rows per" in " ".join(
        line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#"))
    assert "NOT RUN HERE" in path.read_text()
    # the chat prompt wraps the stub in a fenced block; what is scored stays the task's prompt + completion
    user = cfg.rollout.user_template.replace("{prompt}", "def f(x):\n")
    assert "```python\ndef f(x):\n```" in user and cfg.rollout.extract_code and cfg.rollout.chat_template
