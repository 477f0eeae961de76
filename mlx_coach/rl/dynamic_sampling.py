"""Signal in every batch: dynamic sampling of prompt groups and per-task difficulty tracking.

Dynamic sampling (algo.dynamic_sampling, as in DAPO): under group-relative advantages a group whose
G rewards are all equal has every advantage 0, so it adds no policy-gradient signal to the update.
`fill_groups` drops such groups and draws more prompts until the step holds prompts_per_step
informative groups, or until it has drawn algo.max_draw_factor x prompts_per_step prompts (the cap),
or the epoch's order runs out. Each extra round draws the missing number of groups divided by the
informative share seen so far in the step (at least the missing number), within the cap. Informative
groups beyond prompts_per_step are not trained on. When the cap is hit the step trains on the
informative groups it has; when it has none, it trains on the first prompts_per_step groups drawn,
exactly as without dynamic sampling (their policy-gradient term is zero; only the KL and entropy
terms act), so every step is an update and the learning-rate schedule advances as usual.

Difficulty tracking (`DifficultyTracker`): each task's fresh samples and passes (cached scores repeat
an earlier verdict, so they are not counted again), hence its running pass rate. With
algo.difficulty_weighting on, the trainer's walk through the epoch order takes each task with
probability `task_weight`: 1 for a task never seen (exploration), else 4 p (1 - p) with the
smoothed pass rate p = (passes + 1) / (samples + 2), floored at algo.difficulty_floor, so a task the
model sometimes solves is taken and one it always fails or always passes is mostly passed over.
With algo.difficulty_by_level (the default) a task never seen takes its level's rate instead of 1: the
fresh verdicts of every task of its level (procedural tasks: family and difficulty, `task_level`), each
step's counts first multiplied by LEVEL_DECAY so that the rate follows the policy as it improves. A
procedural run rarely meets a task twice, so the per-task rates alone leave nearly every task "unseen";
pooled by level, the walk moves past the levels the model has saturated (a curriculum) and back to the
ones it still fails sometimes. algo.difficulty_pool "template" pools by template within a level instead: a
run learns a template whole (all its instances pass), while the level's other templates still fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlx_coach.engine.rollout import RolloutBatch

QUANTILES = (0.1, 0.5, 0.9)
LEVEL_DECAY = 0.9  # per step: a level's verdicts of ~10 steps ago weigh a third of this step's


def task_level(task, pool="level") -> str | None:
    """The level a task's pass rate is pooled in: "family/difficulty" for tasks that carry both tags
    (procedural ones), with pool "template" "family/difficulty/template" for tasks that also carry a
    template; else None (no pooling)."""
    tags = getattr(task, "tags", None) or {}
    if "category" not in tags or "difficulty" not in tags or (pool == "template" and "template" not in tags):
        return None
    level = f"{tags['category']}/{tags['difficulty']}"
    return f"{level}/{tags['template']}" if pool == "template" else level


def task_weight(passes: int, samples: int, floor: float) -> float:
    """Probability of taking a task in the epoch walk: highest for pass rates near 1/2 and for unseen tasks."""
    if samples == 0:
        return 1.0
    p = (passes + 1) / (samples + 2)
    return max(floor, 4.0 * p * (1.0 - p))


class DifficultyTracker:
    """Fresh samples and passes per task id, and per level (decayed); its state is plain JSON (it goes
    into the checkpoint)."""

    def __init__(self):
        self.counts: dict[str, list[int]] = {}  # task_id -> [fresh samples, passes]
        self.levels: dict[str, list[float]] = {}  # level -> [fresh samples, passes], decayed per step

    def observe(self, task_ids, passed, provenance, levels=None):
        """Count the fresh verdicts among one step's samples: each distinct (task, completion) the step
        scored counts once. Skipped: "cached" (an earlier verdict), "duplicate" (a copy of a sample counted here),
        "fallback" and "unjudged" (no verdict). levels: each sample's task_level (or None); the levels'
        earlier counts are decayed by LEVEL_DECAY first."""
        for c in self.levels.values():
            c[0] *= LEVEL_DECAY
            c[1] *= LEVEL_DECAY
        for i, (task_id, ok, prov) in enumerate(zip(task_ids, passed, provenance)):
            if prov != "fresh":
                continue
            c = self.counts.setdefault(task_id, [0, 0])
            c[0] += 1
            c[1] += int(bool(ok))
            level = levels[i] if levels is not None else None
            if level is not None:
                lc = self.levels.setdefault(level, [0.0, 0.0])
                lc[0] += 1.0
                lc[1] += float(bool(ok))

    def pass_rate(self, task_id):
        c = self.counts.get(task_id)
        return None if c is None else c[1] / c[0]

    def weight(self, task_id, floor, level=None):
        """task_weight of the task's own counts; for a task never seen, of its level's counts when a
        level is given and has any, else 1 (unseen)."""
        samples, passes = self.counts.get(task_id) or self.levels.get(level) or (0, 0)
        return task_weight(passes, samples, floor)

    def rates(self):
        return [p / n for n, p in self.counts.values()]

    def metrics(self):
        """Counts of tracked tasks at pass rate 0, strictly between, and 1, quantiles of the rates, and
        each level's decayed pass rate."""
        rates = np.array(self.rates(), dtype=np.float64)
        out = {"difficulty/tasks_seen": len(rates), "difficulty/at_0": int(np.sum(rates == 0.0)),
               "difficulty/mid": int(np.sum((rates > 0.0) & (rates < 1.0))), "difficulty/at_1": int(np.sum(rates == 1.0))}
        if len(rates):
            for q in QUANTILES:
                out[f"difficulty/pass_rate_p{round(q * 100)}"] = float(np.quantile(rates, q))
        for level, (n, p) in sorted(self.levels.items()):
            out[f"difficulty/level/{level}"] = p / n
        return out

    def state_dict(self):
        return {"counts": {k: list(v) for k, v in self.counts.items()},
                "levels": {k: list(v) for k, v in self.levels.items()}}

    def load(self, state):
        self.counts = {k: [int(v[0]), int(v[1])] for k, v in state["counts"].items()}
        # checkpoints written before levels were pooled have none: the pools start empty
        self.levels = {k: [float(v[0]), float(v[1])] for k, v in state.get("levels", {}).items()}


# ---------------------------------------------------------------------------------------------
# dynamic sampling


@dataclass
class Round:
    """One round of a step: the prompts drawn, their samples (grouped G per prompt, in prompt order),
    the rollout engine's statistics and the scores (a future while scoring runs)."""

    tasks: list
    batch: RolloutBatch
    scoring: object  # concurrent.futures.Future of (scores, seconds)
    gen_s: float = 0.0

    def result(self):
        return self.scoring.result()


@dataclass
class Filled:
    """What a step trains on: tasks, their rollouts and scores (G per task, group after group)."""

    tasks: list
    rollouts: list
    scores: list
    batch: RolloutBatch  # the rounds' statistics summed
    gen_s: float
    rewards_s: float
    draws: int  # prompts drawn in the step
    informative: int  # groups with unequal rewards among those drawn
    rounds: int


def is_informative(rewards) -> bool:
    """True when a group's rewards are not all equal (NaN rewards count as unequal to anything)."""
    first = rewards[0]
    return any(not (r == first) for r in rewards[1:])


def groups(rnd: Round, scores, G):
    """(task, rollouts, scores) per prompt of a round."""
    out = []
    for i, task in enumerate(rnd.tasks):
        out.append((task, rnd.batch.rollouts[i * G: (i + 1) * G], scores[i * G: (i + 1) * G]))
    return out


def merge_batches(batches) -> RolloutBatch:
    """The rounds' rollouts and statistics as one RolloutBatch (tok/s from the summed tokens and time)."""
    out = RolloutBatch(rollouts=[r for b in batches for r in b.rollouts])
    for b in batches:
        out.prefill_tokens += b.prefill_tokens
        out.prefill_s += b.prefill_s
        out.decode_tokens += b.decode_tokens
        out.decode_s += b.decode_s
        out.peak_batch = max(out.peak_batch, b.peak_batch)
        out.num_batches += b.num_batches
        out.refills += b.refills
        out.decode_steps += b.decode_steps
        out.peak_cache_tokens = max(out.peak_cache_tokens, b.peak_cache_tokens)
        out.shapes |= b.shapes
        out.padding_tokens += b.padding_tokens
    out.tokens_per_sec = out.decode_tokens / out.decode_s if out.decode_s > 0 else 0.0
    return out


def next_round_size(missing, informative, drawn, cap_left):
    """Prompts to draw next: the missing groups divided by the informative share so far (at least the
    missing number; the share is taken as 1/4 at worst so that one barren round does not spend the
    whole cap), within the cap."""
    share = max(informative / drawn, 0.25) if drawn else 1.0
    return min(cap_left, max(missing, math.ceil(missing / share)))


def fill_groups(first: Round, draw, start_round, need, max_draws, G, on_scores=None) -> Filled:
    """Rounds until `need` informative groups, `max_draws` prompts drawn, or no prompt left.

    first: the step's first round (already started); draw(k) -> up to k next tasks (fewer, or none,
    at the epoch's end); start_round(tasks) -> a started Round; on_scores(round, scores) sees every
    round's scores (difficulty tracking)."""
    rounds, kept, barren = [first], [], []
    drawn, informative, rewards_s = len(first.tasks), 0, 0.0
    rnd = first
    while True:
        scores, seconds = rnd.result()
        rewards_s += seconds
        if on_scores is not None:
            on_scores(rnd, scores)
        for group in groups(rnd, scores, G):
            if is_informative([s.total for s in group[2]]):
                informative += 1
                kept.append(group)
            else:
                barren.append(group)
        if len(kept) >= need or drawn >= max_draws:
            break
        tasks = draw(next_round_size(need - len(kept), informative, drawn, max_draws - drawn))
        if not tasks:
            break
        drawn += len(tasks)
        rnd = start_round(tasks)
        rounds.append(rnd)
    chosen = kept[:need] if kept else barren[:need]
    return Filled(tasks=[g[0] for g in chosen], rollouts=[r for g in chosen for r in g[1]],
                  scores=[s for g in chosen for s in g[2]], batch=merge_batches([r.batch for r in rounds]),
                  gen_s=sum(r.gen_s for r in rounds), rewards_s=rewards_s, draws=drawn, informative=informative,
                  rounds=len(rounds))


def sampling_metrics(filled: Filled, need: int) -> dict:
    """sampling/draws: prompts drawn; sampling/dropped_groups: drawn groups whose rewards were all equal;
    sampling/rounds; sampling/trained_groups; sampling/informative_frac: informative groups trained on
    per group the step should hold (`need`, its size without dynamic sampling): 1 when it is full of signal."""
    trained = len(filled.tasks)
    informative_trained = min(filled.informative, trained)
    return {"sampling/draws": filled.draws, "sampling/dropped_groups": filled.draws - filled.informative,
            "sampling/rounds": filled.rounds, "sampling/trained_groups": trained,
            "sampling/informative_frac": informative_trained / need if need else 0.0}
