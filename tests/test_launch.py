"""`mlx-coach launch`: a rank's failure reaches the user as its exit code and one line, a dead rank or a
killed launcher leaves no rank alive. (Two ranks in two network namespaces are tests/test_distributed.py's 2-rank
runs, as root.)"""

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_distributed import EQUIVALENCE
from waiting import wait_exited, wait_until

from mlx_coach.core.errors import UserError
from mlx_coach.runtime.checkpoint import latest_checkpoint, read_checkpoint
from mlx_coach.runtime.launch import _Output, read_hostfile, ssh_argv
from mlx_coach.runtime.netns import parse_shape
from mlx_coach.runtime.watchdog import PEER_GONE_EXIT

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
ENDED_S = 60  # the bound the issue sets: no rank outlives a failure by more than this

# a long run of the builtin tiny model (killed long before its end), a checkpoint every step
LONG = {**EQUIVALENCE, "train": {"steps": 500, "checkpoint_every": 1, "epochs_val": False},
        "rollout": {**EQUIVALENCE["rollout"], "max_new_tokens": 8}}


def mlx_coach(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mlx_coach", *args], env=ENV, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def children(pid):
    """Pids of the processes whose parent is `pid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


# A rank blocked in a collective its peer never joins: the hang a dead peer leaves. Rank 1 then does
# what argv says: "exit2" (a one-line error, exit 2) or "wait" (blocks in Python, as rank 0 does in C).
BLOCKED = r"""
import os, sys, threading
from mlx_coach.runtime.watchdog import watch_launcher_from_env
watch_launcher_from_env()
from mlx_coach.runtime.distributed import world
w = world()
w.all_sum(1.0)
print("READY", w.rank, os.getpid(), flush=True)
if w.rank == 1 and sys.argv[1] == "exit2":
    print("mlx-coach: error: rank 1 refuses", file=sys.stderr, flush=True)
    sys.exit(2)
if w.rank == 1:
    threading.Event().wait()
w.all_sum(2.0)
"""

DRIVER = r"""
import sys
from mlx_coach.runtime.launch import Rank, free_ports, rank_env, ring_hostfile, run_ranks
hostfile = sys.argv[1] + "/hostfile.json"
open(hostfile, "w").write(ring_hostfile([f"127.0.0.1:{p}" for p in free_ports(2)]))
sys.exit(run_ranks([Rank(r, [sys.executable, sys.argv[2], sys.argv[3]], rank_env(r, hostfile)) for r in range(2)]))
"""


def launch_blocked(tmp_path, mode):
    (tmp_path / "blocked.py").write_text(BLOCKED)
    (tmp_path / "driver.py").write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(tmp_path / "blocked.py"),
                             mode], env=ENV, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_config_error_on_every_rank_exits_2_in_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algo:\n  advantage: ppo\n")
    p = mlx_coach("launch", "-n", "2", "--", "train", "-c", str(cfg), "--output", str(tmp_path / "run"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-coach: error:") and "algo.advantage" in lines[0], err


def test_one_rank_exiting_2_stops_its_blocked_peer_and_launch_exits_2(tmp_path):
    p = launch_blocked(tmp_path, "exit2")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err  # the failing rank's code, not the stopped peer's (PEER_GONE_EXIT)
    lines = err.strip().splitlines()  # MLX's own lines about the closed socket pass through as they come
    assert [x for x in lines if x.startswith("mlx-coach:")] == [lines[-1]] == ["mlx-coach: error: rank 1 refuses"], err
    pids = [int(line.split()[-1]) for line in out.splitlines() if "READY" in line]
    assert len(pids) == 2 and all(wait_exited(pid, timeout=1) for pid in pids)  # run_ranks waited for both


def test_the_launcher_killed_leaves_no_rank_alive(tmp_path):
    p = launch_blocked(tmp_path, "wait")
    pids = []
    for line in p.stdout:  # rank 0's line plain, rank 1's with its prefix
        if "READY" in line:
            pids.append(int(line.split()[-1]))
        if len(pids) == 2:
            break
    assert len(pids) == 2, p.stderr.read()
    p.kill()  # both ranks are now blocked: rank 0 in a collective, rank 1 in Python
    p.wait()
    assert all(wait_exited(pid, timeout=ENDED_S) for pid in pids)


def test_a_rank_killed_mid_run_ends_the_run_with_its_code_and_keeps_checkpoints(tmp_path):
    cfg, run = tmp_path / "long.yaml", tmp_path / "run"
    cfg.write_text(yaml.safe_dump(LONG))
    p = mlx_coach("launch", "-n", "2", "--", "train", "-c", str(cfg), "--output", str(run))
    assert wait_until(lambda: latest_checkpoint(run) is not None or p.poll() is not None, timeout=240), "no step"
    assert p.poll() is None, p.communicate()[1][-2000:]
    ranks = children(p.pid)
    assert len(ranks) == 2
    rank1 = next(pid for pid in ranks if b"MLX_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(rank1, signal.SIGKILL)
    _, err = p.communicate(timeout=ENDED_S)
    assert p.returncode == 128 + signal.SIGKILL, err[-2000:]
    # the launcher's line comes last and whole, even after a rank stopped mid-write (MLX's unterminated
    # "[ring] Socket N was closed" warning)
    last = err.strip().splitlines()[-1]
    assert last == "mlx-coach: error: rank 1 was killed by SIGKILL, the other ranks were stopped", err[-2000:]
    assert PEER_GONE_EXIT != p.returncode and all(wait_exited(pid, timeout=1) for pid in ranks)
    with open(run / ".lock", "a") as f:  # the run's lock went with rank 0
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    newest = latest_checkpoint(run)
    assert newest is not None
    read_checkpoint(newest)  # verifies every file against the manifest


def test_a_rank_output_cut_mid_line_is_ended_so_the_next_line_starts_its_own():
    out, shared = _Output(), io.BytesIO()
    out.pump(1, io.BytesIO(b"step 3\n[ring] Socket 4"), shared)  # a rank killed while writing its warning
    shared.write(b"mlx-coach: error: rank 1 was killed by SIGKILL\n")
    assert shared.getvalue().decode().splitlines() == [
        "[rank 1] step 3", "[rank 1] [ring] Socket 4", "mlx-coach: error: rank 1 was killed by SIGKILL"]


def test_hostfile_and_shape_errors_are_one_line(tmp_path):
    bad = tmp_path / "hosts.json"
    for text, needle in (("{oops", "not JSON"), ('{"hosts": [{"ssh": "mac1"}]}', "hosts[0].ips"),
                         ('{"hosts": []}', "expected")):
        bad.write_text(text)
        with pytest.raises(UserError) as e:
            read_hostfile(bad)
        assert needle in str(e.value) and "\n" not in str(e.value)
    bad.write_text(json.dumps({"hosts": [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, {"ips": ["10.0.0.2"]}]}))
    assert read_hostfile(bad) == [("mac1.local", "10.0.0.1"), ("", "10.0.0.2")]
    assert parse_shape("rate=10gbit, delay=1ms") == {"rate": "10gbit", "delay": "1ms"}
    for text in ("rate=fast", "jitter=1ms", "delay=1", ""):
        with pytest.raises(UserError):
            parse_shape(text)


def test_a_remote_rank_gets_its_environment_and_hostfile(tmp_path):
    """The script ssh runs on the other host, run here by bash: the rank sees its variables and a file
    with the ring's hostfile."""
    ring = json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5001"]])
    probe = "import json, os; print(json.dumps([os.environ['MLX_RANK'], open(os.environ['MLX_HOSTFILE']).read()]))"
    argv = ssh_argv("mac2.local", [sys.executable, "-c", probe], {"MLX_RANK": "1", "MLX_HOSTFILE": "/here"}, ring,
                    str(tmp_path))
    assert argv[:2] == ["ssh", "-T"] and argv[-2] == "mac2.local"
    p = subprocess.run(["bash", "-c", argv[-1]], capture_output=True, text=True, check=True)
    assert json.loads(p.stdout) == ["1", ring]
