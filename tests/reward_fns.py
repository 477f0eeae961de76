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


def odd_tasks_signal(prompts, completions, **columns):
    """Tasks "s/<odd>": a reward that differs between different completions (a digest of the text);
    tasks "s/<even>": 0.0 for every completion, so their groups are all equal (no signal)."""
    import hashlib

    out = []
    for c, task_id in zip(completions, columns["task_id"]):
        if int(task_id.rsplit("/", 1)[1]) % 2:
            out.append(int(hashlib.sha256(c.encode()).hexdigest()[:6], 16) / 16**6)
        else:
            out.append(0.0)
    return out


def distinct_kinds(prompts, completions, **columns):
    """Every sample of the batch gets the share of the 4 "kind" tag values its tasks cover."""
    kinds = {tags["kind"] for tags in columns["tags"]}
    return [len(kinds) / 4 for _ in completions]
