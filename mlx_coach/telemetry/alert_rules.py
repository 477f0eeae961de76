"""Smart alerts: rules over the step metrics that say what went wrong and what to do about it.

`evaluate(state, metrics, cfg)` runs once per step on the dict the trainer logs (with its "step"
key); `evaluate_epoch(state, epoch_metrics, cfg)` once at every epoch end. Both are pure apart from
updating `state` (an `AlertState`), so recorded metric sequences drive them in tests. Each alert code
fires at most once per `cooldown_steps`, except "nonfinite", which fires at every skipped step.

Metrics read (all optional; a rule without its inputs stays quiet):
    loss/*, grad/norm*          any non-finite value -> "nonfinite" (critical)
    train/skipped_steps         cumulative count of steps skipped for non-finite values (a rise fires)
    loss/nonfinite              1.0 when this step was skipped (fires too)
    kl/mean, else loss/kl       unweighted KL estimate -> "kl_high"; with beta 0 and no kl_target kl/mean is
                                logged on step 1 and every algo.kl_observe_every-th step only (loss/kl is 0)
    reward/mean                 its EMA falling below (1 - reward_collapse_drop) x its best, by more than
                                noise_k standard errors of the difference -> "reward_collapse"
    reward/count, reward/std    samples behind reward/mean and their spread (the standard error; without a
                                count the reward is taken as exact)
    reward/frac_zero_std        fraction of prompt groups whose rewards are all equal (no signal)
    memory/active_gb            averaged per epoch -> "memory_growth" at epoch end
    gen/tokens_per_sec, epoch/position (or the phase argument) -> "toks_drop" within an epoch
    loss/total, else loss/policy  -> `lr_adjustment` volatility
    memory/peak_gb, memory/footprint_gb beside memory/predicted_peak_gb, memory/predicted_rss_gb
                                -> "memory_over_plan" (`memory_over_plan`, called by the trainer with
                                memory.plan_margin)
Epoch metrics read by evaluate_epoch: cfg.val_metric (default eval/pass@1; absent when no validation
ran), eval/count (the tasks behind it: a regression must exceed val_noise_k standard errors), optionally
memory/active_gb (else the epoch mean seen by evaluate) and epoch.

Noise (noise_k, val_noise_k): a mean of n rewards in [0, 1] with mean p has a standard error of at
most sqrt(p (1 - p) / n). The reward EMA is a weighted sum of step means, so its variance is one
sample's variance times sum_i w_i^2 / n_i (w_i the EMA's weights, n_i the step's reward/count); the
best EMA keeps that factor from when it was set. reward_collapse fires only when the drop exceeds
noise_k standard errors of the difference, one sample's variance taken as p (1 - p) at the pooled
level of the two EMAs (or the observed reward/std^2 when larger). The best EMA is a maximum over the
run and the rule is tested at every step, so k must be large (default 5): with a small k a flat run
of noisy rewards crosses it by chance somewhere along the run.
val_regression compares the best value before the window with the window's best by a two-proportion
test (pooled rate, counts eval/count). Samples of one prompt group are correlated, so these errors
are lower bounds of the true spread.
"""

import math

from mlx_coach.telemetry.accumulators import ema_step, epoch_phase
from mlx_coach.telemetry.alerts import Alert
from mlx_coach.telemetry.health import TrendTracker


def _num(metrics, key):
    v = metrics.get(key)
    if v is None or isinstance(v, (bool, str)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fire(state, cfg, step, alert, out):
    last = state.last_fired.get(alert.code)
    if last is not None and step - last < cfg.cooldown_steps:
        return
    state.last_fired[alert.code] = step
    out.append(alert)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def evaluate(state, metrics, cfg, phase=None):
    """Alerts for one step's metrics. phase: "early"/"mid"/"late", else from metrics["epoch/position"]."""
    step = int(metrics.get("step", state.steps_seen))
    state.steps_seen += 1
    out = []

    # Non-finite loss or gradients: the trainer skipped the step; say so loudly.
    bad = [k for k, v in metrics.items()
           if (k.startswith("loss/") or k.startswith("grad/norm")) and (x := _num(metrics, k)) is not None
           and not math.isfinite(x)]
    skipped = _num(metrics, "train/skipped_steps")
    newly_skipped = skipped is not None and skipped > state.last_skipped
    flagged = (_num(metrics, "loss/nonfinite") or 0) > 0
    if bad or newly_skipped or flagged:
        state.nonfinite_count = int(skipped) if skipped is not None else state.nonfinite_count + 1
        what = ", ".join(f"{k}={metrics[k]}" for k in sorted(bad)) or "a non-finite value"
        # every skipped step is alerted: no cooldown, since a repeat is what the user must see
        state.last_fired["nonfinite"] = step
        out.append(Alert(
            "critical", "nonfinite",
            f"{what} at step {step}; the update was skipped and the weights kept "
            f"({state.nonfinite_count} skipped step(s) so far)",
            "Lower the learning rate (e.g. x0.5) or tighten grad clipping; check reward and advantage "
            "scales; if it repeats, resume from the last good checkpoint.",
        ))
    if skipped is not None:
        state.last_skipped = skipped

    kl = _num(metrics, "kl/mean")
    kl = _num(metrics, "loss/kl") if kl is None else kl
    if kl is not None and math.isfinite(kl) and kl > cfg.kl_max:
        _fire(state, cfg, step, Alert(
            "warning", "kl_high",
            f"KL to the reference is {kl:.4g}, above the bound {cfg.kl_max:g}",
            "Raise the KL coefficient or lower the learning rate; the policy is drifting from the reference.",
        ), out)

    reward = _num(metrics, "reward/mean")
    if reward is not None and math.isfinite(reward):
        first = state.reward_ema is None
        state.reward_ema = ema_step(state.reward_ema, reward, cfg.ema_alpha)
        _track_reward_noise(state, metrics, cfg.ema_alpha, first)
        if state.steps_seen > cfg.warmup_steps:
            best = state.best_reward_ema
            if best is None or state.reward_ema > best:
                state.best_reward_ema, state.best_reward_ema_inv_n = state.reward_ema, state.reward_ema_inv_n
            best = state.best_reward_ema
            drop = best - state.reward_ema
            se = _reward_drop_se(state, best)
            # |best| below 0.01 is noise around zero reward, not a level that can collapse
            if abs(best) >= 0.01 and drop > cfg.reward_collapse_drop * abs(best) and drop > cfg.noise_k * se:
                _fire(state, cfg, step, Alert(
                    "critical", "reward_collapse",
                    f"reward EMA fell to {state.reward_ema:.4g} from its best {best:.4g} "
                    f"(-{drop / abs(best):.0%}; {drop / se:.1f} standard errors)" if se > 0 else
                    f"reward EMA fell to {state.reward_ema:.4g} from its best {best:.4g} (-{drop / abs(best):.0%})",
                    "Stop and resume from the checkpoint with the best reward; lower the learning rate or "
                    "raise the KL coefficient; check the scorer (sandbox errors, teacher outages).",
                ), out)

    zero_std = _num(metrics, "reward/frac_zero_std")
    if zero_std is not None and math.isfinite(zero_std):
        state.zero_std_recent = (state.zero_std_recent + [zero_std])[-cfg.window:]
        recent = _mean(state.zero_std_recent)
        if len(state.zero_std_recent) >= cfg.window and recent > cfg.zero_std_max:
            _fire(state, cfg, step, Alert(
                "warning", "zero_std_groups",
                f"{recent:.0%} of prompt groups have identical rewards (no learning signal) over the "
                f"last {cfg.window} steps",
                "Raise the sampling temperature or the group size, or drop tasks the model always passes "
                "or always fails.",
            ), out)

    active = _num(metrics, "memory/active_gb")
    if active is not None and math.isfinite(active):
        state.epoch_active_sum += active
        state.epoch_active_n += 1

    if phase is None and _num(metrics, "epoch/position") is not None:  # default bounds; the trainer passes its phase
        phase = epoch_phase(_num(metrics, "epoch/position"))
    toks = _num(metrics, "gen/tokens_per_sec")
    if phase is not None and toks is not None and math.isfinite(toks):
        if phase == "early":
            if state.past_early:  # a new epoch began without evaluate_epoch
                _reset_epoch_toks(state)
            state.early_toks_sum += toks
            state.early_toks_n += 1
        else:
            state.past_early = True
        state.recent_toks = (state.recent_toks + [toks])[-cfg.window:]
        memory = _num(metrics, "memory/footprint_gb")
        if memory is None and _num(metrics, "memory/active_gb") is not None:
            memory = _num(metrics, "memory/active_gb") + (_num(metrics, "memory/cache_gb") or 0.0)
        score_s = _num(metrics, "time/score_s")
        if memory is not None:
            state.early_memory = memory if state.early_memory is None else state.early_memory
            state.recent_memory = (state.recent_memory + [memory])[-cfg.window:]
        if score_s is not None:
            state.early_score_s = score_s if state.early_score_s is None else state.early_score_s
            state.recent_score_s = (state.recent_score_s + [score_s])[-cfg.window:]
        early = state.early_toks_sum / state.early_toks_n if state.early_toks_n else None
        recent = _mean(state.recent_toks)
        if (phase != "early" and early and len(state.recent_toks) >= cfg.window
                and recent < (1 - cfg.toks_drop_frac) * early):
            cause, action = toks_drop_cause(state)
            _fire(state, cfg, step, Alert(
                "warning", "toks_drop",
                f"generation fell to {recent:.1f} tok/s in the {phase} phase from {early:.1f} early in the "
                f"epoch (-{1 - recent / early:.0%}); {cause}", action,
            ), out)
    return out


def _track_reward_noise(state, metrics, alpha, first):
    """Update the reward EMA's variance factor sum_i w_i^2 / n_i (w_i its weights, n_i = reward/count)
    and the EMA of reward/std^2. Without a count the step adds no variance (its reward is read as exact)."""
    n = _num(metrics, "reward/count")
    inv_n = 1.0 / n if n and n > 0 and math.isfinite(n) else 0.0
    std = _num(metrics, "reward/std")
    spread = std * std if std is not None and math.isfinite(std) else 0.0
    if first:
        state.reward_ema_inv_n, state.reward_spread_ema = inv_n, spread
    else:
        state.reward_ema_inv_n = alpha * alpha * inv_n + (1 - alpha) ** 2 * state.reward_ema_inv_n
        state.reward_spread_ema = ema_step(state.reward_spread_ema, spread, alpha)


def _reward_drop_se(state, best):
    """Standard error of best - reward_ema if the reward had not changed: one sample's variance is
    p (1 - p) at the pooled level p of the two (the most a reward in [0, 1] with that mean can have;
    a run of all-zero steps does not make it 0), or the observed spread when larger."""
    p = min(max((best + state.reward_ema) / 2, 0.0), 1.0)
    per_sample = max(p * (1 - p), state.reward_spread_ema)
    return math.sqrt(per_sample * (state.best_reward_ema_inv_n + state.reward_ema_inv_n))


def toks_drop_cause(state, growth=0.2):
    """(what was measured, what to do) for a tok/s drop: memory growth, a slower scorer, or neither."""
    memory, score_s = _mean(state.recent_memory), _mean(state.recent_score_s)
    if memory is not None and state.early_memory and memory > (1 + growth) * state.early_memory:
        return (f"memory held grew from {state.early_memory:.2f} to {memory:.2f} GB over the same steps",
                "Clear MLX's cache under pressure (memory.clear_pressure, memory.clear_growth_steps) and keep "
                "shapes bucketed (rollout.bucket); see memory/footprint_gb and memory/distinct_shapes.")
    if score_s is not None and state.early_score_s and score_s > (1 + growth) * state.early_score_s:
        return (f"scoring took {score_s:.2f} s a step against {state.early_score_s:.2f} s early: the sandbox "
                "competes for the CPU", "Lower sandbox.workers or raise the score-cache hit rate (cache.policy).")
    return ("memory and scoring time did not grow, so the cause is outside the trainer's measurements",
            "Look for another process on the machine, thermal throttling or swap.")


def _reset_epoch_toks(state):
    state.early_toks_sum, state.early_toks_n = 0.0, 0
    state.recent_toks, state.past_early = [], False
    state.early_memory, state.recent_memory = None, []
    state.early_score_s, state.recent_score_s = None, []


def evaluate_epoch(state, epoch_metrics, cfg, step=None):
    """Epoch-end alerts: validation trend over plateau_epochs, active memory growth across epochs.

    Call it at every epoch end, with or without validation: it also closes the epoch's tok/s and
    memory accounting. epoch_metrics: {cfg.val_metric: value (when validation ran),
    "memory/active_gb": the epoch's active memory (optional; default: mean of the steps'), "epoch": N}.
    """
    step = state.steps_seen if step is None else step
    out = []
    val_metric = _num(epoch_metrics, cfg.val_metric)
    if val_metric is not None and math.isfinite(val_metric):
        tracker = TrendTracker(cfg.plateau_epochs, cfg.val_higher_is_better, cfg.trend_min_delta, cfg.val_noise_k)
        if state.val_trend:
            tracker.load(state.val_trend)
        epoch = epoch_metrics.get("epoch", len(tracker.history))
        trend = tracker.update(val_metric, epoch, count=_num(epoch_metrics, "eval/count"))
        state.val_trend = tracker.state_dict()
        if trend in ("plateau", "regressing"):
            _fire(state, cfg, step, _trend_alert(trend, tracker, cfg), out)

    active_memory_gb = _num(epoch_metrics, "memory/active_gb")
    if active_memory_gb is None and state.epoch_active_n:
        active_memory_gb = state.epoch_active_sum / state.epoch_active_n
    if active_memory_gb is not None:
        history = state.epoch_active
        if history:
            lowest, last = min(history), history[-1]
            if lowest > 0 and active_memory_gb > (1 + cfg.memory_growth_frac) * lowest and active_memory_gb > last:
                _fire(state, cfg, step, Alert(
                    "warning", "memory_growth",
                    f"active memory grew to {active_memory_gb:.3g} GB this epoch from {lowest:.3g} GB "
                    f"(+{active_memory_gb / lowest - 1:.0%}); something keeps arrays alive across steps",
                    "Look for arrays kept across steps (metric histories holding mx.arrays, caches of "
                    "logits, unbounded KV caches); set memory.memory_limit to fail early.",
                ), out)
        history.append(active_memory_gb)
    state.epoch_active_sum, state.epoch_active_n = 0.0, 0
    _reset_epoch_toks(state)
    return out


def _trend_alert(trend, tracker, cfg):
    best_epoch, best = tracker.best
    now = tracker.history[-1][1]
    if trend == "plateau":
        return Alert(
            "warning", "val_plateau",
            f"{cfg.val_metric} has not improved for {cfg.plateau_epochs} epochs "
            f"(best {best:.4g} at epoch {best_epoch}, now {now:.4g})",
            f"Consider stopping; the checkpoint from epoch {best_epoch} is the best. "
            "Otherwise lower the learning rate.",
        )
    return Alert(
        "critical", "val_regression",
        f"{cfg.val_metric} has been below its best ({best:.4g}, epoch {best_epoch}) for "
        f"{cfg.plateau_epochs} epochs (now {now:.4g})",
        f"Roll back to the checkpoint from epoch {best_epoch}; lower the learning rate or raise "
        "the KL coefficient.",
    )


def lr_adjustment(state, metrics, cfg):
    """Learning-rate factor to apply now, or None. Call once per step (it updates the loss EMAs).

    Volatility = EMA(|loss - EMA(loss)|) / EMA(|loss|). Above cfg.volatility_max, after warmup, with
    cfg.lr_adjust on and cooldown_steps since the last adjustment, returns cfg.lr_adjust_factor.
    A loss that hovers around zero (a policy-gradient loss with normalised advantages does) has a
    large relative volatility by construction; feed the total loss, and keep lr_adjust off if it is
    centred on zero.
    """
    step = int(metrics.get("step", state.vol_steps))
    loss = _num(metrics, "loss/total")
    loss = _num(metrics, "loss/policy") if loss is None else loss
    if loss is None or not math.isfinite(loss):
        return None
    a = cfg.ema_alpha
    state.vol_steps += 1
    if state.loss_ema is not None:
        state.dev_ema = ema_step(state.dev_ema, abs(loss - state.loss_ema), a)
    state.loss_ema = ema_step(state.loss_ema, loss, a)
    state.abs_ema = ema_step(state.abs_ema, abs(loss), a)
    if not cfg.lr_adjust or state.vol_steps <= cfg.warmup_steps or not state.abs_ema or state.dev_ema is None:
        return None
    if state.last_lr_adjust is not None and step - state.last_lr_adjust < cfg.cooldown_steps:
        return None
    if state.dev_ema / state.abs_ema > cfg.volatility_max:
        state.last_lr_adjust = step
        return cfg.lr_adjust_factor
    return None


def loss_volatility(state):
    """The volatility lr_adjustment compares with volatility_max (None before two losses)."""
    if state.dev_ema is None or not state.abs_ema:
        return None
    return state.dev_ema / state.abs_ema


def memory_over_plan(state, metrics, margin, cfg):
    """"memory_over_plan" when the step's measured MLX peak (memory/peak_gb) or resident size
    (memory/footprint_gb) passes the memory plan's prediction (memory/predicted_peak_gb,
    memory/predicted_rss_gb) by more than `margin` (memory.plan_margin): the plan, which refused nothing,
    underestimates this run, so a larger one it lets start may not fit. [] without the predictions."""
    step, out = int(metrics.get("step", state.steps_seen)), []
    for measured_key, predicted_key, what in (("memory/peak_gb", "memory/predicted_peak_gb", "MLX peak"),
                                              ("memory/footprint_gb", "memory/predicted_rss_gb", "resident size")):
        measured, predicted = _num(metrics, measured_key), _num(metrics, predicted_key)
        if measured is None or not predicted or measured <= (1 + margin) * predicted:
            continue
        _fire(state, cfg, step, Alert(
            "warning", "memory_over_plan",
            f"{what} {measured:.3g} GB is {measured / predicted - 1:.0%} above the memory plan's {predicted:.3g} GB "
            f"(margin {margin:.0%})",
            "The plan (mlx-coach plan) underestimates this run: check for arrays kept across steps and for longer "
            "prompts than the tasks' own; before a larger run, leave this much more room (optim.grad_accum, "
            "rollout.max_new_tokens).",
        ), out)
    return out
