"""The RL loop on the builtin tiny model: gradient sign and scale, KL pull, exact resume, NaN guard."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_coach.config import from_dict, validate
from mlx_coach.trainer import Trainer, train


def tiny_cfg(tmp_path, **sections):
    base = {
        "model": {"path": "builtin:tiny", "lora_rank": 8, "lora_alpha": 16},
        "data": {"tasks": "builtin", "val_fraction": 0.2},
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


def test_reward_rises_with_a_programmatic_reward(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"steps": 15}, rollout={"group_size": 8, "max_new_tokens": 12},
                   optim={"lr": 1e-2})
    train(cfg, tmp_path / "run")
    r = [row["reward/mean"] for row in step_rows(tmp_path / "run")]
    assert len(r) == 15
    start, end = np.mean(r[:3]), np.mean(r[-3:])
    # a random byte-level policy emits the target ~1/256 of the time
    assert start < 0.03
    assert end > max(5 * start, 0.06), r


def test_kl_term_pulls_toward_the_reference(tmp_path):
    """Reward carries no signal; only beta * KL moves the policy, and it must move it back."""
    cfg = tiny_cfg(tmp_path, algo={"beta": 0.5, "kl_estimator": "k3"}, train={"steps": 12},
                   rewards=[{"type": "function", "function": "reward_fns:zero"}], optim={"lr": 3e-3})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        # push the adapters away from zero so the policy differs from the reference
        mx.random.seed(1)
        perturbed = [(k, v + 0.15 * mx.random.normal(v.shape)) for k, v in tree_flatten(trainer.model.trainable_parameters())]
        trainer.model.update(tree_unflatten(perturbed))
        kls = [trainer.run_step()["kl/mean"] for _ in range(12)]
    finally:
        trainer.close()
    assert kls[0] > 1e-3
    assert np.mean(kls[-3:]) < 0.6 * np.mean(kls[:3]), kls


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


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """Micro-batches weighted by their share of tokens give the full batch's update."""
    weights = {}
    for accum in (1, 4):
        cfg = tiny_cfg(tmp_path, optim={"lr": 1e-3, "grad_accum": accum, "grad_clip": 0.0}, train={"steps": 1},
                       algo={"beta": 0.1})
        run = tmp_path / f"accum{accum}"
        train(cfg, run)
        weights[accum] = mx.load(str(run / "checkpoints/step-1/adapters.safetensors"))
    for k in weights[1]:
        np.testing.assert_allclose(np.array(weights[1][k]), np.array(weights[4][k]), atol=2e-6, err_msg=k)


def test_multiple_iterations_per_rollout_clip_the_ratio(tmp_path):
    cfg = tiny_cfg(tmp_path, algo={"num_iterations": 4, "epsilon": 0.05}, optim={"lr": 1e-2}, train={"steps": 2})
    train(cfg, tmp_path / "run")
    r = step_rows(tmp_path / "run")
    # later iterations move the policy away from the behaviour log-probs, so some ratios get clipped
    assert max(x["policy/clip_frac"] for x in r) > 0.0
    assert any(abs(x["policy/ratio_mean"] - 1.0) > 1e-3 for x in r)


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
    from mlx_coach.config import OptimConfig
    from mlx_coach.trainer import make_optimizer

    scale = [1.0]
    opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 14,
                         scale=lambda: scale[0])
    sched = opt._schedulers["learning_rate"]
    lrs = [float(sched(mx.array(s))) for s in range(15)]
    np.testing.assert_allclose(lrs[:5], [2.5e-4, 4.375e-4, 6.25e-4, 8.125e-4, 1e-3], rtol=1e-5)  # linear warmup
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1e-4, rel=1e-4)  # cosine
    scale[0] = 0.5
    assert float(sched(mx.array(4))) == pytest.approx(5e-4)  # the health factor scales the rate itself


@pytest.mark.parametrize("algo", [
    {"advantage": "dr_grpo", "aggregation": "constant"},
    {"advantage": "reinforce", "baseline_decay": 0.5, "aggregation": "sequence"},
    {"kl_in": "reward", "beta": 0.2, "kl_estimator": "k1"},
    {"kl_target": 0.01, "kl_horizon": 10, "beta": 0.1, "kl_estimator": "k2"},
    {"entropy_coef": 0.01, "mask_truncated": True, "scale_rewards": "batch", "epsilon_high": 0.3},
])
def test_objective_variants_train_and_log_finite_numbers(tmp_path, algo):
    cfg = tiny_cfg(tmp_path, algo=algo, train={"steps": 2})
    last = train(cfg, tmp_path / "run")
    for key in ("loss/policy", "grad/norm", "kl/mean", "kl/beta", "reward/mean"):
        assert np.isfinite(last[key]), (key, last[key])
    assert last["train/skipped_steps"] == 0
    if "kl_target" in algo:
        # step 1 observed KL 0 < target, so the controller lowered beta: 0.1 * (1 - 0.2 / 10)
        assert last["kl/beta"] == pytest.approx(0.098)
