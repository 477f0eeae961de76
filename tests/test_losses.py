import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_coach.rl import kl_control, update
from mlx_coach.rl import objective as L

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, G = 6, 7, 3


def close(actual, expected):
    np.testing.assert_allclose(np.array(actual, dtype=np.float64), expected, **TOL)


@pytest.fixture
def data():
    rng = np.random.default_rng(1234)
    lengths = np.array([7, 3, 1, 5, 0, 6])  # ragged, with one empty row
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    logp = -rng.uniform(0.05, 3.0, size=(B, T)).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.3, size=(B, T))).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.5, size=(B, T))).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    ent = rng.uniform(0.0, 2.0, size=(B, T)).astype(np.float32)
    rewards = np.array([1.0, 0.0, 0.5, 0.2, 0.2, 0.2], dtype=np.float32)
    return dict(mask=mask, logp=logp, old=old, ref=ref, adv=adv, ent=ent, rewards=rewards)


# ---------------------------------------------------------------- NumPy references


def np_token(x, mask):
    n = mask.sum()
    return (x * mask).sum() / n if n > 0 else 0.0


def np_aggregate(x, mask, mode, max_len=None):
    x, mask = x.astype(np.float64), mask.astype(np.float64)
    if mode == "token":
        return np_token(x, mask)
    if mode == "sequence":
        means = [(x[i] * mask[i]).sum() / mask[i].sum() for i in range(len(x)) if mask[i].sum() > 0]
        return float(np.mean(means)) if means else 0.0
    return (x * mask).sum() / (x.shape[0] * (max_len or x.shape[1]))


def np_kl(logp, ref, kind):
    d = np.clip(ref.astype(np.float64) - logp.astype(np.float64), -L.LOG_RATIO_CLAMP, L.LOG_RATIO_CLAMP)
    if kind == "k1":
        kl = -d
    elif kind == "k2":
        kl = 0.5 * d**2
    else:
        kl = np.exp(d) - d - 1.0
    return np.clip(kl, -L.KL_CLAMP, L.KL_CLAMP)


# ---------------------------------------------------------------- advantages


def test_grpo_group_scale_uses_population_std(data):
    r = data["rewards"].astype(np.float64).reshape(-1, G)
    expected = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=0, keepdims=True) + 1e-4)).ravel()
    close(L.grpo_advantages(mx.array(data["rewards"]), G), expected)


def test_grpo_batch_and_none_scales(data):
    r = data["rewards"].astype(np.float64)
    centred = (r.reshape(-1, G) - r.reshape(-1, G).mean(1, keepdims=True)).ravel()
    close(L.grpo_advantages(mx.array(data["rewards"]), G, scale="batch", eps=1e-3), centred / (r.std() + 1e-3))
    close(L.grpo_advantages(mx.array(data["rewards"]), G, scale="none"), centred)
    close(L.dr_grpo_advantages(mx.array(data["rewards"]), G), centred)


def test_all_equal_group_gives_zero_advantages(data):
    for scale in L.ADV_SCALES:
        adv = np.array(L.grpo_advantages(mx.array(data["rewards"]), G, scale=scale))
        assert np.all(np.isfinite(adv))
        assert np.all(adv[3:] == 0.0)  # the second group is [0.2, 0.2, 0.2]
        assert np.any(adv[:3] != 0.0)
    ones = np.array(L.grpo_advantages(mx.ones(4), 2, scale="batch"))
    assert np.all(ones == 0.0)


def test_advantage_argument_errors():
    with pytest.raises(ValueError):
        L.grpo_advantages(mx.ones(5), 2)
    with pytest.raises(ValueError):
        L.grpo_advantages(mx.ones(4), 2, scale="std")
    with pytest.raises(ValueError):
        L.reinforce_advantages(mx.ones(4), None, 1.5)


def test_reinforce_baseline_before_update():
    r1 = np.array([1.0, 0.0, 0.5, 0.5])
    adv, b = L.reinforce_advantages(mx.array(r1, dtype=mx.float32), None, 0.9)
    close(adv, r1 - 0.5)  # first call: baseline starts at the batch mean
    assert b == pytest.approx(0.5, abs=1e-7)
    r2 = np.array([1.0, 1.0, 1.0, 0.0])
    adv, b2 = L.reinforce_advantages(mx.array(r2, dtype=mx.float32), b, 0.9)
    close(adv, r2 - 0.5)  # uses the baseline from before this batch
    assert b2 == pytest.approx(0.9 * 0.5 + 0.1 * 0.75, abs=1e-7)


def test_zero_std_fraction(data):
    assert L.zero_std_fraction(mx.array(data["rewards"]), G) == pytest.approx(0.5)
    assert L.zero_std_fraction(mx.array([1.0, 1.0, 0.0, 1.0, 3.0, 3.0]), 2) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- KL, aggregation, masks


@pytest.mark.parametrize("kind", L.KL_KINDS)
def test_kl_estimators(data, kind):
    got = L.kl_estimate(mx.array(data["logp"]), mx.array(data["ref"]), kind)
    close(got, np_kl(data["logp"], data["ref"], kind))
    if kind != "k1":
        assert np.all(np.array(got) >= 0)
    with pytest.raises(ValueError):
        L.kl_estimate(mx.array(data["logp"]), mx.array(data["ref"]), "k4")


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_aggregate_ragged(data, mode):
    x, mask = data["ent"], data["mask"]
    close(L.aggregate(mx.array(x), mx.array(mask), mode), np_aggregate(x, mask, mode))
    # modes really differ on ragged masks
    others = [np_aggregate(x, mask, m) for m in L.AGGREGATIONS if m != mode]
    assert all(abs(o - np_aggregate(x, mask, mode)) > 1e-3 for o in others)


def test_aggregate_constant_max_len_and_empty_mask(data):
    x, mask = data["ent"], data["mask"]
    close(L.aggregate(mx.array(x), mx.array(mask), "constant", max_len=16), np_aggregate(x, mask, "constant", 16))
    for mode in L.AGGREGATIONS:
        got = L.aggregate(mx.array(x), mx.zeros((B, T)), mode)
        assert float(got.item()) == 0.0
    with pytest.raises(ValueError):
        L.aggregate(mx.array(x), mx.array(mask), "mean")


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_aggregate_ignores_non_finite_padding(data, mode):
    x, mask = data["ent"].copy(), data["mask"]
    x[mask == 0] = np.nan
    x[1, -1] = np.inf
    close(L.aggregate(mx.array(x), mx.array(mask), mode), np_aggregate(data["ent"], mask, mode))


def test_mask_truncated(data):
    trunc = np.array([False, True, False, False, True, True])
    got = L.mask_truncated(mx.array(data["mask"]), mx.array(trunc))
    close(got, data["mask"] * (~trunc)[:, None])


@pytest.mark.parametrize("kind", L.KL_KINDS)
def test_kl_penalized_advantages(data, kind):
    kl = np_kl(data["logp"], data["ref"], kind)
    expected = data["adv"] - 0.05 * (kl * data["mask"]).sum(1)
    got = L.kl_penalized_advantages(
        mx.array(data["adv"]), mx.array(data["logp"]), mx.array(data["ref"]), mx.array(data["mask"]), 0.05, kind
    )
    close(got, expected)


def test_one_outlier_token_gives_a_bounded_kl_and_gradient():
    """p = 1e-4 under the policy, 0.5 under the reference: unclamped k3 is ~4990 for that one token."""
    logp = mx.array([[math.log(1e-4), math.log(0.5), math.log(0.4)]])
    ref = mx.array([[math.log(0.5), math.log(0.5), math.log(0.5)]])
    mask = mx.ones((1, 3))
    assert float(mx.exp(ref - logp)[0, 0] - (ref - logp)[0, 0] - 1) > 4000  # what the clamp exists for
    kl = L.kl_estimate(logp, ref, "k3")
    assert float(kl[0, 0]) == L.KL_CLAMP
    grad = mx.grad(lambda lp: L.aggregate(L.kl_estimate(lp, ref, "k3"), mask))(logp)
    assert float(grad[0, 0]) == 0.0  # saturated: the outlier pushes nothing
    assert float(mx.max(mx.abs(grad))) < 1.0  # the other tokens keep their ordinary gradients
    assert float(grad[0, 2]) != 0.0


# ---------------------------------------------------------------- policy loss


def np_policy_loss(d, eps, eps_high, mode, beta, kl_kind, coef):
    logp, mask = d["logp"].astype(np.float64), d["mask"].astype(np.float64)
    ratio = np.exp(logp - d["old"])
    a = d["adv"][:, None].astype(np.float64)
    unclipped = ratio * a
    clipped = np.clip(ratio, 1 - eps, 1 + eps_high) * a
    pg = -np_aggregate(np.minimum(unclipped, clipped), mask, mode)
    kl = np_kl(d["logp"], d["ref"], kl_kind)
    kl_loss = beta * np_aggregate(kl, mask, mode)
    loss = pg + kl_loss - coef * np_aggregate(d["ent"], mask, mode)
    stats = dict(
        clip_frac=np_token((clipped < unclipped).astype(np.float64), mask),
        ratio_mean=np_token(ratio, mask),
        kl_mean=np_token(kl, mask),
        pg_loss=pg,
        kl_loss=kl_loss,
        entropy_mean=np_token(d["ent"], mask),
    )
    return loss, stats


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
@pytest.mark.parametrize("kl_kind,eps_high", [("k3", None), ("k1", 0.28), ("k2", 0.1)])
def test_policy_loss_matches_numpy(data, mode, kl_kind, eps_high):
    loss, stats = L.policy_loss(
        mx.array(data["logp"]), mx.array(data["old"]), mx.array(data["adv"]), mx.array(data["mask"]),
        epsilon=0.2, epsilon_high=eps_high, aggregation=mode, ref_logp=mx.array(data["ref"]),
        beta=0.04, kl_kind=kl_kind, entropy=mx.array(data["ent"]), entropy_coef=0.01,
    )
    exp_loss, exp_stats = np_policy_loss(data, 0.2, eps_high or 0.2, mode, 0.04, kl_kind, 0.01)
    close(loss, exp_loss)
    assert set(stats) == set(exp_stats)
    for k, v in exp_stats.items():
        close(stats[k], v)
    assert 0.0 < exp_stats["clip_frac"] < 1.0  # the fixture exercises both branches


def test_kl_mean_reported_when_beta_is_zero(data):
    args = (mx.array(data["logp"]), mx.array(data["old"]), mx.array(data["adv"]), mx.array(data["mask"]))
    with_ref, stats = L.policy_loss(*args, ref_logp=mx.array(data["ref"]))
    without, stats0 = L.policy_loss(*args)
    close(with_ref, float(without.item()))
    close(stats["kl_mean"], np_token(np_kl(data["logp"], data["ref"], "k3"), data["mask"]))
    assert float(stats["kl_loss"].item()) == 0.0 and float(stats0["kl_mean"].item()) == 0.0
    with pytest.raises(ValueError):
        L.policy_loss(*args, beta=0.1)
    # a far reference shows in the stats at the clamp and does not reach a beta=0 loss
    far_ref = mx.array(data["logp"] + 100.0)
    loss, stats = L.policy_loss(*args, ref_logp=far_ref)
    close(loss, float(without.item()))
    assert float(stats["kl_mean"].item()) == L.KL_CLAMP


def test_asymmetric_clipping_changes_clip_frac():
    logp = mx.array(np.log([[1.25, 1.25, 0.7, 1.0]]).astype(np.float32))
    old, mask, adv = mx.zeros((1, 4)), mx.ones((1, 4)), mx.array([2.0])
    sym_loss, sym = L.policy_loss(logp, old, adv, mask, epsilon=0.2)
    asym_loss, asym = L.policy_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.3)
    # A > 0: 1.25 is clipped at 1.2 only in the symmetric case; 0.7 < 0.8 is never clipped for A > 0
    close(sym["clip_frac"], 0.5)
    close(asym["clip_frac"], 0.0)
    close(sym_loss, -2.0 * (1.2 + 1.2 + 0.7 + 1.0) / 4)
    close(asym_loss, -2.0 * (1.25 + 1.25 + 0.7 + 1.0) / 4)


def test_far_ratio_is_clipped_and_gets_no_gradient():
    old = mx.zeros((2, 2))
    mask = mx.ones((2, 2))
    adv = mx.array([1.0, -1.0])
    logp = mx.array([[2.0, 0.0], [-2.0, 0.0]])  # ratios e^2 (A>0) and e^-2 (A<0): both clipped

    def f(lp):
        return L.policy_loss(lp, old, adv, mask, epsilon=0.2)

    loss, stats = f(logp)
    close(loss, -(1.2 + 1.0 - 0.8 - 1.0) / 4)
    close(stats["clip_frac"], 0.5)
    close(stats["ratio_mean"], (math.e**2 + 1 + math.e**-2 + 1) / 4)
    grad = mx.grad(lambda lp: f(lp)[0])(logp)
    close(grad, np.array([[0.0, -0.25], [0.0, 0.25]]))


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_on_policy_gradient_is_vanilla_pg(data, mode):
    mask = data["mask"].astype(np.float64)
    adv = data["adv"].astype(np.float64)[:, None]
    lengths = mask.sum(1, keepdims=True)
    if mode == "token":
        denom = mask.sum()
    elif mode == "sequence":
        denom = np.where(lengths > 0, lengths, 1.0) * (lengths > 0).sum()
    else:
        denom = B * T
    expected = -adv * mask / denom

    def loss_fn(lp):
        return L.policy_loss(lp, mx.stop_gradient(lp), mx.array(data["adv"]), mx.array(data["mask"]),
                             aggregation=mode)[0]

    logp = mx.array(data["logp"])
    _, stats = L.policy_loss(logp, mx.stop_gradient(logp), mx.array(data["adv"]), mx.array(data["mask"]))
    close(stats["ratio_mean"], 1.0)
    close(stats["clip_frac"], 0.0)
    close(mx.grad(loss_fn)(logp), expected)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller():
    c = kl_control.AdaptiveKLController(beta=0.1, target=0.05, horizon=100)
    assert c.update(0.5, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    assert c.beta > 0.1
    c = kl_control.AdaptiveKLController(beta=0.1, target=0.05, horizon=100)
    assert c.update(0.045, n_steps=2) == pytest.approx(0.1 * (1 - 0.1 * 2 / 100))
    assert c.update(0.0) < 0.1 * (1 - 0.1 * 2 / 100)
    before = c.beta
    assert c.update(float("nan")) == before and c.update(mx.array(float("inf"))) == before
    restored = kl_control.kl_controller_from_state(c.state_dict())
    assert isinstance(restored, kl_control.AdaptiveKLController) and restored == c
    with pytest.raises(ValueError):
        kl_control.AdaptiveKLController(beta=0.1, target=0.0)


def test_adaptive_kl_moves_beta_visibly_within_20_steps():
    """A KL 100x over target at the trainer's batch size (16 samples a step) moves beta by more than
    20% in 20 steps, and a KL 100x under target lowers it as much; it never overshoots the clip."""
    up = kl_control.AdaptiveKLController(beta=0.04, target=0.01)
    for _ in range(20):
        up.update(1.0, n_steps=16)
    assert 0.04 * 1.2 < up.beta <= 0.04 * (1 + 0.2 * 16 / 256) ** 20 + 1e-12
    down = kl_control.AdaptiveKLController(beta=0.04, target=0.01)
    for _ in range(20):
        down.update(1e-4, n_steps=16)
    assert down.beta < 0.04 / 1.2


def test_fixed_kl_controller_and_factory():
    c = kl_control.make_kl_controller(0.04)
    assert isinstance(c, kl_control.FixedKLController)
    assert c.update(10.0, n_steps=5) == 0.04 and c.beta == 0.04
    assert kl_control.FixedKLController.from_state(c.state_dict()) == c
    a = kl_control.make_kl_controller(0.04, target=6.0, horizon=500)
    assert isinstance(a, kl_control.AdaptiveKLController) and (a.target, a.horizon) == (6.0, 500)
    assert kl_control.AdaptiveKLController.from_state(a.state_dict()) == a


# ---------------------------------------------------------------- entropy and gradient norms


def np_entropy(logits):
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def test_token_entropy_matches_numpy_and_is_stable():
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(2, 3, 11)) * 3).astype(np.float32)
    close(L.token_entropy(mx.array(logits)), np_entropy(logits))
    close(L.token_entropy(mx.array(logits + 1000.0)), np_entropy(logits))  # no overflow
    close(L.token_entropy(mx.zeros((1, 1, 8))), [[math.log(8)]])
    logits[0, 0, :5] = -np.inf  # masked vocabulary
    got = L.token_entropy(mx.array(logits))
    close(got, np_entropy(logits))
    grad = mx.grad(lambda z: L.token_entropy(z).sum())(mx.array(logits))
    assert np.all(np.isfinite(np.array(grad)))


def grads_tree():
    rng = np.random.default_rng(3)
    return {
        "a": mx.array(rng.normal(size=(3, 4)).astype(np.float32)),
        "layers": [{"w": mx.array(rng.normal(size=(5,)).astype(np.float32))}, {"w": mx.array([2.0, -1.0])}],
    }


def np_norm(tree):
    leaves = [tree["a"], tree["layers"][0]["w"], tree["layers"][1]["w"]]
    return math.sqrt(sum((np.array(x, dtype=np.float64) ** 2).sum() for x in leaves))


def test_grad_global_norm():
    close(update.grad_global_norm(grads_tree()), np_norm(grads_tree()))
    close(update.grad_global_norm({}), 0.0)


def test_clip_grad_norm_scales_to_max_norm():
    g = grads_tree()
    norm0 = np_norm(g)
    clipped, norm = update.clip_grad_norm(g, 1.0)
    close(norm, norm0)
    close(update.grad_global_norm(clipped), 1.0)
    close(clipped["a"], np.array(g["a"]) / norm0)
    same, _ = update.clip_grad_norm(g, norm0 * 2)
    close(same["layers"][1]["w"], [2.0, -1.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_grad_norm_keeps_non_finite_norm_visible(bad):
    g = grads_tree()
    g["layers"][1]["w"] = mx.array([bad, 1.0])
    clipped, norm = update.clip_grad_norm(g, 1.0)
    n = float(norm.item())
    assert math.isnan(n) if math.isnan(bad) else math.isinf(n)
    w = np.array(clipped["layers"][1]["w"])
    assert not np.isfinite(w[0]) and w[1] == 1.0  # left untouched, NaN not turned finite
    close(clipped["a"], np.array(g["a"]))


def test_policy_loss_compiles_with_array_coefficients(data):
    args = [mx.array(data[k]) for k in ("logp", "old", "adv", "mask", "ref", "ent")]

    def step(logp, old, adv, mask, ref, ent, beta, coef):
        loss, stats = L.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, entropy=ent,
                                    entropy_coef=coef, aggregation="sequence")
        return loss, stats["kl_loss"]

    compiled = mx.compile(step)
    for beta in (0.04, 0.0):
        exp_loss, exp_stats = np_policy_loss(data, 0.2, 0.2, "sequence", beta, "k3", 0.01)
        loss, kl_loss = compiled(*args, mx.array(beta), mx.array(0.01))
        close(loss, exp_loss)
        close(kl_loss, exp_stats["kl_loss"])
    _, norm = mx.compile(update.clip_grad_norm)(grads_tree(), mx.array(1.0))
    close(norm, np_norm(grads_tree()))


@pytest.mark.parametrize("seed", range(3))
def test_kl_estimators_as_losses_have_these_expected_gradients(seed):
    """Exact expectations over a categorical policy (every token weighted by its probability, the
    weights held fixed as a sample would be): as a loss, k1's expected gradient is zero, k2's is the
    gradient of the reverse KL(policy || ref), k3's the gradient of the forward KL(ref || policy).
    So k1 only makes sense in the reward, and both k2 and k3 pull the policy toward the reference.
    (Within the clamp: here no token's log-ratio comes near where k3 reaches KL_CLAMP.)"""
    key = mx.random.key(seed)
    logits = 0.5 * mx.random.normal((7,), key=key)
    ref_logp = 0.5 * mx.random.normal((7,), key=mx.random.split(key)[0])
    ref_logp = ref_logp - mx.logsumexp(ref_logp)
    assert float(mx.max(L.kl_estimate(logits - mx.logsumexp(logits), ref_logp, "k3"))) < L.KL_CLAMP / 2

    def expected_loss(z, kind):
        logp = z - mx.logsumexp(z)
        weights = mx.stop_gradient(mx.exp(logp))  # tokens were sampled: their probabilities are data
        return mx.sum(weights * L.kl_estimate(logp, ref_logp, kind))

    def reverse(z):
        logp = z - mx.logsumexp(z)
        return mx.sum(mx.exp(logp) * (logp - ref_logp))

    def forward(z):
        logp = z - mx.logsumexp(z)
        return mx.sum(mx.exp(ref_logp) * (ref_logp - logp))

    g = {k: np.array(mx.grad(lambda z, k=k: expected_loss(z, k))(logits)) for k in ("k1", "k2", "k3")}
    np.testing.assert_allclose(g["k1"], 0.0, atol=1e-6)
    np.testing.assert_allclose(g["k2"], np.array(mx.grad(reverse)(logits)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["k3"], np.array(mx.grad(forward)(logits)), rtol=1e-4, atol=1e-6)
    assert np.abs(g["k3"] - g["k2"]).max() > 1e-3  # two different gradients
