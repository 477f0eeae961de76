"""Use Debian's OpenBLAS in place of the reference BLAS bundled in MLX's Linux CPU wheel.

The reference BLAS is unoptimised, so CPU matmuls (every forward and backward pass) are far slower
through it than through OpenBLAS. The library must be preloaded before the process starts, so entry
points re-exec themselves once with LD_PRELOAD set.
"""

import os
import sys

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
_OPT_OUT = "MLX_COACH_NO_OPENBLAS"


def openblas_path():
    """Path of the OpenBLAS library to preload, or None when absent or not applicable."""
    if not sys.platform.startswith("linux") or os.environ.get(_OPT_OUT):
        return None
    return OPENBLAS if os.path.exists(OPENBLAS) else None


def preloaded():
    return OPENBLAS in os.environ.get("LD_PRELOAD", "")


def needs_reexec():
    return openblas_path() is not None and not preloaded()


def reexec_with_openblas(argv):
    """Replace this process with argv under LD_PRELOAD=OpenBLAS, if that helps; else return."""
    if not needs_reexec():
        return
    lib = openblas_path()
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[_OPT_OUT] = "1"  # never loop, even if the loader ignores the preload
    os.execve(sys.executable, [sys.executable, *argv], env)
