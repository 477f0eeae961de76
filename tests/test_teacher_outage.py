"""A judge that misbehaves on purpose, on loopback (issue 10, items 6-8): junk offered as a reference
solution, an outage in the middle of a run. A reply that trickles: test_judge_deadline.py."""

import json
import math
import threading
import time

import pytest
import yaml
from test_teacher import Clock, ScriptedServer, completion, grade_from, judge, server, task  # noqa: F401 (fixture)
from test_trainer import step_rows, tiny_cfg
from waiting import HOLD_S

from mlx_coach.rewards.cache import ScoreCache
from mlx_coach.config.tree import to_dict
from mlx_coach.rewards.scoring.http_judge import HttpJudge
from mlx_coach.rewards.scoring.judge_config import JudgeConfig
from mlx_coach.rl.trainer import Trainer


@pytest.mark.parametrize("junk", ["", "upstream overloaded, try again",
                                  "```python\ndef something_else(x):\n    return x\n```"])
def test_junk_is_never_pinned_as_a_reference(server, junk):
    s = server([("reply", junk)])  # the first request is the reference solution's
    cache = ScoreCache("lru")
    j = judge(s.url, cache, use_reference=True, concurrency=1)
    [score] = j.score_batch([(task(), completion(4))])
    assert score.fallback and score.status == "parse_error" and "reference" in score.error
    assert cache.size("reference") == 0  # nothing pinned in the never-evicted namespace
    assert [sc.value for sc in j.score_batch([(task(), completion(4))])] == [0.4]  # asked again, a real one
    assert s.count("solve") == 2 and cache.size("reference") == 1


def judge_reward(url, **extra):
    return {"type": "http-judge", "base_url": url, "model": "judge", "weight": 0.5, "timeout_s": 5.0,
            "max_retries": 0, "backoff_s": 0.01, "max_backoff_s": 0.02, "fallback": 0.3,
            "breaker_threshold": 2, "breaker_reset_s": 0.2, **extra}


def test_a_judge_failure_in_one_sample_leaves_its_group_graded_in_training(tmp_path, server):
    """The trainer's scoring: one failed request is one fallback; its group mate keeps its grade."""
    s = server([None, ("drop",)])  # the step's second request fails, every other one is answered
    cfg = tiny_cfg(tmp_path, rollout={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8},
                   rewards=[{"type": "function", "function": "reward_fns:target_share"},
                            judge_reward(s.url, breaker_threshold=10, concurrency=1)], train={"steps": 1})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        metrics = trainer.run_step()
    finally:
        trainer.close()
    assert len(s.requests) == 4  # four distinct texts, each graded once
    assert metrics["reward/fallback_count"] == 1 and metrics["reward/count"] == 3


def test_an_outage_is_alerted_both_ways_and_fallbacks_are_their_own_provenance(tmp_path, server):
    s = server()
    cfg = tiny_cfg(tmp_path, rollout={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8},
                   rewards=[{"type": "function", "function": "reward_fns:target_share"}, judge_reward(s.url, concurrency=1)],
                   train={"steps": 8})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        trainer.run_step()
        port = s.port
        s.stop()
        trainer.run_step()  # the breaker opens on this step's failures
        trainer.run_step()
        server(port=port)  # back on the same port
        time.sleep(0.3)  # past breaker_reset_s: the next request is the half-open trial
        trainer.run_step()
        trainer.run_step()
    finally:
        trainer.close()
    rows = step_rows(tmp_path / "run")
    for r in rows:
        assert r["reward/fresh_count"] + r["reward/cached_count"] == r["reward/count"]
        assert r["reward/count"] + r["reward/fallback_count"] == 4
    assert [r["reward/fallback_frac"] for r in rows] == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert math.isnan(float(rows[1]["reward/fresh_mean"])) and rows[1]["reward/count"] == 0  # no made-up fresh reward
    alerts = [json.loads(line) for line in (tmp_path / "run/alerts.jsonl").read_text().splitlines()]
    said = [(a["step"], a["code"]) for a in alerts if a["code"].startswith("judge_")]
    assert said == [(2, "judge_outage"), (4, "judge_recovered")]


def test_on_outage_pause_waits_for_the_judge(server):
    s = server()
    port = s.port
    s.stop()
    cfg = JudgeConfig(base_url=s.url, model="m", timeout_s=2.0, max_retries=0, breaker_threshold=1,
                      breaker_reset_s=0.2, fallback=0.3, on_outage="pause")
    clock, pauses = Clock(), []

    def pause(seconds):  # the judge's clock moves on by the pause; during the second one the judge comes back
        pauses.append(seconds)
        clock.advance(seconds)
        if len(pauses) == 2:
            server(port=port)

    j = HttpJudge(cfg, sleep=pause, timer=clock)

    def back_unpaused():  # a judge that never pauses: the judge comes back and its breaker can close, so the test ends
        if not pauses:
            clock.advance(cfg.breaker_reset_s)
            server(port=port)

    backstop = threading.Timer(HOLD_S, back_unpaused)
    backstop.start()
    try:
        scores = j.score_batch([(task(i), completion(i + 1)) for i in range(3)])
    finally:
        backstop.cancel()
    assert [(sc.value, sc.fallback) for sc in scores] == [(0.1, False), (0.2, False), (0.3, False)]
    # it waited out the breaker each time, and asked again until every sample was graded
    assert len(pauses) >= 2 and set(pauses) == {0.2}


def test_on_outage_stop_ends_the_run_with_its_finished_steps_checkpointed(tmp_path):
    run = tmp_path / "run"
    answered, lock = [], threading.Lock()

    def judge_dies_after_two_steps(request):  # a step asks at most 4 grades (2 prompts x 2 samples, no retry)
        with lock:
            answered.append(len(answered) < 8)
            return grade_from(request) if answered[-1] else ("drop",)

    s = ScriptedServer(default=judge_dies_after_two_steps)
    try:
        cfg = tiny_cfg(tmp_path, rollout={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8},
                       rewards=[{"type": "function", "function": "reward_fns:target_share"},
                                judge_reward(s.url, on_outage="stop")], train={"steps": 50, "checkpoint_every": 0})
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg)))
        from mlx_coach.cli import main

        rc = main(["train", "-c", str(path), "--output", str(run)])
    finally:
        s.stop()
    assert rc == 3
    steps = [r["step"] for r in step_rows(run)]
    last = steps[-1]
    assert last >= 2 and steps == list(range(1, last + 1))
    state = json.loads((run / f"checkpoints/step-{last}/state.json").read_text())
    # every finished step is kept, and the aborted step's prompts were given back
    assert (state["step"], state["epoch"], state["pos"]) == (last, 0, 2 * last)
    assert not (run / f"checkpoints/step-{last + 1}").exists()
