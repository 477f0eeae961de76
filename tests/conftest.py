import os
import sys

from mlx_coach.runtime.blas import needs_reexec, reexec_with_openblas

# One BLAS thread per process: OpenBLAS's threads spin while they wait, so two of them on a 2-core
# machine that also runs another CPU-bound process (or the sandbox's workers) slow each other down
# several-fold. The tests' matrices are small; one thread costs them little when the machine is idle.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")
    # MLX's Linux wheel ships a reference BLAS; re-run pytest under OpenBLAS when available.
    # Output capture must stop first, or the new process would write into pytest's capture file.
    if needs_reexec():
        capman = config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.stop_global_capturing()
        reexec_with_openblas(["-m", "pytest", *sys.argv[1:]])
