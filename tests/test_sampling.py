"""Dynamic sampling and difficulty tracking: refilled batches, the draw cap, the logged shares, the
task weighting, fresh-only counting, and a resume that keeps the tracker."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_coach.core.errors import UserError
from mlx_coach.rl.dynamic_sampling import LEVEL_DECAY, DifficultyTracker, next_round_size, task_level, task_weight
from mlx_coach.rl.trainer import Trainer
from mlx_coach.rl.setup import epoch_order, select_tasks
from mlx_coach.rl.loop import train
from test_trainer import step_rows, tiny_cfg, write_short_tasks


def dyn_cfg(tmp_path, reward, **over):
    # a learning rate that leaves the policy where it started over the few steps: these tests are about
    # which groups are drawn and kept, and a policy that collapsed (all samples alike) would change that
    sections = {"algo": {"beta": 0.0, "dynamic_sampling": True, "max_draw_factor": 3.0}, "optim": {"lr": 1e-6},
                "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8},
                "rewards": [{"type": "function", "function": f"reward_fns:{reward}"}],
                "train": {"steps": 3}}
    for k, v in over.items():
        sections[k] = {**sections.get(k, {}), **v} if isinstance(v, dict) else v
    return tiny_cfg(tmp_path, **sections)


def drawn_ids(trainer_tasks, seed, rows):
    """Task ids each step drew: a step draws a contiguous stretch of the epoch order."""
    order = epoch_order(len(trainer_tasks), seed, 0)
    n = len(order)
    out = []
    for row in rows:
        start = round(row["epoch/position"] * n)
        out.append([trainer_tasks[i].task_id for i in order[start: start + row["sampling/draws"]]])
    return out


def test_all_equal_groups_are_dropped_and_the_batch_refilled(tmp_path):
    """Even tasks give every sample 0.0 (all-equal groups); odd tasks give differing rewards."""
    cfg = dyn_cfg(tmp_path, "odd_tasks_signal")
    train(cfg, tmp_path / "run")
    rows = step_rows(tmp_path / "run")
    assert len(rows) == 3
    train_tasks, _ = select_tasks(cfg.data)  # the split the run made
    for row, ids in zip(rows, drawn_ids(train_tasks, cfg.train.seed, rows)):
        evens = sum(int(t.rsplit("/", 1)[1]) % 2 == 0 for t in ids)
        assert row["sampling/draws"] == len(ids) <= 12  # the cap: prompts_per_step x max_draw_factor
        assert row["sampling/dropped_groups"] == evens  # exactly the all-equal groups drawn
        assert row["sampling/draws"] - evens >= 4  # enough odd tasks drawn to fill the step ...
        assert row["sampling/trained_groups"] == 4 and row["sampling/informative_frac"] == 1.0
        assert row["reward/frac_zero_std"] == 0.0  # ... and the trained batch holds only those
        assert row["reward/count"] == 16
    assert sum(r["sampling/dropped_groups"] for r in rows) > 0  # the order did hold even tasks
    # the difficulty distribution: counts in metrics.jsonl, a histogram in the TensorBoard files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    hists = acc.Histograms("difficulty/pass_rate")
    assert [h.step for h in hists] == [1, 2, 3]
    # every drawn prompt was scored fresh (a function reward: fresh, never passed), so all sit at 0
    seen = np.cumsum([r["sampling/draws"] for r in rows])
    assert [h.histogram_value.num for h in hists] == [r["difficulty/tasks_seen"] for r in rows] == list(seen)
    assert [r["difficulty/at_0"] for r in rows] == list(seen)
    assert len(acc.Scalars("sampling/informative_frac")) == 3
    # consecutive steps continue the walk where the last one stopped
    positions = [round(r["epoch/position"] * len(train_tasks)) for r in rows]
    assert positions == list(np.cumsum([0] + [r["sampling/draws"] for r in rows[:-1]]))


def test_the_cap_holds_and_a_barren_step_trains_on_its_first_groups(tmp_path):
    """A reward that is 0.0 everywhere: no group is informative, every step draws exactly the cap."""
    cfg = dyn_cfg(tmp_path, "zero", algo={"max_draw_factor": 2.0}, train={"steps": 2})
    last = train(cfg, tmp_path / "run")
    rows = step_rows(tmp_path / "run")
    for row in rows:
        assert row["sampling/draws"] == 8  # 4 prompts x factor 2, never more
        assert row["sampling/dropped_groups"] == 8
        assert row["sampling/informative_frac"] == 0.0
        assert row["sampling/trained_groups"] == 4 and row["reward/count"] == 16
        assert math.isfinite(row["loss/policy"]) and row["train/skipped_steps"] == 0
    assert last["sampling/rounds"] >= 2


def test_at_the_cap_the_step_trains_on_the_informative_groups_it_has(tmp_path):
    """max_draw_factor 1: one round only; the step keeps its odd (informative) tasks' groups."""
    cfg = dyn_cfg(tmp_path, "odd_tasks_signal", algo={"max_draw_factor": 1.0}, train={"steps": 4})
    train(cfg, tmp_path / "run")
    rows = step_rows(tmp_path / "run")
    train_tasks, _ = select_tasks(cfg.data)
    seen_partial = False
    for row, ids in zip(rows, drawn_ids(train_tasks, cfg.train.seed, rows)):
        odds = sum(int(t.rsplit("/", 1)[1]) % 2 for t in ids)
        assert row["sampling/draws"] == 4 and row["sampling/rounds"] == 1
        assert row["sampling/informative_frac"] == odds / 4
        assert row["sampling/trained_groups"] == (odds or 4)
        assert row["reward/count"] == 4 * (odds or 4)
        seen_partial |= 0 < odds < 4
    assert seen_partial  # the seeded order gave at least one step a partial fill


@pytest.mark.parametrize("missing, informative, drawn, cap_left", [
    (4, 0, 0, 12), (3, 1, 4, 8), (1, 0, 4, 8), (2, 3, 4, 1), (4, 0, 4, 0)])
def test_round_size_stays_within_the_cap(missing, informative, drawn, cap_left):
    k = next_round_size(missing, informative, drawn, cap_left)
    assert k <= cap_left
    assert k >= min(missing, cap_left)
    if drawn and informative:  # scaled by the informative share seen so far
        assert k == min(cap_left, max(missing, math.ceil(missing * drawn / informative)))


def test_weight_prefers_tasks_the_model_sometimes_solves():
    floor = 0.05
    for n in (1, 2, 5, 8, 16, 40):
        w = [task_weight(k, n, floor) for k in range(n + 1)]
        assert all(floor <= x <= 1.0 for x in w)
        np.testing.assert_allclose(w, w[::-1])  # pass rate p and 1 - p weigh the same
        mid = n // 2
        eps = 1e-12  # p and 1 - p give 4 p (1 - p) up to rounding
        assert all(w[k] <= w[k + 1] + eps for k in range(mid))  # rising toward the middle ...
        assert all(w[k] + eps >= w[k + 1] for k in range(mid, n))  # ... and falling after it
        assert w[mid] > w[0] or n == 1 and w[0] == w[1]
    assert task_weight(0, 0, floor) == 1.0  # unseen: explored first
    # more evidence that a task is always failed (or passed) lowers its weight, down to the floor
    ws = [task_weight(0, n, floor) for n in (1, 4, 16, 64, 1000)]
    assert all(a > b for a, b in zip(ws, ws[1:-1])) and ws[-1] == floor
    assert task_weight(8, 16, floor) == pytest.approx(1.0)


def test_tracker_counts_fresh_scores_only_and_reports_the_distribution():
    t = DifficultyTracker()
    t.observe(["a", "a", "a", "a"], [True, False, True, True], ["fresh", "fresh", "cached", "fallback"])
    t.observe(["b", "b"], [False, False], ["fresh", "fresh"])
    t.observe(["c", "c"], [True, True], ["fresh", "cached"])
    assert t.counts == {"a": [2, 1], "b": [2, 0], "c": [1, 1]}
    assert t.pass_rate("a") == 0.5 and t.pass_rate("zzz") is None
    m = t.metrics()
    assert (m["difficulty/tasks_seen"], m["difficulty/at_0"], m["difficulty/mid"], m["difficulty/at_1"]) == (3, 1, 1, 1)
    assert m["difficulty/pass_rate_p50"] == 0.5
    u = DifficultyTracker()
    u.load(json.loads(json.dumps(t.state_dict())))
    assert u.counts == t.counts
    t.observe(["d"] * 5, [True] * 4 + [False], ["fresh", "duplicate", "duplicate", "unjudged", "fallback"])
    assert t.counts["d"] == [1, 1]  # copies, and samples with no verdict, are not counted


def test_levels_pool_fresh_verdicts_decay_per_step_and_rate_tasks_never_seen():
    t = DifficultyTracker()
    floor = 0.05
    # step 1: level a/1 solved by all 8 fresh samples, b/2 by half; a cached copy counts in neither
    t.observe(["a1"] * 4 + ["a2"] * 4 + ["b1"] * 8 + ["a1"], [True] * 8 + [True, False] * 4 + [True],
              ["fresh"] * 16 + ["cached"], ["a/1"] * 8 + ["b/2"] * 8 + ["a/1"])
    assert t.levels == {"a/1": [8.0, 8.0], "b/2": [8.0, 4.0]}
    saturated, mixed = t.weight("a9", floor, "a/1"), t.weight("b9", floor, "b/2")
    assert saturated == task_weight(8, 8, floor) < 0.4 and mixed == pytest.approx(1.0)
    assert t.weight("c9", floor, "c/3") == t.weight("c9", floor) == 1.0  # no pool yet, or none: unseen
    assert t.weight("a1", floor, "b/2") == task_weight(4, 4, floor)  # a task seen keeps its own rate
    # step 2: only b/2 sampled; a/1's verdicts fade, so it is tried again as steps pass without it
    t.observe(["b2"] * 2, [False, False], ["fresh", "fresh"], ["b/2", "b/2"])
    assert t.levels["a/1"] == pytest.approx([8 * LEVEL_DECAY] * 2)
    assert t.levels["b/2"] == pytest.approx([8 * LEVEL_DECAY + 2, 4 * LEVEL_DECAY])
    assert t.weight("a9", floor, "a/1") > saturated
    assert t.metrics()["difficulty/level/b/2"] == pytest.approx(4 * LEVEL_DECAY / (8 * LEVEL_DECAY + 2))
    # the pools go into the checkpoint; one written before them loads with none
    u = DifficultyTracker()
    u.load(json.loads(json.dumps(t.state_dict())))
    assert (u.counts, u.levels) == (t.counts, t.levels)
    u.load({"counts": t.state_dict()["counts"]})
    assert u.levels == {} and u.counts == t.counts


def test_procedural_tasks_pool_by_family_and_difficulty():
    from mlx_coach.data.procedural import generate

    tasks = generate(12, seed=0, difficulty=(1, 3))
    levels = {task_level(t) for t in tasks}
    assert all(lv == f"{t.tags['category']}/{t.tags['difficulty']}" for t, lv in zip(tasks, map(task_level, tasks)))
    assert len(levels) > 1
    from mlx_coach.data.task import Task

    assert task_level(Task("t/0", "def f():\n", "f", "def check(c):\n    assert c() == 1\n")) is None  # no tags
    # by template: one pool per template within its level
    by_template = [task_level(t, "template") for t in tasks]
    assert by_template == [f"{task_level(t)}/{t.tags['template']}" for t in tasks]
    assert len(set(by_template)) >= len(levels)


def test_the_walk_moves_past_a_saturated_level(tmp_path):
    """Procedural tasks never seen: with one level's pool at 40/40 passes every other level's tasks are
    taken and few of the saturated level's; with difficulty_by_level off every task is taken."""
    data = {"tasks": "procedural", "procedural_count": 120, "procedural_heldout": 4, "difficulty_max": 2}
    picked = {}
    for by_level in (True, False):
        cfg = tiny_cfg(tmp_path, data=data, rewards=[{"type": "tests"}],
                       algo={"difficulty_weighting": True, "difficulty_floor": 0.05, "difficulty_by_level": by_level})
        trainer = Trainer(cfg, tmp_path / f"run-{by_level}")
        try:
            saturated = trainer.task_levels[trainer.train_tasks[0].task_id]
            trainer.state.difficulty.levels[saturated] = [40.0, 40.0]
            ids = []
            while trainer.state.pos < len(trainer.order):
                ids += [t.task_id for t in trainer.next_prompts()[0]]
            in_level = [i for i, lv in trainer.task_levels.items() if lv == saturated]
            picked[by_level] = (set(ids), in_level, set(trainer.task_levels) - set(in_level))
        finally:
            trainer.close()
    ids, in_level, others = picked[True]
    assert others <= ids and len(in_level) >= 10
    assert len(ids & set(in_level)) < 0.5 * len(in_level)  # expected 0.09 of them (4 p (1 - p), p = 41/42)
    ids, in_level, others = picked[False]
    assert ids == set(in_level) | others


def test_the_walk_pooled_by_template_moves_past_a_learned_template_not_its_level(tmp_path):
    """A template learned whole (its pool at 40/40) is mostly passed over; the other templates of its level,
    whose pool is their own, are all taken."""
    data = {"tasks": "procedural", "procedural_count": 160, "procedural_heldout": 4, "difficulty_max": 2}
    cfg = tiny_cfg(tmp_path, data=data, rewards=[{"type": "tests"}],
                   algo={"difficulty_weighting": True, "difficulty_floor": 0.05, "difficulty_pool": "template"})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        first = trainer.train_tasks[0]
        learned = trainer.task_levels[first.task_id]
        trainer.state.difficulty.levels[learned] = [40.0, 40.0]
        ids = set()
        while trainer.state.pos < len(trainer.order):
            ids |= {t.task_id for t in trainer.next_prompts()[0]}
        of_template = {t.task_id for t in trainer.train_tasks if trainer.task_levels[t.task_id] == learned}
        same_level = {t.task_id for t in trainer.train_tasks if task_level(t) == task_level(first)} - of_template
    finally:
        trainer.close()
    assert len(of_template) >= 5 and same_level and same_level <= ids
    assert len(ids & of_template) < 0.5 * len(of_template)  # expected 0.09 of them, as for a level


def test_tracker_counts_copies_of_a_text_in_a_batch_once():
    """Four identical completions of a task: the sandbox runs one, the tracker counts one sample."""
    from mlx_coach.config.tree import from_dict
    from mlx_coach.data.tasks import builtin_tasks
    from mlx_coach.rewards.cache import ScoreCache
    from mlx_coach.rewards.sources import RewardSet

    task = builtin_tasks()[0]
    rs = RewardSet(from_dict({"rewards": [{"type": "tests"}], "sandbox": {"workers": 1}}), ScoreCache("none"))
    try:
        scores = rs.score([task] * 4, [task.prompt] * 4, [task.canonical_solution] * 4)
        stats = rs.tests.impl.stats()
    finally:
        rs.close()
    t = DifficultyTracker()
    t.observe([task.task_id] * 4, [s.passed for s in scores], [s.provenance for s in scores])
    assert t.counts == {task.task_id: [1, 1]}
    assert (stats["calls"], stats["fresh"], stats["duplicate"]) == (1, 1, 3)  # the sandbox ran one of the four


def test_weighted_walk_passes_over_tasks_always_failed(tmp_path):
    """Hand-set pass rates: half the tasks at 0/16, half at 8/16; one epoch's walk takes every mid
    task and few of the others (their weight is 4 p (1 - p) with p = 1/18, i.e. 0.21)."""
    cfg = tiny_cfg(tmp_path, data={"tasks": write_short_tasks(tmp_path / "many", 80)},
                   rewards=[{"type": "tests"}], algo={"difficulty_weighting": True, "difficulty_floor": 0.05})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        for i, t in enumerate(trainer.train_tasks):
            trainer.state.difficulty.counts[t.task_id] = [16, 0] if i % 2 else [16, 8]
        picked = []
        while trainer.state.pos < len(trainer.order):
            picked += [t.task_id for t in trainer.next_prompts()[0]]
        ids = [t.task_id for t in trainer.train_tasks]
        mid = {ids[i] for i in range(0, len(ids), 2)}
        assert mid <= set(picked)
        at_zero = [p for p in picked if p not in mid]
        assert len(at_zero) < len(ids) // 2 * 0.5  # expected 0.21 of them; 0.5 is far in the tail
        assert len(picked) == len(set(picked))  # a task is taken at most once an epoch
    finally:
        trainer.close()


def test_resume_keeps_the_tracker_and_is_exact(tmp_path):
    """Dynamic sampling and difficulty weighting on, two epochs of 10 tasks (so the second epoch's
    walk reads the first's pass rates): stopping at 4 and resuming to 8 equals a straight 8."""
    common = dict(data={"tasks": write_short_tasks(tmp_path / "few", 12)},
                  rollout={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 8},
                  algo={"beta": 0.0, "dynamic_sampling": True, "max_draw_factor": 2.0, "difficulty_weighting": True},
                  rewards=[{"type": "tests"}, {"type": "function", "function": "reward_fns:odd_tasks_signal"}],
                  train={"steps": 8, "checkpoint_every": 4})
    train(tiny_cfg(tmp_path, **common), tmp_path / "straight")
    cfg = tiny_cfg(tmp_path, **common)
    train(cfg, tmp_path / "resumed", steps=4)
    train(cfg, tmp_path / "resumed", resume=True, steps=8)
    sa = json.loads((tmp_path / "straight/checkpoints/step-8/state.json").read_text())
    sb = json.loads((tmp_path / "resumed/checkpoints/step-8/state.json").read_text())
    assert sa["difficulty"] == sb["difficulty"] and sa["difficulty"]["counts"]
    assert (sa["epoch"], sa["pos"]) == (sb["epoch"], sb["pos"]) and sa["epoch"] >= 1
    a = mx.load(str(tmp_path / "straight/checkpoints/step-8/adapters.safetensors"))
    b = mx.load(str(tmp_path / "resumed/checkpoints/step-8/adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5, err_msg=k)
    ra, rb = step_rows(tmp_path / "straight"), step_rows(tmp_path / "resumed")
    assert sum(r["sampling/passed_over"] for r in ra) > 0  # the second epoch's walk did weigh tasks
    for key in ("sampling/draws", "sampling/passed_over", "difficulty/tasks_seen", "reward/mean"):
        np.testing.assert_allclose([r[key] for r in ra], [r[key] for r in rb], atol=1e-6, err_msg=key)
    # the tracker counts every fresh sample it scored: G per drawn prompt (tests are never cached here
    # twice: the cache is on, so a repeated completion would come back cached and not count)
    total = sum(n for n, _ in sa["difficulty"]["counts"].values())
    assert 0 < total <= 4 * sum(r["sampling/draws"] for r in ra)


def test_config_refuses_what_cannot_work(tmp_path):
    with pytest.raises(UserError, match="algo.dynamic_sampling"):
        tiny_cfg(tmp_path, algo={"dynamic_sampling": True, "advantage": "reinforce"})
    with pytest.raises(UserError, match="algo.difficulty_weighting"):
        tiny_cfg(tmp_path, algo={"difficulty_weighting": True})  # its rewards have no tests source
    with pytest.raises(UserError, match="algo.max_draw_factor"):
        tiny_cfg(tmp_path, algo={"max_draw_factor": 0.5})


@pytest.mark.parametrize("sizes", [(5, 5, 5, 5), (7, 2, 4, 1)])
def test_an_interleaved_epoch_order_takes_the_keys_round_robin(sizes):
    """A permutation of every task, in rounds: each round holds each key that still has tasks once (so
    while all keys have tasks, any len(keys) draws from a round's start cover every key)."""
    groups = [k for k, n in enumerate(sizes) for _ in range(n)]
    order = epoch_order(len(groups), 3, 1, groups)
    assert sorted(order) == list(range(len(groups)))
    left, at = list(sizes), 0
    while at < len(order):
        live = [k for k, n in enumerate(left) if n]
        assert sorted(groups[i] for i in order[at:at + len(live)]) == live
        for k in live:
            left[k] -= 1
        at += len(live)
    assert epoch_order(len(groups), 3, 1, groups) == order
    assert epoch_order(len(groups), 3, 2, groups) != order  # each epoch its own order
    assert epoch_order(len(groups), 3, 1) == np.random.default_rng([3, 1]).permutation(len(groups)).tolist()


def test_a_run_interleaved_by_a_tag_covers_its_values_in_every_step(tmp_path):
    """4 "kind" values over 40 tasks, 4 prompts a step: interleaved, every step's batch holds all 4 kinds
    (the reward is the share of kinds the batch covers)."""
    path = tmp_path / "kinds.jsonl"
    path.write_text("".join(json.dumps({"task_id": f"s/{i}", "prompt": f"def f{i}(x):\n", "entry_point": f"f{i}",
                                        "test": "def check(c):\n    assert c(1) == 1\n", "tags": {"kind": i % 4}}) + "\n"
                            for i in range(40)))
    cfg = dyn_cfg(tmp_path, "distinct_kinds", algo={"dynamic_sampling": False}, data={"tasks": str(path),
                  "interleave_by": "kind"}, train={"steps": 3})
    train_tasks, _ = select_tasks(cfg.data)
    assert min(sum(t.tags["kind"] == k for t in train_tasks) for k in range(4)) >= 3
    train(cfg, tmp_path / "run")
    assert [r["reward/mean"] for r in step_rows(tmp_path / "run")] == [1.0, 1.0, 1.0]


def test_interleaving_by_a_tag_no_task_has_is_refused(tmp_path):
    cfg = dyn_cfg(tmp_path, "zero", data={"interleave_by": "nope"})
    with pytest.raises(UserError, match="data.interleave_by"):
        train(cfg, tmp_path / "run")
