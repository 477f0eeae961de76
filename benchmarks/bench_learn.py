"""Learning benchmark: evaluate before, train for a budget, evaluate after, and judge the change per task.

    mlx-coach bench learn -c configs/smollm2.yaml --minutes 30 --output runs/bench-learn
    mlx-coach bench learn -c configs/smollm2.yaml --seeds 3 --minutes 10 --output runs/bench-learn-seeds

Everything is in mlx_coach/commands/learn_bench.py (`--help` lists the options); this script is its entry point.
"""

import sys

from mlx_coach.commands.learn_bench import run

if __name__ == "__main__":
    run(sys.argv[1:])
