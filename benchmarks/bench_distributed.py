"""Step time of one rank against two ranks (mlx.launch, ring backend over loopback), side by side.

    python benchmarks/bench_distributed.py [--steps 5] [--prompts 8] [--group 4] [--max-new-tokens 32]
                                           [--repeats 1] [--full] [--json PATH]
    mlx-coach bench distributed -- --steps 5

The default (one 1-rank and one 2-rank run of 5 steps) finishes in a few minutes on a 2-core CPU;
`--full` is the long version (3 repeats of 10 steps). Progress lines go to stderr, the results to stdout.

Both runs train the same config (builtin tiny model, the same global batch of `--prompts` prompts x
`--group` samples per step, a function reward so the sandbox does not dominate) for `--steps` steps;
the 1-rank run is the plain command, the 2-rank run the same command under
`mlx.launch -n 2 --backend ring`. Runs alternate (1, 2, 1, 2, ... for `--repeats`) so that load from
other processes falls on both. Reported: median `time/step_s` over the steps after the first
(warm-up), per phase medians (generate, score, update; the slowest rank's), and the ratio.

Caveat: on one machine both ranks share its cores (2 here), so two ranks cannot be faster than one
that already uses every core; what the ratio shows on one machine is the cost of the collectives and
of splitting the batch. On two Macs each rank has its own machine.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_coach.commands.argtypes import positive_int
from mlx_coach.commands.bench import BenchParser
from mlx_coach.telemetry.writer import read_jsonl
from mlx_coach.telemetry.progress import bench_note

PHASES = ("time/step_s", "time/generate_s", "time/score_s", "time/update_s")
STEPS, REPEATS = 5, 1  # the default's workload
FULL_STEPS, FULL_REPEATS = 10, 3  # --full


note = bench_note("distributed")


def config(args):
    return {
        "model": {"path": "builtin:tiny", "lora_rank": 8, "lora_alpha": 16},
        "data": {"tasks": "builtin", "val_fraction": 0.2},
        "rollout": {"group_size": args.group, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens},
        "algo": {"beta": 0.04},
        "train": {"steps": args.steps, "checkpoint_every": 0, "epochs_val": False},
        "rewards": [{"type": "function", "function": "mlx_coach.rewards.shaping:code_charset"}],
        "telemetry": {"progress": True, "tensorboard": False},  # its step lines become this bench's progress
    }


def run(ranks, cfg_path, out, port):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "mlx_coach", "train", "-c", str(cfg_path), "--output", str(out)]
    if ranks > 1:
        launcher = Path(sys.executable).with_name("mlx.launch")
        launcher = str(launcher) if launcher.exists() else shutil.which("mlx.launch")
        cmd = [launcher, "-n", str(ranks), "--backend", "ring", "--starting-port", str(port), "--", *cmd]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env=env) as p:
        err = []
        for line in p.stderr:  # the main rank's "step i/n | reward ... | ETA" lines, passed on as they come
            err.append(line)
            if line.lstrip().startswith("step ") and " | " in line:
                note(f"{ranks} rank{'s' * (ranks > 1)}: {line.strip()}")
    if p.returncode != 0:
        sys.exit(f"{ranks}-rank run failed:\n{''.join(err)[-2000:]}")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r][1:]  # drop the warm-up step
    return {tag: [r[tag] for r in rows] for tag in PHASES + ("gen/tokens_per_sec",)}


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if xs else float("nan")


def main(argv=None):
    ap = BenchParser("distributed", __doc__.splitlines()[0])
    ap.add_argument("--steps", type=positive_int, help=f"steps per run (default {STEPS}; --full: {FULL_STEPS})")
    ap.add_argument("--prompts", type=positive_int, default=8, help="global prompts per step (both runs)")
    ap.add_argument("--group", type=positive_int, default=4)
    ap.add_argument("--max-new-tokens", type=positive_int, default=32)
    ap.add_argument("--repeats", type=positive_int, help=f"1-rank, 2-rank pairs (default {REPEATS}; --full: "
                    f"{FULL_REPEATS})")
    ap.add_argument("--full", action="store_true",
                    help=f"the long version: {FULL_REPEATS} repeats of {FULL_STEPS} steps")
    ap.add_argument("--port", type=positive_int, default=45123, help="ring backend's first port")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.steps = args.steps or (FULL_STEPS if args.full else STEPS)
    args.repeats = args.repeats or (FULL_REPEATS if args.full else REPEATS)
    results = {1: {t: [] for t in PHASES + ("gen/tokens_per_sec",)}, 2: {t: [] for t in PHASES + ("gen/tokens_per_sec",)}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "bench.yaml"
        cfg_path.write_text(yaml.safe_dump(config(args)))
        for rep in range(args.repeats):
            for ranks in (1, 2):
                note(f"[{2 * rep + ranks}/{2 * args.repeats}] {ranks} rank{'s' * (ranks > 1)}: training "
                     f"{args.steps} steps of builtin:tiny")
                got = run(ranks, cfg_path, Path(tmp) / f"r{ranks}-{rep}", args.port)
                note(f"{ranks} rank{'s' * (ranks > 1)}: median step {median(got['time/step_s']):.2f} s")
                for tag, values in got.items():
                    results[ranks][tag] += values
    table = {ranks: {tag: median(v) for tag, v in res.items()} for ranks, res in results.items()}
    print(f"global batch {args.prompts} prompts x {args.group} samples, {args.max_new_tokens} new tokens, "
          f"{args.steps} steps x {args.repeats} repeat(s); medians over steps 2..{args.steps}; {os.cpu_count()} CPUs")
    print(f"{'':<22}{'1 rank':>10}{'2 ranks':>10}{'2 / 1':>8}")
    for tag in PHASES + ("gen/tokens_per_sec",):
        one, two = table[1][tag], table[2][tag]
        print(f"{tag:<22}{one:>10.3f}{two:>10.3f}{two / one if one else float('nan'):>8.2f}")
    print("caveat: both ranks share this machine's cores, so 2 ranks here measure the cost of splitting the "
          "batch and of the collectives, not the speed-up of two Macs")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "medians": table}, indent=2))


if __name__ == "__main__":
    main()
