"""The Mac recipes (not run here: no Mac, no hub) load and validate through the same config path as every run,
and hold the values their purpose needs: a 4-bit hub model trained through LoRA, an update sized for the
memory estimate that fits a 16 GB Mac, and the prompt and adapters of the recipe measured here (smollm2)."""

from pathlib import Path

import pytest

from mlx_coach.config.tree import load_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name, hub_id, rows_per_micro_batch", [
    ("qwen2.5-coder-0.5b.yaml", "mlx-community/Qwen2.5-Coder-0.5B-Instruct-4bit", 4),
    ("qwen2.5-coder-1.5b.yaml", "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit", 4),
])
def test_mac_recipes_load_and_hold_what_their_memory_estimate_assumes(name, hub_id, rows_per_micro_batch):
    cfg = load_config(CONFIGS / name)  # parses and validates, or raises UserError
    assert cfg.model.path == hub_id and cfg.model.fine_tune == "lora"
    # the memory estimate (16 GB Mac) is per micro-batch of the update: this many rows, the step split evenly
    rows = cfg.rollout.group_size * cfg.rollout.prompts_per_step
    assert rows % cfg.optim.grad_accum == 0 and rows // cfg.optim.grad_accum == rows_per_micro_batch
    # a recipe for code: procedural tasks, rewarded by the tasks' unit tests
    assert cfg.data.tasks == "procedural" and [r.type for r in cfg.rewards] == ["tests"]
    # the prompt and the adapters of the recipe measured on this project's machine
    measured = load_config(CONFIGS / "smollm2.yaml")
    for key in ("chat_template", "extract_code", "stop_after_code", "system_prompt", "user_template"):
        assert getattr(cfg.rollout, key) == getattr(measured.rollout, key), key
    assert (cfg.model.lora_rank, cfg.model.lora_layers, cfg.model.lora_keys) == \
        (measured.model.lora_rank, measured.model.lora_layers, measured.model.lora_keys)
    # the chat prompt wraps the stub in a fenced block; what is scored stays the task's prompt + completion
    user = cfg.rollout.user_template.replace("{prompt}", "def f(x):\n")
    assert "```python\ndef f(x):\n```" in user and cfg.rollout.extract_code and cfg.rollout.chat_template
