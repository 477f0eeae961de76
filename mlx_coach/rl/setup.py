"""What a run fixes at its start: its tasks, its optimizer and schedule, and its seeded orders.

Randomness is a pure function of (seed, step) and (seed, epoch), and the learning-rate schedule's
length is optim.schedule_steps (fixed when a run starts), not where this invocation stops; so a run
stopped at step N and resumed to 2N replays a straight 2N run's samples and rates.
"""

from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_coach.core.errors import UserError
from mlx_coach.data.procedural import procedural_split
from mlx_coach.data.tasks import load_tasks, split_tasks
from mlx_coach.runtime.rundir import copy_folder, written_whole


def epoch_order(n, seed, epoch, groups=None):
    """The epoch's order of the n training tasks: a permutation seeded by (seed, epoch). With `groups`
    (one key per task, from data.interleave_by) the tasks come round-robin over the keys: each key's
    tasks in seeded order, each round visiting the keys that still hold tasks in a new seeded order, so
    a run of consecutive draws spreads over the keys instead of clustering on a few."""
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(n).tolist()
    if groups is None:
        return shuffled
    queues = {}
    for i in shuffled:
        queues.setdefault(groups[i], []).append(i)
    queues, order = list(queues.values()), []
    while queues:
        order += [queues[j].pop() for j in rng.permutation(len(queues)).tolist()]
        queues = [q for q in queues if q]
    return order


def run_order(tasks, cfg, epoch):
    """The run's order of its training tasks for an epoch: epoch_order under train.seed and data.interleave_by."""
    return epoch_order(len(tasks), cfg.train.seed, epoch, interleave_groups(tasks, cfg.data.interleave_by))


def interleave_groups(tasks, tag):
    """Each task's value of the tag data.interleave_by names (None: no interleaving)."""
    if tag is None:
        return None
    groups = [t.tags.get(tag) for t in tasks]
    if all(g is None for g in groups):
        raise UserError(f"config key 'data.interleave_by': no training task has the tag {tag!r}")
    return groups


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


def make_optimizer(optim_cfg, steps, iterations=1, scale=lambda: 1.0):
    """AdamW with warmup + constant/cosine over `steps` x `iterations` optimizer updates (the schedule
    counts updates, so warmup_steps, given in steps, is scaled by the iterations too); `scale()`
    multiplies the scheduled rate at every update (health adjustments lower the rate itself: with
    Adam, scaling gradients would change nothing)."""
    total, warmup = steps * iterations, optim_cfg.warmup_steps * iterations
    decay_steps = max(1, total - warmup)
    if optim_cfg.schedule == "cosine":
        base = optim.cosine_decay(optim_cfg.lr, decay_steps, end=optim_cfg.lr * optim_cfg.min_lr_ratio)
    else:
        base = lambda _: mx.array(optim_cfg.lr)  # noqa: E731
    if warmup:
        warm = optim.linear_schedule(optim_cfg.lr / warmup, optim_cfg.lr, warmup)
        base = optim.join_schedules([warm, base], [warmup])
    return optim.AdamW(learning_rate=lambda step: base(step) * scale(), weight_decay=optim_cfg.weight_decay)


def check_shards(n_tasks, per_step, algo, size):
    """Every rank needs at least one prompt in every step, the epoch's last (shorter) step included."""
    if size > 1 and (algo.dynamic_sampling or algo.difficulty_weighting):
        # both change how many prompts a step holds, which the ranks' contiguous shards assume fixed
        key = "dynamic_sampling" if algo.dynamic_sampling else "difficulty_weighting"
        raise UserError(f"config key 'algo.{key}' is not supported with several ranks yet; turn it off")
    smallest = min(per_step, n_tasks % per_step or per_step, n_tasks)
    if smallest < size:
        raise UserError(f"config key 'rollout.prompts_per_step': {n_tasks} training tasks in steps of {per_step} "
                        f"leave a step of {smallest} prompts, fewer than the {size} ranks; make each step hold at "
                        f"least {size} prompts (prompts_per_step, data.limit)")


def base_model_folder(model_info, run_dir, is_main):
    """The base model that adapter_config.json names. A builtin model is created in code, so its HF
    folder is copied into the run directory (by rank 0), whole or not at all (WriteFailed): the run then
    loads anywhere with mlx-lm."""
    if model_info.get("kind") != "builtin":
        return model_info["path"]
    target = Path(run_dir) / "base_model"
    if is_main and not (target / "config.json").is_file():
        with written_whole(target) as tmp:
            copy_folder(model_info["path"], tmp)
    return str(target.resolve())
