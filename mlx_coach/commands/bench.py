"""`mlx-coach bench NAME [ARGS...]`: run one of the scripts in the checkout's benchmarks/ folder.

Benchmarks measure side by side in one run and report ratios; they live outside the package
so they can be read and run as plain scripts too (`python benchmarks/bench_rollout.py`).
"""

import argparse
import runpy
import sys
from pathlib import Path

from mlx_coach.core.errors import UserError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


class BenchParser(argparse.ArgumentParser):
    """A benchmark script's flags: a bad one raises UserError (one line naming the flag; exit code 2 under
    `mlx-coach bench`) instead of argparse's usage text."""

    def __init__(self, name, description):
        super().__init__(prog=f"mlx-coach bench {name}", description=description)

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def available():
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def add_arguments(p):
    p.add_argument("name", help="rollout | sandbox | cache | memory | learn | plan ... (benchmarks/bench_NAME.py)")
    # everything after the name goes to the benchmark, options included (`bench learn -c CONFIG`)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def run(args):
    script = BENCH_DIR / f"bench_{args.name}.py"
    if not script.is_file():
        names = ", ".join(available()) or "none found (benchmarks/ ships with a source checkout)"
        raise UserError(f"bench: unknown benchmark {args.name!r}; available: {names}")
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0
