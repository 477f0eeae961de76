"""The objective: advantages, KL estimators, the clipped policy-gradient loss, and its aggregation.

`micro_batch_loss` is the whole loss of one micro-batch, read top to bottom; the rest are pure
functions on mx.arrays. `normaliser` is what an aggregation divides by, so the update can weight
micro-batches and ranks to give exactly the full batch's loss.

Shapes: B sequences grouped contiguously (rows [g*G:(g+1)*G] share a prompt), T completion tokens
right-padded, ``mask`` [B, T] float with 1 for a real token.

Conventions:
- Group and batch standard deviations are *population* stds (ddof=0), so a group of one is
  well defined (std 0) rather than NaN. TRL uses the unbiased std; for G samples the two differ
  by a factor sqrt(G / (G - 1)).
- Aggregations ("token", "sequence", "constant") are defined in ``aggregate``.
- Rows whose mask is all zero contribute nothing and never produce NaN.
"""

import mlx.core as mx

from mlx_coach.engine.logprobs import logprobs_from_inputs

AGGREGATIONS = ("token", "sequence", "constant")
KL_KINDS = ("k1", "k2", "k3")
ADV_SCALES = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


def _f32(x):
    if isinstance(x, mx.array):
        return x.astype(mx.float32)
    return mx.array(x, dtype=mx.float32)


def _groups(rewards, group_size):
    r = _f32(rewards)
    if group_size < 1 or r.ndim != 1 or r.size % group_size:
        raise ValueError(
            f"rewards of shape {tuple(r.shape)} cannot be split into groups of {group_size}"
        )
    return r.reshape(-1, group_size)


# ---------------------------------------------------------------------------- advantages


def grpo_advantages(rewards, group_size, scale="group", eps=1e-4, valid=None):
    """(r - group mean) / (std + eps), std of the group ("group"), of all rewards ("batch"), or 1 ("none").

    valid: [B] bool, False for a sample the scorers could not judge: it gets advantage 0 and no place
    in its group's mean and std (nor in the batch's), so the others' advantages are those of the
    group without it."""
    if scale not in ADV_SCALES:
        raise ValueError(f"advantage scale must be one of {ADV_SCALES}, got {scale!r}")
    g = _groups(rewards, group_size)
    if valid is not None and not all(bool(v) for v in valid):
        return _masked_group_advantages(g, _f32(mx.array(valid)).reshape(g.shape), scale, eps).reshape(-1)
    # float32 rounding makes mean([0.2]*3) != 0.2, and dividing by (0 + eps) would blow that
    # residue up to ~1e-4; a group of equal rewards carries no signal, so force it to 0.
    flat = mx.max(g, axis=1, keepdims=True) == mx.min(g, axis=1, keepdims=True)
    adv = mx.where(flat, 0.0, g - mx.mean(g, axis=1, keepdims=True))
    if scale == "group":
        adv = adv / (mx.sqrt(mx.var(g, axis=1, keepdims=True)) + eps)
    elif scale == "batch":
        adv = adv / (mx.sqrt(mx.var(g)) + eps)
    return adv.reshape(-1)


def _masked_group_advantages(g, keep, scale, eps):
    """grpo_advantages over the kept members of each group (keep: [groups, G] of 0/1)."""
    n = mx.maximum(mx.sum(keep, axis=1, keepdims=True), 1.0)
    safe = mx.where(keep > 0, g, 0.0)  # an unjudged reward may be anything, NaN included
    mean = mx.sum(safe, axis=1, keepdims=True) / n
    big = mx.array(float("inf"))
    flat = mx.max(mx.where(keep > 0, g, -big), axis=1, keepdims=True) == mx.min(mx.where(keep > 0, g, big), axis=1,
                                                                                keepdims=True)
    adv = mx.where(flat | (keep == 0), 0.0, safe - mean)
    if scale == "group":
        adv = adv / (mx.sqrt(mx.sum(keep * (safe - mean) ** 2, axis=1, keepdims=True) / n) + eps)
    elif scale == "batch":
        total = mx.maximum(mx.sum(keep), 1.0)
        batch_mean = mx.sum(safe) / total
        adv = adv / (mx.sqrt(mx.sum(keep * (safe - batch_mean) ** 2) / total) + eps)
    return adv


def dr_grpo_advantages(rewards, group_size, valid=None):
    """Dr. GRPO: reward minus its group mean, no std division (removes the difficulty bias)."""
    return grpo_advantages(rewards, group_size, scale="none", valid=valid)


def reinforce_advantages(rewards, baseline, decay, valid=None):
    """REINFORCE with a moving-average baseline. Returns (adv, new_baseline).

    adv = r - baseline, using the baseline *before* this batch updates it (so a batch is never
    its own baseline, except on the first call, when baseline is None and starts at the batch
    mean). new_baseline = decay * baseline + (1 - decay) * mean(r). Samples that are not `valid`
    (unjudged) get advantage 0 and stay out of the mean; a batch with none leaves the baseline.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"baseline decay must be in [0, 1], got {decay}")
    r = _f32(rewards)
    if valid is not None and not all(bool(v) for v in valid):
        keep = mx.array([bool(v) for v in valid])
        if not any(bool(v) for v in valid):
            return mx.zeros_like(r), baseline
        batch_mean = float((mx.sum(mx.where(keep, r, 0.0)) / mx.sum(keep)).item())
        start = batch_mean if baseline is None else baseline
        return mx.where(keep, r - start, 0.0), decay * float(start) + (1.0 - decay) * batch_mean
    batch_mean = float(mx.mean(r).item())
    if baseline is None:
        baseline = batch_mean
    adv = r - baseline
    return adv, decay * float(baseline) + (1.0 - decay) * batch_mean


def zero_std_fraction(rewards, group_size):
    """Share of groups whose rewards are all equal, i.e. that carry no GRPO learning signal."""
    g = _groups(rewards, group_size)
    flat = mx.max(g, axis=1) == mx.min(g, axis=1)
    return float(mx.mean(flat.astype(mx.float32)).item())


# ---------------------------------------------------------------------------- KL and masks


def kl_estimate(logp, ref_logp, kind="k3"):
    """Per-token estimate of KL(policy || ref) from log-probs of tokens sampled by the policy.

    k1 = logp - ref (unbiased, high variance, can be negative); k2 = (logp - ref)^2 / 2;
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased and always >= 0). As the *value* of KL(policy || ref)
    k1 and k3 are unbiased. As a *loss* on on-policy samples their expected gradients differ: k1's is
    zero, k2's is the gradient of KL(policy || ref), k3's that of KL(ref || policy).

    The log-ratio is clamped to +-LOG_RATIO_CLAMP and the estimate to +-KL_CLAMP (as verl does), so one
    token the policy finds very unlikely cannot dominate the mean, the controller or the gradient (the
    clamp passes no gradient beyond its bounds).
    """
    d = mx.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        kl = -d
    elif kind == "k2":
        kl = 0.5 * d * d
    elif kind == "k3":
        kl = mx.exp(d) - d - 1.0
    else:
        raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")
    return mx.clip(kl, -KL_CLAMP, KL_CLAMP)


def _is_zero(coef):
    # An mx.array coefficient (one that changes under mx.compile without retracing) cannot be
    # tested without evaluating it, so it always counts as used.
    return not isinstance(coef, mx.array) and coef == 0


def _masked(x, mask):
    # where, not just x * mask: padding may hold inf or NaN (e.g. an overflowing k3), and 0 * inf is NaN.
    return mx.where(mask > 0, x * mask, 0.0)


def aggregate(per_token, mask, mode="token", max_len=None):
    """Reduce [B, T] per-token values to a scalar over the real tokens.

    token:    sum(x * mask) / sum(mask)  -- every real token in the batch weighs the same.
    sequence: mean, over sequences with at least one real token, of each one's masked mean.
    constant: sum(x * mask) / (B * max_len), max_len defaulting to T (Dr. GRPO: no length bias).
    An all-zero mask gives 0.
    """
    masked = _masked(per_token, mask)
    if mode == "token":
        return mx.sum(masked) / mx.maximum(mx.sum(mask), 1.0)
    if mode == "sequence":
        lengths = mx.sum(mask, axis=1)
        seq_means = mx.sum(masked, axis=1) / mx.maximum(lengths, 1.0)
        n_seqs = mx.sum((lengths > 0).astype(per_token.dtype))
        return mx.sum(seq_means) / mx.maximum(n_seqs, 1.0)
    if mode == "constant":
        max_len = per_token.shape[1] if max_len is None else max_len
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        return mx.sum(masked) / (per_token.shape[0] * max_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def _token_mean(x, mask):
    return aggregate(x, mask, "token")


def sampler_gap(train_logp, sampler_logp):
    """|pi_train / pi_sampler - 1| per token: how far the sampler's log-probs are from the training forward's."""
    return mx.abs(mx.exp(train_logp - sampler_logp) - 1.0)


def sampler_mismatch(train_logp, sampler_logp, mask):
    """`policy/sampler_mismatch`: the token mean of `sampler_gap`."""
    return _token_mean(sampler_gap(train_logp, sampler_logp), mask)


def mask_truncated(mask, truncated):
    """Zero the rows of completions cut off by the length limit (truncated: [B] bool)."""
    keep = 1.0 - mx.array(truncated).astype(mask.dtype)
    return mask * keep[:, None]


# ---------------------------------------------------------------------------- loss


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    epsilon=0.2,
    epsilon_high=None,
    aggregation="token",
    max_len=None,
    ref_logp=None,
    beta=0.0,
    kl_kind="k3",
    entropy=None,
    entropy_coef=0.0,
    importance="token",
    token_weight=None,
):
    """PPO-style clipped surrogate with optional KL penalty and entropy bonus.

    loss = -agg(w * min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)) + beta * agg(kl)
           - entropy_coef * agg(entropy),  ratio = exp(logp - old_logp) per token ("token"), or
    GSPO's ("sequence") exp(mean over the sequence's tokens of (logp - old_logp)), the same for every
    token of a sequence, so clipping acts on whole sequences. w: `token_weight` (gradient-free, e.g.
    a truncated importance weight), 1 by default.
    Returns (loss, stats); stats are gradient-free scalars and their token means ignore
    ``aggregation``: clip_frac, ratio_mean, kl_mean, pg_loss, kl_loss, entropy_mean.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    # bfloat16 log-probs would round ratios near 1 (8-bit mantissa), so compute in float32.
    logp = _f32(logp)
    mask = _f32(mask)
    adv = _f32(advantages)[:, None]

    log_ratio = logp - _f32(old_logp)
    if importance == "sequence":
        lengths = mx.maximum(mx.sum(mask, axis=1, keepdims=True), 1.0)
        log_ratio = mx.broadcast_to(mx.sum(_masked(log_ratio, mask), axis=1, keepdims=True) / lengths, logp.shape)
    elif importance != "token":
        raise ValueError(f"importance level must be one of {IMPORTANCE_LEVELS}, got {importance!r}")
    ratio = mx.exp(log_ratio)
    unclipped = ratio * adv
    clipped = mx.clip(ratio, 1.0 - epsilon, 1.0 + eps_high) * adv
    objective = mx.minimum(unclipped, clipped)
    if token_weight is not None:
        objective = objective * mx.stop_gradient(_f32(token_weight))
    pg_loss = -aggregate(objective, mask, aggregation, max_len)
    loss = pg_loss

    zero = mx.array(0.0)
    kl_mean, kl_loss = zero, zero
    if ref_logp is not None:
        kl = kl_estimate(logp, _f32(ref_logp), kl_kind)
        kl_mean = _token_mean(kl, mask)
        # Skip an unused term: 0 * inf (an overflowing k3) would be NaN.
        if not _is_zero(beta):
            kl_loss = beta * aggregate(kl, mask, aggregation, max_len)
            loss = loss + kl_loss
    elif not _is_zero(beta):
        raise ValueError("beta != 0 needs ref_logp")

    entropy_mean = zero
    if entropy is not None:
        entropy = _f32(entropy)
        entropy_mean = _token_mean(entropy, mask)
        if not _is_zero(entropy_coef):
            loss = loss - entropy_coef * aggregate(entropy, mask, aggregation, max_len)

    stats = {
        "clip_frac": _token_mean((clipped < unclipped).astype(mx.float32), mask),
        "ratio_mean": _token_mean(ratio, mask),
        "kl_mean": kl_mean,
        "pg_loss": pg_loss,
        "kl_loss": kl_loss,
        "entropy_mean": entropy_mean,
    }
    return loss, {k: mx.stop_gradient(v) for k, v in stats.items()}


def normaliser(mask, aggregation):
    """What `aggregate` divides by, from a host-side [B, T] numpy mask: real tokens ("token"), rows
    with at least one real token ("sequence"), or rows ("constant": B x max_len, max_len fixed)."""
    if aggregation == "token":
        return mask.sum()
    if aggregation == "sequence":
        return (mask.sum(1) > 0).sum()
    return len(mask)


def micro_batch_weight(chunk_mask, batch_mask, aggregation):
    """A micro-batch's share of the batch's normaliser: the weighted sum of micro-batch losses (and
    gradients) is then exactly the full batch's."""
    return float(normaliser(chunk_mask, aggregation) / max(normaliser(batch_mask, aggregation), 1))


def observed_kl(behaviour_logp, reference_logp, token_mask, estimator, world=None):
    """(token mean, max) of the KL estimate over every sampled token: the distance the KL controller,
    `kl/mean`, `kl/max` and the kl_high alert see, whatever `algo.kl_in` is. With `world` (several
    ranks) both run over every rank's tokens."""
    per_token = kl_estimate(behaviour_logp, reference_logp, estimator)
    real = token_mask > 0
    largest = float(mx.max(mx.where(real, per_token, -mx.inf)).item()) if bool(mx.any(real).item()) else 0.0
    if world is None:
        return float(aggregate(per_token, token_mask).item()), largest
    total, count = world.all_sum([float(mx.sum(mx.where(real, per_token, 0.0)).item()),
                                  float(token_mask.sum().item())])
    return total / max(count, 1.0), world.all_max([largest])[0]


def advantages(rewards, algo, group_size, baseline, valid=None):
    """(advantages [B], the moving baseline after this batch) under `algo.advantage`; samples that are
    not `valid` (unjudged) get 0 and no place in the statistics."""
    if algo.advantage == "grpo":
        return grpo_advantages(rewards, group_size, scale=algo.scale_rewards, valid=valid), baseline
    if algo.advantage == "dr_grpo":
        return dr_grpo_advantages(rewards, group_size, valid=valid), baseline
    return reinforce_advantages(rewards, baseline, algo.baseline_decay, valid=valid)


def kl_penalized_advantages(adv, logp, ref_logp, token_mask, beta, kind="k3"):
    """`kl_in: reward`: the advantages minus beta x each sample's KL estimate summed over its sampled
    tokens (truncated or not). Applied after the rewards' normalisation, so beta means the same under
    every advantage and scaling. A constant for the policy gradient: no gradient flows through it."""
    kl = kl_estimate(_f32(logp), _f32(ref_logp), kind)
    penalty = mx.sum(_masked(kl, _f32(token_mask)), axis=1)
    return mx.stop_gradient(_f32(adv) - beta * penalty)


def micro_batch_loss(model, x, beta, *, algo, temperature, max_len, first_iteration=True, inject_nan=False):
    """(loss, stats) of one micro-batch: `x` holds its log-prob inputs (engine.logprobs) and the
    batch's columns cut to its width: sampler_logp (the sampler's numbers), old_logp (pi_old from the
    training forward, for iterations after the first), ref_logp (absent on a step without the reference
    pass: beta is then 0 and the KL term is not computed), loss_mask, adv.

    pi_old at the first iteration is this forward's own log-probs, detached (as TRL does): the ratio
    is exactly 1 whatever LoRA dropout or the sampler's kernels do. `algo.sampler_correction: tis`
    weighs each token by min(pi_train / pi_sampler, algo.tis_cap) for the gap between the sampler's
    numbers and the training forward. The KL term enters the loss only with `algo.kl_in: loss`; with
    `reward` it is part of the advantages (`kl_penalized_advantages`)."""
    logp, mask, entropy = logprobs_from_inputs(model, x, with_entropy=algo.entropy_coef > 0,
                                               temperature=temperature)
    mask = mask * x["loss_mask"]
    detached = mx.stop_gradient(logp)
    old = detached if first_iteration else mx.where(mask > 0, x["old_logp"], detached)
    gap = detached - x["sampler_logp"]
    weight = mx.minimum(mx.exp(gap), algo.tis_cap) if algo.sampler_correction == "tis" else None
    in_loss = algo.kl_in == "loss"
    loss, stats = policy_loss(
        logp, old, x["adv"], mask, epsilon=algo.epsilon, epsilon_high=algo.epsilon_high,
        aggregation=loss_aggregation(algo), max_len=max_len, ref_logp=x.get("ref_logp") if in_loss else None,
        beta=beta if in_loss else 0.0, kl_kind=algo.kl_estimator, entropy=entropy, entropy_coef=algo.entropy_coef,
        importance=algo.importance_level, token_weight=weight)
    stats["sampler_mismatch"] = mx.stop_gradient(sampler_mismatch(detached, x["sampler_logp"], mask))
    if inject_nan:  # train.debug_nan_steps: exercises the non-finite guard
        loss = loss * mx.array(float("nan"))
    return loss, stats


def loss_aggregation(algo):
    """algo.aggregation, where "auto" is Dr. GRPO's constant normaliser under advantage: dr_grpo (the
    length bias it exists to remove would stay under a token mean) and the token mean otherwise."""
    if algo.aggregation != "auto":
        return algo.aggregation
    return "constant" if algo.advantage == "dr_grpo" else "token"


def token_entropy(logits):
    """Entropy [B, T] of the softmax over the last axis, computed from log-softmax."""
    logits = _f32(logits)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    p = mx.exp(logp)
    # Masked-out vocabulary (-inf logits) has p = 0; 0 * -inf would be NaN in value and gradient.
    safe_logp = mx.where(p > 0, logp, 0.0)
    return -mx.sum(p * safe_logp, axis=-1)
