"""`StepBatch`: what one step trains on and reports, one row per sample, rows grouped G per prompt.

The update reads the training columns (ids, behaviour and reference log-probs, advantages, the loss
mask); `step_metrics` reads the rest (scores, rollout statistics, phase times, the observed KL).
"""

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

UNJUDGED = ("fallback", "unjudged")  # no reward to learn from: no gradient, no place in group statistics


@dataclass
class StepBatch:
    prompt_ids: list  # each row's prompt token ids
    completion_ids: list  # each row's sampled token ids
    reference_logp: mx.array  # [B, T] the reference policy's log-probs at the sampling temperature
    behaviour_logp: mx.array = None  # [B, T] the sampler's, at the same temperature: pi_old
    advantages: mx.array = None  # [B]
    token_mask: np.ndarray = None  # [B, T] float32: each row's sampled tokens
    loss_mask: np.ndarray = None  # [B, T] float32: the trained ones: unjudged rows and, under
    # algo.mask_truncated, truncated rows have none
    forwards: list = None  # each micro-batch's (rows, log-prob inputs), built once (rl.update)
    rank_weight: float = 1.0  # several ranks: size x this rank's share of the loss normaliser
    inject_nan: bool = False  # train.debug_nan_steps
    # what the step reports
    tasks: list = field(default_factory=list)  # the step's prompts, every rank's
    rollouts: list = field(default_factory=list)  # engine.rollout records of this rank's rows
    scores: list = field(default_factory=list)  # rewards.sources scores of this rank's rows
    rollout_stats: object = None  # engine.rollout.RolloutBatch (its rollouts' statistics)
    truncated: list = field(default_factory=list)  # rows cut off by the length limit
    kl_observed: float = 0.0  # token mean of KL(behaviour || reference)
    kl_max: float = 0.0  # its largest token
    beta: float = 0.0
    phase: str = "early"  # epoch phase of the step's first prompt
    times: dict = field(default_factory=dict)  # seconds of the step's phases: generate, score, rewards, reference
    sampling: dict = field(default_factory=dict)  # dynamic sampling's sampling/* metrics


def judged_rows(scores):
    """[B] float32, 0 for a sample with an `UNJUDGED` provenance, 1 otherwise."""
    return np.array([s.provenance not in UNJUDGED for s in scores], dtype=np.float32)


def token_mask(completion_ids, width):
    """[B, width] float32, 1 on each row's sampled tokens."""
    return np.array([[1.0] * len(c) + [0.0] * (width - len(c)) for c in completion_ids], dtype=np.float32)


def pad_rows(rows, width):
    """Per-row float lists right-padded with zeros to an [B, width] float32 array."""
    return mx.array([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=mx.float32)


def fit_width(x, width):
    """[B, T] cut or right-padded with zeros to [B, width]."""
    return x[:, :width] if x.shape[1] >= width else mx.pad(x, [(0, 0), (0, width - x.shape[1])])


def micro_batches(n, grad_accum):
    """Row indices of the micro-batches one update (and the reference pass) is split into."""
    return np.array_split(np.arange(n), min(grad_accum, n))
