"""The RL loop on the builtin tiny model: gradient sign and scale, KL pull, exact resume, NaN guard."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_coach.config.tree import from_dict, validate
from mlx_coach.engine.logprobs import sequence_logprobs
from mlx_coach.models.lora import adapters_disabled
from mlx_coach.rl import objective
from mlx_coach.rl.trainer import Trainer
from mlx_coach.rl.batch import StepBatch, micro_batches
from mlx_coach.rl.loop import train


def write_short_tasks(folder, n=40):
    """n one-line stubs: where the reward ignores the task, short prompts make a step ~10x cheaper."""
    path = Path(folder) / "short_tasks.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"task_id": f"s/{i}", "prompt": f"def f{i}(x):\n", "entry_point": f"f{i}",
                                        "test": "def check(c):\n    assert c(1) == 1\n"}) + "\n" for i in range(n)))
    return str(path)


def tiny_cfg(tmp_path, **sections):
    """The builtin tiny model on 40 short stubs (32 train, 8 validation), a function reward, no KL."""
    base = {
        "model": {"path": "builtin:tiny", "lora_rank": 8, "lora_alpha": 16},
        "data": {"tasks": write_short_tasks(tmp_path), "val_fraction": 0.2},
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 12, "temperature": 1.0},
        "algo": {"beta": 0.0},
        "optim": {"lr": 2e-3, "grad_clip": 1.0},
        "train": {"steps": 4, "checkpoint_every": 0, "epochs_val": False, "output": str(tmp_path / "run")},
        "rewards": [{"type": "function", "function": "reward_fns:target_share"}],
        "telemetry": {"progress": False},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    cfg = from_dict(base)
    validate(cfg)
    return cfg


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_rows(run_dir):
    return [r for r in rows(run_dir) if "reward/mean" in r]


def perturb(trainer, seed=1, scale=0.15):
    """Push the adapters away from zero so the policy differs from the reference."""
    mx.random.seed(seed)
    params = tree_flatten(trainer.model.trainable_parameters())
    trainer.model.update(tree_unflatten([(k, v + scale * mx.random.normal(v.shape)) for k, v in params]))


def test_reward_rises_with_a_programmatic_reward(tmp_path):
    """The share of a target letter rises from what the untrained policy samples.

    Margins from seeds 0-3 on this CPU (2026-11-30): step-1 reward (before any update) 0.009-0.024,
    mean of steps 6-8 0.119-0.143. Trajectories differ across CPUs in their last bits and then diverge,
    so the test asserts the rise, not a trajectory: end > max(4 x start, start + 0.06)."""
    cfg = tiny_cfg(tmp_path, train={"steps": 8},
                   rollout={"group_size": 8, "max_new_tokens": 12}, optim={"lr": 1e-2})
    train(cfg, tmp_path / "run")
    r = [row["reward/mean"] for row in step_rows(tmp_path / "run")]
    assert len(r) == 8
    start, end = r[0], np.mean(r[-3:])
    assert start < 0.05  # the untrained policy rarely writes the target letter
    assert end > max(4 * start, start + 0.06), r


def exact_kl_to_reference(trainer, contexts):
    """Forward KL(reference || policy), summed over the vocabulary at every position of fixed sequences
    and averaged: what a k3 loss term descends, computed exactly rather than from samples."""
    L = max(len(c) for c in contexts)
    x = mx.array([c + [0] * (L - len(c)) for c in contexts])
    mask = mx.array([[1.0] * len(c) + [0.0] * (L - len(c)) for c in contexts])
    logp = trainer.model(x).astype(mx.float32)
    with adapters_disabled(trainer.model):
        logq = trainer.model(x).astype(mx.float32)
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
    logq = logq - mx.logsumexp(logq, axis=-1, keepdims=True)
    kl = mx.sum(mx.exp(logq) * (logq - logp), axis=-1)
    return float((mx.sum(kl * mask) / mx.sum(mask)).item())


def test_kl_term_pulls_toward_the_reference(tmp_path):
    """Reward carries no signal; only beta * KL moves the policy, and it must move it back.

    Measured exactly on fixed prompt + completion sequences sampled once from the perturbed policy
    (the sampled kl/mean is as noisy per step as the effect). Seeds 0-5 on this CPU (2026-11-30): the
    mean over the last 5 of 20 steps was 0.46-0.62 of the starting KL; the test asserts < 0.8."""
    from mlx_coach.engine.rollout import RolloutConfig, generate_rollouts

    cfg = tiny_cfg(tmp_path, algo={"beta": 0.5, "kl_estimator": "k3"},
                   train={"steps": 20}, rollout={"group_size": 8, "max_new_tokens": 12},
                   rewards=[{"type": "function", "function": "reward_fns:zero"}], optim={"lr": 3e-3})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        perturb(trainer)
        mx.random.seed(1000)
        fixed = generate_rollouts(trainer.model, trainer.tokenizer, [t.prompt for t in trainer.train_tasks[:8]],
                                  RolloutConfig(group_size=1, max_new_tokens=12, stop=[])).rollouts
        contexts = [r.prompt_ids + r.token_ids for r in fixed]
        start = exact_kl_to_reference(trainer, contexts)
        kls = []
        for _ in range(20):
            trainer.run_step()
            kls.append(exact_kl_to_reference(trainer, contexts))
    finally:
        trainer.close()
    assert start > 0.1
    assert np.mean(kls[-5:]) < 0.8 * start, (start, kls)


def test_resume_is_exact(tmp_path):
    common = {"train": {"steps": 4, "checkpoint_every": 2}}
    straight = tiny_cfg(tmp_path, **common)
    train(straight, tmp_path / "straight")

    resumed = tiny_cfg(tmp_path, **common)
    train(resumed, tmp_path / "resumed", steps=2)
    assert (tmp_path / "resumed/checkpoints/step-2").is_dir()
    train(resumed, tmp_path / "resumed", resume=True, steps=4)

    a = mx.load(str(tmp_path / "straight/checkpoints/step-4/adapters.safetensors"))
    b = mx.load(str(tmp_path / "resumed/checkpoints/step-4/adapters.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5, err_msg=k)
    sa = json.loads((tmp_path / "straight/checkpoints/step-4/state.json").read_text())
    sb = json.loads((tmp_path / "resumed/checkpoints/step-4/state.json").read_text())
    assert (sa["step"], sa["epoch"], sa["pos"]) == (sb["step"], sb["epoch"], sb["pos"]) == (4, 0, 16)
    # the resumed run's metrics continue without duplicated steps
    steps = [r["step"] for r in step_rows(tmp_path / "resumed")]
    assert steps == [1, 2, 3, 4]
    ra = [r["reward/mean"] for r in step_rows(tmp_path / "straight")]
    rb = [r["reward/mean"] for r in step_rows(tmp_path / "resumed")]
    np.testing.assert_allclose(ra, rb, atol=1e-6)


def test_non_finite_loss_skips_the_update_and_alerts(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"steps": 3, "checkpoint_every": 1, "debug_nan_steps": [2]})
    train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    r = step_rows(run)
    assert [x["train/skipped_steps"] for x in r] == [0, 1, 1]
    w1 = mx.load(str(run / "checkpoints/step-1/adapters.safetensors"))
    w2 = mx.load(str(run / "checkpoints/step-2/adapters.safetensors"))
    w3 = mx.load(str(run / "checkpoints/step-3/adapters.safetensors"))
    assert all(np.array_equal(np.array(w1[k]), np.array(w2[k])) for k in w1)  # untouched, not zeroed
    assert any(not np.array_equal(np.array(w2[k]), np.array(w3[k])) for k in w2)  # training went on
    alerts = [json.loads(line) for line in (run / "alerts.jsonl").read_text().splitlines()]
    assert any(a["step"] == 2 and "finite" in (a.get("code", "") + a.get("message", "")).lower() for a in alerts)


def fixed_batch(trainer, n=32, prompt_len=64, comp_len=64, seed=0):
    """A batch of random token ids (no sampling), with reference log-probs as behaviour log-probs."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 256, prompt_len).tolist() for _ in range(n)]
    comps = [rng.integers(0, 256, int(rng.integers(comp_len // 2, comp_len + 1))).tolist() for _ in range(n)]
    T = max(len(c) for c in comps)
    mask_np = np.array([[1.0] * len(c) + [0.0] * (T - len(c)) for c in comps], dtype=np.float32)
    ref = trainer.reference_logprobs(prompts, comps)
    adv = mx.array(rng.standard_normal(n).astype(np.float32))
    return StepBatch(prompt_ids=prompts, completion_ids=comps, behaviour_logp=ref, reference_logp=ref, advantages=adv,
                     loss_mask=mask_np, beta=0.1)


def tree_gap(a, b):
    """(norm of a - b, norm of a) over two flattened gradient trees: float sums in another order differ
    in the last bits, so gradients are compared relative to their size."""
    assert a.keys() == b.keys() and len(a) > 0
    diff = np.sqrt(sum(float(mx.sum(mx.square(a[k] - b[k])).item()) for k in a))
    norm = np.sqrt(sum(float(mx.sum(mx.square(a[k])).item()) for k in a))
    return diff, norm


def completions(lengths, seed=0):
    """Random token ids, row i the first lengths[i] of its own 32 draws: calls with the same seed give
    each row the same prefix whatever the lengths."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, 32).tolist()[:n] for n in lengths]


def scored_batch(trainer, rewards, comps, truncated=()):
    """The step's batch as run_step builds it, from rollouts of `comps` (G rows a prompt, the sampler's
    log-probs the policy's own, the rows in `truncated` cut off by the length limit) and fresh scores,
    through the trainer's observe_kl and compute_advantages."""
    G = trainer.cfg.rollout.group_size
    rng = np.random.default_rng(1000)
    prompts = [p for p in (rng.integers(0, 256, 6).tolist() for _ in range(len(comps) // G)) for _ in range(G)]
    behaviour, _, _ = sequence_logprobs(trainer.model, prompts, comps, temperature=trainer.temperature)
    rollouts = [SimpleNamespace(logprobs=np.array(behaviour[i, :len(c)]).tolist(), token_ids=c, entropies=[],
                                finish_reason="length" if i in truncated else "stop") for i, c in enumerate(comps)]
    batch = StepBatch(prompt_ids=prompts, completion_ids=comps, rollouts=rollouts,
                      reference_logp=trainer.reference_logprobs(prompts, comps), tasks=[None] * (len(comps) // G),
                      scores=[SimpleNamespace(total=r, provenance="fresh") for r in rewards])
    trainer.observe_kl(batch)
    trainer.compute_advantages(batch)
    return batch


def batch_gradient(trainer, batch):
    """(flattened gradient, loss) of the whole batch before any update, micro-batches as configured."""
    grads, loss, _ = trainer.updater.accumulate(batch, batch.beta, trainer.updater.split(batch.prompt_ids,
                                                                                         batch.completion_ids))
    return dict(tree_flatten(grads)), loss.item()


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, aggregation):
    """Micro-batches weighted by their share of the aggregation's normaliser give the full batch's loss
    and gradient, with rows masked out as truncated rows are (one micro-batch has no trained token)."""
    results = {}
    for accum in (1, 4):
        cfg = tiny_cfg(tmp_path, optim={"grad_accum": accum}, algo={"beta": 0.1, "aggregation": aggregation})
        trainer = Trainer(cfg, tmp_path / f"accum{accum}")
        try:
            perturb(trainer)  # KL(policy || reference) > 0: the beta term has a gradient too
            batch = fixed_batch(trainer, n=16, prompt_len=16, comp_len=24)
            batch.loss_mask[[1, 4, 5, 6, 7, 13]] = 0.0  # as mask_truncated does; rows 4-7 are a whole micro-batch
            results[accum] = batch_gradient(trainer, batch)
        finally:
            trainer.close()
    (g1, l1), (g4, l4) = results[1], results[4]
    assert l1 == pytest.approx(l4, rel=1e-4, abs=1e-6)
    diff, norm = tree_gap(g1, g4)
    assert norm > 0 and diff <= 1e-4 * norm, (diff, norm)


def test_bucketed_update_gives_the_losses_and_gradients_of_exact_shapes(tmp_path):
    results = {}
    for bucket in (0, 32):
        trainer = Trainer(tiny_cfg(tmp_path, rollout={"bucket": bucket}, algo={"beta": 0.1}), tmp_path / f"b{bucket}")
        try:
            batch = fixed_batch(trainer, n=8, prompt_len=13, comp_len=20)
            g, loss, _ = trainer.updater.accumulate(batch, 0.1, micro_batches(8, 2))
            results[bucket] = (dict(tree_flatten(g)), loss.item(), np.array(batch.reference_logp))
        finally:
            trainer.close()
    (g0, l0, r0), (g1, l1, r1) = results[0], results[32]
    np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-6)  # reference log-probs
    assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-7)
    diff = np.sqrt(sum(float(mx.sum(mx.square(g1[k] - g0[k])).item()) for k in g0))
    norm = np.sqrt(sum(float(mx.sum(mx.square(g0[k])).item()) for k in g0))
    assert diff <= 1e-4 * norm, (diff, norm)


def test_shared_prompts_give_the_per_sample_reference_loss_and_gradients(tmp_path):
    """optim.share_prompts (each group's prompt computed once) against the per-sample forward, in the
    trainer's reference pass and update, with two micro-batches that split a group."""
    rng = np.random.default_rng(0)
    prompts = [p for p in (rng.integers(0, 256, n).tolist() for n in (9, 30, 17)) for _ in range(4)]
    comps = [rng.integers(0, 256, int(rng.integers(1, 20))).tolist() for _ in prompts]
    adv = mx.array(rng.standard_normal(len(prompts)).astype(np.float32))
    results = {}
    for share in (True, False):
        trainer = Trainer(tiny_cfg(tmp_path, optim={"share_prompts": share, "grad_accum": 2}, algo={"beta": 0.1}),
                          tmp_path / f"share{share}")
        try:
            assert trainer.share_prompts is share
            perturb(trainer)
            ref = trainer.reference_logprobs(prompts, comps)
            T = ref.shape[1]
            mask_np = np.array([[1.0] * len(c) + [0.0] * (T - len(c)) for c in comps], dtype=np.float32)
            batch = StepBatch(prompt_ids=prompts, completion_ids=comps, behaviour_logp=ref, reference_logp=ref,
                              advantages=adv, loss_mask=mask_np)
            g, loss, _ = trainer.updater.accumulate(batch, 0.1, micro_batches(len(prompts), 2))
            results[share] = (np.array(ref), loss.item(), dict(tree_flatten(g)))
        finally:
            trainer.close()
    (r1, l1, g1), (r0, l0, g0) = results[True], results[False]
    np.testing.assert_allclose(r1, r0, atol=1e-4)
    assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-7)
    diff = np.sqrt(sum(float(mx.sum(mx.square(g1[k] - g0[k])).item()) for k in g0))
    norm = np.sqrt(sum(float(mx.sum(mx.square(g0[k])).item()) for k in g0))
    assert norm > 0 and diff <= 1e-4 * norm, (diff, norm)

def test_gradient_accumulation_bounds_peak_memory(tmp_path):
    """Each micro-batch is evaluated before the next one: the reference pass and the update need
    well under half the extra memory with grad_accum 4 as with grad_accum 1, on the same batch."""
    extra = {}
    for accum in (1, 4):
        cfg = tiny_cfg(tmp_path, optim={"grad_accum": accum}, algo={"beta": 0.1})
        trainer = Trainer(cfg, tmp_path / f"mem{accum}")
        try:
            batch = fixed_batch(trainer, n=32, prompt_len=96, comp_len=64)
            mx.eval(batch.behaviour_logp, batch.advantages)
            mx.clear_cache()
            held = mx.get_active_memory()
            mx.reset_peak_memory()
            trainer.reference_logprobs(batch.prompt_ids, batch.completion_ids)
            trainer.update(batch)
            extra[accum] = mx.get_peak_memory() - held
        finally:
            trainer.close()
    assert extra[1] > 0 and extra[4] < 0.5 * extra[1], extra


def test_lora_dropout_acts_in_the_update_and_not_while_sampling(tmp_path):
    weights, first_reward = {}, {}
    for p in (0.0, 0.5):
        run = tmp_path / f"dropout{p}"
        train(tiny_cfg(tmp_path, model={"lora_dropout": p}, train={"steps": 1}), run)
        weights[p] = mx.load(str(run / "checkpoints/step-1/adapters.safetensors"))
        first_reward[p] = step_rows(run)[0]["reward/mean"]
    assert first_reward[0.0] == first_reward[0.5]  # the same samples: no dropout while generating
    assert any(not np.allclose(np.array(weights[0.0][k]), np.array(weights[0.5][k]), atol=1e-6)
               for k in weights[0.0])  # but the update saw dropped inputs


def test_adaptive_kl_sees_the_kl_when_the_penalty_is_in_the_reward(tmp_path):
    """kl/mean is KL(behaviour || reference) whatever kl_in is, and the controller (horizon in samples)
    raises beta when that KL is far above its target."""
    cfg = tiny_cfg(tmp_path, algo={"kl_in": "reward", "beta": 0.04, "kl_target": 1e-4, "kl_estimator": "k3"},
                   train={"steps": 4})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        perturb(trainer)
        rows = [trainer.run_step() for _ in range(4)]
        beta = trainer.state.kl_controller.beta
    finally:
        trainer.close()
    assert all(r["kl/mean"] > 1e-3 for r in rows), [r["kl/mean"] for r in rows]
    assert beta == pytest.approx(0.04 * (1 + 0.2 * 16 / 256) ** 4, rel=1e-6)  # 16 samples a step, error clipped


def test_multiple_iterations_per_rollout_clip_the_ratio(tmp_path):
    """Iteration 1's pi_old is its own forward: ratio exactly 1, nothing clipped, although the sampler's
    numbers (the reference's here) differ from the policy's. Later iterations compare with pi_old taken
    before the update, so a large step with a small epsilon clips tokens."""
    cfg = tiny_cfg(tmp_path, algo={"num_iterations": 4, "epsilon": 0.05}, optim={"lr": 1e-2})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        perturb(trainer)
        result = trainer.update(fixed_batch(trainer, n=8, prompt_len=16, comp_len=24))
    finally:
        trainer.close()
    assert result.skipped == 0 and len(result.ratio_mean) == len(result.clip_frac) == 4
    assert result.ratio_mean[0] == 1.0 and result.clip_frac[0] == 0.0
    assert all(c > 0.0 for c in result.clip_frac[1:]), result.clip_frac
    assert all(abs(r - 1.0) > 1e-4 for r in result.ratio_mean[1:]), result.ratio_mean


def test_tokens_beyond_the_clip_get_no_gradient():
    """Advantages +1 and -1, ratios on both sides of [1 - epsilon, 1 + epsilon_high] = [0.8, 1.3]: a
    token whose clipped term is the smaller (A > 0 above 1.3, A < 0 below 0.8) has zero gradient, every
    other has d loss / d logp = -A x ratio / tokens."""
    ratio = np.array([[1.5, 1.25, 0.7, 1.0], [0.7, 0.75, 1.5, 1.1]])
    beyond = np.array([[1, 0, 0, 0], [1, 1, 0, 0]])
    adv = np.array([1.0, -1.0])
    old = mx.full((2, 4), np.log(0.3))
    logp = old + mx.array(np.log(ratio), dtype=mx.float32)

    def loss(lp):
        return objective.policy_loss(lp, old, mx.array(adv), mx.ones((2, 4)), epsilon=0.2, epsilon_high=0.3)

    grad = mx.grad(lambda lp: loss(lp)[0])(logp)
    np.testing.assert_allclose(np.array(grad), np.where(beyond, 0.0, -adv[:, None] * ratio / 8), rtol=1e-5, atol=1e-8)
    assert float(loss(logp)[1]["clip_frac"]) == pytest.approx(3 / 8)


def test_rows_beyond_the_clip_add_nothing_to_the_trainers_gradient(tmp_path):
    """In an iteration after the first, rows whose pi_old puts the ratio beyond the clip on their
    advantage's side (e for A > 0, 1/e for A < 0) give the gradient of the batch without their
    advantage; on the other side (the unclipped term is the smaller) they count."""
    trainer = Trainer(tiny_cfg(tmp_path), tmp_path / "run")
    try:
        perturb(trainer)
        batch = fixed_batch(trainer, n=8, prompt_len=16, comp_len=24)
        forwards = trainer.updater.forwards(batch.prompt_ids, batch.completion_ids)
        chunks = [chunk for chunk, _ in forwards]
        clipped = np.array([0, 3, 5])
        sign = np.zeros(8, dtype=np.float32)
        sign[clipped] = np.sign(np.array(batch.advantages))[clipped]
        assert len(set(sign[clipped])) == 2  # both sides of the clip

        def gradient(old_shift, zero_rows):
            inputs = []
            for chunk, x in forwards:
                x = trainer.updater.micro_inputs(batch, chunk, x)
                x["old_logp"] = trainer.updater.old_logprobs(x) + mx.array(old_shift[chunk])[:, None]
                if zero_rows:
                    x["adv"] = mx.where(mx.array(np.isin(chunk, clipped)), 0.0, x["adv"])
                inputs.append(x)
            grads, _, stats = trainer.updater.accumulate(batch, 0.0, chunks, inputs, first_iteration=False)
            return dict(tree_flatten(grads)), stats

        beyond, stats = gradient(-sign, zero_rows=False)  # log pi_old = log pi - sign(A): ratio e^sign(A)
        without, _ = gradient(np.zeros(8, dtype=np.float32), zero_rows=True)
        inside, _ = gradient(sign, zero_rows=False)
    finally:
        trainer.close()
    diff, norm = tree_gap(without, beyond)
    assert norm > 0 and diff <= 1e-4 * norm, (diff, norm)
    assert float(stats["clip_frac"]) == pytest.approx(batch.loss_mask[clipped].sum() / batch.loss_mask.sum(), rel=1e-5)
    diff, norm = tree_gap(without, inside)
    assert diff > 0.05 * norm, (diff, norm)


def test_full_fine_tuning_uses_a_frozen_reference_and_saves_all_weights(tmp_path):
    import mlx_lm

    cfg = tiny_cfg(tmp_path, model={"fine_tune": "full"}, algo={"beta": 0.1}, optim={"lr": 1e-3},
                   train={"steps": 2})
    train(cfg, tmp_path / "run")
    r = step_rows(tmp_path / "run")
    assert r[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6) and r[1]["kl/mean"] > 1e-6  # reference stays put
    ckpt = tmp_path / "run/checkpoints/step-2"
    saved = mx.load(str(ckpt / "adapters.safetensors"))
    assert json.loads((ckpt / "adapter_config.json").read_text())["fine_tune_type"] == "full"
    assert any("embed_tokens" in k for k in saved) and not any("lora" in k for k in saved)
    model, tok = mlx_lm.load(str(tmp_path / "run/base_model"), adapter_path=str(ckpt))
    w = dict(tree_flatten(model.parameters()))
    k = next(k for k in saved if "q_proj" in k)
    np.testing.assert_array_equal(np.array(w[k]), np.array(saved[k]))


def test_schedule_warmup_cosine_and_health_scale():
    from mlx_coach.config.tree import OptimConfig
    from mlx_coach.rl.setup import make_optimizer

    scale = [1.0]
    opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 14,
                         scale=lambda: scale[0])
    sched = opt._schedulers["learning_rate"]
    lrs = [float(sched(mx.array(s))) for s in range(15)]
    np.testing.assert_allclose(lrs[:5], [2.5e-4, 4.375e-4, 6.25e-4, 8.125e-4, 1e-3], rtol=1e-5)  # linear warmup
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1e-4, rel=1e-4)  # cosine
    scale[0] = 0.5
    assert float(sched(mx.array(4))) == pytest.approx(5e-4)  # the health factor scales the rate itself


def plain_logprobs(model, prompts, comps):
    """(log-probs, entropies) [B, T] of each completion token at temperature 1, from a plain forward of
    each row's prompt + completion alone: apart from engine.logprobs (no shared prompt, no padding), and
    differentiable."""
    T = max(len(c) for c in comps)
    logp, entropy = [], []
    for p, c in zip(prompts, comps):
        logits = model(mx.array([p + c]))[0, len(p) - 1: len(p) + len(c) - 1].astype(mx.float32)
        every = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        logp.append(mx.pad(mx.take_along_axis(every, mx.array(c)[:, None], axis=-1)[:, 0], [(0, T - len(c))]))
        entropy.append(mx.pad(-mx.sum(mx.exp(every) * every, axis=-1), [(0, T - len(c))]))
    return mx.stack(logp), mx.stack(entropy)


def aggregation_weights(mask, aggregation, max_len):
    """W [B, T] such that the aggregate of x is sum(W * x): each trained token's weight, written out."""
    if aggregation == "token":
        return mask / mask.sum()
    if aggregation == "sequence":
        lengths = mask.sum(1, keepdims=True)
        return mask / np.maximum(lengths, 1) / (lengths > 0).sum()
    return mask / (len(mask) * max_len)  # constant


def expected_advantages(rewards, advantage, group_size, baseline):
    r = np.array(rewards, dtype=np.float64)
    if advantage == "reinforce":
        return r - baseline  # the baseline from before this batch
    g = r.reshape(-1, group_size)
    centred = g - g.mean(1, keepdims=True)
    return (centred / (g.std(1, keepdims=True) + 1e-4) if advantage == "grpo" else centred).reshape(-1)


VARIANTS = {  # algo, and the aggregation it must train with
    "grpo": ({"advantage": "grpo"}, "token"),
    "dr_grpo": ({"advantage": "dr_grpo"}, "constant"),
    "reinforce-sequence": ({"advantage": "reinforce", "aggregation": "sequence"}, "sequence"),
    "kl-in-loss-k3": ({"kl_in": "loss", "beta": 0.1, "kl_estimator": "k3"}, "token"),
    "entropy-bonus": ({"entropy_coef": 0.05}, "token"),
    "mask-truncated": ({"mask_truncated": True}, "token"),
}
REWARDS = [1.0, 0.0, 0.5, 0.25, 0.9, 0.3, 0.0, 0.6]  # two groups of 4, rewards all different
LENGTHS = [5, 12, 3, 7, 9, 2, 12, 4]  # rollout.max_new_tokens is 12
TRUNCATED = (1, 6)  # the rows at the length limit


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_objective_variants_give_the_hand_computed_loss_and_gradient(tmp_path, variant):
    """One batch's loss and gradient as the update takes them (`accumulate`, first iteration: ratio 1)
    against a hand computation from the model's own per-token log-probs (a plain forward), the
    advantages from the rewards, the aggregation's weights over the trained tokens, beta x k3 and the
    entropy bonus. The gradient is mx.grad of that loss written apart."""
    algo, aggregation = VARIANTS[variant]
    trainer = Trainer(tiny_cfg(tmp_path, algo=algo), tmp_path / "run")
    try:
        # adapters away from zero: every LoRA matrix has a gradient, and the KL is > 0 but below its clamp
        perturb(trainer, scale=0.03)
        trainer.state.baseline = 0.2  # reinforce: the baseline earlier steps left
        comps = completions(LENGTHS)
        batch = scored_batch(trainer, REWARDS, comps, truncated=TRUNCATED)
        adv = expected_advantages(REWARDS, algo.get("advantage", "grpo"), 4, 0.2)
        np.testing.assert_allclose(np.array(batch.advantages), adv, rtol=1e-5, atol=1e-6)
        grads, loss, stats = trainer.updater.accumulate(batch, batch.beta, micro_batches(8, 1))

        mask = (np.arange(12)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float64)
        if algo.get("mask_truncated"):
            mask[list(TRUNCATED)] = 0.0
        weights = aggregation_weights(mask, aggregation, max_len=12)
        beta, coef = algo.get("beta", 0.0), algo.get("entropy_coef", 0.0)
        assert batch.beta == beta
        with adapters_disabled(trainer.model):
            ref, _ = plain_logprobs(trainer.model, batch.prompt_ids, comps)

        def surrogate(model):  # at ratio 1 the clipped term's gradient is A x d logp
            logp, entropy = plain_logprobs(model, batch.prompt_ids, comps)
            d = ref - logp
            per_token = -mx.array(adv[:, None], dtype=mx.float32) * logp + beta * (mx.exp(d) - d - 1.0) - coef * entropy
            return mx.sum(mx.array(weights, dtype=mx.float32) * per_token)

        _, expected_grads = nn.value_and_grad(trainer.model, surrogate)(trainer.model)
        logp, entropy = (np.array(a, dtype=np.float64) for a in plain_logprobs(trainer.model, batch.prompt_ids, comps))
    finally:
        trainer.close()
    d = np.array(ref, dtype=np.float64) - logp
    k3 = np.exp(d) - d - 1.0
    assert (k3 * mask).max() < objective.KL_CLAMP
    pg, kl = -(weights * adv[:, None]).sum(), beta * (weights * k3).sum()
    assert float(stats["pg_loss"]) == pytest.approx(pg, rel=1e-4, abs=1e-6)
    assert float(stats["kl_loss"]) == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert loss.item() == pytest.approx(pg + kl - coef * (weights * entropy).sum(), rel=1e-4, abs=1e-6)
    diff, norm = tree_gap(dict(tree_flatten(expected_grads)), dict(tree_flatten(grads)))
    assert norm > 0 and diff <= 1e-4 * norm, (diff, norm)


def test_truncated_rows_get_no_gradient_under_mask_truncated(tmp_path):
    """Other tokens in the rows cut off by the length limit change neither the loss nor the gradient
    under algo.mask_truncated; without it the same change moves the gradient."""
    comps = completions(LENGTHS)
    other = [completions(LENGTHS, seed=7)[i] if i in TRUNCATED else c for i, c in enumerate(comps)]
    results = {}
    for masked in (True, False):
        trainer = Trainer(tiny_cfg(tmp_path, algo={"mask_truncated": masked}), tmp_path / f"masked{masked}")
        try:
            perturb(trainer)
            for name, tokens in (("sampled", comps), ("other", other)):
                batch = scored_batch(trainer, REWARDS, tokens, truncated=TRUNCATED)
                results[masked, name] = batch_gradient(trainer, batch)
        finally:
            trainer.close()
    (g, loss), (g_other, loss_other) = results[True, "sampled"], results[True, "other"]
    assert loss == pytest.approx(loss_other, rel=1e-5, abs=1e-7)
    diff, norm = tree_gap(g, g_other)
    assert norm > 0 and diff <= 1e-4 * norm, (diff, norm)
    diff, norm = tree_gap(results[False, "sampled"][0], results[False, "other"][0])
    assert diff > 0.05 * norm, (diff, norm)


def test_the_entropy_bonus_raises_entropy_in_one_step(tmp_path):
    """Equal rewards (no advantage) and no KL term: the bonus alone moves the policy, and one update
    raises the mean entropy over the batch's tokens."""
    trainer = Trainer(tiny_cfg(tmp_path, algo={"entropy_coef": 0.05}), tmp_path / "run")
    try:
        perturb(trainer)
        comps = completions(LENGTHS)
        batch = scored_batch(trainer, [0.5] * 8, comps)
        assert not np.any(np.array(batch.advantages))
        mask = batch.loss_mask

        def mean_entropy():
            entropy = np.array(plain_logprobs(trainer.model, batch.prompt_ids, comps)[1])
            return float((entropy * mask).sum() / mask.sum())

        before = mean_entropy()
        result = trainer.update(batch)
        after = mean_entropy()
    finally:
        trainer.close()
    assert result.skipped == 0 and result.update_ratio[0] > 0
    assert after > before, (before, after)


def test_dr_grpo_divides_by_rows_times_max_new_tokens_not_by_tokens(tmp_path):
    """Dr. GRPO's normaliser is B x rollout.max_new_tokens: tokens that carry no signal (a group of
    equal rewards) made longer change neither the loss nor the gradient, where a token mean shrinks
    both by the share of tokens they add; doubling max_new_tokens halves both."""
    rewards = [1.0, 0.0, 0.5, 0.25] + [0.5] * 4
    lengths = {"short": [5, 12, 3, 7, 2, 2, 2, 2], "long": [5, 12, 3, 7, 12, 10, 12, 11]}
    results = {}
    for name, algo, max_new in (("auto", {"advantage": "dr_grpo"}, 12), ("auto24", {"advantage": "dr_grpo"}, 24),
                                ("token", {"advantage": "dr_grpo", "aggregation": "token"}, 12)):
        trainer = Trainer(tiny_cfg(tmp_path, algo=algo, rollout={"max_new_tokens": max_new}), tmp_path / name)
        try:
            perturb(trainer)
            for length, n in lengths.items():
                results[name, length] = batch_gradient(trainer, scored_batch(trainer, rewards, completions(n)))
        finally:
            trainer.close()

    def assert_scaled(a, b, factor):  # b = factor x a, loss and gradient
        (ga, la), (gb, lb) = a, b
        assert lb == pytest.approx(factor * la, rel=1e-4, abs=1e-7)
        diff, norm = tree_gap({k: factor * v for k, v in ga.items()}, gb)
        assert norm > 0 and diff <= 1e-4 * norm, (diff, norm)

    assert_scaled(results["auto", "short"], results["auto", "long"], 1.0)
    assert_scaled(results["auto", "short"], results["auto24", "short"], 0.5)
    assert_scaled(results["auto", "long"], results["auto24", "long"], 0.5)
    assert_scaled(results["token", "short"], results["token", "long"], sum(lengths["short"]) / sum(lengths["long"]))


def test_adaptive_kl_lowers_beta_while_the_policy_is_the_reference(tmp_path):
    """Step 1: policy = reference, observed KL 0 < target, so the controller lowers beta by the clipped
    error, and 16 samples exceed the 10-sample horizon, so by the full 20%."""
    cfg = tiny_cfg(tmp_path, algo={"kl_target": 0.01, "kl_horizon": 10, "beta": 0.1, "kl_estimator": "k2"})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        row = trainer.run_step()
    finally:
        trainer.close()
    assert row["kl/mean"] == pytest.approx(0.0, abs=1e-6)
    assert trainer.state.kl_controller.beta == pytest.approx(0.1 * (1 - 0.2))


def test_sandbox_timeouts_are_counted_not_passed_off_as_failing_programs(tmp_path):
    """A deadline no interpreter can meet: every sample is a timeout, unjudged (not a failing program),
    counted per step, never cached (a loaded machine must not fix a verdict), and trained on not at all:
    the adapters end where they started."""
    cfg = tiny_cfg(tmp_path, rewards=[{"type": "tests"}], sandbox={"timeout_s": 0.001, "workers": 2},
                   train={"steps": 2})
    train(cfg, tmp_path / "run")
    rows = step_rows(tmp_path / "run")
    assert [r["reward/timeout_count"] for r in rows] == [r["reward/unjudged_count"] for r in rows] == [16, 16]
    assert all(r["reward/count"] == 0 and r["reward/cached_count"] == 0 for r in rows)
    assert rows[-1]["cache/size"] == 0
    start = mx.load(str(tmp_path / "run/initial_trainable.safetensors"))
    end = mx.load(str(tmp_path / "run/checkpoints/step-2/adapters.safetensors"))
    assert start.keys() == end.keys() and all(np.array_equal(np.array(start[k]), np.array(end[k])) for k in start)


def test_repeated_non_finite_steps_are_each_counted_once_and_alerted(tmp_path):
    """With two updates per rollout a skipped step is still one step, and a repeat inside the
    alerts' cooldown is alerted too (issue 10, item 5)."""
    cfg = tiny_cfg(tmp_path, train={"steps": 4, "debug_nan_steps": [2, 3]}, algo={"beta": 0.0, "num_iterations": 2})
    train(cfg, tmp_path / "run")
    skipped = {r["step"]: r["train/skipped_steps"] for r in step_rows(tmp_path / "run")}
    assert skipped == {1: 0, 2: 1, 3: 2, 4: 2}
    alerts = [json.loads(line) for line in (tmp_path / "run/alerts.jsonl").read_text().splitlines()]
    assert [a["step"] for a in alerts if a["code"] == "nonfinite"] == [2, 3]


def test_stopping_at_n_and_resuming_to_2n_is_a_straight_2n_run_with_a_cosine_schedule(tmp_path):
    """Through the CLI as a user runs it: `--steps 4`, then `--resume --steps 8`, against a straight
    `--steps 8`, with warmup + cosine. `--steps` must not move the schedule (issue 10, item 2)."""
    import yaml

    from mlx_coach.cli import main
    from mlx_coach.config.tree import to_dict

    cfg = tiny_cfg(tmp_path, optim={"lr": 2e-3, "warmup_steps": 1, "schedule": "cosine"}, train={"steps": 20})
    path = tmp_path / "cosine.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    halves, straight = tmp_path / "halves", tmp_path / "straight"
    assert main(["train", "-c", str(path), "--output", str(halves), "--steps", "4"]) == 0
    assert main(["train", "--resume", str(halves), "--steps", "8"]) == 0
    assert main(["train", "-c", str(path), "--output", str(straight), "--steps", "8"]) == 0
    lr_a = [r["lr"] for r in step_rows(halves)]
    lr_b = [r["lr"] for r in step_rows(straight)]
    assert len(lr_a) == len(lr_b) == 8
    np.testing.assert_allclose(lr_a, lr_b, rtol=1e-6)
    assert lr_b[3] > lr_b[7] > 0  # it is a decaying schedule, not yet at its end
    a = mx.load(str(halves / "checkpoints/step-8/adapters.safetensors"))
    b = mx.load(str(straight / "checkpoints/step-8/adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5, err_msg=k)


@pytest.mark.parametrize("epochs_val", [False, True])
def test_val_every_scores_each_multiple_once_epoch_ends_included(tmp_path, epochs_val):
    # 32 training tasks, 16 prompts a step: epochs of 2 steps; val_every 2 falls on every epoch end, where the
    # epoch's own validation (epochs_val) must not be doubled and its absence must not skip val_every
    cfg = tiny_cfg(tmp_path, rollout={"group_size": 2, "prompts_per_step": 16, "max_new_tokens": 4},
                   train={"steps": 4, "val_every": 2, "epochs_val": epochs_val, "val_limit": 2},
                   rewards=[{"type": "tests"}])  # validation scores with the unit tests
    train(cfg, tmp_path / "run")
    assert [r["step"] for r in rows(tmp_path / "run") if "eval/pass@1" in r] == [2, 4]
