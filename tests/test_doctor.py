import os
import subprocess
import sys

from mlx_coach.doctor import report


def test_report_names_backend_blas_sandbox_limits():
    rows = dict(report())
    assert rows["backend"] in ("CPU", "Metal", "CUDA") and rows["mlx"].count(".") >= 2
    assert rows["sandbox"].startswith("passed in ")
    memory_limit = "sandbox RLIMIT_DATA" if sys.platform == "darwin" else "sandbox RLIMIT_AS"
    assert rows[memory_limit] == "set" and rows["sandbox RLIMIT_CPU"] == "set"
    assert "GFLOP/s" in rows["matmul 512x512 f32"]
    for guard in ("user", "network", "no_new_privs"):  # each says whether it held, and why not
        assert rows[f"sandbox worker {guard}"].startswith(("yes", "no")), rows
    if sys.platform.startswith("linux") and os.geteuid() != 0:
        assert rows["sandbox worker user"].startswith("no") and rows["sandbox worker judge_undumpable"] == "yes"
    if sys.platform.startswith("linux"):
        assert "BLAS" in rows["blas"]
    # outside mlx.launch: one rank; the ring backend ships with every MLX build
    assert rows["distributed rank / size"] == "0 / 1" and rows["distributed backend"].startswith("none")
    assert "ring" in rows["distributed backends"]


def test_cli_doctor_prints_every_row():
    p = subprocess.run([sys.executable, "-m", "mlx_coach", "doctor"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    names = [line.split("  ")[0] for line in p.stdout.splitlines()]
    for name in ("python", "mlx", "backend", "default device", "blas", "sandbox", "cache limit"):
        assert name in names
