"""The objective optimises what the rewards and the config say (issue 24): unjudged samples, pi_old,
KL outliers and the penalty's place, the sampler's gap, GSPO, the normalisers and the schedule."""

import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from test_trainer import fixed_batch, perturb, tiny_cfg

from mlx_coach.config.tree import AlgoConfig, OptimConfig, from_dict
from mlx_coach.core.errors import UserError
from mlx_coach.rl import objective as L
from mlx_coach.rl import update as update_module
from mlx_coach.rl.batch import StepBatch, token_mask
from mlx_coach.rl.setup import make_optimizer
from mlx_coach.rl.trainer import Trainer


# ---------------------------------------------------------------- unjudged samples


@pytest.mark.parametrize("advantage,scale", [("grpo", "group"), ("grpo", "batch"), ("dr_grpo", "group")])
def test_an_unjudged_sample_has_no_place_in_its_group(advantage, scale):
    """Group 1: three passing answers and one whose sandbox failed (its reward 0 is not a verdict);
    group 2: a mixed group. The unjudged sample gets 0; the others get what their group gives
    without it (batch scaling: the batch's std without it)."""
    rewards = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.0]
    valid = [True, True, True, False, True, True, True, True]
    algo = AlgoConfig(advantage=advantage, scale_rewards=scale)
    adv, _ = L.advantages(mx.array(rewards), algo, 4, None, valid=valid)
    adv = np.array(adv)
    assert adv[3] == 0.0
    np.testing.assert_allclose(adv[:3], 0.0, atol=1e-6)  # an all-passing group carries no signal
    kept = np.array([1.0, 0.0, 0.5, 0.0])
    expected = kept - kept.mean()
    if advantage == "grpo":
        std = kept.std() if scale == "group" else np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.0]).std()
        expected = expected / (std + 1e-4)
    np.testing.assert_allclose(adv[4:], expected, rtol=1e-5)
    # what today's code did: the sandbox failure pushed a correct answer down at full strength
    unmasked = np.array(L.grpo_advantages(mx.array(rewards), 4))
    assert unmasked[3] < -1.0


def test_reinforce_leaves_unjudged_samples_out_of_advantages_and_baseline():
    adv, baseline = L.reinforce_advantages(mx.array([1.0, 0.0, 0.0, 1.0]), 0.5, 0.9, valid=[True, True, False, True])
    np.testing.assert_allclose(np.array(adv), [0.5, -0.5, 0.0, 0.5])
    assert baseline == pytest.approx(0.9 * 0.5 + 0.1 * (2 / 3))
    adv, baseline = L.reinforce_advantages(mx.array([0.0, 0.0]), 0.5, 0.9, valid=[False, False])
    assert np.array(adv).tolist() == [0.0, 0.0] and baseline == 0.5


def scored(totals, provenance=None):
    provenance = provenance or ["fresh"] * len(totals)
    return [SimpleNamespace(total=t, provenance=p) for t, p in zip(totals, provenance)]


def step_batch(trainer, totals, provenance=None, seed=0, comp_len=8):
    """A batch of random completions with its reference log-probs, before observe_kl/compute_advantages."""
    rng = np.random.default_rng(seed)
    prompts = [[1, 2, 3]] * len(totals)
    comps = [rng.integers(0, 200, comp_len).tolist() for _ in totals]
    ref = trainer.reference_logprobs(prompts, comps)
    rollouts = [SimpleNamespace(logprobs=np.array(ref[i]).tolist(), finish_reason="stop", token_ids=c, entropies=[])
                for i, c in enumerate(comps)]
    return StepBatch(prompt_ids=prompts, completion_ids=comps, reference_logp=ref, rollouts=rollouts,
                     scores=scored(totals, provenance), tasks=[None] * (len(totals) // 4))


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "reinforce"])
def test_unjudged_and_fallback_samples_get_no_gradient_in_the_trainer(tmp_path, advantage):
    trainer = Trainer(tiny_cfg(tmp_path, algo={"advantage": advantage}), tmp_path / advantage)
    try:
        for bad in ("unjudged", "fallback"):
            batch = step_batch(trainer, [1.0, 1.0, 0.0, 1.0], ["fresh", "fresh", bad, "cached"])
            trainer.observe_kl(batch)
            trainer.compute_advantages(batch)
            assert batch.loss_mask[2].sum() == 0 and batch.loss_mask[[0, 1, 3]].min() == 1.0
            assert float(batch.advantages[2]) == 0.0
            if advantage != "reinforce":  # the three judged answers all passed: no signal left
                np.testing.assert_allclose(np.array(batch.advantages), 0.0, atol=1e-6)
    finally:
        trainer.close()


# ---------------------------------------------------------------- KL: the outlier, the penalty's place


def test_kl_in_reward_keeps_beta_meaning_under_group_scaling(tmp_path):
    """An all-failing group: the advantages are the KL penalty alone. beta x 100 moves them 100x
    (applied before the normalisation, group scaling made them unit-size whatever beta was)."""
    shares = {}
    for beta in (0.01, 1.0):
        trainer = Trainer(tiny_cfg(tmp_path, algo={"beta": beta, "kl_in": "reward", "kl_estimator": "k1"}),
                          tmp_path / f"beta{beta}")
        try:
            perturb(trainer)
            batch = step_batch(trainer, [0.0] * 4, seed=3)
            batch.rollouts = [SimpleNamespace(**{**vars(r), "logprobs": [x - 0.05 * (i + 1) for x in r.logprobs]})
                              for i, r in enumerate(batch.rollouts)]  # behaviour differs from reference per row
            trainer.observe_kl(batch)
            trainer.compute_advantages(batch)
            shares[beta] = np.array(batch.advantages)
        finally:
            trainer.close()
    assert np.abs(shares[0.01]).max() > 0
    np.testing.assert_allclose(shares[1.0], 100 * shares[0.01], rtol=1e-4)


def test_kl_max_and_mean_follow_the_tokens():
    logp = mx.array([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    ref = mx.array([[-1.0, -1.0, 5.0], [-2.0, 0.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the 5.0 is padding: not a token
    mean, largest = L.observed_kl(logp, ref, mask, "k1")
    assert largest == pytest.approx(1.0) and mean == pytest.approx((0.0 - 1.0 + 1.0) / 3)


# ---------------------------------------------------------------- pi_old and the sampler's gap


def test_first_iteration_ratio_is_exactly_one_under_lora_dropout(tmp_path):
    """Dropout 0.1, adapters moved away from the base: at the first iteration the ratio is the
    forward's own log-probs over themselves, so nothing is clipped by noise; measured against the
    sampler's numbers instead (what pi_old used to be), dropout alone clips tokens."""
    trainer = Trainer(tiny_cfg(tmp_path, model={"lora_dropout": 0.1}, algo={"beta": 0.0}), tmp_path / "run")
    try:
        perturb(trainer, scale=0.3)
        batch = fixed_batch(trainer, n=8, prompt_len=16, comp_len=24)
        forwards = trainer.updater.forwards(batch.prompt_ids, batch.completion_ids)
        inputs = [trainer.updater.micro_inputs(batch, rows, x) for rows, x in forwards]
        chunks = [rows for rows, _ in forwards]
        trainer.model.train()
        _, _, first = trainer.updater.accumulate(batch, 0.0, chunks, inputs, first_iteration=True)
        for x in inputs:
            x["old_logp"] = x["sampler_logp"]  # pi_old = the sampler's numbers
        _, _, sampler = trainer.updater.accumulate(batch, 0.0, chunks, inputs, first_iteration=False)
        trainer.model.eval()
    finally:
        trainer.close()
    assert abs(float(first["ratio_mean"]) - 1.0) < 1e-6 and float(first["clip_frac"]) == 0.0
    assert float(sampler["clip_frac"]) > 0.0


def test_sampler_mismatch_and_the_truncated_importance_weight():
    """The sampler's log-probs 10% above the training forward's on every token: mismatch 1/1.1 - 1;
    under tis each token's objective is weighted by min(pi_train / pi_sampler, cap)."""
    logp = mx.log(mx.array([[0.5, 0.25, 0.4]]))
    sampler = logp + math.log(1.1)
    mask = mx.ones((1, 3))
    adv = mx.array([1.0])
    plain, _ = L.policy_loss(logp, mx.stop_gradient(logp), adv, mask)
    weighted, _ = L.policy_loss(logp, mx.stop_gradient(logp), adv, mask,
                                token_weight=mx.minimum(mx.exp(logp - sampler), 3.0))
    assert float(weighted) == pytest.approx(float(plain) / 1.1, rel=1e-5)
    mismatch = L._token_mean(mx.abs(mx.exp(logp - sampler) - 1.0), mask)
    assert float(mismatch) == pytest.approx(1 - 1 / 1.1, rel=1e-5)


def test_a_tiny_run_logs_what_the_batch_says(tmp_path):
    from test_trainer import step_rows

    from mlx_coach.rl.loop import train

    train(tiny_cfg(tmp_path, algo={"beta": 0.04}, train={"steps": 2}), tmp_path / "run")
    for row in step_rows(tmp_path / "run"):
        # float32 on the CPU: the sampler and the training forward agree to rounding
        assert 0.0 <= row["policy/sampler_mismatch"] < 1e-3
        assert row["kl/max"] >= row["kl/mean"] >= 0.0
        assert row["reward/duplicate_count"] >= 0
        assert sum(row[f"reward/{p}_count"] for p in ("fresh", "cached", "duplicate", "fallback", "unjudged")) == 16
        assert row["loss/total"] == pytest.approx(row["loss/policy"] + row["loss/kl"], abs=1e-5)


# ---------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_matches_a_hand_computation():
    logp = np.log(np.array([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]], dtype=np.float64))
    old = np.log(np.array([[0.3, 0.2, 0.6], [0.3, 0.3, 0.1]], dtype=np.float64))
    mask = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = np.array([1.0, -1.0])
    eps = 0.2
    loss, stats = L.policy_loss(mx.array(logp, dtype=mx.float32), mx.array(old, dtype=mx.float32),
                                mx.array(adv, dtype=mx.float32), mx.array(mask, dtype=mx.float32), epsilon=eps,
                                importance="sequence", aggregation="sequence")
    s = np.exp(((logp - old) * mask).sum(1) / mask.sum(1))  # length-normalised sequence ratio
    per_seq = np.minimum(s * adv, np.clip(s, 1 - eps, 1 + eps) * adv)
    assert float(loss) == pytest.approx(-per_seq.mean(), rel=1e-5)
    # row 1 (A > 0) is clipped as a whole sequence; row 2 (A < 0) is not: its ratio only lowers the objective
    assert s[0] > 1 + eps and s[1] > 1 + eps and float(stats["clip_frac"]) == pytest.approx(3 / 5)


# ---------------------------------------------------------------- normalisers, schedule, config


def test_dr_grpo_uses_the_constant_normaliser_unless_told_otherwise():
    assert L.loss_aggregation(AlgoConfig(advantage="dr_grpo")) == "constant"
    assert L.loss_aggregation(AlgoConfig(advantage="grpo")) == "token"
    assert L.loss_aggregation(AlgoConfig(advantage="dr_grpo", aggregation="token")) == "token"


def test_warmup_is_counted_in_steps_whatever_the_iterations():
    sched = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=8, schedule="cosine"), 20, iterations=4)
    lrs = [float(sched._schedulers["learning_rate"](mx.array(u))) for u in range(80)]
    assert int(np.argmax(lrs)) == 32  # 8 steps x 4 updates
    assert lrs[31] < lrs[32] and lrs[32] > lrs[40]


def test_a_negative_entropy_coefficient_is_refused():
    with pytest.raises(UserError, match="algo.entropy_coef"):
        from_dict({"algo": {"entropy_coef": -0.1}})


def test_the_entropy_bonus_raises_entropy():
    logits = mx.array([[[2.0, 0.0, -1.0], [1.0, 1.0, 0.0]]])

    def loss(z):
        lp = z - mx.logsumexp(z, axis=-1, keepdims=True)
        taken = mx.take_along_axis(lp, mx.array([[[0], [1]]]), axis=-1).squeeze(-1)
        value, _ = L.policy_loss(taken, mx.stop_gradient(taken), mx.array([0.0]), mx.ones((1, 2)),
                                 entropy=L.token_entropy(z), entropy_coef=0.5)
        return value

    stepped = logits - 0.1 * mx.grad(loss)(logits)
    assert float(mx.sum(L.token_entropy(stepped))) > float(mx.sum(L.token_entropy(logits)))


# ---------------------------------------------------------------- work the config does not need


def test_log_prob_inputs_are_built_once_per_micro_batch_per_step(tmp_path, monkeypatch):
    calls = []
    real = update_module.logprob_inputs
    monkeypatch.setattr(update_module, "logprob_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = Trainer(tiny_cfg(tmp_path, optim={"grad_accum": 2}, algo={"num_iterations": 3}), tmp_path / "run")
    try:
        trainer.run_step()
    finally:
        trainer.close()
    assert len(calls) == 2  # two micro-batches: reference pass, shapes and three iterations share them


def test_token_mask_marks_each_rows_sampled_tokens():
    assert token_mask([[5, 6], [], [7]], 3).tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]


def test_the_reference_pass_runs_the_base_layers_without_the_adapters(tmp_path):
    """Inside adapters_disabled no LoRA layer is left in the model (their matrix products are not
    computed at all), the log-probs are the base model's, and the adapters are back afterwards."""
    from mlx_coach.models.lora import _lora_layer_types, adapters_disabled

    trainer = Trainer(tiny_cfg(tmp_path), tmp_path / "run")
    try:
        perturb(trainer)
        model, lora = trainer.model, _lora_layer_types()
        count = lambda: sum(isinstance(m, lora) for _, m in model.named_modules())  # noqa: E731
        before = count()
        x = mx.array([[5, 6, 7, 8]])
        adapted = model(x)
        layers = [m for _, m in model.named_modules() if isinstance(m, lora)]
        with adapters_disabled(model):
            assert count() == 0
            base = model(x)
        scales = [m.scale for m in layers]
        for m in layers:  # the same numbers as scaling every adapter by 0
            m.scale = 0.0
        zero_scale = model(x)
        for m, scale in zip(layers, scales):
            m.scale = scale
        assert before > 0 and count() == before
        np.testing.assert_allclose(np.array(base), np.array(zero_scale), rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.array(adapted), np.array(base), atol=1e-4)  # the adapters do act outside
        np.testing.assert_allclose(np.array(model(x)), np.array(adapted), rtol=1e-6, atol=1e-6)
    finally:
        trainer.close()
