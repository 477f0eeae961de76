"""`mlx-coach ab`: the same greedy run under two cache policies, compared from its own report."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_ab_reports_the_scorer_work_each_policy_saves(tmp_path):
    cfg = {
        "model": {"path": "builtin:tiny"},
        "data": {"tasks": "builtin", "limit": 10, "val_fraction": 0.2},
        "rollout": {"group_size": 2, "prompts_per_step": 4, "max_new_tokens": 8, "temperature": 0.0},
        "algo": {"beta": 0.0},
        "train": {"steps": 6, "checkpoint_every": 0, "epochs_val": False},
        "rewards": [{"type": "tests"}],
        "sandbox": {"workers": 2},
        "telemetry": {"progress": False},
    }
    path = tmp_path / "greedy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "ab"
    proc = subprocess.run([sys.executable, "-m", "mlx_coach", "ab", "-c", str(path), "--policies", "lru",
                           "epoch-clear", "--output", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    lru, clear = report["runs"]["lru"], report["runs"]["epoch-clear"]
    # 3 epochs of 8 tasks x 2 identical greedy samples: LRU scores each program once
    assert lru["samples"] == clear["samples"] == 48
    assert lru["scorer_calls"] == 8 and lru["cached_samples"] == 32 and lru["cache_clears"] == 0
    assert clear["scorer_calls"] == 24 and clear["cached_samples"] == 0 and clear["cache_clears"] == 3
    assert report["b_over_a"]["scorer_calls"] == 3.0
    assert lru["reward_mean"] == clear["reward_mean"]  # same programs, same rewards
    assert "scorer_calls" in proc.stdout and (out / "a-lru" / "metrics.jsonl").is_file()


def test_ab_rejects_bad_policies(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlx_coach", "ab", "--policies", "lru", "fifo"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "fifo" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
