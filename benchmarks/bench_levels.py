"""How hard the procedural tasks are for a model: pass rate by difficulty level and family.

    python benchmarks/bench_levels.py [--model builtin:smollm2] [--tasks 20 | --full] [--temperature 0]
                                      [--samples 1] [--max-new-tokens 192] [--json PATH]
    (or: mlx-coach bench levels -- --tasks 100)

Samples the first `--tasks` tasks of the default held-out procedural split (`procedural:heldout`)
through the chat template with configs/smollm2.yaml's system prompt and fenced user message, scores the first
code block in the sandbox, and prints the passes per level and family, and how many tasks the model
passed never, sometimes (strictly between: the tasks that give a group a learning signal) and always.
"""

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from mlx_coach.commands.argtypes import number_at_least, positive_int
from mlx_coach.commands.bench import BenchParser
from mlx_coach.config.tree import load_config
from mlx_coach.engine.generate import generate_and_score
from mlx_coach.models.loader import load_policy
from mlx_coach.data.procedural import procedural_split
from mlx_coach.engine.rollout import RolloutConfig
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer

TASKS, FULL_TASKS = 20, 100  # the default finishes in a few minutes on a 2-core CPU; --full is the long version
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml"  # its system prompt and user template


def main():
    p = BenchParser("levels", __doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: the model's)")
    p.add_argument("--tasks", type=positive_int, help=f"held-out tasks sampled (default {TASKS}; --full: {FULL_TASKS})")
    p.add_argument("--full", action="store_true", help=f"the long version: {FULL_TASKS} tasks")
    p.add_argument("--temperature", type=number_at_least(0), default=0.0)
    p.add_argument("--samples", type=positive_int, default=1)
    p.add_argument("--max-new-tokens", type=positive_int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    tasks = procedural_split()[1][: args.tasks or (FULL_TASKS if args.full else TASKS)]
    model, tokenizer, _ = load_policy(args.model, dtype=args.dtype)
    model.eval()
    recipe = load_config(RECIPE).rollout
    rc = RolloutConfig(group_size=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=0.95 if args.temperature else 1.0, chat_template=True, extract_code=True,
                       system_prompt=recipe.system_prompt, user_template=recipe.user_template)
    mx.random.seed(args.seed)
    print(f"[bench levels] sampling and scoring {len(tasks)} held-out procedural tasks x {args.samples} with "
          f"{args.model} (a progress bar on a terminal)", file=sys.stderr, flush=True)
    t0 = time.time()
    with SandboxScorer(SandboxConfig(timeout_s=10.0, workers=2)) as scorer:
        records = generate_and_score(model, tokenizer, tasks, rc, scorer)
    by_id = {t.task_id: t for t in tasks}
    level, family, per_task = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in records:
        t = by_id[r["task_id"]]
        level[t.tags["difficulty"]].append(r["passed"])
        family[t.tags["category"]].append(r["passed"])
        per_task[r["task_id"]].append(r["passed"])
    rates = [sum(v) / len(v) for v in per_task.values()]
    out = {"model": args.model, "tasks": len(tasks), "samples": args.samples, "temperature": args.temperature,
           "seconds": round(time.time() - t0), "pass_rate": sum(r["passed"] for r in records) / len(records),
           "by_level": {k: [sum(v), len(v)] for k, v in sorted(level.items())},
           "by_family": {k: [sum(v), len(v)] for k, v in sorted(family.items())},
           "tasks_never": sum(x == 0 for x in rates), "tasks_sometimes": sum(0 < x < 1 for x in rates),
           "tasks_always": sum(x == 1 for x in rates)}
    for lv, (passed, n) in out["by_level"].items():
        print(f"level {lv}: {passed}/{n} samples passed")
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
