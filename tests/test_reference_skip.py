"""No work the config does not need (issue 27 items 2 and 3): with beta 0 the reference pass runs on the
cadence of algo.kl_observe_every only, health statistics on that of train.health_every, and neither changes
a sample or a gradient; the reference without the LoRA branches gives the log-probs of adapters at scale 0."""

import numpy as np
from mlx.utils import tree_flatten

from mlx_coach.engine.logprobs import logprobs_from_inputs
from mlx_coach.models.lora import _lora_layer_types
from mlx_coach.rl.trainer import Trainer
from mlx_coach.rl.update import on_cadence
from test_trainer import perturb, tiny_cfg

KL_TAGS = ("kl/mean", "kl/max")
HEALTH_TAGS = ("grad/update_ratio", "grad/norm/attention", "grad/norm/mlp", "grad/norm/adapters")


def run(tmp_path, name, every, steps=3):
    """`steps` steps at beta 0 with the reference pass and the health statistics every `every` steps: each
    step's sampled tokens and metrics, and the trainable weights after them."""
    cfg = tiny_cfg(tmp_path, algo={"beta": 0.0, "kl_observe_every": every}, train={"health_every": every},
                   rollout={"group_size": 2, "max_new_tokens": 8})
    trainer = Trainer(cfg, tmp_path / name)
    tokens, metrics = [], []
    real = trainer.roll_out_and_score

    def roll_out_and_score(tasks):  # the real phase, its sampled tokens kept
        batch, rounds = real(tasks)
        tokens.append([list(c) for c in batch.completion_ids])
        return batch, rounds

    trainer.roll_out_and_score = roll_out_and_score
    try:
        for _ in range(steps):
            metrics.append(trainer.run_step())
        weights = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    finally:
        trainer.close()
    return tokens, metrics, weights


def test_skipping_the_reference_and_health_changes_no_sample_and_no_gradient(tmp_path):
    every_step = run(tmp_path, "every", 1)  # the reference pass and health statistics at every step
    sparse = run(tmp_path, "sparse", 3)  # steps 1 and 3 only
    assert sparse[0] == every_step[0]  # the same samples at every step ...
    for name, w in every_step[2].items():  # ... and the same updates
        np.testing.assert_allclose(sparse[2][name], w, rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(np.abs(w).max() > 0 for k, w in every_step[2].items() if "lora_b" in k)  # the updates moved B
    for step, row in enumerate(every_step[1], start=1):
        assert all(tag in row for tag in KL_TAGS + HEALTH_TAGS), step
    for step, row in enumerate(sparse[1], start=1):
        observed = step in (1, 3)
        # absent, not 0, on the other steps
        assert all((tag in row) == observed for tag in KL_TAGS + HEALTH_TAGS), (step, sorted(row))
        assert (row["time/reference_s"] > 0) == observed
        if observed:
            assert abs(row["kl/mean"] - every_step[1][step - 1]["kl/mean"]) < 1e-6


def test_the_cadence_holds_step_one_and_every_nth():
    assert [s for s in range(1, 13) if on_cadence(s, 5)] == [1, 5, 10]
    assert [s for s in range(1, 4) if on_cadence(s, 1)] == [1, 2, 3]
    assert not any(on_cadence(s, 0) for s in range(1, 20))


def test_a_kl_target_or_a_beta_keeps_the_reference_at_every_step(tmp_path):
    for name, algo in (("beta", {"beta": 0.04}), ("target", {"beta": 0.0, "kl_target": 0.01, "kl_estimator": "k3"})):
        trainer = Trainer(tiny_cfg(tmp_path, algo={**algo, "kl_observe_every": 0}), tmp_path / name)
        try:
            assert all(trainer.reference_needed(s) for s in range(1, 12)), name
        finally:
            trainer.close()


def test_the_reference_without_lora_branches_equals_adapters_at_scale_zero(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path), tmp_path / "run")
    try:
        perturb(trainer)
        prompts, comps = [[5, 6, 7], [8, 9, 10, 11], [5, 6, 7]], [[12, 13, 14, 15], [16, 17], [18, 19, 20]]
        reference = np.array(trainer.reference_logprobs(prompts, comps))
        layers = [m for _, m in trainer.model.named_modules() if isinstance(m, _lora_layer_types())]
        scales = [m.scale for m in layers]
        try:
            for m in layers:
                m.scale = 0.0
            (_, x), = trainer.updater.forwards(prompts, comps)
            at_zero, _, _ = logprobs_from_inputs(trainer.model, x, temperature=trainer.temperature)
        finally:
            for m, scale in zip(layers, scales):
                m.scale = scale
        adapted, _, _ = logprobs_from_inputs(trainer.model, x, temperature=trainer.temperature)
        mask = np.array(x["mask"]) > 0
        np.testing.assert_allclose(reference[mask], np.array(at_zero)[mask], rtol=1e-5, atol=1e-5)
        assert np.abs(reference[mask] - np.array(adapted)[mask]).max() > 1e-4  # the adapters do act
    finally:
        trainer.close()
