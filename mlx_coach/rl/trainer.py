"""The RL loop: rollout -> score -> advantages -> policy-gradient update with a KL penalty.

`Trainer.run_step` reads top to bottom, one call per phase. Every log-prob (behaviour, policy,
reference) is taken at the sampling temperature, so the PPO ratio and the KL estimate refer to the
distribution the samples came from (top-k, min-p and top-p aside: the kept tokens' mass is not renormalised in the
ratio, as in TRL and verl). The run directory is claimed (locked) before anything is written.
"""

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_coach.config.tree import Config, save_config
from mlx_coach.core.errors import UserError
from mlx_coach.core.keys import draw_seed
from mlx_coach.engine.logprobs import can_share_prompts
from mlx_coach.engine.rollout import generate_rollouts
from mlx_coach.engine.sampling import SampleKeys
from mlx_coach.models import base_identity
from mlx_coach.models.loader import load_policy
from mlx_coach.models.lora import adapter_config, apply_lora, frozen_copy, unfreeze_all
from mlx_coach.models.size import check_fits, plan_run
from mlx_coach.rewards.cache import ScoreCache
from mlx_coach.rewards.sources import RewardSet
from mlx_coach.rl import dynamic_sampling, objective
from mlx_coach.rl.batch import StepBatch, judged_rows
from mlx_coach.rl.kl_control import make_kl_controller
from mlx_coach.rl.after_step import AfterStep
from mlx_coach.rl.reference import ReferencePass
from mlx_coach.rl.setup import (base_model_folder, check_shards, make_optimizer, run_order, schedule_steps,
                                select_tasks)
from mlx_coach.rl.state import TrainerState
from mlx_coach.rl.step_metrics import sample_columns, step_metrics
from mlx_coach.rl.update import Updater, on_cadence
from mlx_coach.runtime.checkpoint import (CheckpointError, latest_checkpoint, load_latest_intact, save_checkpoint,
                                          write_safetensors)
from mlx_coach.runtime.distributed import shard_bounds, step_timing, world
from mlx_coach.runtime.memory import MemoryManager
from mlx_coach.runtime.memory_plan import GB
from mlx_coach.runtime.rundir import claim, written_whole
from mlx_coach.telemetry.accumulators import epoch_phase
from mlx_coach.telemetry.writer import SilentTelemetry, Telemetry


class Trainer(AfterStep, ReferencePass):
    """Holds what one run needs; `rl.loop.train()` drives it. Methods are the step's phases; what
    follows a step's update (run metrics, alerts, logging, the epoch's end) is `AfterStep`'s."""

    def __init__(self, cfg: Config, run_dir, *, resume=False):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.world = world()  # size 1 without mlx.launch; rank 0 alone writes the run directory
        # the lock, before anything is written (rank 0 alone: the other ranks write nothing there)
        self.claim = claim(self.run_dir, resume=resume) if self.world.is_main else None
        try:
            self._setup(cfg, resume)
            # only once the run has started cleanly: a failed start (a bad --set model.path) must not
            # leave its config behind for every later --resume to fail on
            if self.world.is_main:
                with written_whole(self.run_dir / "config.yaml") as tmp:
                    save_config(cfg, tmp)
        except BaseException:
            if self.claim is not None:
                self.claim.release()
            raise

    def _setup(self, cfg, resume):
        self.train_tasks, self.val_tasks = select_tasks(cfg.data)
        self.task_levels = {t.task_id: dynamic_sampling.task_level(t, cfg.algo.difficulty_pool)
                            for t in self.train_tasks}
        if cfg.train.val_limit:
            self.val_tasks = self.val_tasks[: cfg.train.val_limit]
        check_shards(len(self.train_tasks), cfg.rollout.prompts_per_step, cfg.algo, self.world.size)
        self.state = TrainerState(kl_controller=make_kl_controller(cfg.algo.beta, cfg.algo.kl_target,
                                                                   cfg.algo.kl_horizon))
        self._setup_policy(cfg, resume)
        # stamps its SQLite rows with this run; one cache for all ranks, held by rank 0 (CachedScorer)
        self.cache = ScoreCache.from_config(cfg.cache, run=self.run_dir, shared_over=self.world)
        self.rewards = RewardSet(cfg, self.cache)
        self.val_scorer = self.rewards.tests.impl if self.rewards.tests else None
        self.memory = MemoryManager(cfg.memory)
        self.memory.apply_limits()
        self.events_seen = 0  # memory events already written to events.jsonl
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.passed_over = 0  # tasks the difficulty weighting passed over in this step's walk
        self.placed = 0  # the place in the step of the next round's first task: its samples' keys
        if resume:
            self._resume()
        self.order = run_order(self.train_tasks, cfg, self.state.epoch)
        if self.world.is_main:
            self.telemetry = Telemetry(self.run_dir, tensorboard=cfg.telemetry.tensorboard,
                                       console=cfg.telemetry.progress,
                                       purge_step=self.state.step + 1 if resume else None)
        else:
            self.telemetry = SilentTelemetry()
        self.telemetry.custom_layout()
        self.cache_counts = self._cache_counts()  # per-step hit rates are differences of these
        if not resume:
            self._log_cache_clear(self.cache.on_epoch_start(0), step=0)

    def _setup_policy(self, cfg, resume):
        """Policy (LoRA adapters, or all weights), reference, optimizer and updater."""
        planned = check_fits(cfg, self.train_tasks)  # a run that cannot fit the machine is refused before loading
        self.predicted_memory = {} if planned is None else {"memory/predicted_peak_gb": planned[2].mlx_peak / GB,
                                                            "memory/predicted_rss_gb": planned[2].rss_peak / GB}
        self.model, self.tokenizer, self.model_info = load_policy(cfg.model.path, dtype=cfg.model.dtype)
        model_cfg = cfg.model
        if model_cfg.fine_tune == "full" and self.model_info.get("quantization"):
            raise UserError(f"model.fine_tune: {cfg.model.path} is quantized (packed weights cannot be trained); "
                            "use fine_tune: lora")
        if model_cfg.fine_tune == "lora":
            lora = apply_lora(self.model, rank=model_cfg.lora_rank, alpha=model_cfg.lora_alpha,
                              dropout=model_cfg.lora_dropout, num_layers=model_cfg.lora_layers,
                              keys=model_cfg.lora_keys, seed=cfg.train.seed)
            self.ref_model = None  # reference = the same weights with adapters switched off
        else:
            lora = None
            self.ref_model = frozen_copy(self.model)
            unfreeze_all(self.model)
        self.adapter_cfg = adapter_config(base_model_folder(self.model_info, self.run_dir, self.world.is_main), lora)
        self.adapter_cfg[base_identity.KEY] = base_identity.identity(self.model_info)
        # log-probs at the sampling temperature; greedy sampling (0) has none, so it uses 1
        self.temperature = cfg.rollout.temperature or 1.0
        self.optimizer = make_optimizer(cfg.optim, schedule_steps(cfg), cfg.algo.num_iterations,
                                        scale=lambda: self.state.lr_scale)
        self.optimizer.init(self.model.trainable_parameters())
        self.share_prompts = cfg.optim.share_prompts and can_share_prompts(self.model)
        self.updater = Updater(self.model, self.optimizer, algo=cfg.algo, optim=cfg.optim, bucket=cfg.rollout.bucket,
                               share_prompts=self.share_prompts, temperature=self.temperature,
                               max_len=cfg.rollout.max_new_tokens, world=self.world,
                               group_size=cfg.rollout.group_size, plan=planned or self._loaded_plan(cfg))
        # the adapters' starting point, kept on disk so per-layer deltas survive a resume
        initial = self.run_dir / "initial_trainable.safetensors"
        if resume and initial.is_file():
            self.initial_trainable = mx.load(str(initial))
        else:
            self.initial_trainable = {k: mx.array(v) for k, v in tree_flatten(self.model.trainable_parameters())}
            if model_cfg.fine_tune == "lora" and self.world.is_main:
                with written_whole(initial) as tmp:
                    write_safetensors(tmp, self.initial_trainable)

    def _loaded_plan(self, cfg):
        """The memory plan from the loaded model's folder, for a model the plan could not describe before
        loading (a hub id not yet downloaded); grad_accum auto splits steps by it."""
        return plan_run(replace(cfg, model=replace(cfg.model, path=self.model_info["path"])), self.train_tasks)

    # ---------------------------------------------------------------- checkpoints
    def save(self):
        """Rank 0 writes the checkpoint (every rank holds the same weights and optimizer state)."""
        if not self.world.is_main:
            return None
        facts = {"rng": {"scheme": "keyed draws: (seed, purpose, ids), core.keys; epoch order from (seed, epoch)",
                         "seed": self.cfg.train.seed},
                 "model": self.model_info.get("path"), "world_size": self.world.size}
        cache = self.cache.snapshot()
        path = save_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer,
                               {**self.state.state_dict(), **facts}, self.adapter_cfg, cache)
        self.cache.checkpointed(cache)  # only once the checkpoint is in place
        return path

    def _resume(self):
        newest = latest_checkpoint(self.run_dir)
        if newest is not None:  # before any weights are read: another base must not load into this one
            base_identity.check(newest, self.model_info, "--resume")
        try:
            ckpt, saved, cache_snapshot = load_latest_intact(
                self.run_dir, self.model, self.optimizer, warn=lambda line: print(line, file=sys.stderr, flush=True))
        except CheckpointError as e:
            raise UserError(f"--resume: no intact checkpoint under {self.run_dir / 'checkpoints'} ({e})") from None
        saved_size = saved.get("world_size", 1)
        if saved_size != self.world.size:
            raise UserError(f"--resume: {ckpt} was written by a {saved_size}-rank run; resume it with "
                            f"{saved_size} rank(s) (this run has {self.world.size}): another world size "
                            f"splits the steps' prompts differently, so the run would not continue the same")
        self.state.load(saved)
        if cache_snapshot is not None:
            self.cache.restore(cache_snapshot)
        if self.world.is_main:
            print(f"resumed from {ckpt} at step {self.state.step}", file=sys.stderr)

    # ---------------------------------------------------------------- one step
    def run_step(self):
        started = time.perf_counter()
        with self._giving_prompts_back_on_failure():
            step_tasks, position = self.draw_prompts()
            batch, rounds = self.roll_out_and_score(step_tasks)  # the reference pass overlaps the scoring
        self.track_difficulty(rounds)
        batch.phase = epoch_phase(position, tuple(self.cfg.telemetry.phase_bounds))
        self.observe_kl(batch)
        self.compute_advantages(batch)
        result = self.update(batch)
        self.finish_update(batch, result)
        metrics = {"epoch": self.state.epoch, "epoch/position": position, **batch.sampling, **self.metrics(batch, result)}
        metrics["time/step_s"] = time.perf_counter() - started
        metrics.update(self.predicted_memory)  # the memory plan's peaks beside the measured ones
        self.after_step(metrics, batch.phase, result)
        return metrics

    @contextmanager
    def _giving_prompts_back_on_failure(self):
        """A step stopped before its update (judge outage, interrupt) gives its prompts back: the state
        stays the last step's."""
        pos_before = self.state.pos
        try:
            yield
        except BaseException:
            self.state.pos = pos_before
            raise

    def draw_prompts(self, n=None):
        """The step's prompts (every rank's: advantages and sample counts span them), and the epoch
        fraction done before them."""
        self.passed_over = 0
        return self.next_prompts(n)

    def next_prompts(self, n=None):
        """Up to n (default prompts_per_step) next prompts of this epoch's seeded order, and the epoch
        fraction done before them. With algo.difficulty_weighting each task is taken with probability
        dynamic_sampling.task_weight (from its running pass rate, or its level's while it has none) and
        otherwise passed over until next epoch; the draws come from a generator seeded by (seed, epoch,
        position), so a resumed run walks the same way. The last task of the order is always taken when the
        step has none yet."""
        algo, state = self.cfg.algo, self.state
        n = n or self.cfg.rollout.prompts_per_step
        position = state.pos / len(self.order)
        rng = (np.random.default_rng([self.cfg.train.seed, state.epoch, state.pos, 1])
               if algo.difficulty_weighting else None)
        picked = []
        while len(picked) < n and state.pos < len(self.order):
            task = self.train_tasks[self.order[state.pos]]
            state.pos += 1
            last_chance = not picked and state.pos == len(self.order)
            level = self.task_levels[task.task_id] if algo.difficulty_by_level else None
            if rng is None or last_chance or rng.random() < state.difficulty.weight(task.task_id, algo.difficulty_floor,
                                                                                    level):
                picked.append(task)
            else:
                self.passed_over += 1
        return picked, position

    def start_round(self, tasks):
        """G samples per task (KV-cached, batched), then their scoring started in the worker thread. Each
        sample draws from key(seed, "sample", step, the task's place in the step, its index)."""
        keys = SampleKeys(self.cfg.train.seed, (self.state.step + 1,), self.placed)
        self.placed += len(tasks)
        rollout_cfg = self.cfg.rollout
        self.memory.sample("generate_start")
        t0 = time.perf_counter()
        rollout_stats = self.memory.run_with_oom_backoff(
            lambda budget: generate_rollouts(self.model, self.tokenizer, [t.prompt for t in tasks],
                                             replace(rollout_cfg, max_batch_tokens=budget), keys=keys),
            rollout_cfg.max_batch_tokens, step=self.state.step + 1)
        generate_s = time.perf_counter() - t0
        self.memory.sample("generate")
        self.memory.note_shapes("generate", rollout_stats.shapes)
        row_tasks = [tasks[r.prompt_index] for r in rollout_stats.rollouts]
        scoring = self.pool.submit(_timed, self.rewards.score,
                                   row_tasks, [t.prompt for t in row_tasks], [r.completion for r in rollout_stats.rollouts])
        return dynamic_sampling.Round(tasks, rollout_stats, scoring, generate_s)

    def roll_out_and_score(self, step_tasks):
        """(StepBatch with this rank's share of the step's samples, their scores and reference log-probs;
        every round with its scores).

        Without dynamic sampling the reference pass runs while the worker thread scores; with it,
        rounds are drawn until the step holds prompts_per_step informative groups."""
        algo, group_size = self.cfg.algo, self.cfg.rollout.group_size
        tasks = self.world.shard(step_tasks)  # this rank's contiguous share
        self.placed = shard_bounds(len(step_tasks), self.world.size, self.world.rank)[0]  # its first place in the step
        first = self.start_round(tasks)
        rounds, sampling = [], {}
        t0 = time.perf_counter()
        if algo.dynamic_sampling:
            filled = dynamic_sampling.fill_groups(
                first, lambda k: self.next_prompts(k)[0], self.start_round, len(tasks),
                math.floor(len(tasks) * algo.max_draw_factor), group_size,
                on_scores=lambda rnd, scores: rounds.append((rnd, scores)))
            sampling = dynamic_sampling.sampling_metrics(filled, len(tasks))
            step_tasks = filled.tasks  # one rank: the step's tasks are this rank's
            rollout_stats, rollouts, scores = filled.batch, filled.rollouts, filled.scores
            generate_s, rewards_s = filled.gen_s, filled.rewards_s
        else:
            rollout_stats, rollouts, generate_s = first.batch, first.batch.rollouts, first.gen_s
        prompt_ids, completion_ids = [r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts]
        forwards = self.updater.forwards(prompt_ids, completion_ids)
        reference_logp, reference_s = None, 0.0
        if self.reference_needed(self.state.step + 1):
            t_ref = time.perf_counter()
            reference_logp = self.reference_logprobs(prompt_ids, completion_ids, forwards)
            mx.eval(reference_logp)
            reference_s = time.perf_counter() - t_ref
        if not algo.dynamic_sampling:
            scores, rewards_s = first.result()
            rounds.append((first, scores))
        score_s = time.perf_counter() - t0 - (generate_s - first.gen_s)  # extra rounds' generation apart
        self.memory.sample("score")
        batch = StepBatch(prompt_ids=prompt_ids, completion_ids=completion_ids, reference_logp=reference_logp,
                          forwards=forwards,
                          tasks=step_tasks, rollouts=rollouts, scores=scores, rollout_stats=rollout_stats,
                          sampling=sampling, times={"generate": generate_s, "score": score_s, "rewards": rewards_s,
                                                    "reference": reference_s})
        return batch, rounds

    def track_difficulty(self, rounds):
        """Count the fresh verdicts of the step's rounds; on several ranks every rank counts all of them
        (gathered), so each holds the tracker a single process would."""
        group_size = self.cfg.rollout.group_size
        ids = [t.task_id for rnd, _ in rounds for t in rnd.tasks for _ in range(group_size)]
        passed = [s.passed for _, scores in rounds for s in scores]
        provenance = [s.provenance for _, scores in rounds for s in scores]
        if self.world.size > 1:
            index = {t.task_id: i for i, t in enumerate(self.train_tasks)}
            columns = self.world.gather_columns({"task": [index[i] for i in ids], "passed": passed,
                                                 "fresh": [p == "fresh" for p in provenance]})
            ids = [self.train_tasks[int(i)].task_id for i in columns["task"]]
            passed = [bool(p) for p in columns["passed"]]
            provenance = ["fresh" if f else "cached" for f in columns["fresh"]]
        levels = [self.task_levels.get(i) for i in ids]
        self.state.difficulty.observe(ids, passed, provenance, levels)

    def compute_advantages(self, batch):
        """Advantages on the global batch (as on one rank), unjudged samples out of the statistics;
        each rank keeps its rows, a contiguous slice since its prompts' groups are whole. Under
        kl_in: reward the KL penalty is subtracted after the normalisation."""
        algo, group_size = self.cfg.algo, self.cfg.rollout.group_size
        rewards = np.array([s.total for s in batch.scores], dtype=np.float32)
        judged = judged_rows(batch.scores)
        if self.world.size > 1:
            lo, hi = shard_bounds(len(batch.tasks), self.world.size, self.world.rank)
            both = self.world.gather(np.stack([rewards, judged], axis=1))
            rewards, judged = both[:, 0], both[:, 1]
        adv, self.state.baseline = objective.advantages(mx.array(rewards), algo, group_size, self.state.baseline,
                                                        valid=[bool(v) for v in judged])
        if self.world.size > 1:
            adv = adv[lo * group_size: hi * group_size]
        if algo.kl_in == "reward" and batch.beta > 0:
            adv = objective.kl_penalized_advantages(adv, batch.behaviour_logp, batch.reference_logp, batch.token_mask,
                                                    batch.beta, algo.kl_estimator)
        batch.advantages = adv
        if self.world.size > 1:
            batch.rank_weight = self.updater.rank_weight(batch.loss_mask)
        batch.inject_nan = self.state.step + 1 in self.cfg.train.debug_nan_steps

    def update(self, batch):
        """num_iterations optimizer steps on the batch (rl.update), its shapes noted for the memory manager."""
        shapes, real_tokens = self.updater.shapes(batch)
        self.memory.note_shapes("update", shapes)
        t0 = time.perf_counter()
        # LoRA dropout draws from MLX's global generator: seeded here, its masks depend on (seed, step, rank) alone
        mx.random.seed(draw_seed(self.cfg.train.seed, "dropout", self.state.step + 1, self.world.rank))
        health = on_cadence(self.state.step + 1, self.cfg.train.health_every)  # gradient norms by group, update ratio
        result = self.updater.run(batch, batch.beta, health=health)
        result.seconds, result.shapes, result.real_tokens = time.perf_counter() - t0, shapes, real_tokens
        self.memory.sample("update")
        return result

    def finish_update(self, batch, result):
        """Count the step: skipped steps, the KL controller (horizon in samples, as in TRL and OpenRLHF)."""
        self.state.skipped_steps += int(result.skipped > 0)  # steps, not updates (num_iterations may be > 1)
        if result.skipped == 0 and batch.kl_observed is not None:
            self.state.kl_controller.update(batch.kl_observed, len(batch.tasks) * self.cfg.rollout.group_size)
        self.state.step += 1

    def metrics(self, batch, result):
        """The step's metrics: `step_metrics` of every rank's samples, then what the run's history adds."""
        columns = self.world.gather_columns(sample_columns(batch, self.rewards.sources))
        entropies = [e for r in batch.rollouts for e in r.entropies]
        if self.world.size > 1:
            entropies = self.world.gather(np.array(entropies, dtype=np.float32)[:, None]).ravel().tolist()
        metrics = step_metrics(batch, result, columns, entropies, self._generation_totals(batch, result),
                               self.cfg.rollout.group_size, [src.name for src in self.rewards.sources])
        return self.add_run_metrics(metrics, columns, batch.phase, result)

    def _generation_totals(self, batch, result):
        """Tokens and tok/s summed over ranks, phase times the slowest rank's (the step waits for it); on
        several ranks also the dist/* timing tags (runtime.distributed.step_timing)."""
        stats = batch.rollout_stats
        sums = {"gen/tokens_per_sec": stats.tokens_per_sec, "gen/prefill_tokens": stats.prefill_tokens,
                "gen/decode_tokens": stats.decode_tokens}
        times = {"time/generate_s": batch.times["generate"], "time/score_s": batch.times["score"],
                 "time/update_s": result.seconds,
                 "time/rewards_s": batch.times["rewards"],  # the reward sources alone (cache, sandbox, judges)
                 "time/reference_s": batch.times["reference"]}  # the reference forward, which scoring overlaps
        if self.world.size > 1:
            sums = dict(zip(sums, self.world.all_sum(list(sums.values()))))
            times = dict(zip(times, self.world.all_max(list(times.values()))))
            times.update(step_timing(self.world, batch.times["generate"], times["time/generate_s"], result.allreduce_s))
        return {**sums, **times}


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
