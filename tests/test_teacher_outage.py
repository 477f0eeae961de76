"""A judge that misbehaves on purpose, on loopback (issue 10, items 6-8): a reply that trickles,
junk offered as a reference solution, an outage in the middle of a run."""

import json
import math
import threading
import time

import pytest
import yaml
from test_teacher import ScriptedServer, completion, grade_from, judge, server, task  # noqa: F401 (fixture)
from test_trainer import step_rows, tiny_cfg

from mlx_coach.rewards.cache import ScoreCache
from mlx_coach.config.tree import to_dict
from mlx_coach.rewards.sources import RewardSet
from mlx_coach.rewards.scoring.http_judge import HttpJudge, JudgeConfig
from mlx_coach.rl.trainer import Trainer


def test_a_reply_that_trickles_is_cut_at_the_overall_deadline(server):
    s = server([("trickle", 0.3, "SCORE: 7/10")])  # ~200 bytes: a minute, though no read waits 0.3 s
    j = judge(s.url, timeout_s=2.0, deadline_s=1.5)
    t0 = time.monotonic()
    [score] = j.score_batch([(task(), completion(7))])
    elapsed = time.monotonic() - t0
    assert score.status == "timeout" and score.fallback and "deadline" in score.error
    assert elapsed < 20  # generous: the whole reply would take ~60 s
    assert [sc.value for sc in j.score_batch([(task(), completion(7))])] == [0.7]  # a normal reply still fits


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


def test_an_outage_never_splits_a_group(tmp_path, server):
    s = server([None, ("drop",), None, None])  # one of group A's two requests fails
    cfg = tiny_cfg(tmp_path, rewards=[judge_reward(s.url, breaker_threshold=10, concurrency=1)])
    rewards = RewardSet(cfg, ScoreCache("lru"))
    t = [task(0), task(0), task(1), task(1)]
    out = rewards.score(t, [x.prompt for x in t], [completion(g) for g in (2, 4, 6, 8)], group_size=2)
    assert [r.provenance for r in out] == ["fallback", "fallback", "fresh", "fresh"]
    assert [r.parts["http-judge"] for r in out] == [0.3, 0.3, 0.6, 0.8]  # group A all fallback, B all graded


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
    j = HttpJudge(cfg)
    threading.Timer(1.0, lambda: server(port=port)).start()
    scores = j.score_batch([(task(i), completion(i + 1)) for i in range(3)])
    assert [(sc.value, sc.fallback) for sc in scores] == [(0.1, False), (0.2, False), (0.3, False)]


def test_on_outage_stop_ends_the_run_with_its_finished_steps_checkpointed(tmp_path):
    run = tmp_path / "run"
    alive = threading.Event()
    alive.set()
    s = ScriptedServer(default=lambda request: grade_from(request) if alive.is_set() else ("drop",))

    def kill_the_judge_after_two_steps():
        while len(step_rows(run) if (run / "metrics.jsonl").exists() else []) < 2:
            time.sleep(0.02)
        alive.clear()

    watcher = threading.Thread(target=kill_the_judge_after_two_steps, daemon=True)
    watcher.start()
    try:
        cfg = tiny_cfg(tmp_path, rollout={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8},
                       rewards=[{"type": "function", "function": "reward_fns:target_share"},
                                judge_reward(s.url, on_outage="stop")], train={"steps": 50, "checkpoint_every": 0})
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg)))
        from mlx_coach.cli import main

        rc = main(["train", "-c", str(path), "--output", str(run)])
    finally:
        alive.set()
        s.stop()
    assert rc == 3
    steps = [r["step"] for r in step_rows(run)]
    last = steps[-1]
    assert last >= 2 and steps == list(range(1, last + 1))
    state = json.loads((run / f"checkpoints/step-{last}/state.json").read_text())
    # every finished step is kept, and the aborted step's prompts were given back
    assert (state["step"], state["epoch"], state["pos"]) == (last, 0, 2 * last)
    assert not (run / f"checkpoints/step-{last + 1}").exists()
