"""The score cache inside real training runs: provenance, epoch-clear vs LRU, a judge that dies mid-run."""

import json

import numpy as np
import pytest
from test_teacher import ScriptedServer
from test_trainer import step_rows, tiny_cfg

from mlx_coach.telemetry.writer import read_jsonl
from mlx_coach.rl.trainer import Trainer
from mlx_coach.rl.loop import train


def greedy_cfg(tmp_path, policy):
    """Greedy decoding and zero-std groups: the policy does not change, so every epoch repeats the
    same completions and a cache that keeps them must serve them. A group's two greedy samples are
    one text: the second is a copy ("duplicate") of the first."""
    return tiny_cfg(
        tmp_path, data={"tasks": "builtin", "limit": 10, "val_fraction": 0.2},
        rollout={"group_size": 2, "prompts_per_step": 4, "max_new_tokens": 8, "temperature": 0.0},
        rewards=[{"type": "tests"}], cache={"policy": policy}, train={"steps": 6, "epochs_val": True},
        sandbox={"timeout_s": 5.0, "workers": 2})


@pytest.mark.parametrize("policy", ["lru", "epoch-clear"])
def test_cache_policy_changes_provenance_not_rewards(tmp_path, policy):
    run = tmp_path / policy
    train(greedy_cfg(tmp_path, policy), run)
    rows = step_rows(run)
    assert len(rows) == 6  # 8 training tasks, 4 per step: 2 steps per epoch, 3 epochs
    by_origin = [(r["reward/fresh_count"], r["reward/cached_count"], r["reward/duplicate_count"]) for r in rows]
    assert all(sum(counts) == r["reward/count"] == 8 for counts, r in zip(by_origin, rows))
    later = rows[2:]
    assert by_origin[:2] == [(4, 0, 4)] * 2  # 4 texts scored, each copied once
    events = read_jsonl(run / "events.jsonl") if (run / "events.jsonl").exists() else []
    clears = [e for e in events if e["kind"] == "cache/clear"]
    if policy == "lru":
        assert by_origin[2:] == [(0, 4, 4)] * 4 and all(r["cache/hit_rate"] == 1.0 for r in later)
        assert all(np.isfinite(r["reward/cached_mean"]) for r in later)
        assert not any(e["removed"] for e in clears)
    else:
        # the old behaviour: every epoch starts cold, so nothing is ever served across steps
        assert by_origin == [(4, 0, 4)] * 6 and all(r["cache/hit_rate"] == 0.0 for r in rows)
        # one greedy program per training task is dropped at each of the three epoch ends
        assert [e["removed"] for e in clears if e["removed"]] == [8, 8, 8]
    # the reward itself does not depend on where it came from
    by_step = {r["step"]: r["reward/mean"] for r in rows}
    assert by_step[1] == by_step[3] == by_step[5] and by_step[2] == by_step[4] == by_step[6]
    evals = [r["eval/pass@1"] for r in read_jsonl(run / "metrics.jsonl") if "eval/pass@1" in r]
    assert len(evals) == 3 and len(set(evals)) == 1  # validation is scored fresh, never from the cache


def test_resume_restores_the_cache(tmp_path):
    cfg = greedy_cfg(tmp_path, "lru")
    cfg.train.checkpoint_every = 2
    run = tmp_path / "run"
    train(cfg, run, steps=2)
    snapshot = json.loads((run / "checkpoints/step-2/cache.json").read_text())
    assert len(snapshot["entries"]["student"]) == 8
    train(cfg, run, resume=True, steps=4)
    rows = step_rows(run)
    assert [r["reward/cached_count"] for r in rows] == [0, 0, 4, 4]  # hits right after the resume
    assert [r["reward/fresh_count"] for r in rows] == [4, 4, 0, 0]  # (each group: one text, and its copy)


def test_run_survives_the_judge_server_stopping(tmp_path):
    server = ScriptedServer()
    cfg = tiny_cfg(
        tmp_path, rollout={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8},
        rewards=[{"type": "tests"},
                 {"type": "http-judge", "base_url": server.url, "model": "judge", "weight": 0.5, "timeout_s": 2.0,
                  "max_retries": 1, "backoff_s": 0.01, "max_backoff_s": 0.02, "fallback": 0.0,
                  "breaker_threshold": 3, "breaker_reset_s": 60.0}],
        train={"steps": 4})
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        before = [trainer.run_step() for _ in range(2)]
        requests_before = len(server.requests)
        server.stop()
        after = [trainer.run_step() for _ in range(2)]
        snapshot = trainer.cache.snapshot()
    finally:
        trainer.close()
    assert requests_before == 8 and before[-1]["teacher/errors"] == 0  # 2 steps x 2 prompts x group 2
    assert after[-1]["teacher/errors"] == 8  # the next 8 samples got the fallback, all counted
    assert after[-1]["teacher/circuit_open"] == 1  # the breaker stopped hammering a dead server
    judged = [e for e in snapshot["entries"]["student"] if e[0][0].startswith("http-judge")]
    assert len(judged) == 8 and all(not e[1].get("fallback") for e in judged)  # nothing false was cached
    assert all(np.isfinite(m["reward/mean"]) for m in after)  # training went on with the fallback
