"""What a run fixes at its start: its tasks, its optimizer and schedule, and its seeded orders.

Randomness is a pure function of (seed, step) and (seed, epoch), and the learning-rate schedule's
length is optim.schedule_steps (fixed when a run starts), not where this invocation stops; so a run
stopped at step N and resumed to 2N replays a straight 2N run's samples and rates.
"""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_coach.core.errors import UserError
from mlx_coach.data.procedural import procedural_split
from mlx_coach.data.tasks import load_tasks, split_tasks


def step_seed(seed, step):
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**31)


def epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def select_tasks(data):
    """(training tasks, validation tasks). Procedural tasks come with their own held-out split;
    other sources are split by data.val_fraction."""
    if data.tasks.strip() == "procedural":
        tasks, val = procedural_split(data.procedural_count, data.procedural_heldout, data.procedural_seed,
                                      (data.difficulty_min, data.difficulty_max), data.families)
    else:
        tasks, val = load_tasks(data.tasks), None
    if data.categories:
        tasks = [t for t in tasks if t.tags.get("category") in data.categories]
        val = None if val is None else [t for t in val if t.tags.get("category") in data.categories]
    if data.limit:
        tasks = tasks[: data.limit]
    if not tasks:
        raise UserError(f"config key 'data.tasks': no tasks selected from {data.tasks!r}")
    return split_tasks(tasks, data.val_fraction, data.split_seed) if val is None else (tasks, val)


def schedule_steps(cfg):
    """The learning-rate schedule's length in steps: optim.schedule_steps, else train.steps."""
    return cfg.optim.schedule_steps or cfg.train.steps


def make_optimizer(optim_cfg, total_updates, scale=lambda: 1.0):
    """AdamW with warmup + constant/cosine; `scale()` multiplies the scheduled rate at every update
    (health adjustments lower the rate itself: with Adam, scaling gradients would change nothing)."""
    decay_steps = max(1, total_updates - optim_cfg.warmup_steps)
    if optim_cfg.schedule == "cosine":
        base = optim.cosine_decay(optim_cfg.lr, decay_steps, end=optim_cfg.lr * optim_cfg.min_lr_ratio)
    else:
        base = lambda _: mx.array(optim_cfg.lr)  # noqa: E731
    if optim_cfg.warmup_steps:
        warm = optim.linear_schedule(optim_cfg.lr / optim_cfg.warmup_steps, optim_cfg.lr, optim_cfg.warmup_steps)
        base = optim.join_schedules([warm, base], [optim_cfg.warmup_steps])
    return optim.AdamW(learning_rate=lambda step: base(step) * scale(), weight_decay=optim_cfg.weight_decay)
