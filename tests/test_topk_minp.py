"""rollout.top_k and rollout.min_p (issue 27 item 4): keyed draws never leave the kept tokens, the kept ones
are drawn in their renormalised proportions, the reported log-probs stay the untruncated distribution's,
and a sample's draws stay its own whatever the batch or the split."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_coach.core.errors import UserError
from mlx_coach.engine.rollout import RolloutConfig, generate_rollouts
from mlx_coach.engine.sampling import SampleKeys, sample
from mlx_coach.models.loader import load_policy

PROBS = np.array([0.3, 0.25, 0.2, 0.12, 0.08, 0.05])
ROWS = 6000


def draws(**truncation):
    """ROWS keyed draws from PROBS (each row its own key, as in the engine): tokens and their log-probs."""
    logits = mx.broadcast_to(mx.log(mx.array(PROBS, dtype=mx.float32)), (ROWS, len(PROBS)))
    u = SampleKeys(5, ("topk",)).uniforms([(r, 0) for r in range(ROWS)], 1)
    tokens, lp, _ = sample(logits, 1.0, truncation.pop("top_p", 1.0), u, **truncation)
    return np.array(tokens), np.array(lp)


@pytest.mark.parametrize("truncation, kept", [
    ({"top_k": 2}, [0, 1]),
    ({"top_k": 4}, [0, 1, 2, 3]),
    ({"min_p": 0.5}, [0, 1, 2]),  # 0.15 = 0.5 x 0.3: 0.12 and below are out
    ({"min_p": 0.3}, [0, 1, 2, 3]),  # 0.09: 0.08 and 0.05 are out
    ({"top_k": 3, "min_p": 0.7}, [0, 1]),  # both: min-p cuts the top 3 further
    ({"top_k": 2, "top_p": 0.5}, [0]),  # top-p over the top 2's renormalised mass: 0.3 / 0.55 > 0.5 alone
])
def test_only_kept_tokens_are_drawn_in_their_renormalised_proportions(truncation, kept):
    tokens, lp = draws(**truncation)
    assert set(tokens.tolist()) == set(kept)  # never outside; every kept token drawn
    freq = np.bincount(tokens, minlength=len(PROBS))[kept] / ROWS
    np.testing.assert_allclose(freq, PROBS[kept] / PROBS[kept].sum(), atol=0.025)
    # the behaviour log-probs are the untruncated distribution's (the ratio ignores the kept mass)
    np.testing.assert_allclose(lp, np.log(PROBS[tokens]), atol=1e-5)


def test_top_k_beyond_the_vocabulary_and_min_p_at_one():
    tokens, _ = draws(top_k=100)
    assert len(set(tokens.tolist())) == len(PROBS)  # nothing cut
    tokens, _ = draws(min_p=1.0)
    assert set(tokens.tolist()) == {0}  # only the most likely token reaches 1 x its own probability


def test_top_k_one_is_greedy_on_a_large_vocabulary():
    logits = mx.random.normal((8, 5000), key=mx.random.key(3))
    u = mx.random.uniform(shape=(8, 1), key=mx.random.key(4))
    tokens, lp, _ = sample(logits, 0.7, 1.0, u, top_k=1)
    assert mx.array_equal(tokens, mx.argmax(logits, axis=-1))
    expected = mx.take_along_axis(logits / 0.7, tokens[:, None], axis=-1).squeeze(-1) - mx.logsumexp(logits / 0.7,
                                                                                                     axis=-1)
    assert np.allclose(np.array(lp), np.array(expected), atol=1e-5) and math.isfinite(float(lp.sum()))


def test_bad_top_k_and_min_p_are_user_errors():
    for bad, key in ((dict(top_k=-1), "rollout.top_k"), (dict(min_p=1.5), "rollout.min_p"),
                     (dict(min_p=-0.1), "rollout.min_p")):
        with pytest.raises(UserError, match=key):
            RolloutConfig(**bad)


PROMPTS = ["def add(a, b):\n", "def f(x):\n    return", "# sort a list\ndef s(xs):\n", "class A:\n"]


def sampled(model, tok, prompts, first_place=0, **rollout):
    cfg = RolloutConfig(**{"group_size": 3, "max_new_tokens": 12, "temperature": 1.0, "stop": [], "top_k": 5,
                           "min_p": 0.05, **rollout})
    batch = generate_rollouts(model, tok, prompts, cfg, keys=SampleKeys(11, (4,), first_place))
    return [r.token_ids for r in batch.rollouts]


def test_truncated_keyed_draws_do_not_depend_on_the_batch_or_the_split():
    model, tok, _ = load_policy("builtin:tiny")
    whole = sampled(model, tok, PROMPTS)
    assert sampled(model, tok, PROMPTS, max_batch_tokens=60) == whole  # fewer rows at once, refilled
    assert sampled(model, tok, PROMPTS[:2]) + sampled(model, tok, PROMPTS[2:], first_place=2) == whole
    assert whole != sampled(model, tok, PROMPTS, top_k=0, min_p=0.0)  # the truncation does act on these rows
