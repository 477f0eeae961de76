"""Sampling one token per row from the logits of a decode step: temperature, top-p, and the behaviour
log-probs and entropies reported for the sampled tokens."""

import mlx.core as mx

TOP_P_CANDIDATES = 1024


def sample(logits, temperature, top_p):
    """Sample one token per row. Returns (tokens, log-probs of them, entropies).

    Log-probs and entropies are those of softmax(logits / temperature) before top-p, the
    distribution `logprobs.sequence_logprobs` computes at the same temperature, so they serve as
    the behaviour log-probs of PPO ratios. Greedy decoding (temperature 0) reports them at
    temperature 1. Top-p then samples from the renormalised nucleus, so a sampled token's true
    sampling probability is higher than reported by 1 / (nucleus mass).
    One exp over the vocabulary serves the log-probs, the entropy and the sampling, which draws
    by inverse CDF: on CPU, exp dominates and the Gumbel trick would cost two more logs per entry.
    """
    logits = logits.astype(mx.float32)
    if temperature not in (0, 1):
        logits = logits * (1.0 / temperature)
    top = logits.max(axis=-1, keepdims=True)
    e = mx.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    lse = top + mx.log(total)
    if temperature == 0:
        tokens = mx.argmax(logits, axis=-1)
    else:
        tokens = _inverse_cdf(_top_p_filter(e, top_p) if top_p < 1.0 else e)
    token_lp = mx.take_along_axis(logits, tokens[:, None], axis=-1).squeeze(-1) - lse.squeeze(-1)
    # -sum p log p with log p = logits - lse: no cancellation between large terms; a -inf
    # logit has p == 0 and contributes 0, not NaN
    plogp = mx.where(e > 0, e * (logits - lse), 0.0)
    entropy = -(plogp.sum(axis=-1, keepdims=True) / total).squeeze(-1)
    return tokens, token_lp, entropy


def _inverse_cdf(w):
    """One index per row with probability w / w.sum() (w >= 0, unnormalised)."""
    cdf = mx.cumsum(w, axis=-1)
    u = mx.random.uniform(shape=(w.shape[0], 1)) * cdf[:, -1:]
    return mx.minimum((cdf <= u).sum(axis=-1), w.shape[-1] - 1)


def _top_p_filter(w, top_p):
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p.

    The nucleus is searched among the TOP_P_CANDIDATES most likely tokens (a full sort of a
    large vocabulary costs more than the model step on CPU), so it is capped at that many.
    """
    p = w / w.sum(axis=-1, keepdims=True)
    k = min(TOP_P_CANDIDATES, p.shape[-1])
    cand = p if k == p.shape[-1] else mx.topk(p, k, axis=-1)
    ordered = mx.sort(cand, axis=-1)[..., ::-1]
    mass_before = mx.cumsum(ordered, axis=-1) - ordered
    n_keep = mx.maximum((mass_before < top_p).sum(axis=-1, keepdims=True), 1)
    threshold = mx.take_along_axis(ordered, n_keep - 1, axis=-1)
    return mx.where(p >= threshold, w, 0.0)
