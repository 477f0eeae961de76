"""Log-probs (and entropies) of completion tokens given their prompts, batched: the policy and
reference passes of the update. Inputs are built on the host (`logprob_inputs`), so the forward
(`logprobs_from_inputs`) is a function of arrays; each distinct prompt can be computed once for the
rows that share it."""

import mlx.core as mx

from mlx_coach.engine.buckets import round_up


# mlx-lm models whose __call__ is exactly `head(self.model(inputs))`: for these only the
# completion positions go through the (vocab-sized) output layer.
_HEAD_SPLIT_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def _hidden_and_head(model):
    if getattr(model, "model_type", None) not in _HEAD_SPLIT_TYPES or not hasattr(model, "model"):
        return None
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model, model.model.embed_tokens.as_linear
    if hasattr(model, "lm_head"):
        return model.model, model.lm_head
    return None


def padded_length(prompt_ids, completion_ids, bucket=0):
    """Columns of the batch sequence_logprobs builds: the longest prompt + completion, rounded up to a
    multiple of bucket (0: not rounded)."""
    longest = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    return round_up(longest, bucket)


def logprob_inputs(prompt_ids, completion_ids, *, bucket=0, share_prompts=False):
    """The arrays one log-prob forward needs (host side), so the forward itself is a pure function of
    arrays that `mx.compile` can trace once per shape.

    T, the completion width, is the longest completion (at least 1); bucket > 0 rounds it and the
    sequence widths up to a multiple of bucket, so shapes repeat across steps (the extra positions are
    masked). Flat layout: each row is its prompt + completion, right-padded. Shared layout
    (share_prompts): each distinct prompt is one row of `prompt` (right-padded), computed once, and
    every completion row attends to its prompt's keys and values (`group` maps rows to prompts); the
    G samples of a group then pay for their prompt once instead of G times.
    """
    B = len(prompt_ids)
    if B != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length")
    plen = [len(p) for p in prompt_ids]
    clen = [len(c) for c in completion_ids]
    if min(plen) < 1:
        raise ValueError("every prompt needs at least one token")
    T = round_up(max(1, max(clen)), bucket)
    targets = mx.array([list(c) + [0] * (T - len(c)) for c in completion_ids], dtype=mx.int32)
    mask = (mx.arange(T)[None, :] < mx.array(clen)[:, None]).astype(mx.float32)
    out = {"targets": targets, "mask": mask}
    if not share_prompts:
        L = round_up(max(p + c for p, c in zip(plen, clen)), bucket)
        out["inputs"] = mx.array([list(p) + list(c) + [0] * (L - len(p) - len(c))
                                  for p, c in zip(prompt_ids, completion_ids)], dtype=mx.int32)
        # logits at position i predict token i + 1; positions past a row's end are masked anyway
        out["pos"] = mx.array([[min(p - 1 + t, L - 1) for t in range(T)] for p in plen], dtype=mx.int32)
        return out
    index, unique = {}, []
    for p in prompt_ids:
        key = tuple(p)
        if key not in index:
            index[key] = len(unique)
            unique.append(list(p))
    P = round_up(max(len(u) for u in unique), bucket)
    out["prompt"] = mx.array([u + [0] * (P - len(u)) for u in unique], dtype=mx.int32)
    out["prompt_len"] = mx.array([len(u) for u in unique], dtype=mx.int32)
    out["group"] = mx.array([index[tuple(p)] for p in prompt_ids], dtype=mx.int32)
    return out


class _CaptureCache:
    """One layer's attention cache for the prompt forward: keeps the keys and values it is given."""

    offset = 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n, **_):
        return "causal"  # right padding comes after every real position: causal attention ignores it


class _PrefixCache:
    """One layer's attention cache for the completion forward: its prompt's keys and values (computed
    once per prompt, gathered for each row) in front of the completion's own. Concatenation, not
    in-place writes, so gradients flow back into the prompt's forward."""

    def __init__(self, keys, values, offset, mask):
        self.keys, self.values, self.offset, self._mask = keys, values, offset, mask

    def update_and_fetch(self, keys, values):
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def make_mask(self, n, **_):
        return self._mask


def _shared_prompt_hidden(body, x):
    """Final hidden states [B, T, D] for the positions that predict completion tokens 0..T-1: the last
    prompt position (once per prompt), then completion positions 0..T-2 attending to the prompt's
    cached keys and values at their true RoPE positions."""
    caps = [_CaptureCache() for _ in body.layers]
    h_prompt = body(x["prompt"], cache=caps)
    last = mx.take_along_axis(h_prompt, (x["prompt_len"] - 1)[:, None, None], axis=1)  # [U, 1, D]
    group = x["group"]
    h_first = last[group]
    T = x["targets"].shape[1]
    if T == 1:
        return h_first
    plen = x["prompt_len"][group]  # [B]
    P = x["prompt"].shape[1]
    n = T - 1
    # a completion position sees its prompt's real positions (not the padding) and earlier completion ones
    see_prompt = mx.broadcast_to((mx.arange(P)[None, :] < plen[:, None])[:, None, None, :], (len(plen), 1, n, P))
    causal = mx.broadcast_to(mx.tril(mx.ones((n, n), dtype=mx.bool_))[None, None], (len(plen), 1, n, n))
    mask = mx.concatenate([see_prompt, causal], axis=-1)
    caches = [_PrefixCache(c.keys[group], c.values[group], plen, mask) for c in caps]
    h_comp = body(x["targets"][:, :-1], cache=caches)
    return mx.concatenate([h_first, h_comp], axis=1)


def logprobs_from_inputs(model, x, *, with_entropy=False, temperature=1.0):
    """(logp [B, T], mask [B, T], entropy [B, T] or None) from `logprob_inputs`' arrays; see
    sequence_logprobs. A pure function of the arrays and the model's parameters."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    split = _hidden_and_head(model)
    if "prompt" in x:
        if split is None:
            raise ValueError("shared-prompt log-probs need a model whose head can be split off (llama, qwen2, ...)")
        body, head = split
        logits = head(_shared_prompt_hidden(body, x))
    elif split is not None:
        body, head = split
        h = mx.take_along_axis(body(x["inputs"]), x["pos"][..., None], axis=1)
        logits = head(h)
    else:
        logits = mx.take_along_axis(model(x["inputs"]), x["pos"][..., None], axis=1)
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    mask = x["mask"]
    lse = mx.logsumexp(logits, axis=-1)
    logp = (mx.take_along_axis(logits, x["targets"][..., None], axis=-1).squeeze(-1) - lse) * mask
    entropy = None
    if with_entropy:
        logp_all = logits - lse[..., None]
        probs = mx.exp(logp_all)
        # -inf logits have probability 0: they contribute 0, not NaN
        entropy = -mx.where(probs > 0, probs * logp_all, 0.0).sum(axis=-1) * mask
    return logp, mask, entropy


def can_share_prompts(model):
    """Whether `logprob_inputs(share_prompts=True)` works for this model (its head splits off)."""
    return _hidden_and_head(model) is not None


def sequence_logprobs(model, prompt_ids, completion_ids, *, with_entropy=False, temperature=1.0, bucket=0,
                      share_prompts=False):
    """Log-probs of completion tokens given their prompts, in one batched forward pass.

    prompt_ids, completion_ids: B lists of token ids. T is the longest completion (at least 1).
    Returns (logp [B, T], mask [B, T], entropy [B, T] or None), float32, under softmax(logits /
    temperature) without top-p (the distribution `sampling.sample` reports for its tokens at the same
    temperature): mask is 1.0 for real completion tokens, and logp/entropy are 0 where mask is 0.
    Differentiable with respect to the model's trainable parameters. bucket > 0 right-pads the rows to
    a multiple of it (fewer distinct shapes for MLX's buffer cache); causal attention keeps the padding
    out of every real position, so the results equal the unpadded ones up to float rounding.
    share_prompts computes each distinct prompt once (see logprob_inputs): equal up to float rounding.
    """
    T = max(1, max(len(c) for c in completion_ids)) if completion_ids else 1
    x = logprob_inputs(prompt_ids, completion_ids, bucket=bucket, share_prompts=share_prompts)
    logp, mask, entropy = logprobs_from_inputs(model, x, with_entropy=with_entropy, temperature=temperature)
    return logp[:, :T], mask[:, :T], entropy[:, :T] if entropy is not None else None
