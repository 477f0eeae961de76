"""What follows a step's update: metrics from the run's history, alerts and health adjustments,
logging, and the epoch's end (validation, the phase table, adapter deltas, the report)."""

from dataclasses import replace

import numpy as np
from mlx.utils import tree_flatten

from mlx_coach.engine.generate import generate_and_score, pass_at_k_summary
from mlx_coach.rl.setup import run_order
from mlx_coach.runtime.distributed import checksum_spread, shard_bounds
from mlx_coach.telemetry.alert_rules import (evaluate as evaluate_alerts, evaluate_epoch, lr_adjustment,
                                              memory_over_plan)
from mlx_coach.telemetry.alerts import Alert
from mlx_coach.telemetry.health import (block_deltas, bucket_pass_rates, heatmap_image, lora_deltas,
                                        top_layers_text)
from mlx_coach.telemetry.report import log_images, write_report

LENGTH_EDGES = (200, 400)  # prompt length buckets (characters) for the category x length heatmap
DRIFT_TOLERANCE = 1e-6  # relative spread of the ranks' parameter checksums that counts as drift


class AfterStep:
    """Mixed into `Trainer`: reads and updates its state, telemetry, cache, memory and alert state."""

    def add_run_metrics(self, metrics, columns, phase, result):
        """Metrics that depend on the run so far (EMAs, learning rate, first tok/s, the first epoch's
        rewards, reward sources, difficulty, cache and memory counters, the epoch phase's accumulator);
        also lets the memory manager clear its caches and writes its events."""
        state = self.state
        fresh = [v for v, f in zip(columns["total"], columns["fresh"]) if f]
        metrics["reward/ema"] = state.reward_ema.update(metrics["reward/mean"])
        metrics["loss/total_ema"] = state.loss_ema.update(metrics["loss/total"])
        metrics.update({"lr": float(self.optimizer.learning_rate.item()), "lr/scale": state.lr_scale,
                        "train/skipped_steps": state.skipped_steps})
        tokens_per_sec = metrics["gen/tokens_per_sec"]
        if len(state.toks_first) < 5:
            state.toks_first.append(tokens_per_sec)
        metrics["gen/tokens_per_sec_rel"] = tokens_per_sec / max(float(np.mean(state.toks_first)), 1e-9)
        if state.baseline_reward is not None and fresh:
            metrics["reward/gain_from_baseline"] = float(np.mean(fresh)) - state.baseline_reward
        if state.epoch == 0:
            state.first_epoch_fresh.extend(fresh)
        metrics.update(self.rewards.stats())
        metrics.update(state.difficulty.metrics())
        if self.cfg.algo.difficulty_weighting:
            metrics["sampling/passed_over"] = self.passed_over
        metrics.update(self.cache_metrics())
        memory = self.memory.step_metrics()
        if self.world.size > 1:  # the largest rank's memory (per-phase samples stay rank 0's)
            keys = [k for k in memory if not k.startswith("memory/phase/")]
            memory.update(zip(keys, self.world.all_max([memory[k] for k in keys])))
        metrics.update(memory)
        self.memory.maybe_clear(state.step)
        for event in self.memory.events[self.events_seen:]:  # clears and OOM batch halvings
            self.telemetry.event(state.step, event.kind, **event.fields())
        self.events_seen = len(self.memory.events)
        state.phases.add(phase, {"tokens_per_sec": tokens_per_sec, "hits": metrics.get("cache/step_hits", 0),
                                 "misses": metrics.get("cache/step_misses", 0),
                                 "cache_share": memory.get("memory/cache_share", 0.0),
                                 "fresh_reward_mean": metrics["reward/fresh_mean"] if fresh else None,
                                 "fresh_count": len(fresh)})
        metrics.update(state.phases.by_phase_metrics(phase))
        return metrics

    def after_step(self, metrics, phase, result):
        """Parameter agreement across ranks, judge outages, alerts and health adjustments, logging,
        and the epoch's end when its last prompt was drawn."""
        state, cfg = self.state, self.cfg
        if self.world.size > 1 and cfg.train.checksum_every and state.step % cfg.train.checksum_every == 0:
            self.check_parameters_agree(metrics)
        for source, (kind, failures) in self.rewards.drain_events():  # judge outages, always said
            self.telemetry.alert(state.step, _outage_alert(source, kind, failures))
        if cfg.alerts.enabled:
            alert_metrics = dict(metrics, **{"step": state.step, "loss/nonfinite": float(result.skipped > 0)})
            for alert in evaluate_alerts(state.alerts, alert_metrics, cfg.alerts, phase=phase):
                self.telemetry.alert(state.step, alert)
            for alert in memory_over_plan(state.alerts, alert_metrics, cfg.memory.plan_margin, cfg.alerts):
                self.telemetry.alert(state.step, alert)
            factor = lr_adjustment(state.alerts, alert_metrics, cfg.alerts)
            if self.world.size > 1:  # rank 0's decision, so the learning rate stays the same everywhere
                factor = self.world.from_main(factor or 0.0) or None
            if factor is not None:
                state.lr_scale *= factor
                self.telemetry.event(state.step, "health/lr_adjust", factor=factor, lr_scale=state.lr_scale)
        self.telemetry.log(state.step, metrics)
        self.telemetry.histogram("difficulty/pass_rate", state.difficulty.rates(), state.step)
        if state.pos >= len(self.order):
            self.end_epoch()

    def check_parameters_agree(self, metrics):
        """All-reduced parameter checksums: the ranks must hold the same weights; drift is alerted."""
        spread = checksum_spread(self.world, tree_flatten(self.model.trainable_parameters()))
        metrics["dist/param_checksum_spread"] = spread
        if spread > DRIFT_TOLERANCE:
            self.telemetry.alert(self.state.step, Alert(
                "error", "param_drift", f"ranks hold different weights (checksum spread {spread:.2e})",
                "stop and resume from the last checkpoint; check that every rank runs the same code and config"))

    def _cache_counts(self):
        student = self.cache.stats()["student"]
        return student["hits"], student["misses"]

    def cache_metrics(self):
        """The step's hit rate (differences of the cache's counters) and the cache's totals; on several
        ranks rank 0's cache is the run's one cache (ScoreCache.shared_over), and rank 0 logs them."""
        student = self.cache.stats()["student"]
        (hits_before, misses_before), self.cache_counts = self.cache_counts, self._cache_counts()
        hits, misses = student["hits"] - hits_before, student["misses"] - misses_before
        return {"cache/hit_rate": hits / (hits + misses) if hits + misses else 0.0, "cache/step_hits": hits,
                "cache/step_misses": misses, "cache/hits": student["hits"], "cache/misses": student["misses"],
                "cache/evictions": student["evictions"], "cache/expirations": student["expirations"],
                "cache/size": student["size"], "cache/corrupt_rows": student["corrupt_rows"]}

    def _log_cache_clear(self, removed, step):
        if removed or self.cfg.cache.policy == "epoch-clear":
            self.telemetry.event(step, "cache/clear", removed=int(removed), epoch=self.state.epoch)

    # ---------------------------------------------------------------- validation and the epoch's end
    def validate(self):
        """Score the fixed validation split fresh (the cache is bypassed) with greedy decoding."""
        if not self.val_tasks or self.val_scorer is None:
            return None
        rollout_cfg = replace(self.cfg.rollout, temperature=0.0, group_size=1,
                              max_new_tokens=self.cfg.train.val_max_new_tokens or self.cfg.rollout.max_new_tokens)
        if self.world.size == 1:
            records = generate_and_score(self.model, self.tokenizer, self.val_tasks, rollout_cfg, self.val_scorer,
                                         bypass_cache=True, desc=f"validation (epoch {self.state.epoch})")
        else:  # each rank scores its share (greedy: the same verdicts as one rank's), then all are combined
            mine = self.world.shard(self.val_tasks)
            lo, _ = shard_bounds(len(self.val_tasks), self.world.size, self.world.rank)
            local = generate_and_score(self.model, self.tokenizer, mine, rollout_cfg, self.val_scorer,
                                       bypass_cache=True) if mine else []
            index = {t.task_id: lo + i for i, t in enumerate(mine)}
            rows = self.world.gather_columns({"task": [index[r["task_id"]] for r in local],
                                              "passed": [float(r["passed"]) for r in local]})
            tasks = [self.val_tasks[int(i)] for i in rows["task"]]
            records = [{"task_id": t.task_id, "passed": bool(p), "category": t.tags.get("category", "none"),
                        "prompt": t.prompt} for t, p in zip(tasks, rows["passed"])]
        summary = pass_at_k_summary(records, ks=(1,))
        triples = [(r["category"], len(r["prompt"]), r["passed"]) for r in records]
        return summary, triples

    def validate_midway(self):
        """train.val_every: the validation split scored between epoch ends, logged as eval/pass@1 (the
        epoch-trend alerts still see epoch ends only)."""
        result = self.validate()
        if result is not None:
            self.telemetry.log(self.state.step, {"eval/pass@1": result[0]["pass@1"], "epoch": self.state.epoch})

    def end_epoch(self):
        """Validation (fresh), the per-phase table, then the next epoch's seeded order."""
        state, step = self.state, self.state.step
        if state.baseline_reward is None and state.first_epoch_fresh:
            state.baseline_reward = float(np.mean(state.first_epoch_fresh))
        self.telemetry.epoch_table(state.epoch, step, state.phases.epoch_rows())
        epoch_metrics = {"epoch": state.epoch}
        result = self.validate() if self.cfg.train.epochs_val else None
        if result is not None:
            summary, triples = result
            # the count lets the alerts tell a regression from the noise of a small validation split
            epoch_metrics.update({"eval/pass@1": summary["pass@1"], "eval/count": summary["tasks"]})
            self.telemetry.log(step, {"eval/pass@1": summary["pass@1"], "eval/count": summary["tasks"],
                                      "epoch": state.epoch})
            categories, buckets, matrix = bucket_pass_rates(triples, LENGTH_EDGES)
            self.telemetry.image("eval/category_length_heatmap", heatmap_image(matrix, categories, buckets), step)
        if self.cfg.alerts.enabled:
            for alert in evaluate_epoch(state.alerts, epoch_metrics, self.cfg.alerts, step=step):
                self.telemetry.alert(step, alert)
        if self.cfg.model.fine_tune == "lora":
            deltas = lora_deltas(self.initial_trainable, dict(tree_flatten(self.model.trainable_parameters())))
            self.telemetry.text("adapters/top_layers", top_layers_text(deltas), step)
            self.telemetry.log(step, {f"adapters/delta/{name}": v for name, v in block_deltas(deltas).items()})
        if self.cfg.telemetry.report and self.world.is_main:  # RUN/report/, its PNGs also on the Images tab
            log_images(self.telemetry, write_report(self.run_dir), step)
        state.epoch += 1
        state.pos = 0
        self.order = run_order(self.train_tasks, self.cfg, state.epoch)
        state.phases.reset()
        self._log_cache_clear(self.cache.on_epoch_start(state.epoch), step)

    def close(self):
        try:
            self.pool.shutdown(wait=True)
            self.rewards.close()
            self.telemetry.close()
        finally:
            if self.claim is not None:
                self.claim.release()


def _outage_alert(source, kind, failures):
    if kind == "open":
        return Alert("warning", "judge_outage",
                     f"{source}: the judge failed {failures} requests in a row; its circuit breaker opened and "
                     f"samples get the fallback (reward/fallback_frac)",
                     "Check the judge server; rewards[].on_outage: pause waits for it, stop ends the run.")
    return Alert("info", "judge_recovered", f"{source}: the judge answers again; its circuit breaker closed",
                 "None needed; steps since the outage alert trained on fallback judge scores.")
