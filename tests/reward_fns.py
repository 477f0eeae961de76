"""User reward functions for tests (referenced from configs as `reward_fns:NAME`)."""

TARGET = "a"


def target_share(prompts, completions, **columns):
    """Share of characters of the completion that are the target letter: a dense, learnable signal."""
    assert len(prompts) == len(completions) == len(columns["task_id"])
    return [c.count(TARGET) / max(len(c), 1) for c in completions]


def zero(prompts, completions, **columns):
    return [0.0 for _ in completions]


async def async_length(prompts, completions, **columns):
    return [None if not c else min(len(c), 10) / 10 for c in completions]


def nan_reward(prompts, completions, **columns):
    return [float("nan") for _ in completions]
