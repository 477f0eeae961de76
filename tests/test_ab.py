"""`mlx-coach ab`: the --vary grammar, and an A/B that is interrupted and continues where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from mlx_coach.commands import ab
from mlx_coach.commands.ab_report import METRICS
from mlx_coach.cli import main

ROOT = Path(__file__).resolve().parent.parent


def args(**kw):
    base = dict(config=None, vary=[], policies=None, seeds=1, steps=None, output="unused", parallel=1, set=[])
    return Namespace(**{**base, **kw})


# --- grammar ------------------------------------------------------------------------------------


def test_vary_is_the_full_product_of_the_values_in_order():
    vary, seeds, parallel = ab.grammar(args(vary=["cache.policy=lru,epoch-clear", "rollout.temperature=0.5,1.0,1.5"],
                                            seeds=3, parallel=2))
    arms = ab.arms(vary)
    assert len(arms) == 6 and (seeds, parallel) == (3, 2)
    assert arms[0] == [("cache.policy", "lru"), ("rollout.temperature", "0.5")]
    assert arms[-1] == [("cache.policy", "epoch-clear"), ("rollout.temperature", "1.5")]
    assert len({ab.arm_dir(i, a) for i, a in enumerate(arms)}) == 6
    # a list value keeps its commas; --policies is shorthand for --vary cache.policy=A,B
    assert ab.parse_vary(["model.lora_keys=[self_attn.q_proj, self_attn.v_proj],null"]) == \
        [("model.lora_keys", ["[self_attn.q_proj, self_attn.v_proj]", "null"])]
    assert ab.grammar(args(policies=["lru", "ttl"]))[0] == [("cache.policy", ["lru", "ttl"])]


@pytest.mark.parametrize("argv,needle", [
    (["--vary", "cache.policy"], "KEY=V1,V2"),
    (["--vary", "=lru,ttl"], "empty key"),
    (["--vary", "cache.policy="], "empty value"),
    (["--vary", "cache.policy=lru,,ttl"], "empty value"),
    (["--vary", "cache.policy=lru,lru"], "twice"),
    (["--vary", "cache.policy=lru", "--vary", "cache.policy=ttl"], "given twice"),
    (["--vary", "cache.nope=1,2"], "cache.nope"),
    (["--vary", "cache.policy=lru,fifo"], "fifo"),
    (["--vary", "train.seed=1,2"], "--seeds"),
    (["--vary", "cache.policy=lru,ttl", "--set", "cache.policy=lru"], "--set"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--parallel", "0"], "--parallel"),
    (["--policies", "lru", "fifo"], "fifo"),
])
def test_grammar_errors_are_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    assert main(["ab", "--output", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything is written


# --- an interrupted A/B continues -----------------------------------------------------------------


def _greedy_config(tmp_path):
    cfg = {
        "model": {"path": "builtin:tiny"},
        "data": {"tasks": "builtin", "limit": 10, "val_fraction": 0.2},
        "rollout": {"group_size": 2, "prompts_per_step": 4, "max_new_tokens": 8, "temperature": 0.0},
        "algo": {"beta": 0.0},
        "train": {"steps": 6, "checkpoint_every": 1, "epochs_val": False},
        "rewards": [{"type": "tests"}],
        "sandbox": {"workers": 2},
        "telemetry": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / "greedy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _table_row(md, first_cell):
    """(header cells, row cells) of the first markdown table row whose first cell is `first_cell`."""
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    top = i
    while top > 0 and lines[top - 1].startswith("|"):
        top -= 1
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    return cells(lines[top]), cells(lines[i])


def _checkpoint_steps(run_dir):
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []


def test_an_interrupted_ab_continues_without_redoing_finished_runs(tmp_path):
    config, out = _greedy_config(tmp_path), tmp_path / "ab"
    cmd = [sys.executable, "-m", "mlx_coach", "ab", "-c", str(config), "--vary", "cache.policy=lru,epoch-clear",
           "--output", str(out)]
    first, second = out / "a0-policy-lru" / "seed0", out / "a1-policy-epoch-clear" / "seed0"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:  # interrupt once the second run has checkpointed its first step
        deadline = time.monotonic() + 240
        while not _checkpoint_steps(second):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, log
    assert _checkpoint_steps(first)[-1] == 6 and 1 <= _checkpoint_steps(second)[-1] < 6
    stopped_at = _checkpoint_steps(second)[-1]
    finished = (first / "metrics.jsonl").read_bytes()
    assert not (out / "summary.json").exists()

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept  cache.policy=lru seed 0" in again.stdout
    assert f"start cache.policy=epoch-clear seed 0: resumes from step {stopped_at}" in again.stdout
    assert (first / "metrics.jsonl").read_bytes() == finished  # the finished run was not redone
    summary = json.loads((out / "summary.json").read_text())
    lru, clear = (summary["arms"][a]["runs"][0] for a in ("cache.policy=lru", "cache.policy=epoch-clear"))
    # 3 epochs of 8 tasks x 2 identical greedy samples: LRU asks the scorer once per program, epoch-clear
    # once per program and epoch; the resumed run's counts are a straight run's
    assert lru["samples"] == clear["samples"] == 48 and lru["steps"] == clear["steps"] == 6
    assert (lru["scorer_calls"], lru["cache_hits"]) == (8, 16)
    assert (clear["scorer_calls"], clear["cache_hits"]) == (24, 0)
    assert summary["differences"]["arms"]["cache.policy=epoch-clear"]["scorer_calls"]["mean"] == 16
    for png in ("reward.png", "hit_rate.png", "toks_phase.png", "calls.png"):
        assert (out / png).stat().st_size > 1000
    # the report's table of arms shows each arm's scorer calls in its column
    label = {k: text for k, text, _ in METRICS}["scorer_calls"]
    header, row = _table_row((out / "report.md").read_text(), label)
    shown = {arm: float(cell.split()[0]) for arm, cell in zip(header[1:], row[1:])}
    assert shown == {"cache.policy=lru": 8.0, "cache.policy=epoch-clear": 24.0}

    # the same output folder with another grammar is refused in one line, before any run
    other = subprocess.run([*cmd, "--seeds", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "another config" in other.stderr
