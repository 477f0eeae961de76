"""A step's metrics from its batch and its update, in one block (as CleanRL logs).

`step_metrics` is a pure function: the per-sample columns and generation totals it reads are
gathered from every rank beforehand (`sample_columns`, `Trainer.gather`), so one rank and several
give the same numbers. What depends on the run's history (EMAs, the learning rate, cache and memory
counters, phase tables) is added by the trainer.
"""

import math

import mlx.core as mx
import numpy as np

from mlx_coach.rewards.scoring.base import UNJUDGED_STATUSES as STATUSES_APART
from mlx_coach.rewards.sources import PROVENANCES
from mlx_coach.rl.objective import zero_std_fraction



def sample_columns(batch, sources):
    """This rank's per-sample columns, to be gathered over ranks in rank order."""
    scores = batch.scores
    return {
        "total": [s.total for s in scores],
        **{provenance: [s.provenance == provenance for s in scores] for provenance in PROVENANCES},
        "passed": [s.passed for s in scores], "truncated": batch.truncated,
        "comp_len": [len(c) for c in batch.completion_ids],
        **{f"status/{st}": [st in s.statuses.values() for s in scores] for st in STATUSES_APART},
        **{f"part/{src.name}": [s.parts.get(src.name, math.nan) for s in scores] for src in sources}}


def step_metrics(batch, result, columns, entropies, gen, group_size, source_names):
    """reward/*, loss/*, kl/*, policy/*, grad/*, gen/* and update/* of one step.

    columns: `sample_columns` of every rank; entropies: every sampled token's; gen: tokens, tok/s
    (summed over ranks) and phase times (the slowest rank's)."""
    rewards = np.array(columns["total"], dtype=np.float32)
    fresh = [v for v, f in zip(columns["total"], columns["fresh"]) if f]
    cached = [v for v, c in zip(columns["total"], columns["cached"]) if c]
    counts = {provenance: int(sum(columns[provenance])) for provenance in PROVENANCES}
    stats = batch.rollout_stats
    computed = sum(rows * cols for rows, cols in result.shapes)
    metrics = {
        "reward/mean": float(np.mean(rewards)), "reward/std": float(np.std(rewards)),
        # count = graded samples (fresh + cached + duplicate); fresh = scorer calls; fallback and unjudged
        # samples are apart: they carry no gradient
        "reward/count": counts["fresh"] + counts["cached"] + counts["duplicate"],
        **{f"reward/{provenance}_count": counts[provenance] for provenance in PROVENANCES},
        "reward/fallback_frac": counts["fallback"] / len(columns["total"]),
        "reward/frac_zero_std": float(zero_std_fraction(mx.array(rewards), group_size)),
        # the mean of no samples is undefined: NaN, never a made-up 0
        "reward/fresh_mean": float(np.mean(fresh)) if fresh else float("nan"),
        "reward/cached_mean": float(np.mean(cached)) if cached else float("nan"),
        **{f"reward/{status}_count": sum(bool(v) for v in columns[f"status/{status}"]) for status in STATUSES_APART},
        "loss/total": float(np.mean(result.loss)), "loss/policy": float(np.mean(result.pg_loss)),
        "loss/kl": float(np.mean(result.kl_loss)),
        "kl/beta": batch.beta,
        "policy/sampler_mismatch": result.sampler_mismatch,
        "policy/clip_frac": float(np.mean(result.clip_frac)),
        "policy/ratio_mean": float(np.mean(result.ratio_mean)),
        "policy/entropy": float(np.mean(entropies)) if entropies else 0.0,
        "grad/norm": float(result.grad_norm[-1]),
        "train/pass_rate": float(np.mean(columns["passed"])),
        **gen,
        "gen/completion_len_mean": float(np.mean(columns["comp_len"])),
        "gen/truncated_frac": float(np.mean(columns["truncated"])),
        # positions computed for no sequence (prompt padding, finished rows kept for the bucket; the
        # update's right padding): the cost of shape bucketing, next to memory/new_shapes, its gain
        "gen/padding_frac": stats.padding_tokens / max(stats.padding_tokens + stats.prefill_tokens
                                                       + stats.decode_tokens, 1),
        "gen/rows_per_forward": stats.rows_per_forward,  # how full rollout.continuous kept the batch
        "gen/refills": stats.refills,
        "update/padding_frac": 1.0 - result.real_tokens / max(computed, 1),
        "optim/micro_batches": result.micro_batches,  # this rank's (optim.grad_accum, or auto's choice)
        **result.group_norms,
    }
    # the share of the step's drawn prompt groups whose rewards are not all equal (the groups with GRPO signal);
    # dynamic sampling trains on informative groups only, so there it counts every group the step drew
    drawn = batch.sampling.get("sampling/draws")
    metrics["groups/informative_frac"] = (1.0 - batch.sampling["sampling/dropped_groups"] / drawn if drawn
                                          else 1.0 - metrics["reward/frac_zero_std"])
    if batch.kl_observed is not None:  # steps with the reference pass (Trainer.reference_needed)
        metrics.update({"kl/mean": batch.kl_observed, "kl/max": batch.kl_max})
    if result.health:  # steps of train.health_every
        metrics["grad/update_ratio"] = float(np.mean(result.update_ratio)) if result.update_ratio else 0.0
    if len(source_names) > 1:
        for name in source_names:
            values = [v for v in columns[f"part/{name}"] if not math.isnan(v)]
            if values:
                metrics[f"reward/{name}_mean"] = float(np.mean(values))
    return metrics
