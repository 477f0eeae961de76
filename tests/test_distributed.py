"""Data-parallel training: sharding, collectives across real ranks (mlx.launch over loopback), the
2-rank run (two hosts in two network namespaces, as root) against the 1-rank run, resume rules, and the
single-process defaults."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from test_trainer import tiny_cfg

from mlx_coach.runtime.distributed import main_host, shard_bounds, world
from mlx_coach.core.errors import UserError
from mlx_coach.telemetry.writer import read_jsonl
from mlx_coach.rl.loop import train

ROOT = Path(__file__).resolve().parent.parent
# the mlx.launch installed with this interpreter's mlx
MLX_LAUNCH = str(Path(sys.executable).with_name("mlx.launch")) if Path(sys.executable).with_name(
    "mlx.launch").exists() else shutil.which("mlx.launch")


def free_port_block(n=4):
    """A port whose next n-1 neighbours were free a moment ago (the ring backend uses port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n < 65535 and all(_free(port + i) for i in range(1, n)):
            return port
    raise RuntimeError("no free port block")


def _free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch(args, ranks=2, timeout=240):
    """`mlx.launch -n RANKS --backend ring -- python ARGS` with this checkout (and tests/) first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [MLX_LAUNCH, "-n", str(ranks), "--backend", "ring",
           "--starting-port", str(free_port_block()), "--", sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False)


def test_shards_are_contiguous_disjoint_and_cover_each_step_once():
    for n in range(1, 21):
        for size in range(1, 5):
            bounds = [shard_bounds(n, size, r) for r in range(size)]
            covered = [i for lo, hi in bounds for i in range(lo, hi)]
            assert covered == list(range(n))  # rank order = the single-process order
            lengths = [hi - lo for lo, hi in bounds]
            assert max(lengths) - min(lengths) <= 1


def test_a_single_process_is_rank_0_of_1_and_collectives_change_nothing():
    w = world()
    assert (w.rank, w.size, w.is_main) == (0, 1, True)
    cols = {"total": [0.25, 1.0], "fresh": [True, False]}
    assert w.gather_columns(cols) is cols
    assert w.all_sum([1.5, 2.0]) == [1.5, 2.0] and w.all_max(3.0) == 3.0 and w.from_main(0.5) == 0.5


COLLECTIVES = r"""
import mlx.core as mx
import numpy as np
from mlx_coach.runtime.distributed import checksum_spread, world
w = world()
rows = np.arange(3 * (w.rank + 1), dtype=np.float32).reshape(-1, 1) + 100 * w.rank  # 1 row on rank 0, 2 on rank 1
params = [("a", mx.ones((3, 3)) * (1.0 + 1e-3 * w.rank))]
out = {"rank": w.rank, "size": w.size, "gather": w.gather(rows[: w.rank + 1]).ravel().tolist(),
       "sum": w.all_sum([1.0, float(w.rank)]), "max": w.all_max(float(w.rank)), "min": w.all_min(float(w.rank)),
       "from_main": w.from_main(7.0 if w.rank == 0 else 3.0),
       "spread_same": checksum_spread(w, [("a", mx.ones((3, 3)))]), "spread_drift": checksum_spread(w, params),
       "bytes": [[b.decode() for b in share] for share in w.gather_bytes([b"r%d-%d" % (w.rank, i) for i in range(w.rank)])]}
print("RESULT", __import__("json").dumps(out), flush=True)
"""


def run_on_two_ranks(script, source, timeout):
    """Write `source` to `script`, run it on two ranks (mlx.launch, loopback), and return the RESULT lines every
    rank printed, as JSON, in rank order."""
    script.write_text(source)
    p = launch([str(script)], timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return sorted((json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines() if line.startswith("RESULT")),
                  key=lambda r: r["rank"])


def test_collectives_across_two_real_ranks(tmp_path):
    results = run_on_two_ranks(tmp_path / "collectives.py", COLLECTIVES, timeout=120)
    assert [r["rank"] for r in results] == [0, 1] and all(r["size"] == 2 for r in results)
    for r in results:  # every rank sees the same global answers
        assert r["gather"] == [0.0, 100.0, 101.0]  # uneven shares, concatenated in rank order
        assert r["sum"] == [2.0, 1.0] and r["max"] == 1.0 and r["min"] == 0.0 and r["from_main"] == 7.0
        assert r["spread_same"] == 0.0
        assert r["bytes"] == [[], ["r1-0"]]  # byte strings of each rank, rank 0's list empty
        assert 5e-4 < r["spread_drift"] < 5e-3  # one rank's weights 1e-3 larger (sum of squares: 2e-3)


EQUIVALENCE = {
    # Sampled decoding: each sample's draws are keyed by (seed, step, the task's place in the step, its index),
    # so the 2-rank run must draw the 1-rank run's completions. min_p 0.3 keeps the tiny model's texts few
    # enough that some repeat (within a group, and in epoch 2): the shared score cache then has hits and
    # duplicates to agree on. Stop strings make completion lengths differ, so the token-level loss
    # normalisation must use the global token count to match; the REINFORCE baseline starts at the batch
    # mean, so advantages must come from the global batch; grad_accum 2 splits each rank's share. No
    # LoRA dropout: its masks are drawn per rank.
    "model": {"path": "builtin:tiny", "lora_rank": 8, "lora_alpha": 16},
    "data": {"tasks": "builtin", "val_fraction": 0.2, "limit": 10},  # 8 training tasks: an epoch is 2 steps
    "rollout": {"group_size": 2, "prompts_per_step": 4, "max_new_tokens": 12, "temperature": 1.0, "min_p": 0.3,
                "stop": ["\x05\x05", "d"]},
    "algo": {"advantage": "reinforce", "beta": 0.04, "kl_estimator": "k3", "aggregation": "token"},
    "optim": {"lr": 0.002, "grad_clip": 1.0, "grad_accum": 2},
    "train": {"steps": 3, "checkpoint_every": 2, "epochs_val": True, "val_limit": 2, "checksum_every": 1},
    "rewards": [{"type": "function", "function": "mlx_coach.rewards.shaping:code_charset", "weight": 1.0},
                {"type": "tests", "weight": 0.5}],
    "telemetry": {"progress": False},
}


def _plain(args):
    """`python ARGS` as a plain command, without mlx.launch (a 1-rank run, or `mlx-coach launch`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, cwd=ROOT, env=env,
                          check=False)


# As root with iproute2 (as in CI), the 2-rank runs are two hosts: `mlx-coach launch --netns` puts each rank in
# its own network namespace, joined by a rate-shaped veth pair, from a hostfile of their addresses; elsewhere
# they run over loopback with mlx.launch.
TWO_HOSTS = os.geteuid() == 0 and shutil.which("ip") is not None


def netns_names():
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in p.stdout.splitlines() if line.startswith("mlx-coach-")}


def two_ranks(args):
    if not TWO_HOSTS:
        return launch(args)
    return _plain(["-m", "mlx_coach", "launch", "--netns", "--shape", "rate=10gbit", "--", *args[2:]])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """{1: 1-rank run, 2: 2-rank run, "resumed": the 2-rank run stopped after step 2 and resumed to step 3}:
    (run directory, its last process)."""
    base = tmp_path_factory.mktemp("dist")
    cfg = base / "eq.yaml"
    cfg.write_text(yaml.safe_dump(EQUIVALENCE))
    namespaces = netns_names() if TWO_HOSTS else set()
    runs = {}
    for ranks in (1, 2):
        out = base / f"ranks{ranks}"
        args = ["-m", "mlx_coach", "train", "-c", str(cfg), "--output", str(out)]
        p = _plain(args) if ranks == 1 else two_ranks(args)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[ranks] = (out, p)
    # the straight 2-rank run as it stood after step 2 (its checkpoint there, its later rows purged on resume)
    out = base / "resumed"
    shutil.copytree(runs[2][0], out)
    shutil.rmtree(out / "checkpoints/step-3")
    p = two_ranks(["-m", "mlx_coach", "train", "--resume", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    runs["resumed"] = (out, p)
    if TWO_HOSTS:
        assert netns_names() <= namespaces  # every launch tore its namespaces down
    return runs


def _adapters(run):
    return mx.load(str(run / "checkpoints/step-3/adapters.safetensors")), mx.load(str(run / "initial_trainable.safetensors"))


def test_two_ranks_train_the_same_adapters_as_one_rank(two_runs):
    """Same seed, same 4 prompts per step, same sampled completions, 3 steps (across an epoch end): the
    2-rank run's adapter update equals the 1-rank run's within 1e-2 relative per tensor (Adam turns
    last-bit differences of near-zero gradients, from differently shaped batches, into visible ones)."""
    (a, a0), (b, b0) = _adapters(two_runs[1][0]), _adapters(two_runs[2][0])
    assert a.keys() == b.keys() and len(a) > 0
    moved = 0.0
    for k in a:
        assert np.array_equal(np.array(a0[k]), np.array(b0[k])), k  # same initial adapters on every rank
        da, db = np.array(a[k] - a0[k]), np.array(b[k] - a0[k])
        moved = max(moved, float(np.linalg.norm(da)))
        assert np.linalg.norm(da - db) <= 1e-2 * max(np.linalg.norm(da), 1e-12), k
    assert moved > 1e-3  # the runs did train
    state = json.loads((two_runs[2][0] / "checkpoints/step-3/state.json").read_text())
    assert (state["world_size"], state["step"], state["epoch"], state["pos"]) == (2, 3, 1, 4)
    # the difficulty tracker counted both ranks' fresh verdicts (rank 0 logs both ranks' fresh counts)
    steps = [r for r in read_jsonl(two_runs[2][0] / "metrics.jsonl") if "reward/mean" in r]
    counted = sum(n for n, _ in state["difficulty"]["counts"].values())
    assert counted == sum(r["reward/fresh_count"] for r in steps) > 0


def test_rank_0_alone_logs_every_sample_of_both_ranks_once(two_runs):
    one, two = (read_jsonl(two_runs[r][0] / "metrics.jsonl") for r in (1, 2))
    steps1, steps2 = ([r for r in rows if "reward/mean" in r] for rows in (one, two))
    assert [r["step"] for r in steps2] == [1, 2, 3]  # one row per step: only rank 0 writes
    for r1, r2 in zip(steps1, steps2):
        assert r2["reward/count"] == r1["reward/count"] == 8  # 4 prompts x 2 samples, both ranks' together
        assert r2["reward/fresh_count"] + r2["reward/cached_count"] + r2["reward/duplicate_count"] == 8
        assert r2["cache/step_hits"] + r2["cache/step_misses"] == r1["cache/step_hits"] + r1["cache/step_misses"]
        for tag in ("reward/mean", "gen/completion_len_mean", "kl/mean", "grad/norm"):
            assert r2[tag] == pytest.approx(r1[tag], rel=1e-3, abs=1e-6), tag
        assert r2["dist/param_checksum_spread"] == 0.0  # identical weights on both ranks
    assert any(r["gen/truncated_frac"] < 1 for r in steps1)  # the stop strings made lengths differ
    evals = [r for r in two if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [2] and evals[0]["eval/pass@1"] == next(
        r for r in one if "eval/pass@1" in r)["eval/pass@1"]
    assert not (two_runs[2][0] / "alerts.jsonl").exists() or "param_drift" not in (
        two_runs[2][0] / "alerts.jsonl").read_text()
    assert two_runs[2][1].stdout.count("done: step 3") == 1  # rank 0 alone reports


STEP_COUNTS = ("cache/step_hits", "cache/step_misses", "reward/fresh_count", "reward/cached_count",
               "reward/duplicate_count")


def _steps(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if "reward/mean" in r]


def _cache(run, step=3):
    """(counts, entries) of the score cache a checkpoint holds, timings and ages aside: the entries are
    (key, verdict) per distinct (task, completion) in least-recently-used-first order."""
    snap = json.loads((run / f"checkpoints/step-{step}/cache.json").read_text())
    counts = {ns: {k: v for k, v in c.items() if k != "lookup_s"} for ns, c in snap["counts"].items()}
    entries = {ns: [(key, {k: v for k, v in value["score"].items() if k != "duration_s"}) for key, value, _ in rows]
               for ns, rows in snap["entries"].items()}
    return counts, entries


def test_two_ranks_draw_the_same_samples_and_share_one_score_cache(two_runs):
    """Sampled decoding: the 2-rank run draws the 1-rank run's completions, and its ranks act as one score
    cache: hits, misses, fresh, cached and duplicate counts are the 1-rank run's at every step, and the
    checkpoint holds the same cache (one entry per distinct completion, same order, same verdicts)."""
    one, two = _steps(two_runs[1][0]), _steps(two_runs[2][0])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for r1, r2 in zip(one, two):
        assert {t: r2[t] for t in STEP_COUNTS} == {t: r1[t] for t in STEP_COUNTS}, r1["step"]
        assert r2["gen/completion_len_mean"] == r1["gen/completion_len_mean"]
    assert any(r["cache/step_hits"] > 0 for r in one)  # a completion of epoch 1 came again in epoch 2
    assert any(r["reward/duplicate_count"] > 0 for r in one)
    counts, entries = _cache(two_runs[1][0])
    assert len(entries["student"]) > 0 and counts["student"]["hits"] > 0
    assert _cache(two_runs[2][0]) == (counts, entries)


def test_a_two_rank_run_stopped_and_resumed_equals_the_straight_run(two_runs):
    straight, resumed = two_runs[2][0], two_runs["resumed"][0]
    assert "at step 2" in two_runs["resumed"][1].stderr  # it went on from step 2's checkpoint
    (a, _), (b, _) = _adapters(straight), _adapters(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert _cache(resumed) == _cache(straight)
    states = [json.loads((run / "checkpoints/step-3/state.json").read_text()) for run in (straight, resumed)]
    for key in ("step", "epoch", "pos", "difficulty", "world_size"):
        assert states[0][key] == states[1][key], key
    s, r = _steps(straight), _steps(resumed)
    assert [x["step"] for x in r] == [1, 2, 3]
    for x, y in zip(s, r):
        assert {t: x[t] for t in (*STEP_COUNTS, "reward/mean")} == {t: y[t] for t in (*STEP_COUNTS, "reward/mean")}


def test_rank_0_logs_each_steps_distributed_timing(two_runs):
    """dist/rollout_s_max and _min (the ranks' rollout times), dist/straggler_s (their gap) and
    dist/allreduce_s (rank 0's gradient all-reduce) on every step of a 2-rank run; none on one rank."""
    tags = ("dist/rollout_s_max", "dist/rollout_s_min", "dist/straggler_s", "dist/allreduce_s")
    assert not any(t in r for r in _steps(two_runs[1][0]) for t in tags)
    for r in _steps(two_runs[2][0]):
        assert 0 < r["dist/rollout_s_min"] <= r["dist/rollout_s_max"] == r["time/generate_s"]
        assert r["dist/straggler_s"] == pytest.approx(r["dist/rollout_s_max"] - r["dist/rollout_s_min"], abs=1e-6)
        assert r["dist/allreduce_s"] > 0


TEACHER = r"""
import json, types, urllib.parse
from mlx_coach.core.errors import UserError
from mlx_coach.rewards.teacher_server import TeacherServerConfig, _healthy, serve
from mlx_coach.runtime.distributed import world
w = world()
out = {"rank": w.rank}
try:  # fails on rank 0 alone (the other ranks never load the model): every rank must hear of it
    with serve(types.SimpleNamespace(teacher_server=TeacherServerConfig(model="builtin:nosuchmodel"))):
        out["bad"] = "started"
except UserError as e:
    out["bad"] = str(e)
with serve(types.SimpleNamespace(teacher_server=TeacherServerConfig(model="builtin:tiny"))) as served:
    where = urllib.parse.urlsplit(served.url)
    out.update(url=served.url, identity=served.identity, bias=served.digit_bias, started=served.process is not None,
               healthy=_healthy(where.port, host=where.hostname))
    w.all_sum(0.0)  # every rank asked before rank 0 stops it
print("RESULT", json.dumps(out), flush=True)
"""


def test_rank_0_alone_starts_the_teacher_server_and_every_rank_is_told_where(tmp_path):
    results = run_on_two_ranks(tmp_path / "teacher.py", TEACHER, timeout=180)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["started"] for r in results] == [True, False]  # one server for the run
    assert all(r["healthy"] for r in results)
    assert results[0]["url"].startswith("http://127.0.0.1:")  # rank 0's address in the loopback hostfile
    for key in ("url", "identity", "bias", "bad"):
        assert results[1][key] == results[0][key], key
    assert "unknown builtin" in results[0]["bad"] and "\n" not in results[0]["bad"]


def test_rank_0s_address_comes_from_the_ring_hostfile(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["10.0.0.1:5000", "10.0.0.1:5001"], ["10.0.0.2:5000"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert main_host() == "10.0.0.1"
    monkeypatch.delenv("MLX_HOSTFILE")
    assert main_host() == "127.0.0.1"  # no launcher's hostfile: ranks on one machine


def test_resuming_with_another_world_size_is_refused_in_one_line(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"steps": 1})
    train(cfg, tmp_path / "run")
    state_file = tmp_path / "run/checkpoints/step-1/state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state["world_size"] = 2  # as a 2-rank run writes it, manifest included (an intact checkpoint)
    state_file.write_text(json.dumps(state))
    from mlx_coach.runtime.checkpoint import MANIFEST, _digest

    manifest_file = state_file.parent / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["state.json"] = _digest(state_file)
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(UserError) as e:
        train(cfg, tmp_path / "run", resume=True, steps=2)
    assert "2-rank run" in str(e.value) and "\n" not in str(e.value)


def test_a_step_with_fewer_prompts_than_ranks_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**EQUIVALENCE, "rollout": {**EQUIVALENCE["rollout"], "prompts_per_step": 1}}))
    p = launch(["-m", "mlx_coach", "train", "-c", str(cfg), "--output", str(tmp_path / "run1")], timeout=120)
    # a rank exits 2 with the one line; mlx.launch 0.32 then stops the other rank and itself exits 0
    output = p.stdout + p.stderr
    errors = [line for line in output.splitlines() if line.startswith("mlx-coach: error:")]
    assert errors and all("fewer than the 2 ranks" in e for e in errors), output[-2000:]
    assert "exited with code 2" in output
    assert not (tmp_path / "run1/metrics.jsonl").exists()
