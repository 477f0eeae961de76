"""Sampling one token per row from the logits of a decode step: temperature, top-k, min-p, top-p, the
behaviour log-probs and entropies reported for the sampled tokens, and `SampleKeys`, where each row's draws
come from."""

from dataclasses import dataclass

import mlx.core as mx

from mlx_coach.core.keys import draw_key

TOP_P_CANDIDATES = 1024


@dataclass(frozen=True)
class SampleKeys:
    """The keys of sampled sequences: prompt p's sample g draws its i-th token with the i-th uniform of
    key(seed, "sample", *ids, first_place + p, g).

    ids name the draw's context (the trainer: the step); first_place is the place in that context of the
    first prompt handed to the engine (a rank's share, a later dynamic-sampling round). A sequence's
    draws thus depend on which sample of which task it is, never on its row in a batch: batch size,
    refills, OOM retries with a smaller budget or another split across ranks draw the same numbers.
    """

    seed: int
    ids: tuple = ()
    first_place: int = 0

    def uniforms(self, sequences, n):
        """[len(sequences), n] float32: the first n draws of each (prompt index, sample index)."""
        keys = mx.stack([draw_key(self.seed, "sample", *self.ids, self.first_place + p, g) for p, g in sequences])
        return mx.vmap(lambda k: mx.random.uniform(shape=(n,), key=k))(keys)


def sample(logits, temperature, top_p, u=None, *, top_k=0, min_p=0.0):
    """Sample one token per row. Returns (tokens, log-probs of them, entropies).

    u: [rows, 1] uniforms in [0, 1), the rows' own draws (`SampleKeys.uniforms`); None draws them from
    MLX's global generator. Greedy decoding (temperature 0) draws nothing.

    Truncation, applied in this order to p = softmax(logits / temperature): top_k > 0 keeps the k most
    likely tokens (ties at the k-th probability all stay), min_p > 0 keeps the tokens with p >= min_p x
    the largest p, and top_p < 1 keeps the smallest nucleus of what is left whose mass reaches top_p
    (of the remaining mass). The draw is from the kept tokens, renormalised.

    Log-probs and entropies are those of p itself, before any truncation: the distribution
    `logprobs.sequence_logprobs` computes at the same temperature, so they serve as the behaviour
    log-probs of PPO ratios. Greedy decoding (temperature 0) reports them at temperature 1. A sampled
    token's true sampling probability is higher than reported by 1 / (kept mass): the ratio ignores
    that factor, for top-k and min-p as for top-p.
    One exp over the vocabulary serves the log-probs, the entropy and the sampling, which draws
    by inverse CDF: on CPU, exp dominates and the Gumbel trick would cost two more logs per entry.
    """
    logits = logits.astype(mx.float32)
    if temperature not in (0, 1):
        logits = logits * (1.0 / temperature)
    top = logits.max(axis=-1, keepdims=True)
    e = mx.exp(logits - top)  # the most likely token's weight is exactly 1
    total = e.sum(axis=-1, keepdims=True)
    lse = top + mx.log(total)
    if temperature == 0:
        tokens = mx.argmax(logits, axis=-1)
    else:
        if u is None:
            u = mx.random.uniform(shape=(e.shape[0], 1))
        tokens = _inverse_cdf(truncate(e, top_p, top_k=top_k, min_p=min_p), u)
    token_lp = mx.take_along_axis(logits, tokens[:, None], axis=-1).squeeze(-1) - lse.squeeze(-1)
    # -sum p log p with log p = logits - lse: no cancellation between large terms; a -inf
    # logit has p == 0 and contributes 0, not NaN
    plogp = mx.where(e > 0, e * (logits - lse), 0.0)
    entropy = -(plogp.sum(axis=-1, keepdims=True) / total).squeeze(-1)
    return tokens, token_lp, entropy


def truncate(e, top_p=1.0, *, top_k=0, min_p=0.0):
    """The sampling weights after top-k, min-p and top-p (in that order, see `sample`): e [rows, V] holds
    exp(logits - max logit), so the most likely token weighs 1 and min-p's bound is min_p itself. Zeroed
    entries are never drawn; the most likely token always stays."""
    if 0 < top_k < e.shape[-1]:
        kth = mx.topk(e, top_k, axis=-1).min(axis=-1, keepdims=True)
        e = mx.where(e >= kth, e, 0.0)
    if min_p > 0:
        e = mx.where(e >= min_p, e, 0.0)
    if top_p < 1.0:
        e = _top_p_filter(e, top_p)
    return e


def _inverse_cdf(w, u):
    """One index per row with probability w / w.sum() (w >= 0, unnormalised), u: [rows, 1] uniforms."""
    cdf = mx.cumsum(w, axis=-1)
    u = u * cdf[:, -1:]
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
