"""Micro-batches chosen from a memory budget: `optim.grad_accum: auto`.

A step's rows are G consecutive rows per prompt. `budget_split` returns the fewest micro-batches whose
predicted working memory each stays within the budget (`optim.micro_batch_gb`): whole groups while a
micro-batch can hold one (under optim.share_prompts each distinct prompt is computed once per micro-batch),
then equal parts of each group, then one row each, the most it can do. A micro-batch's working memory is the
memory plan's (runtime/memory_plan.py `predict`) for those rows at the widths their forward is padded to:
the update's kept activations and logits, or the reference pass's logits if larger (the two run one after
the other, never at once); the gradient sum and the resident state are the same at every count and outside
the budget. The objective needs no whole groups (advantages are computed on the whole batch before the
update), so parts of a group are only slower, never different.

The split reads nothing but the rows' token counts and the settings: a resumed run splits each step as
the straight run did. `planned_count` is the count for rows as long as the run allows (prompts as long as
the plan estimates them). `auto_plan` is the memory plan of such a run: a step whose rows are shorter may
take fewer, larger micro-batches, each up to the budget, so its peak is bounded by the budget, not by the
count's share of the longest rows.
"""

import math
from dataclasses import replace
from functools import lru_cache

from mlx_coach.runtime.distributed import shard_bounds
from mlx_coach.runtime.memory_plan import GB, RSS_BASE, RSS_PER_MLX, predict

AUTO = "auto"


def working_bytes(arch, shape, rows, prompts, completion_width, prompt_width):
    """Predicted working memory of one micro-batch of `rows` rows over `prompts` distinct prompts whose
    forward is `completion_width` completion and `prompt_width` prompt positions wide."""
    per_prompt = math.ceil(rows / prompts)  # prompts x per_prompt rows: rows itself when the groups are whole
    parts = predict(arch, replace(shape, group_size=per_prompt, prompts_per_step=prompts, grad_accum=1,
                                  max_new_tokens=completion_width, prompt_tokens=prompt_width)).parts
    return max(parts["update_activations"] + parts["update_logits"], parts["reference_pass"])


def candidate_splits(n, group_size):
    """Row-index lists of each candidate split of n rows, fewest micro-batches first: k runs of whole
    groups for k = 1..groups, then each group in m near-equal parts for m = 2..group_size."""
    groups = [list(range(start, min(start + group_size, n))) for start in range(0, n, group_size)]
    for k in range(1, len(groups) + 1):
        yield [[r for g in run for r in g] for run in _near_equal(groups, k)]
    for m in range(2, group_size + 1):
        yield [part for g in groups for part in _near_equal(g, m) if part]


def budget_split(arch, shape, n, group_size, budget_gb, widths):
    """Row-index lists of the fewest micro-batches of n rows whose predicted working memory each is within
    budget_gb; one row each when no split is. widths(rows) -> (rows, distinct prompts, completion width,
    prompt width) of the forward of those rows."""
    cost = lru_cache(maxsize=None)(lambda *key: working_bytes(arch, shape, *key))
    split = []
    for split in candidate_splits(n, max(1, group_size)):
        if all(cost(*widths(rows)) <= budget_gb * GB for rows in split):
            break
    return split


def planned_count(arch, shape, budget_gb):
    """How many micro-batches `budget_split` picks when every prompt is shape.prompt_tokens long and every
    completion shape.max_new_tokens: the count the memory plan predicts a run under grad_accum auto with.
    Found by bisection over the candidates (their largest micro-batches only shrink), so a huge group
    costs a few predictions."""
    groups, size = shape.prompts_per_step, shape.group_size

    def largest(i):  # (count, rows, distinct prompts) of candidate i's largest micro-batch
        if i < groups:
            run = -(-groups // (i + 1))
            return i + 1, run * size, run
        parts = i - groups + 2
        return groups * parts, -(-size // parts), 1

    def fits(i):
        _, rows, prompts = largest(i)
        prompts = prompts if shape.share_prompts else rows
        return working_bytes(arch, shape, rows, prompts, shape.max_new_tokens, shape.prompt_tokens) <= budget_gb * GB

    lo, hi = 0, groups + size - 2  # the last candidate, one row each, is taken even when over budget
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return largest(lo)[0]


def auto_plan(arch, shape, budget_gb):
    """(count, Plan) of a run under grad_accum auto: `planned_count`, and the peak of the worst step auto
    may take. At the count, the longest rows' micro-batches may hold well under the budget; a step of shorter
    rows then takes fewer micro-batches, each at most the budget's working memory (or, if less, that of one
    micro-batch of all the longest rows). The update phase is planned at that bound (part
    "auto_working_bound")."""
    count = planned_count(arch, shape, budget_gb)
    plan = predict(arch, replace(shape, grad_accum=count))
    rows = shape.group_size * shape.prompts_per_step
    prompts = shape.prompts_per_step if shape.share_prompts else rows
    worst = min(budget_gb * GB, working_bytes(arch, shape, rows, prompts, shape.max_new_tokens, shape.prompt_tokens))
    parts = plan.parts
    bound = (parts["weights"] + parts["reference"] + parts["trainable_state"] + parts["update_gradients"] + worst)
    if count > 1 and bound > plan.mlx_peak:
        plan = replace(plan, parts={**parts, "auto_working_bound": worst}, mlx_peak=bound,
                       rss_peak=RSS_BASE + RSS_PER_MLX * bound, phase="update")
    return count, plan


def _near_equal(items, k):
    """items in k consecutive runs whose lengths differ by at most one, longer runs first (as ranks share
    a step: runtime.distributed.shard_bounds)."""
    return [items[slice(*shard_bounds(len(items), k, i))] for i in range(k)]
