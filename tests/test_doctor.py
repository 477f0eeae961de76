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
    if sys.platform.startswith("linux"):
        assert "BLAS" in rows["blas"]


def test_cli_doctor_prints_every_row():
    p = subprocess.run([sys.executable, "-m", "mlx_coach", "doctor"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    names = [line.split("  ")[0] for line in p.stdout.splitlines()]
    for name in ("python", "mlx", "backend", "default device", "blas", "sandbox", "cache limit"):
        assert name in names
