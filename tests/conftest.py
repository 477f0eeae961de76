import sys

from mlx_coach._blas import reexec_with_openblas

# MLX's Linux wheel ships a reference BLAS; re-run pytest under OpenBLAS when available.
reexec_with_openblas(["-m", "pytest", *sys.argv[1:]])


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")
