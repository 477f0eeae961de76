"""The process and its files: checkpoints, the run directory, data parallelism, memory, BLAS.

`checkpoint` (atomic, verified save and load), `rundir` (the run's lock and marker, writable
folders), `distributed` (`World` under `mlx.launch`), `memory` (MemoryManager: limits, clears, OOM
backoff), `memory_policy` (when to clear, limits in bytes, batch halving: pure functions), `blas` (re-exec
under Debian's OpenBLAS). May import: core.
"""
