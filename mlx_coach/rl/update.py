"""The update: num_iterations optimizer steps on one StepBatch, each from weighted micro-batches.

Each micro-batch is evaluated before the next one builds its graph, so peak memory is one
micro-batch's. optim.grad_accum N splits a step's rows into N near-equal runs; auto takes the fewest
micro-batches within optim.micro_batch_gb of predicted working memory (runtime/micro_batches.py), from the
step's rows alone. Micro-batches (and, on several ranks, the ranks) are weighted by their share of the
objective's normaliser, so the summed gradient is exactly the full batch's whatever the split. A non-finite loss or
gradient norm leaves weights and optimizer state exactly as they were (the step is not taken);
nothing is clamped. LoRA dropout is active here only, never while sampling. Not compiled (see
docs/decisions.md).
"""

import time
from dataclasses import dataclass, field, replace
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_coach.engine.buckets import round_up
from mlx_coach.engine.logprobs import logprob_inputs, logprobs_from_inputs
from mlx_coach.rl.batch import fit_width, micro_batches
from mlx_coach.rl.objective import loss_aggregation, micro_batch_loss, micro_batch_weight, normaliser
from mlx_coach.runtime.micro_batches import AUTO, budget_split
from mlx_coach.telemetry.health import grad_norms_by_group, update_ratio


@dataclass
class UpdateResult:
    """Per optimizer step of one update (num_iterations of them): what `step_metrics` reports."""

    skipped: int = 0  # optimizer steps not taken: non-finite loss or gradient
    loss: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    clip_frac: list = field(default_factory=list)
    pg_loss: list = field(default_factory=list)
    kl_loss: list = field(default_factory=list)
    ratio_mean: list = field(default_factory=list)
    entropy_mean: list = field(default_factory=list)
    sampler_mismatch: float = 0.0  # token mean of |pi_train / pi_sampler - 1| before the update
    health: bool = False  # whether update_ratio and group_norms were computed (train.health_every)
    update_ratio: list = field(default_factory=list)
    group_norms: dict = field(default_factory=dict)  # gradient norms by module group, last step taken
    seconds: float = 0.0
    shapes: list = field(default_factory=list)  # (rows, columns) of the update's forwards
    micro_batches: int = 0  # how many the step's rows were split into
    allreduce_s: float = 0.0  # this rank's time in the gradient all-reduce (several ranks), every iteration's
    real_tokens: int = 0  # real token positions among them


class Updater:
    def __init__(self, model, optimizer, *, algo, optim, bucket, share_prompts, temperature, max_len, world,
                 group_size=1, plan=None):
        """plan: the memory plan's (arch, RunShape) of the run (models/size.py plan_run), which
        optim.grad_accum auto needs; group_size: rows per prompt, consecutive."""
        self.model, self.optimizer, self.world = model, optimizer, world
        self.algo, self.optim, self.bucket, self.share_prompts = algo, optim, bucket, share_prompts
        self.group_size = group_size
        if optim.grad_accum == AUTO:
            if plan is None:
                raise ValueError("optim.grad_accum auto needs the run's memory plan")
            self.arch, self.shape = plan[0], replace(plan[1], share_prompts=share_prompts)
        self.temperature = temperature
        self.allreduce_s = 0.0  # the current update's time in the gradient all-reduce (several ranks)
        loss = partial(micro_batch_loss, algo=algo, temperature=temperature, max_len=max_len)
        self.loss_and_grad = nn.value_and_grad(
            model, lambda m, x, beta, first, nan: loss(m, x, beta, first_iteration=first, inject_nan=nan))

    def inputs(self, prompt_ids, completion_ids):
        return logprob_inputs(prompt_ids, completion_ids, bucket=self.bucket, share_prompts=self.share_prompts)

    def forwards(self, prompt_ids, completion_ids):
        """Each micro-batch's (rows, log-prob inputs): built once a step, for the reference pass, the
        memory manager's shapes and every iteration of the update."""
        return [(rows, self.inputs([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows]))
                for rows in self.split(prompt_ids, completion_ids)]

    def split(self, prompt_ids, completion_ids):
        """Row indices of each micro-batch: optim.grad_accum N near-equal runs, or auto's budget split."""
        n = len(completion_ids)
        if self.optim.grad_accum != AUTO:
            return micro_batches(n, self.optim.grad_accum)
        widths = partial(forward_widths, prompt_ids, completion_ids, self.share_prompts, self.bucket)
        return budget_split(self.arch, self.shape, n, self.group_size, self.optim.micro_batch_gb, widths)

    def micro_inputs(self, batch, rows, x):
        """One micro-batch's log-prob inputs `x` with the batch's per-token columns cut or padded to
        their width (rollout.bucket may round it up; the extra columns are masked)."""
        x = dict(x)
        width, index = x["targets"].shape[1], mx.array(rows)
        for key, column in (("sampler_logp", batch.behaviour_logp), ("ref_logp", batch.reference_logp),
                            ("loss_mask", mx.array(batch.loss_mask))):
            if column is not None:  # no reference on a step that needs none (Trainer.reference_needed)
                x[key] = fit_width(column[index], width)
        x["adv"] = batch.advantages[index]
        return x

    def old_logprobs(self, x):
        """pi_old for the iterations after the first: the training forward before any update (eval
        mode: no dropout), the same arrays as the update's own forward."""
        logp, _, _ = logprobs_from_inputs(self.model, x, temperature=self.temperature)
        return mx.stop_gradient(logp)

    def rank_weight(self, loss_mask):
        """size x this rank's share of the objective's normaliser over all ranks."""
        mine = float(normaliser(loss_mask, loss_aggregation(self.algo)))
        return self.world.size * max(mine, 1.0) / max(self.world.all_sum(mine), 1.0)

    def accumulate(self, batch, beta, chunks, inputs=None, first_iteration=True):
        """(grads, loss, stats) of the whole batch, summed over micro-batches each weighted by its
        share of the batch's normaliser, so they equal the full batch's; no update. On several ranks
        gradients, loss and stats are averaged, so every rank then clips and applies the same step.
        inputs: each chunk's `micro_inputs`, built once per update and reused by every iteration."""
        rank_weight = batch.rank_weight if self.world.size > 1 else 1.0
        aggregation = loss_aggregation(self.algo)
        inputs = inputs or [self.micro_inputs(batch, rows, x) for rows, x in self.forwards(batch.prompt_ids,
                                                                                          batch.completion_ids)]
        grads_sum, loss_sum, stats_sum = None, 0.0, {}
        for rows, x in zip(chunks, inputs):
            weight = micro_batch_weight(batch.loss_mask[rows], batch.loss_mask, aggregation) * rank_weight
            (loss, stats), grads = self.loss_and_grad(self.model, x, beta, first_iteration, batch.inject_nan)
            grads = tree_map(lambda g: g * weight, grads)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            loss_sum += loss * weight
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v * weight
            mx.eval(grads_sum, loss_sum, stats_sum)
        if self.world.size > 1:  # the micro-batches are evaluated: the timer measures the collectives alone
            t0 = time.perf_counter()
            grads_sum = nn.average_gradients(grads_sum)
            loss_sum = mx.distributed.all_sum(loss_sum) / self.world.size
            stats_sum = {k: mx.distributed.all_sum(v) / self.world.size for k, v in stats_sum.items()}
            mx.eval(grads_sum, loss_sum, stats_sum)
            self.allreduce_s += time.perf_counter() - t0
        return grads_sum, loss_sum, stats_sum

    def apply(self, grads, loss):
        """Clip, check and step: (clipped grads, norm, finite); no step unless finite."""
        if self.optim.grad_clip > 0:  # one norm serves the clip, the finite check and the log
            clipped, norm = clip_grad_norm(grads, self.optim.grad_clip)
        else:
            clipped, norm = grads, grad_global_norm(grads)
        finite = bool((mx.isfinite(loss) & mx.isfinite(norm)).item())
        if finite:
            self.optimizer.update(self.model, clipped)
            mx.eval(self.model.parameters(), self.optimizer.state)
        return clipped, norm, finite

    def run(self, batch, beta, health=True):
        """algo.num_iterations optimizer steps on one batch (the model in training mode meanwhile). health:
        also the gradient norms by module group and the update ratio (two more passes over the parameters)."""
        forwards = batch.forwards or self.forwards(batch.prompt_ids, batch.completion_ids)
        chunks = [rows for rows, _ in forwards]
        inputs = [self.micro_inputs(batch, rows, x) for rows, x in forwards]
        if self.algo.num_iterations > 1:
            for x in inputs:
                x["old_logp"] = self.old_logprobs(x)
                mx.eval(x["old_logp"])
        result = UpdateResult(health=health, micro_batches=len(forwards))
        self.allreduce_s = 0.0
        self.model.train()
        try:
            for iteration in range(self.algo.num_iterations):
                before = dict(tree_flatten(self.model.trainable_parameters())) if health else None  # no copy
                grads, loss, stats = self.accumulate(batch, beta, chunks, inputs, first_iteration=iteration == 0)
                clipped, norm, finite = self.apply(grads, loss)
                result.grad_norm.append(norm.item())
                result.loss.append(loss.item())
                for k in ("clip_frac", "pg_loss", "kl_loss", "ratio_mean", "entropy_mean"):
                    getattr(result, k).append(stats[k].item())
                if iteration == 0:  # before any update: the sampler against the training forward
                    result.sampler_mismatch = stats["sampler_mismatch"].item()
                if not finite:
                    result.skipped += 1
                    continue
                if not health:
                    continue
                result.group_norms = grad_norms_by_group(clipped)
                result.update_ratio.append(update_ratio(before, dict(tree_flatten(self.model.trainable_parameters()))))
        finally:
            self.model.eval()
        result.allreduce_s = self.allreduce_s
        return result

    def shapes(self, batch):
        """(rows, columns) of the update's forwards, and the real token positions among them."""
        shapes, real = [], 0
        for rows, x in batch.forwards or self.forwards(batch.prompt_ids, batch.completion_ids):
            if "prompt" in x:
                shapes += [tuple(x["prompt"].shape), (x["targets"].shape[0], x["targets"].shape[1] - 1)]
            else:
                shapes.append(tuple(x["inputs"].shape))
            if self.share_prompts:  # each distinct prompt of a micro-batch computed once
                real += (sum(len(p) for p in {tuple(batch.prompt_ids[i]) for i in rows})
                         + sum(len(batch.completion_ids[i]) for i in rows))
        if not self.share_prompts:
            real = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
        return shapes, real


def forward_widths(prompt_ids, completion_ids, share_prompts, bucket, rows):
    """(rows, distinct prompts, completion width, prompt width) of the log-prob forward of `rows`:
    logprob_inputs pads both widths to the longest, rounded up to the bucket; without shared prompts
    every row computes its own."""
    prompts = {tuple(prompt_ids[i]) for i in rows}
    completion = round_up(max(1, max(len(completion_ids[i]) for i in rows)), bucket)
    prompt = round_up(max(len(p) for p in prompts), bucket)
    return len(rows), len(prompts) if share_prompts else len(rows), completion, prompt


def on_cadence(step, every):
    """Whether a cadence of every N steps includes step (1-based): step 1, whose figures anchor the
    dashboard's curves and show a broken setup at once, and every N-th step; every 0: never."""
    return every > 0 and (step == 1 or step % every == 0)


def grad_global_norm(grads):
    """sqrt of the sum of squares over every leaf of a gradient tree (float32)."""
    total = mx.array(0.0)
    for _, g in tree_flatten(grads):
        total = total + mx.sum(mx.square(g.astype(mx.float32)))
    return mx.sqrt(total)


def clip_grad_norm(grads, max_norm):
    """Scale grads so their global norm is at most max_norm. Returns (grads, norm).

    A NaN or Inf norm leaves the grads untouched and is returned as is, so the caller can see it
    and skip the step; scaling would turn inf entries into NaN and finite ones into 0.
    """
    norm = grad_global_norm(grads)
    scale = mx.where(mx.isfinite(norm) & (norm > max_norm), max_norm / norm, 1.0)
    return tree_map(lambda g: g * scale.astype(g.dtype), grads), norm
