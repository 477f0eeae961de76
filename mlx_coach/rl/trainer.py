"""The RL loop: rollout -> score -> advantages -> policy-gradient update with a KL penalty.

Read `train()` top to bottom: setup, then one step per loop iteration in visible phases
(data, rollout, scoring, advantages, update, logging, checkpoint). Randomness is a pure
function of (seed, step) and (seed, epoch), and the learning-rate schedule's length is
optim.schedule_steps (fixed when a run starts), not where this invocation stops; so a run stopped
at step N and resumed to 2N replays a straight 2N run's samples and rates (tested with a cosine
schedule). The run directory is claimed (locked) before anything is written (rundir.py).

Every log-prob (behaviour, policy, reference) is taken at the sampling temperature, so the PPO
ratio and the KL estimate refer to the distribution the samples came from (top-p aside: the
truncated nucleus is not renormalised in the ratio, as in TRL and verl).
"""

import math
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_coach.models import base_identity
from mlx_coach.rl import objective as losses, dynamic_sampling as sampling
from mlx_coach.telemetry.alerts import Alert, AlertState, evaluate as evaluate_alerts, evaluate_epoch, lr_adjustment
from mlx_coach.rewards.cache import ScoreCache
from mlx_coach.runtime.checkpoint import CheckpointError, latest_checkpoint, load_latest_intact, save_checkpoint
from mlx_coach.config.tree import Config, load_config, load_run_config, save_config
from mlx_coach.runtime.distributed import checksum_spread, shard_bounds, world
from mlx_coach.core.errors import RunStopped, UserError
from mlx_coach.engine.generate import generate_and_score, pass_at_k_summary
from mlx_coach.telemetry.health import block_deltas, bucket_pass_rates, grad_norms_by_group, heatmap_image, lora_deltas, top_layers_text, update_ratio
from mlx_coach.runtime.memory import MemoryManager
from mlx_coach.telemetry.progress import StepClock, format_eta
from mlx_coach.telemetry.report import log_images, write_report
from mlx_coach.data.procedural import procedural_split
from mlx_coach.models.lora import adapter_config, adapters_disabled, apply_lora, frozen_copy, unfreeze_all
from mlx_coach.engine.logprobs import can_share_prompts, logprob_inputs, logprobs_from_inputs
from mlx_coach.models.loader import load_policy
from mlx_coach.rewards.sources import RewardSet
from mlx_coach.engine.rollout import generate_rollouts
from mlx_coach.runtime.rundir import claim
from mlx_coach.rewards.scoring.teacher import JudgeOutage
from mlx_coach.rewards.teacher_server import serve as serve_teacher
from mlx_coach.data.tasks import load_tasks, split_tasks
from mlx_coach.telemetry.writer import Ema, PhaseAccumulator, SilentTelemetry, Telemetry, epoch_phase, progress_line
from mlx_coach.rl.update import Updater

LENGTH_EDGES = (200, 400)  # prompt length buckets (characters) for the category x length heatmap
DRIFT_TOLERANCE = 1e-6  # relative spread of the ranks' parameter checksums that counts as drift


def step_seed(seed, step):
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**31)


def epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def select_tasks(data):
    """(training tasks, validation tasks). Procedural tasks come with their own held-out split;
    other sources are split by data.val_fraction."""
    if data.tasks.strip() == "procedural":
        tasks, val = procedural_split(data.procedural_count, data.procedural_heldout, data.procedural_seed,
                                      (data.difficulty_min, data.difficulty_max), data.families)
    else:
        tasks, val = load_tasks(data.tasks), None
    if data.categories:
        tasks = [t for t in tasks if t.tags.get("category") in data.categories]
        val = None if val is None else [t for t in val if t.tags.get("category") in data.categories]
    if data.limit:
        tasks = tasks[: data.limit]
    if not tasks:
        raise UserError(f"config key 'data.tasks': no tasks selected from {data.tasks!r}")
    return split_tasks(tasks, data.val_fraction, data.split_seed) if val is None else (tasks, val)


def make_optimizer(o, total_updates, scale=lambda: 1.0):
    """AdamW with warmup + constant/cosine; `scale()` multiplies the scheduled rate at every update
    (health adjustments lower the rate itself: with Adam, scaling gradients would change nothing)."""
    decay_steps = max(1, total_updates - o.warmup_steps)
    if o.schedule == "cosine":
        base = optim.cosine_decay(o.lr, decay_steps, end=o.lr * o.min_lr_ratio)
    else:
        base = lambda _: mx.array(o.lr)  # noqa: E731
    if o.warmup_steps:
        warm = optim.linear_schedule(o.lr / o.warmup_steps, o.lr, o.warmup_steps)
        base = optim.join_schedules([warm, base], [o.warmup_steps])
    return optim.AdamW(learning_rate=lambda step: base(step) * scale(), weight_decay=o.weight_decay)


def _pad(rows, width):
    return mx.array([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=mx.float32)


def micro_batches(n, grad_accum):
    """Row indices of the micro-batches one update (and the reference pass) is split into."""
    return np.array_split(np.arange(n), min(grad_accum, n))


def _fit(x, width):
    """[B, T] cut or right-padded with zeros to [B, width]."""
    return x[:, :width] if x.shape[1] >= width else mx.pad(x, [(0, 0), (0, width - x.shape[1])])


class Trainer:
    """Holds what one run needs; `train()` below drives it. Methods are the loop's phases."""

    def __init__(self, cfg: Config, run_dir, *, resume=False):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.world = world()  # size 1 without mlx.launch; rank 0 alone writes the run directory
        # the lock, before anything is written (rank 0 alone: the other ranks write nothing there)
        self.claim = claim(self.run_dir, resume=resume) if self.world.is_main else None
        try:
            self._setup(cfg, resume)
        except BaseException:
            if self.claim is not None:
                self.claim.release()
            raise
        # only once the run has started cleanly: a failed start (a bad --set model.path) must not
        # leave its config behind for every later --resume to fail on
        if self.world.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

    def _setup(self, cfg, resume):
        self.train_tasks, self.val_tasks = select_tasks(cfg.data)
        if cfg.train.val_limit:
            self.val_tasks = self.val_tasks[: cfg.train.val_limit]
        self._check_shards()

        # --- policy, reference, optimizer ---
        mx.random.seed(cfg.train.seed)
        self.model, self.tokenizer, self.model_info = load_policy(cfg.model.path)
        m = cfg.model
        if m.fine_tune == "lora":
            lora = apply_lora(self.model, rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout,
                              num_layers=m.lora_layers, keys=m.lora_keys)
            self.ref_model = None  # reference = the same weights with adapters switched off
        else:
            lora = None
            self.ref_model = frozen_copy(self.model)
            unfreeze_all(self.model)
        self.adapter_cfg = adapter_config(self._base_model_folder(), lora)
        self.adapter_cfg[base_identity.KEY] = base_identity.identity(self.model_info)
        total_updates = schedule_steps(cfg) * cfg.algo.num_iterations
        # log-probs at the sampling temperature; greedy sampling (0) has none, so it uses 1
        self.temperature = cfg.rollout.temperature or 1.0
        self.lr_scale = 1.0  # health adjustments (alerts.lr_adjust) multiply the learning rate
        self.optimizer = make_optimizer(cfg.optim, total_updates, scale=lambda: self.lr_scale)
        self.optimizer.init(self.model.trainable_parameters())
        self.updater = Updater(self.model, self.optimizer, self._loss, grad_clip=cfg.optim.grad_clip)
        self.share_prompts = cfg.optim.share_prompts and can_share_prompts(self.model)
        self.kl_ctl = losses.make_kl_controller(cfg.algo.beta, cfg.algo.kl_target, cfg.algo.kl_horizon)
        # the adapters' starting point, kept on disk so per-layer deltas survive a resume
        initial = self.run_dir / "initial_trainable.safetensors"
        if resume and initial.is_file():
            self.initial_trainable = mx.load(str(initial))
        else:
            self.initial_trainable = {k: mx.array(v) for k, v in tree_flatten(self.model.trainable_parameters())}
            if m.fine_tune == "lora" and self.world.is_main:
                mx.save_safetensors(str(initial), self.initial_trainable)

        # --- scoring, memory, telemetry ---
        self.cache = ScoreCache.from_config(cfg.cache)
        self.rewards = RewardSet(cfg, self.cache)
        self.val_scorer = self.rewards.tests.impl if self.rewards.tests else None
        self.memory = MemoryManager(cfg.memory)
        self.memory.apply_limits()
        self.alert_state = AlertState()
        self.phases = PhaseAccumulator()
        self.reward_ema, self.loss_ema = Ema(0.1), Ema(0.1)
        self.events_seen = 0  # memory events already written to events.jsonl
        self.toks_first = []  # tok/s of the run's first steps: the reference for gen/tokens_per_sec_rel
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.difficulty = sampling.DifficultyTracker()  # running pass rate per task, from fresh scores
        self.passed_over = 0

        # --- state (what a checkpoint restores) ---
        self.step, self.epoch, self.pos = 0, 0, 0
        self.baseline = None
        self.skipped = 0
        self.first_epoch_fresh = []
        self.baseline_reward = None
        if resume:
            self._resume()
        self.order = epoch_order(len(self.train_tasks), cfg.train.seed, self.epoch)
        if self.world.is_main:
            self.telemetry = Telemetry(self.run_dir, tensorboard=cfg.telemetry.tensorboard,
                                       console=cfg.telemetry.progress, purge_step=self.step + 1 if resume else None)
        else:
            self.telemetry = SilentTelemetry()
        self.telemetry.custom_layout()
        self.cache_counts = self._cache_counts()  # per-step hit rates are differences of these
        if not resume:
            self._log_cache_clear(self.cache.on_epoch_start(0), step=0)

    def _base_model_folder(self):
        """The base model that adapter_config.json names. A builtin model is created in code, so
        its HF folder is copied into the run directory: the run then loads anywhere with mlx-lm."""
        if self.model_info.get("kind") != "builtin":
            return self.model_info["path"]
        target = self.run_dir / "base_model"
        if self.world.is_main and not (target / "config.json").is_file():
            tmp = self.run_dir / ".base_model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.model_info["path"], tmp)
            os.replace(tmp, target)
        return str(target.resolve())

    def _check_shards(self):
        """Every rank needs at least one prompt in every step, the epoch's last (shorter) step included."""
        n, per_step, size = len(self.train_tasks), self.cfg.rollout.prompts_per_step, self.world.size
        a = self.cfg.algo
        if size > 1 and (a.dynamic_sampling or a.difficulty_weighting):
            # both change how many prompts a step holds, which the ranks' contiguous shards assume fixed
            key = "dynamic_sampling" if a.dynamic_sampling else "difficulty_weighting"
            raise UserError(f"config key 'algo.{key}' is not supported with several ranks yet; turn it off")
        smallest = min(per_step, n % per_step or per_step, n)
        if smallest < size:
            raise UserError(f"config key 'rollout.prompts_per_step': {n} training tasks in steps of {per_step} leave "
                            f"a step of {smallest} prompts, fewer than the {size} ranks; make each step hold at "
                            f"least {size} prompts (prompts_per_step, data.limit)")

    # ---------------------------------------------------------------- checkpoints
    def _state(self):
        return {
            "step": self.step, "epoch": self.epoch, "pos": self.pos,
            "rng": {"scheme": "seed(step_seed(seed, step)) at each step; epoch order from (seed, epoch)",
                    "seed": self.cfg.train.seed},
            "baseline": self.baseline, "kl_controller": self.kl_ctl.state_dict(), "skipped_steps": self.skipped,
            "first_epoch_fresh": self.first_epoch_fresh, "baseline_reward": self.baseline_reward,
            "reward_ema": self.reward_ema.state_dict(), "loss_ema": self.loss_ema.state_dict(),
            "alerts": self.alert_state.state_dict(), "phases": self.phases.state_dict(),
            "lr_scale": self.lr_scale, "model": self.model_info.get("path"), "toks_first": self.toks_first,
            "world_size": self.world.size, "difficulty": self.difficulty.state_dict(),
        }

    def save(self):
        """Rank 0 writes the checkpoint (every rank holds the same weights and optimizer state)."""
        if not self.world.is_main:
            return None
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self._state(),
                               self.adapter_cfg, self.cache.snapshot())

    def _resume(self):
        newest = latest_checkpoint(self.run_dir)
        if newest is not None:  # before any weights are read: another base must not load into this one
            base_identity.check(newest, self.model_info, "--resume")
        try:
            ckpt, state, cache_snapshot = load_latest_intact(
                self.run_dir, self.model, self.optimizer, warn=lambda line: print(line, file=sys.stderr, flush=True))
        except CheckpointError as e:
            raise UserError(f"--resume: no intact checkpoint under {self.run_dir / 'checkpoints'} ({e})") from None
        saved_size = state.get("world_size", 1)
        if saved_size != self.world.size:
            raise UserError(f"--resume: {ckpt} was written by a {saved_size}-rank run; resume it with "
                            f"{saved_size} rank(s) (this run has {self.world.size}): another world size "
                            f"splits the steps' prompts differently, so the run would not continue the same")
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.baseline, self.skipped = state["baseline"], state["skipped_steps"]
        self.kl_ctl = losses.kl_controller_from_state(state["kl_controller"])
        self.first_epoch_fresh = state["first_epoch_fresh"]
        self.baseline_reward = state["baseline_reward"]
        self.reward_ema.load(state["reward_ema"])
        self.loss_ema.load(state["loss_ema"])
        self.alert_state.load(state["alerts"])
        self.phases.load(state["phases"])
        self.lr_scale = state["lr_scale"]
        self.toks_first = state["toks_first"]
        self.difficulty.load(state.get("difficulty", {"counts": {}}))  # absent from older checkpoints
        if cache_snapshot is not None:
            self.cache.restore(cache_snapshot)
        if self.world.is_main:
            print(f"resumed from {ckpt} at step {self.step}", file=sys.stderr)

    # ---------------------------------------------------------------- phases
    def next_prompts(self, n=None):
        """Up to n (default prompts_per_step) next prompts of this epoch's seeded order, and the epoch
        fraction done before them. With algo.difficulty_weighting each task is taken with probability
        sampling.task_weight (from its running pass rate) and otherwise passed over until next epoch;
        the draws come from a generator seeded by (seed, epoch, position), so a resumed run walks the
        same way. The last task of the order is always taken when the step has none yet."""
        a = self.cfg.algo
        n = n or self.cfg.rollout.prompts_per_step
        position = self.pos / len(self.order)
        rng = np.random.default_rng([self.cfg.train.seed, self.epoch, self.pos, 1]) if a.difficulty_weighting else None
        picked = []
        while len(picked) < n and self.pos < len(self.order):
            task = self.train_tasks[self.order[self.pos]]
            self.pos += 1
            last_chance = not picked and self.pos == len(self.order)
            if rng is None or last_chance or rng.random() < self.difficulty.weight(task.task_id, a.difficulty_floor):
                picked.append(task)
            else:
                self.passed_over += 1
        return picked, position

    def start_round(self, tasks):
        """G samples per task (KV-cached, batched), then their scoring started in the worker thread."""
        rc = self.cfg.rollout
        self.memory.sample("generate_start")
        t0 = time.perf_counter()
        rb = self.memory.run_with_oom_backoff(
            lambda budget: generate_rollouts(self.model, self.tokenizer, [t.prompt for t in tasks],
                                             _with_budget(rc, budget)), rc.max_batch_tokens, step=self.step + 1)
        gen_s = time.perf_counter() - t0
        self.memory.sample("generate")
        self.memory.note_shapes("generate", rb.shapes)
        group_tasks = [tasks[r.prompt_index] for r in rb.rollouts]
        fut = self.pool.submit(_timed, lambda *a: self.rewards.score(*a, group_size=rc.group_size), group_tasks,
                               [t.prompt for t in group_tasks], [r.completion for r in rb.rollouts])
        return sampling.Round(tasks, rb, fut, gen_s)

    def track_difficulty(self, rounds, G):
        """Count the fresh verdicts of the step's rounds; on several ranks every rank counts all of them
        (gathered), so each holds the tracker a single process would."""
        ids = [t.task_id for rnd, _ in rounds for t in rnd.tasks for _ in range(G)]
        passed = [s.passed for _, scores in rounds for s in scores]
        provenance = [s.provenance for _, scores in rounds for s in scores]
        if self.world.size > 1:
            index = {t.task_id: i for i, t in enumerate(self.train_tasks)}
            cols = self.world.gather_columns({"task": [index[i] for i in ids], "passed": passed,
                                              "fresh": [p == "fresh" for p in provenance]})
            ids = [self.train_tasks[int(i)].task_id for i in cols["task"]]
            passed = [bool(p) for p in cols["passed"]]
            provenance = ["fresh" if f else "cached" for f in cols["fresh"]]
        self.difficulty.observe(ids, passed, provenance)

    def reference_logprobs(self, prompt_ids, comp_ids):
        """Reference log-probs [B, T] at the sampling temperature, one micro-batch at a time
        (optim.grad_accum), so the pass needs no more memory than one micro-batch's forward. With
        optim.share_prompts each group's prompt is computed once for its G samples."""
        T = max(1, max(len(c) for c in comp_ids))
        parts = []
        for idx in micro_batches(len(comp_ids), self.cfg.optim.grad_accum):
            x = logprob_inputs([prompt_ids[i] for i in idx], [comp_ids[i] for i in idx],
                               bucket=self.cfg.rollout.bucket, share_prompts=self.share_prompts)
            if self.ref_model is not None:
                logp, _, _ = logprobs_from_inputs(self.ref_model, x, temperature=self.temperature)
            else:
                with adapters_disabled(self.model):
                    logp, _, _ = logprobs_from_inputs(self.model, x, temperature=self.temperature)
            logp = _fit(logp, T)
            mx.eval(logp)
            parts.append(logp)
        return mx.stop_gradient(mx.concatenate(parts, axis=0))

    def _loss(self, model, x, beta, inject_nan=False):
        """The objective on one micro-batch's arrays (`_micro_inputs`)."""
        a = self.cfg.algo
        logp, mask, entropy = logprobs_from_inputs(model, x, with_entropy=a.entropy_coef > 0,
                                                   temperature=self.temperature)
        mask = mask * x["loss_mask"]
        old = mx.where(mask > 0, x["old_logp"], mx.stop_gradient(logp))
        ref = x["ref_logp"] if a.kl_in == "loss" else None
        loss, stats = losses.policy_loss(
            logp, old, x["adv"], mask, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
            aggregation=a.aggregation, max_len=self.cfg.rollout.max_new_tokens, ref_logp=ref,
            beta=beta if a.kl_in == "loss" else 0.0, kl_kind=a.kl_estimator, entropy=entropy,
            entropy_coef=a.entropy_coef)
        if inject_nan:
            loss = loss * mx.array(float("nan"))
        return loss, stats

    def _micro_inputs(self, batch, idx):
        """One micro-batch's arrays: its log-prob inputs, and the batch's per-token columns cut or
        padded to their width (rollout.bucket may round it up; the extra columns are masked)."""
        x = logprob_inputs([batch["prompt_ids"][i] for i in idx], [batch["comp_ids"][i] for i in idx],
                           bucket=self.cfg.rollout.bucket, share_prompts=self.share_prompts)
        width, rows = x["targets"].shape[1], mx.array(idx)
        for k in ("old_logp", "ref_logp", "loss_mask"):
            x[k] = _fit(batch[k][rows], width)
        x["adv"] = batch["adv"][rows]
        return x

    def update_shapes(self, prompt_ids, comp_ids):
        """(rows, columns) of the update's forwards, and the real token positions among them."""
        shapes = []
        for idx in micro_batches(len(comp_ids), self.cfg.optim.grad_accum):
            x = logprob_inputs([prompt_ids[i] for i in idx], [comp_ids[i] for i in idx],
                               bucket=self.cfg.rollout.bucket, share_prompts=self.share_prompts)
            if "prompt" in x:
                shapes += [tuple(x["prompt"].shape), (x["targets"].shape[0], x["targets"].shape[1] - 1)]
            else:
                shapes.append(tuple(x["inputs"].shape))
        if self.share_prompts:  # each distinct prompt of a micro-batch computed once
            real = sum(sum(len(p) for p in {tuple(prompt_ids[i]) for i in idx}) + sum(len(comp_ids[i]) for i in idx)
                       for idx in micro_batches(len(comp_ids), self.cfg.optim.grad_accum))
        else:
            real = sum(len(p) + len(c) for p, c in zip(prompt_ids, comp_ids))
        return shapes, real

    def update(self, batch, beta):
        """num_iterations optimizer updates on one rollout batch, each with gradient accumulation.

        A non-finite loss or gradient skips that update: weights and optimizer state stay as
        they were, the skip is counted and alerted, nothing is clamped. Each micro-batch's
        gradients are evaluated before the next one starts, so peak memory is one micro-batch's.
        LoRA dropout (model.lora_dropout) is active here only, never while sampling."""
        chunks = micro_batches(len(batch["comp_ids"]), self.cfg.optim.grad_accum)
        out = {"skipped": 0, "clip_frac": [], "grad_norm": [], "loss": [], "pg_loss": [],
               "kl_loss": [], "ratio_mean": [], "update_ratio": [], "group_norms": {}}
        self.model.train()
        try:
            self._update_iterations(batch, beta, chunks, out)
        finally:
            self.model.eval()
        return out

    def _parts(self, batch, chunks):
        """[(arrays, weight)] per micro-batch, weighted so that their sum is the full batch's loss.
        Distributed: each rank's weights are scaled by size x (its share of the global batch's
        normaliser, batch["rank_weight"]), so averaging over ranks yields the global batch's."""
        rank_weight = batch.get("rank_weight", 1.0) if self.world.size > 1 else 1.0
        return [(self._micro_inputs(batch, idx), self._chunk_weight(batch["mask_np"][idx], batch["mask_np"]) * rank_weight)
                for idx in chunks]

    def accumulate_gradients(self, batch, beta, chunks):
        """(grads, loss, stats) of the whole batch, summed over micro-batches weighted so that they
        equal the full batch's; each micro-batch is evaluated before the next builds its graph.

        Distributed: gradients are averaged with `nn.average_gradients` (loss and stats likewise),
        so every rank then clips and applies the same gradient."""
        grads, loss, stats = self.updater.accumulate(self._parts(batch, chunks), beta, batch.get("inject_nan", False))
        if self.world.size > 1:
            grads = nn.average_gradients(grads)
            size = self.world.size
            loss = mx.distributed.all_sum(loss) / size
            stats = {k: mx.distributed.all_sum(v) / size for k, v in stats.items()}
            mx.eval(grads, loss, stats)
        return grads, loss, stats

    def _update_iterations(self, batch, beta, chunks, out):
        for _ in range(self.cfg.algo.num_iterations):
            before = dict(tree_flatten(self.model.trainable_parameters()))  # immutable arrays: no copy
            grads_sum, loss_sum, stats_sum = self.accumulate_gradients(batch, beta, chunks)
            clipped, norm, finite = self.updater.apply(grads_sum, loss_sum)
            out["grad_norm"].append(norm.item())
            out["loss"].append(loss_sum.item())
            for k in ("clip_frac", "pg_loss", "kl_loss", "ratio_mean"):
                if k in stats_sum:
                    out[k].append(stats_sum[k].item())
            if not finite:
                out["skipped"] += 1
                continue
            out["group_norms"] = grad_norms_by_group(clipped)
            out["update_ratio"].append(update_ratio(before, dict(tree_flatten(self.model.trainable_parameters()))))

    def _chunk_weight(self, chunk_mask, batch_mask):
        """Weight of one micro-batch so that accumulated gradients equal the full batch's."""
        agg = self.cfg.algo.aggregation
        if agg == "token":
            return float(chunk_mask.sum() / max(batch_mask.sum(), 1))
        if agg == "sequence":  # the mean runs over rows with at least one real token
            return float((chunk_mask.sum(1) > 0).sum() / max((batch_mask.sum(1) > 0).sum(), 1))
        return len(chunk_mask) / len(batch_mask)

    def _rank_weight(self, mask_np):
        """size x this rank's share of what the loss divides by (tokens, sequences or rows) over all ranks."""
        agg = self.cfg.algo.aggregation
        mine = float(mask_np.sum() if agg == "token" else (mask_np.sum(1) > 0).sum() if agg == "sequence"
                     else len(mask_np))
        # _chunk_weight divided by max(local total, 1): multiplying by it leaves chunk / global total
        return self.world.size * max(mine, 1.0) / max(self.world.all_sum(mine), 1.0)

    def _log_cache_clear(self, removed, step):
        if removed or self.cfg.cache.policy == "epoch-clear":
            self.telemetry.event(step, "cache/clear", removed=int(removed), epoch=self.epoch)

    # ---------------------------------------------------------------- validation
    def validate(self):
        """Score the fixed validation split fresh (the cache is bypassed) with greedy decoding."""
        if not self.val_tasks or self.val_scorer is None:
            return None
        t = self.cfg.train
        rc = replace(self.cfg.rollout, temperature=0.0, group_size=1,
                     max_new_tokens=t.val_max_new_tokens or self.cfg.rollout.max_new_tokens)
        if self.world.size == 1:
            records = generate_and_score(self.model, self.tokenizer, self.val_tasks, rc, self.val_scorer,
                                         bypass_cache=True, desc=f"validation (epoch {self.epoch})")
        else:  # each rank scores its share (greedy: the same verdicts as one rank's), then all are combined
            mine = self.world.shard(self.val_tasks)
            lo, _ = shard_bounds(len(self.val_tasks), self.world.size, self.world.rank)
            local = generate_and_score(self.model, self.tokenizer, mine, rc, self.val_scorer,
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

    # ---------------------------------------------------------------- one step
    def run_step(self):
        cfg, a = self.cfg, self.cfg.algo
        t_step = time.perf_counter()
        # rank 0 draws what a single process draws; other ranks draw from their own streams
        mx.random.seed((step_seed(cfg.train.seed, self.step) + 104_729 * self.world.rank) % 2**31)
        pos_before = self.pos  # a step aborted before its update (judge outage, stop) gives it back
        self.passed_over = 0  # tasks the difficulty weighting passes over in this step's walk
        all_tasks, position = self.next_prompts()
        tasks = self.world.shard(all_tasks)  # this rank's contiguous share of the step's prompts
        phase = epoch_phase(position, tuple(cfg.telemetry.phase_bounds))
        metrics = {"epoch": self.epoch, "epoch/position": position}
        G = cfg.rollout.group_size

        # --- rollout: G samples per prompt, KV-cached, batched; scoring starts in a worker thread ---
        first = self.start_round(tasks)
        seen = []  # (round, scores) of the step, for the difficulty tracker once the step is sure to happen
        t0 = time.perf_counter()
        try:
            if a.dynamic_sampling:
                # --- dynamic sampling: drop groups whose rewards are all equal, draw prompts to refill ---
                filled = sampling.fill_groups(first, lambda k: self.next_prompts(k)[0], self.start_round,
                                              len(tasks), math.floor(len(tasks) * a.max_draw_factor), G,
                                              on_scores=lambda rnd, scores: seen.append((rnd, scores)))
                metrics.update(sampling.sampling_metrics(filled, len(tasks)))
                all_tasks = filled.tasks  # one rank: the step's tasks are this rank's
                rb, rollouts, scored = filled.batch, filled.rollouts, filled.scores
                t_gen, t_rewards = filled.gen_s, filled.rewards_s
            else:
                rb, rollouts, t_gen = first.batch, first.batch.rollouts, first.gen_s
            # --- reference log-probs (overlapping the scoring without dynamic sampling) ---
            prompt_ids = [r.prompt_ids for r in rollouts]
            comp_ids = [r.token_ids for r in rollouts]
            T = max(1, max(len(c) for c in comp_ids))
            t_ref = time.perf_counter()
            ref_logp = self.reference_logprobs(prompt_ids, comp_ids)
            mx.eval(ref_logp)
            t_ref = time.perf_counter() - t_ref
            if not a.dynamic_sampling:
                scored, t_rewards = first.result()
                seen.append((first, scored))
        except BaseException:
            self.pos = pos_before  # nothing of this step happened: the state is the last step's
            raise
        t_score = time.perf_counter() - t0 - (t_gen - first.gen_s)  # extra rounds' generation apart
        self.memory.sample("score")
        self.track_difficulty(seen, G)

        # --- rewards and advantages ---
        rewards_np = np.array([s.total for s in scored], dtype=np.float32)
        old_logp = _pad([r.logprobs for r in rollouts], T)
        mask_np = np.array([[1.0] * len(c) + [0.0] * (T - len(c)) for c in comp_ids], dtype=np.float32)
        truncated = [r.finish_reason == "length" for r in rollouts]
        loss_mask = mx.array(mask_np)
        if a.mask_truncated:
            loss_mask = losses.mask_truncated(loss_mask, mx.array(truncated))
            mask_np = np.array(loss_mask)
        beta = self.kl_ctl.beta
        # KL(behaviour || reference) per sampled token, whatever kl_in is: the controller, kl/mean and
        # the kl_high alert see the policy's distance even when the penalty sits in the reward
        all_tokens = mx.array([[1.0] * len(c) + [0.0] * (T - len(c)) for c in comp_ids])
        kl_tokens = losses.kl_estimate(old_logp, ref_logp, a.kl_estimator)
        if self.world.size == 1:
            kl_obs = float(losses.aggregate(kl_tokens, all_tokens).item())
        else:  # token mean over every rank's tokens
            kl_sum, n_tok = self.world.all_sum([float(mx.sum(mx.where(all_tokens > 0, kl_tokens, 0.0)).item()), float(all_tokens.sum().item())])
            kl_obs = kl_sum / max(n_tok, 1.0)
        rewards = mx.array(rewards_np)
        if a.kl_in == "reward" and beta > 0:
            rewards = losses.kl_penalized_rewards(rewards, old_logp, ref_logp, mx.array(mask_np), beta, a.kl_estimator)
        if self.world.size > 1:
            # advantages (group, batch or moving-baseline) are computed on the global batch, as on one
            # rank, and each rank keeps its rows: its prompts' groups are whole, so its slice is contiguous
            lo, hi = shard_bounds(len(all_tasks), self.world.size, self.world.rank)
            rewards = mx.array(self.world.gather(np.array(rewards)[:, None]).ravel())
        if a.advantage == "grpo":
            adv = losses.grpo_advantages(rewards, G, scale=a.scale_rewards)
        elif a.advantage == "dr_grpo":
            adv = losses.dr_grpo_advantages(rewards, G)
        else:
            adv, self.baseline = losses.reinforce_advantages(rewards, self.baseline, a.baseline_decay)
        if self.world.size > 1:
            adv = adv[lo * G: hi * G]
        batch = {"prompt_ids": prompt_ids, "comp_ids": comp_ids, "old_logp": old_logp, "ref_logp": ref_logp,
                 "adv": adv, "loss_mask": loss_mask, "mask_np": mask_np,
                 "inject_nan": self.step + 1 in cfg.train.debug_nan_steps}
        if self.world.size > 1:
            batch["rank_weight"] = self._rank_weight(mask_np)

        # --- update ---
        update_shapes, real_tokens = self.update_shapes(prompt_ids, comp_ids)
        self.memory.note_shapes("update", update_shapes)
        t0 = time.perf_counter()
        upd = self.update(batch, beta)
        t_update = time.perf_counter() - t0
        self.memory.sample("update")
        self.skipped += int(upd["skipped"] > 0)  # steps, not updates (num_iterations may be > 1)
        if upd["skipped"] == 0:  # the controller's horizon is in samples, as in TRL and OpenRLHF
            self.kl_ctl.update(kl_obs, len(all_tasks) * G)
        self.step += 1
        if self.world.size > 1 and cfg.train.checksum_every and self.step % cfg.train.checksum_every == 0:
            self.check_parameters_agree(metrics)

        # --- metrics ---
        metrics.update(self._step_metrics(
            rb, rollouts, scored, truncated, upd, phase, kl_obs=kl_obs, beta=beta,
            times=(t_gen, t_score, t_update, t_rewards, t_ref), update_cost=(update_shapes, real_tokens)))
        metrics["time/step_s"] = time.perf_counter() - t_step

        # --- alerts and health adjustments ---
        for source, (kind, failures) in self.rewards.drain_events():  # judge outages, always said
            self.telemetry.alert(self.step, _outage_alert(source, kind, failures))
        if self.cfg.alerts.enabled:
            step_metrics = dict(metrics, **{"step": self.step, "loss/nonfinite": float(upd["skipped"] > 0)})
            for alert in evaluate_alerts(self.alert_state, step_metrics, self.cfg.alerts, phase=phase):
                self.telemetry.alert(self.step, alert)
            factor = lr_adjustment(self.alert_state, step_metrics, self.cfg.alerts)
            if self.world.size > 1:  # rank 0's decision, so the learning rate stays the same everywhere
                factor = self.world.from_main(factor or 0.0) or None
            if factor is not None:
                self.lr_scale *= factor
                self.telemetry.event(self.step, "health/lr_adjust", factor=factor, lr_scale=self.lr_scale)
        self.telemetry.log(self.step, metrics)
        self.telemetry.histogram("difficulty/pass_rate", self.difficulty.rates(), self.step)
        if self.pos >= len(self.order):
            self.end_epoch()
        return metrics

    def _step_metrics(self, rb, rollouts, scored, truncated, upd, phase, *, kl_obs, beta, times, update_cost):
        """The step's metrics in one place (as CleanRL logs in one block): per-sample columns gathered
        from every rank in rank order (one rank: its own lists), rewards by provenance, loss, KL,
        policy, gradients, generation, padding, cache and memory; updates the EMAs, the first tok/s,
        the first epoch's fresh rewards, memory clears and the epoch-phase accumulator."""
        G = self.cfg.rollout.group_size
        comp_ids = [r.token_ids for r in rollouts]
        update_shapes, real_tokens = update_cost
        cols = self.world.gather_columns({
            "total": [s.total for s in scored], "fresh": [s.provenance == "fresh" for s in scored],
            "cached": [s.provenance == "cached" for s in scored], "fallback": [s.provenance == "fallback" for s in scored],
            "passed": [s.passed for s in scored], "truncated": truncated, "comp_len": [len(c) for c in comp_ids],
            **{f"status/{st}": [st in s.statuses.values() for s in scored] for st in ("timeout", "infra_error")},
            **{f"part/{src.name}": [s.parts.get(src.name, math.nan) for s in scored] for src in self.rewards.sources}})
        rewards_np = np.array(cols["total"], dtype=np.float32)
        fresh = [v for v, f in zip(cols["total"], cols["fresh"]) if f]
        cached = [v for v, c in zip(cols["total"], cols["cached"]) if c]
        n_fallback = int(sum(cols["fallback"]))
        comp_lens, truncated = cols["comp_len"], cols["truncated"]
        ent = [e for r in rollouts for e in r.entropies]
        if self.world.size > 1:
            ent = self.world.gather(np.array(ent, dtype=np.float32)[:, None]).ravel().tolist()
        gen = self._gen_totals(rb, *times)
        metrics = {
            "reward/mean": float(np.mean(rewards_np)), "reward/std": float(np.std(rewards_np)),
            # count = graded samples (fresh + cached); samples with a judge's fallback are apart
            "reward/count": len(fresh) + len(cached), "reward/fresh_count": len(fresh),
            "reward/cached_count": len(cached), "reward/fallback_count": n_fallback,
            "reward/fallback_frac": n_fallback / len(cols["total"]),
            "reward/frac_zero_std": float(losses.zero_std_fraction(mx.array(rewards_np), G)),
            "reward/ema": self.reward_ema.update(float(np.mean(rewards_np))),
            "loss/policy": float(np.mean(upd["loss"])), "loss/kl": float(np.mean(upd["kl_loss"] or [0.0])),
            "loss/policy_ema": self.loss_ema.update(float(np.mean(upd["loss"]))),
            "kl/mean": kl_obs, "kl/beta": beta,
            "policy/clip_frac": float(np.mean(upd["clip_frac"] or [0.0])),
            "policy/ratio_mean": float(np.mean(upd["ratio_mean"] or [1.0])),
            "policy/entropy": float(np.mean(ent)) if ent else 0.0,
            "grad/norm": float(upd["grad_norm"][-1]),
            "grad/update_ratio": float(np.mean(upd["update_ratio"])) if upd["update_ratio"] else 0.0,
            "lr": float(self.optimizer.learning_rate.item()), "lr/scale": self.lr_scale,
            "train/skipped_steps": self.skipped,
            "train/pass_rate": float(np.mean(cols["passed"])),
            **gen,  # tokens and tok/s summed over ranks, times the slowest rank's
            "gen/completion_len_mean": float(np.mean(comp_lens)),
            "gen/truncated_frac": float(np.mean(truncated)),
            # positions computed for no sequence (prompt padding, finished rows kept for the bucket; the
            # update's right padding): the cost of shape bucketing, next to memory/new_shapes, its gain
            "gen/padding_frac": rb.padding_tokens / max(rb.padding_tokens + rb.prefill_tokens + rb.decode_tokens, 1),
            # how full decoding kept the batch (rollout.continuous refills rows that finished sequences free)
            "gen/rows_per_forward": rb.rows_per_forward,
            "gen/refills": rb.refills,
            "update/padding_frac": 1.0 - real_tokens / max(sum(rows * cols for rows, cols in update_shapes), 1),
        }
        # the mean of no samples is undefined: NaN, never a made-up 0
        # a sandbox deadline hit on a loaded machine scores 0 like a failing program: count it apart
        for status in ("timeout", "infra_error"):
            metrics[f"reward/{status}_count"] = sum(bool(v) for v in cols[f"status/{status}"])
        metrics["reward/fresh_mean"] = float(np.mean(fresh)) if fresh else float("nan")
        metrics["reward/cached_mean"] = float(np.mean(cached)) if cached else float("nan")
        toks = metrics["gen/tokens_per_sec"]
        if len(self.toks_first) < 5:
            self.toks_first.append(toks)
        metrics["gen/tokens_per_sec_rel"] = toks / max(float(np.mean(self.toks_first)), 1e-9)
        if self.baseline_reward is not None and fresh:
            metrics["reward/gain_from_baseline"] = float(np.mean(fresh)) - self.baseline_reward
        if self.epoch == 0:
            self.first_epoch_fresh.extend(fresh)
        for src in self.rewards.sources:
            vals = [v for v in cols[f"part/{src.name}"] if not math.isnan(v)]
            if vals and len(self.rewards.sources) > 1:
                metrics[f"reward/{src.name}_mean"] = float(np.mean(vals))
        metrics.update(self.rewards.stats())
        metrics.update(self.difficulty.metrics())
        if self.cfg.algo.difficulty_weighting:
            metrics["sampling/passed_over"] = self.passed_over
        metrics.update(upd["group_norms"])
        metrics.update(self.cache_metrics())
        mem = self.memory.step_metrics()
        if self.world.size > 1:  # the largest rank's memory (per-phase samples stay rank 0's)
            keys = [k for k in mem if not k.startswith("memory/phase/")]
            mem.update(zip(keys, self.world.all_max([mem[k] for k in keys])))
        metrics.update(mem)
        self.memory.maybe_clear(self.step)
        for ev in self.memory.events[self.events_seen:]:  # clears and OOM batch halvings
            self.telemetry.event(self.step, ev.kind, **ev.fields())
        self.events_seen = len(self.memory.events)
        self.phases.add(phase, {"tokens_per_sec": toks, "hits": metrics.get("cache/step_hits", 0),
                                "misses": metrics.get("cache/step_misses", 0),
                                "cache_share": mem.get("memory/cache_share", 0.0),
                                "fresh_reward_mean": metrics["reward/fresh_mean"] if fresh else None, "fresh_count": len(fresh)})
        metrics.update(self.phases.by_phase_metrics(phase))
        return metrics

    def _gen_totals(self, rb, t_gen, t_score, t_update, t_rewards, t_ref):
        """Generation throughput and phase times of the step: tokens and tok/s summed over ranks,
        times the slowest rank's (the step waits for it)."""
        sums = {"gen/tokens_per_sec": rb.tokens_per_sec, "gen/prefill_tokens": rb.prefill_tokens,
                "gen/decode_tokens": rb.decode_tokens}
        times = {"time/generate_s": t_gen, "time/score_s": t_score, "time/update_s": t_update,
                 "time/rewards_s": t_rewards,  # rewards_s: the reward sources alone (cache, sandbox, judges, functions)
                 "time/reference_s": t_ref}  # the reference forward pass, which scoring overlaps
        if self.world.size > 1:
            sums = dict(zip(sums, self.world.all_sum(list(sums.values()))))
            times = dict(zip(times, self.world.all_max(list(times.values()))))
        return {**sums, **times}

    def check_parameters_agree(self, metrics):
        """All-reduced parameter checksums: the ranks must hold the same weights; drift is alerted."""
        spread = checksum_spread(self.world, tree_flatten(self.model.trainable_parameters()))
        metrics["dist/param_checksum_spread"] = spread
        if spread > DRIFT_TOLERANCE:
            self.telemetry.alert(self.step, Alert(
                "error", "param_drift", f"ranks hold different weights (checksum spread {spread:.2e})",
                "stop and resume from the last checkpoint; check that every rank runs the same code and config"))

    def _cache_counts(self):
        s = self.cache.stats()["student"]
        return s["hits"], s["misses"]

    def cache_metrics(self):
        s = self.cache.stats()["student"]
        (h0, m0), self.cache_counts = self.cache_counts, self._cache_counts()
        dh, dm = s["hits"] - h0, s["misses"] - m0
        if self.world.size > 1:  # each rank has its own cache: counts summed over ranks
            names = ("hits", "misses", "evictions", "expirations", "size")
            dh, dm, *totals = self.world.all_sum([dh, dm, *(s[k] for k in names)])
            s = dict(zip(names, totals))
        return {"cache/hit_rate": dh / (dh + dm) if dh + dm else 0.0, "cache/step_hits": dh, "cache/step_misses": dm,
                "cache/hits": s["hits"], "cache/misses": s["misses"], "cache/evictions": s["evictions"],
                "cache/expirations": s["expirations"], "cache/size": s["size"]}

    def validate_midway(self):
        """train.val_every: the validation split scored between epoch ends, logged as eval/pass@1 (the
        epoch-trend alerts still see epoch ends only)."""
        result = self.validate()
        if result is not None:
            self.telemetry.log(self.step, {"eval/pass@1": result[0]["pass@1"], "epoch": self.epoch})

    def end_epoch(self):
        """Validation (fresh), the per-phase table, then the next epoch's seeded order."""
        if self.baseline_reward is None and self.first_epoch_fresh:
            self.baseline_reward = float(np.mean(self.first_epoch_fresh))
        rows = self.phases.epoch_rows()
        self.telemetry.epoch_table(self.epoch, self.step, rows)
        epoch_metrics = {"epoch": self.epoch}
        result = self.validate() if self.cfg.train.epochs_val else None
        if result is not None:
            summary, triples = result
            # the count lets the alerts tell a regression from the noise of a small validation split
            epoch_metrics.update({"eval/pass@1": summary["pass@1"], "eval/count": summary["tasks"]})
            self.telemetry.log(self.step, {"eval/pass@1": summary["pass@1"], "eval/count": summary["tasks"],
                                           "epoch": self.epoch})
            cats, buckets, matrix = bucket_pass_rates(triples, LENGTH_EDGES)
            self.telemetry.image("eval/category_length_heatmap", heatmap_image(matrix, cats, buckets), self.step)
        if self.cfg.alerts.enabled:
            for alert in evaluate_epoch(self.alert_state, epoch_metrics, self.cfg.alerts, step=self.step):
                self.telemetry.alert(self.step, alert)
        if self.cfg.model.fine_tune == "lora":
            deltas = lora_deltas(self.initial_trainable, dict(tree_flatten(self.model.trainable_parameters())))
            self.telemetry.text("adapters/top_layers", top_layers_text(deltas), self.step)
            blocks = block_deltas(deltas)
            self.telemetry.log(self.step, {f"adapters/delta/{name}": v for name, v in blocks.items()})
        if self.cfg.telemetry.report and self.world.is_main:  # RUN/report/, its PNGs also on the Images tab
            log_images(self.telemetry, write_report(self.run_dir), self.step)
        self.epoch += 1
        self.pos = 0
        self.order = epoch_order(len(self.train_tasks), self.cfg.train.seed, self.epoch)
        self.phases.reset()
        self._log_cache_clear(self.cache.on_epoch_start(self.epoch), self.step)

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


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _with_budget(rc, budget):
    return replace(rc, max_batch_tokens=budget)


def schedule_steps(cfg):
    """The learning-rate schedule's length in steps: optim.schedule_steps, else train.steps."""
    return cfg.optim.schedule_steps or cfg.train.steps


class _DeferredInterrupt:
    """While active, the first SIGINT (Ctrl-C) only sets `requested`: the step in progress finishes
    and train() checkpoints it before stopping. A second SIGINT interrupts at once. Only the main
    thread can handle signals; elsewhere this does nothing."""

    def __init__(self):
        self.requested, self._old = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def train(cfg: Config, run_dir, *, resume=False, steps=None, deadline=None):
    """Run (or continue) training until `steps` (default cfg.train.steps), or until the first step that
    ends after `deadline` (a time.monotonic() value; `mlx-coach bench learn --minutes`). Returns the
    last metrics. Ctrl-C checkpoints the last finished step, then raises KeyboardInterrupt. A
    `teacher_server` (the judge's own mlx_lm.server) runs for exactly as long as this call."""
    with serve_teacher(cfg):
        return _train(cfg, run_dir, resume=resume, steps=steps, deadline=deadline)


def _train(cfg, run_dir, *, resume, steps, deadline):
    trainer = Trainer(cfg, run_dir, resume=resume)
    total = steps or cfg.train.steps
    every = cfg.train.checkpoint_every
    clock = StepClock()  # the step line's ETA: steps left x the mean of recent step times
    last = {}
    try:
        with _DeferredInterrupt() as interrupt:
            while trainer.step < total and not interrupt.requested and (deadline is None or time.monotonic() < deadline):
                try:
                    last = trainer.run_step()
                except JudgeOutage as e:  # on_outage: stop; keep every finished step
                    path = trainer.save() if trainer.step else None
                    raise RunStopped(f"{e}; stopped at step {trainer.step}"
                                     + (f", saved {path}; continue with --resume {trainer.run_dir}" if path else "")) from None
                clock.add(last.get("time/step_s", 0.0))
                if cfg.telemetry.progress and trainer.world.is_main:
                    if deadline is None:
                        eta = format_eta(clock.eta(total - trainer.step))
                        line = progress_line(trainer.step, total, last)
                    else:  # a time budget (bench learn --minutes): the steps are not known in advance
                        eta = format_eta(max(0.0, deadline - time.monotonic()))
                        line = progress_line(trainer.step, "budget", last)
                    print(f"{line} | ETA {eta}", file=sys.stderr, flush=True)
                val_every = cfg.train.val_every
                if val_every and trainer.step % val_every == 0 and trainer.pos:  # pos 0: end_epoch validated
                    trainer.validate_midway()
                if every and trainer.step % every == 0:
                    trainer.save()
            path = latest_checkpoint(trainer.run_dir)
            if trainer.step and (path is None or not every or trainer.step % every):
                path = trainer.save()
            if interrupt.requested:
                if trainer.world.is_main:
                    print(f"interrupted at step {trainer.step}: saved {path}; continue with --resume {trainer.run_dir}",
                          file=sys.stderr, flush=True)
                raise KeyboardInterrupt
    finally:
        trainer.close()
    return last


def run_from_args(args):
    if args.resume:
        for flag, value in (("-c/--config", args.config), ("--output", args.output)):
            if value:  # a resumed run keeps its own config and directory: say so rather than ignore it
                raise UserError(f"{flag}: not used with --resume (the run continues with {args.resume}/config.yaml "
                                f"in {args.resume}); change keys with --set")
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume: {saved} not found (is {run_dir} a run directory?)")
        cfg = load_run_config(saved, args.set)  # the run's resolved config, plus any overrides
        newest = latest_checkpoint(run_dir)
        at = int(newest.name.split("-")[-1]) if newest is not None else 0
        if args.steps and args.steps < at:
            raise UserError(f"--steps: the run in {run_dir} is already at step {at}; "
                            f"give --steps {at} or more")
    else:
        cfg = load_config(args.config, args.set)
        run_dir = Path(args.output or cfg.train.output)
        # the schedule's length is fixed here, at the run's start: `--steps` says where to stop
        # now, so stopping at N and resuming to 2N follows the same rates as a straight 2N run
        if not cfg.optim.schedule_steps:
            cfg.optim.schedule_steps = max(cfg.train.steps, args.steps or 0)
    if args.steps:
        cfg.train.steps = args.steps
    if not args.resume and args.output:
        cfg.train.output = args.output
    if cfg.train.steps > schedule_steps(cfg) and cfg.optim.schedule != "constant":
        print(f"note: --steps {cfg.train.steps} runs past the {schedule_steps(cfg)}-step learning-rate schedule "
              f"(optim.schedule_steps); the rate stays at its end value from then on", file=sys.stderr)
    last = train(cfg, run_dir, resume=bool(args.resume))
    if world().is_main:
        print(f"done: step {cfg.train.steps}, reward/mean {last.get('reward/mean', float('nan')):.3f}, run {run_dir}")
    return 0
