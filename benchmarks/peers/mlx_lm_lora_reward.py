"""The peer job's reward for mlx-lm-lora (its --reward-functions-file): `peer_tasks.reward`, the dataset's
`answer` field holding the task's index in benchmarks/step_tasks.jsonl."""

import sys
from pathlib import Path

from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_tasks  # noqa: E402

TASKS = peer_tasks.load_tasks()


@register_reward_function("peer_reward")
def peer_reward(prompts, completions, answer, types=None):
    return [peer_tasks.reward(text, TASKS[int(i)]) for text, i in zip(completions, answer)]
