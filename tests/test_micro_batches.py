"""optim.grad_accum auto (runtime/micro_batches.py, rl/update.py): the fewest micro-batches within
optim.micro_batch_gb of predicted working memory, the same gradient at every count, a smaller measured peak
for a smaller budget, the memory plan predicting with auto's count, and the count logged."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_coach.cli import main
from mlx_coach.core.errors import UserError
from mlx_coach.models.size import check_fits, describe, plan_run
from mlx_coach.rl.batch import StepBatch
from mlx_coach.rl.setup import select_tasks
from mlx_coach.rl.trainer import Trainer
from mlx_coach.rl.update import forward_widths
from mlx_coach.runtime.memory_plan import GB, Capacity, RunShape, predict
from mlx_coach.runtime.micro_batches import budget_split, candidate_splits, planned_count, working_bytes
from test_trainer import perturb, tiny_cfg, tree_gap

TINY = describe("builtin:tiny")


def grouped_batch(trainer, groups, group_size, prompt_len, comp_len, seed=0):
    """groups x group_size rows, a random prompt per group, completions of random lengths up to comp_len,
    the reference's log-probs as the sampler's, random advantages; rows 1 and 6 have no trained token."""
    rng = np.random.default_rng(seed)
    prompts = [p for p in (rng.integers(0, 256, prompt_len).tolist() for _ in range(groups)) for _ in range(group_size)]
    comps = [rng.integers(0, 256, int(rng.integers(comp_len // 3, comp_len + 1))).tolist() for _ in prompts]
    ref = trainer.reference_logprobs(prompts, comps)
    T = ref.shape[1]
    mask = np.array([[1.0] * len(c) + [0.0] * (T - len(c)) for c in comps], dtype=np.float32)
    mask[[1, 6]] = 0.0
    adv = mx.array(rng.standard_normal(len(prompts)).astype(np.float32))
    mx.eval(ref, adv)
    return StepBatch(prompt_ids=prompts, completion_ids=comps, behaviour_logp=ref, reference_logp=ref,
                     advantages=adv, loss_mask=mask, beta=0.1)


def largest_cost(updater, batch, split):
    """GB of the split's largest predicted micro-batch of `batch`, as auto weighs it."""
    return max(working_bytes(updater.arch, updater.shape, *forward_widths(
        batch.prompt_ids, batch.completion_ids, updater.share_prompts, updater.bucket, rows)) for rows in split) / GB


def test_every_auto_split_gives_the_gradient_of_one_micro_batch(tmp_path):
    """Budgets that force each candidate split (whole groups, parts of groups, one row each) give the
    loss and gradient of the whole batch in one micro-batch, rows without trained tokens included."""
    trainer = Trainer(tiny_cfg(tmp_path, algo={"beta": 0.1}), tmp_path / "run")
    try:
        assert trainer.cfg.optim.grad_accum == "auto"  # the default
        perturb(trainer)  # the KL term has a gradient too
        batch = grouped_batch(trainer, groups=4, group_size=4, prompt_len=12, comp_len=24)
        updater, optim = trainer.updater, trainer.cfg.optim

        def gradient():
            chunks = updater.split(batch.prompt_ids, batch.completion_ids)
            grads, loss, _ = updater.accumulate(batch, batch.beta, chunks)
            return chunks, dict(tree_flatten(grads)), loss.item()

        optim.grad_accum = 1
        _, g1, l1 = gradient()
        optim.grad_accum = "auto"
        counts = set()
        for split in candidate_splits(16, 4):
            optim.micro_batch_gb = largest_cost(updater, batch, split)
            chunks, g, loss = gradient()
            counts.add(len(chunks))
            assert sorted(r for rows in chunks for r in rows) == list(range(16))
            if len(chunks) <= 4:  # whole groups while a micro-batch can hold one
                assert all(len(rows) % 4 == 0 and len({r // 4 for r in rows}) == len(rows) // 4 for rows in chunks)
            assert loss == pytest.approx(l1, rel=1e-4, abs=1e-6), len(chunks)
            diff, norm = tree_gap(g1, g)
            assert norm > 0 and diff <= 1e-4 * norm, (len(chunks), diff, norm)
        assert counts >= {1, 2, 4, 8, 16}, counts
    finally:
        trainer.close()


def test_a_smaller_budget_gives_more_micro_batches_and_a_smaller_measured_peak(tmp_path):
    """The reference pass and the update of the same batch, MLX's peak reset between: a budget one group
    fits in takes several micro-batches and well under the peak of a budget the whole batch fits in."""
    trainer = Trainer(tiny_cfg(tmp_path, algo={"beta": 0.1}), tmp_path / "run")
    try:
        batch = grouped_batch(trainer, groups=8, group_size=4, prompt_len=96, comp_len=64)
        one_group = largest_cost(trainer.updater, batch, [list(range(g * 4, g * 4 + 4)) for g in range(8)])
        counts, extra = {}, {}
        for name, budget in (("roomy", 1000.0), ("one group", one_group)):
            trainer.cfg.optim.micro_batch_gb = budget
            mx.clear_cache()
            held = mx.get_active_memory()
            mx.reset_peak_memory()
            trainer.reference_logprobs(batch.prompt_ids, batch.completion_ids)
            counts[name] = trainer.update(batch).micro_batches
            extra[name] = mx.get_peak_memory() - held
        assert counts == {"roomy": 1, "one group": 8}, counts
        assert extra["one group"] > 0 and 1.5 * extra["one group"] <= extra["roomy"], extra
    finally:
        trainer.close()


@pytest.mark.parametrize("shape", [RunShape(group_size=5, prompts_per_step=3, max_new_tokens=40, prompt_tokens=30),
                                   RunShape(group_size=4, prompts_per_step=4, max_new_tokens=64, prompt_tokens=94,
                                            share_prompts=False)],
                         ids=["odd-shared", "per-sample"])
def test_the_plans_count_is_the_split_of_rows_as_long_as_the_run_allows(shape):
    """planned_count (bisection) picks what budget_split (a scan) picks on rows of the longest widths, and
    within the budget whenever rows can be split further; a smaller budget never takes fewer."""
    n = shape.group_size * shape.prompts_per_step

    def widths(rows):
        prompts = len({r // shape.group_size for r in rows}) if shape.share_prompts else len(rows)
        return len(rows), prompts, shape.max_new_tokens, shape.prompt_tokens

    one_row = working_bytes(TINY, shape, 1, 1, shape.max_new_tokens, shape.prompt_tokens) / GB
    whole = working_bytes(TINY, shape, n, shape.prompts_per_step if shape.share_prompts else n,
                          shape.max_new_tokens, shape.prompt_tokens) / GB
    counts = []
    for budget in np.geomspace(one_row / 2, whole * 2, 25):
        count = planned_count(TINY, shape, budget)
        split = budget_split(TINY, shape, n, shape.group_size, budget, widths)
        assert count == len(split), budget
        if count < n:
            assert max(working_bytes(TINY, shape, *widths(rows)) for rows in split) <= budget * GB
        counts.append(count)
    assert counts == sorted(counts, reverse=True) and counts[0] == n and counts[-1] == 1


def test_the_plan_predicts_with_the_count_auto_picks(tmp_path):
    """plan_run under auto: grad_accum is planned_count's; a smaller budget plans more micro-batches and a
    lower update peak."""
    base = tiny_cfg(tmp_path, rollout={"max_new_tokens": 256})
    tasks, _ = select_tasks(base.data)
    plans = []
    for budget in (1000.0, 0.01):
        cfg = dataclasses.replace(base, optim=dataclasses.replace(base.optim, micro_batch_gb=budget))
        arch, shape, plan = plan_run(cfg, tasks)
        assert isinstance(shape.grad_accum, int)
        assert shape.grad_accum == planned_count(arch, dataclasses.replace(shape, grad_accum=1), budget)
        assert plan.mlx_peak >= predict(arch, shape).mlx_peak  # the count's own peak, or auto's bound above it
        plans.append((shape.grad_accum, plan.parts["update_activations"]))
    (roomy, roomy_act), (tight, tight_act) = plans
    assert roomy == 1 and tight > 1 and tight_act < roomy_act


def test_the_plan_bounds_every_step_auto_may_take(tmp_path):
    """A step of shorter completions may take fewer, larger micro-batches than the longest rows need: at
    every completion width up to max_new_tokens, the resident state plus the largest predicted micro-batch
    of the split auto takes there is within the plan's peak, though not within the peak of the count alone."""
    base = tiny_cfg(tmp_path, rollout={"max_new_tokens": 256})
    tasks, _ = select_tasks(base.data)
    arch, shape, _ = plan_run(base, tasks)
    n, G = shape.group_size * shape.prompts_per_step, shape.group_size

    def widths_at(width):
        return lambda rows: (len(rows), len({r // G for r in rows}), width, shape.prompt_tokens)

    # a budget the whole batch fits in at 64-token completions, not at 256
    budget = working_bytes(arch, shape, n, shape.prompts_per_step, 64, shape.prompt_tokens) / GB
    cfg = dataclasses.replace(base, optim=dataclasses.replace(base.optim, micro_batch_gb=budget))
    _, shape, plan = plan_run(cfg, tasks)
    assert shape.grad_accum > 1
    fixed = sum(plan.parts[k] for k in ("weights", "reference", "trainable_state", "update_gradients"))
    worst = max(max(working_bytes(arch, shape, *widths_at(w)(rows)) for rows in budget_split(arch, shape, n, G, budget,
                                                                                          widths_at(w)))
                for w in range(8, 257, 8))
    assert fixed + worst <= plan.mlx_peak * (1 + 1e-9)
    assert fixed + worst > predict(arch, shape).mlx_peak  # what the count's own prediction misses
    # train's check before loading refuses by the same bound: a working set between the two figures
    between = Capacity(physical=1e15, working_set=(predict(arch, shape).mlx_peak + plan.mlx_peak) / 2)
    with pytest.raises(UserError, match="cannot fit"):
        check_fits(cfg, tasks, between)


def test_a_step_logs_its_micro_batch_count(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path), tmp_path / "run")
    try:
        roomy = trainer.run_step()
        trainer.cfg.optim.micro_batch_gb = 1e-9  # nothing fits: one row each
        tight = trainer.run_step()
    finally:
        trainer.close()
    assert roomy["optim/micro_batches"] == 1 and tight["optim/micro_batches"] == 16


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "sometimes", "true"])
def test_a_bad_grad_accum_is_refused_in_one_line(capsys, value):
    code = main(["plan", "-c", "configs/tiny.yaml", "--set", f"optim.grad_accum={value}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "optim.grad_accum" in err
