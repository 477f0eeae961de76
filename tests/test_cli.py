"""The CLI as a user meets it: a real subprocess, exit codes, one-line errors."""

import subprocess
import sys


def mlx_coach(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mlx_coach", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0]


def test_help_lists_commands():
    proc = mlx_coach("--help")
    assert proc.returncode == 0
    for cmd in ("train", "eval", "score", "bench", "doctor"):
        assert cmd in proc.stdout


def test_bad_arguments_exit_2():
    _one_line_error(mlx_coach("train", "--steps", "many"), "--steps")
    _one_line_error(mlx_coach("frobnicate"), "frobnicate")


def test_bad_config_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algo:\n  advantage: ppo\n")
    _one_line_error(mlx_coach("train", "-c", str(cfg), "--output", str(tmp_path / "run")), "algo.advantage")
    _one_line_error(mlx_coach("train", "--set", "optim.lr=-1", "--output", str(tmp_path / "run")), "optim.lr")
    _one_line_error(mlx_coach("train", "-c", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_bad_model_path_exit_2(tmp_path):
    _one_line_error(mlx_coach("train", "--set", f"model.path={tmp_path}/missing-model", "--output",
                              str(tmp_path / "run")), "missing-model")


def test_bad_dataset_exit_2(tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text('{"task_id": "a", "prompt": "def f():\\n", "entry_point": "f", "test": "def check(c): pass"}\n{oops\n')
    _one_line_error(mlx_coach("train", "--set", f"data.tasks={data}", "--output", str(tmp_path / "run")),
                    "tasks.jsonl:2")


def test_resume_without_run_exit_2(tmp_path):
    _one_line_error(mlx_coach("train", "--resume", str(tmp_path / "norun")), "norun")


def test_tests_and_commands_run_under_openblas_when_present():
    import os

    import pytest

    from mlx_coach.runtime.blas import OPENBLAS, preloaded

    if not (sys.platform.startswith("linux") and os.path.exists(OPENBLAS)):
        pytest.skip("Debian's OpenBLAS is not installed")
    assert preloaded()  # conftest re-executed pytest with it
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_COACH_NO_OPENBLAS")}
    doctor = subprocess.run([sys.executable, "-m", "mlx_coach", "doctor"], capture_output=True, text=True,
                            env=clean, timeout=120)
    assert doctor.returncode == 0 and "OpenBLAS, preloaded" in doctor.stdout  # the CLI re-execs itself
