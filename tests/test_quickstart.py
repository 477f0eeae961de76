"""The README's quick start shows what mlx-coach is for, read back from its run's TensorBoard event file: the
second epoch over the same tasks hits the score cache (cache/hit_rate >= 0.2 on at least half of its steps), a
finite cached reward is logged beside the fresh one, and tok/s by epoch phase beside the hit rate by phase."""

import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from quickstart_run import quickstart_run, train_command


def test_the_quick_start_second_epoch_hits_the_cache_and_logs_both_rewards():
    from mlx_coach.config.tree import load_config
    from mlx_coach.rl.setup import select_tasks

    work, proc = quickstart_run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = train_command()
    cfg = load_config(work / argv[argv.index("-c") + 1])
    train, _ = select_tasks(cfg.data)
    per_epoch = -(-len(train) // cfg.rollout.prompts_per_step)
    assert cfg.train.steps >= 2 * per_epoch, "the quick start runs a second epoch over the same tasks"
    acc = EventAccumulator(str(work / cfg.train.output), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()

    def series(tag):
        return {e.step: e.value for e in acc.Scalars(tag)}

    first, second = range(1, per_epoch + 1), range(per_epoch + 1, 2 * per_epoch + 1)
    hit = series("cache/hit_rate")
    assert set(first) | set(second) <= set(hit)
    # each task is seen once an epoch, and a key holds the task: the first epoch has nothing to hit
    assert all(hit[s] == 0 for s in first)
    assert sum(hit[s] >= 0.2 for s in second) >= len(second) / 2, {s: hit[s] for s in second}
    fresh, cached = series("reward/fresh_mean"), series("reward/cached_mean")
    both = [s for s in second if math.isfinite(cached.get(s, math.nan)) and math.isfinite(fresh.get(s, math.nan))]
    assert both, "no step of the second epoch logs a finite cached reward beside a fresh one"

    # tok/s by epoch phase beside the hit rate by phase: both logged at every step of the second epoch
    tags = acc.Tags()["scalars"]
    phases = [t.rsplit("/", 1)[1] for t in tags if t.startswith("gen/tokens_per_sec_by_phase/")]
    assert phases
    for s in second:
        assert any(s in series(f"gen/tokens_per_sec_by_phase/{p}") and s in series(f"cache/hit_rate_by_phase/{p}")
                   for p in phases if f"cache/hit_rate_by_phase/{p}" in tags), s
    # and the run report's two-axis chart of the same
    assert (work / cfg.train.output / "report" / "throughput_vs_hit_rate.png").is_file()
