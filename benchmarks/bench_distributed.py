"""Two-rank training over a shaped network link, and the step time it projects for 2, 4 and 8 Macs.

    python benchmarks/bench_distributed.py [--steps 4] [--prompts 8] [--group 4] [--max-new-tokens 16]
                                           [--links 10gbe,1gbe] [--repeats 30] [--full] [--json PATH]
    mlx-coach bench distributed -- --steps 4

Root only: the two ranks run in two network namespaces joined by a veth pair (runtime/netns.py), the
link shaped with tc. The default (4 steps, the 10 GbE link) takes a few minutes on a 2-core CPU;
`--full` runs 8 steps over every link. Progress lines go to stderr, the results to stdout.

Each rank, and the one-rank baseline, runs pinned to a core of its own (taskset), as each Mac has its
own machine; so does each rank of the link measurement. Per link:
  1. The compute: one rank alone trains the global batch (`--prompts` x `--group`, builtin tiny model, a
     function reward), then half of it; the median `time/step_s` over the steps after the first (warm-up):
     C1, and C_half, what one rank's share of a 2-rank step costs without any distribution (reported
     beside the 2-rank step: the gap is what being one of two ranks costs on this machine).
  2. The link: the two ranks all-sum a float32 buffer the size of the adapters' gradient (`bytes`) and a
     one-float buffer, `--repeats` times each; medians t_grad and t_small. For 2 ranks the ring model
     below gives t_small = 2 L and t_grad - t_small = bytes / B: the link's latency L and bandwidth B.
  3. The same training as two ranks over the link: the median `time/step_s` (the measured step) and,
     where the trainer logs them, the medians of `dist/straggler_s` and `dist/allreduce_s`.
Model (stated again in the output):
    step(n) = C1 / n + A(n) + S,   A(n) = 2 (n - 1) / n x bytes / B + 2 (n - 1) x L
C1 / n is the compute of an n-th of the batch (Macs as fast as one core here), A(n) the ring
all-reduce of the gradient, S the straggler allowance (the 2-rank run's median dist/straggler_s; 0 when
not logged).
The check: step(2) against the measured 2-rank step over the same link, within 25%.
A kernel without the netem qdisc cannot add a delay: the links then shape the rate only (tbf), and L
is the veth's own latency, as measured.
"""

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_coach.commands.argtypes import positive_int
from mlx_coach.commands.bench import BenchParser
from mlx_coach.core.errors import UserError
from mlx_coach.runtime.launch import Rank, rank_env, ring_hostfile, run_ranks
from mlx_coach.runtime.netns import LinkPair, parse_shape
from mlx_coach.telemetry.progress import bench_note
from mlx_coach.telemetry.writer import read_jsonl

# name -> tc shape: 10 and 1 Gigabit Ethernet, and a Thunderbolt-like bridge (its delay needs netem)
LINKS = {"10gbe": "rate=10gbit,delay=1ms", "1gbe": "rate=1gbit,delay=1ms", "thunderbolt": "rate=40gbit,delay=50us"}
STEPS, FULL_STEPS = 4, 8
PROJECT = (2, 4, 8)
TOLERANCE = 0.25
PORT = 32323  # the first rank's port inside the namespaces (nothing else listens there)

note = bench_note("distributed")

LINK_PROBE = r"""
import json, sys, time
import mlx.core as mx
from mlx_coach.runtime.distributed import world
w, size, repeats = world(), int(sys.argv[1]), int(sys.argv[2])
def timed(x):
    mx.eval(mx.distributed.all_sum(x, group=w.group))  # warm-up: the connection and the kernels
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=w.group))
        out.append(time.perf_counter() - start)
    return out
result = {"grad": timed(mx.zeros((size,), dtype=mx.float32)), "small": timed(mx.zeros((1,), dtype=mx.float32))}
if w.rank == 0:
    print("LINK", json.dumps(result), flush=True)
"""


def config(args, prompts=None):
    return {
        "model": {"path": "builtin:tiny", "lora_rank": 8, "lora_alpha": 16},
        "data": {"tasks": "builtin", "val_fraction": 0.2},
        "rollout": {"group_size": args.group, "prompts_per_step": prompts or args.prompts, "max_new_tokens": args.max_new_tokens},
        "algo": {"beta": 0.04},
        "train": {"steps": args.steps, "checkpoint_every": 0, "epochs_val": False},
        "rewards": [{"type": "function", "function": "mlx_coach.rewards.shaping:code_charset"}],
        "telemetry": {"progress": False, "tensorboard": False},
    }


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if xs else float("nan")


def pinned(core, argv):
    return ["taskset", "-c", str(core), *argv]


def _run(ranks, what, stdout=None):
    code = run_ranks(ranks, cwd=ROOT, stdout=stdout or sys.stderr.buffer)  # the ranks' lines are progress here
    if code != 0:
        sys.exit(f"bench distributed: {what} failed (exit {code})")


def train_argv(cfg_path, out):
    return [sys.executable, "-m", "mlx_coach", "train", "-c", str(cfg_path), "--output", str(out)]


def steps_of(out):
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r][1:]  # drop the warm-up step
    tags = ("time/step_s", "dist/straggler_s", "dist/allreduce_s", "dist/rollout_s_max", "dist/rollout_s_min")
    return {t: median([r[t] for r in rows if t in r]) if any(t in r for r in rows) else None for t in tags}


def one_rank(cfg_path, out):
    _run([Rank(0, pinned(0, train_argv(cfg_path, out)), rank_env(0, None))], "the 1-rank run")
    return steps_of(out)


def two_ranks(link, argv, tmp):
    hostfile = tmp / "hostfile.json"
    hostfile.write_text(ring_hostfile([f"{ip}:{PORT + r}" for r, ip in enumerate(link.addresses)]))
    _run([Rank(r, link.exec_prefix(r) + pinned(r, argv), rank_env(r, str(hostfile))) for r in range(2)],
         "a 2-rank run")


def measure_link(link, size, repeats, tmp):
    probe = tmp / "probe.py"
    probe.write_text(LINK_PROBE)
    hostfile = tmp / "hostfile.json"
    hostfile.write_text(ring_hostfile([f"{ip}:{PORT + r}" for r, ip in enumerate(link.addresses)]))
    out = io.BytesIO()
    argv = [sys.executable, str(probe), str(size), str(repeats)]
    path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    _run([Rank(r, link.exec_prefix(r) + pinned(r, argv), {**rank_env(r, str(hostfile)), **path}) for r in range(2)],
         "the link measurement", stdout=out)
    line = next(x for x in out.getvalue().decode().splitlines() if x.startswith("LINK"))
    result = json.loads(line.split(" ", 1)[1])
    t_grad, t_small = median(result["grad"]), median(result["small"])
    latency = t_small / 2
    bandwidth = size * 4 / max(t_grad - t_small, 1e-9)
    return {"t_grad_s": t_grad, "t_small_s": t_small, "latency_s": latency, "bandwidth_Bps": bandwidth}


def open_link(name):
    """The two namespaces of link `name`, shaped; rate only when the kernel cannot add a delay (no netem)."""
    shape = parse_shape(LINKS[name])
    try:
        return LinkPair(shape).__enter__()
    except UserError as e:
        if "netem" not in str(e):
            raise
        note(f"{name}: no delay (this kernel has no netem qdisc): shaping the rate only ({shape['rate']})")
        return LinkPair({"rate": shape["rate"]}).__enter__()


def project(compute, nbytes, link, straggler, ranks):
    allreduce = 2 * (ranks - 1) / ranks * nbytes / link["bandwidth_Bps"] + 2 * (ranks - 1) * link["latency_s"]
    work = compute["c1_s"] / ranks
    return {"compute_s": work, "allreduce_s": allreduce, "straggler_s": straggler,
            "step_s": work + allreduce + straggler}


def adapter_size(run):
    import mlx.core as mx

    return sum(v.size for v in mx.load(str(run / "initial_trainable.safetensors")).values())


def main(argv=None):
    ap = BenchParser("distributed", __doc__.splitlines()[0])
    ap.add_argument("--steps", type=positive_int, help=f"steps per training run (default {STEPS}; --full: {FULL_STEPS})")
    ap.add_argument("--prompts", type=positive_int, default=8, help="global prompts per step")
    ap.add_argument("--group", type=positive_int, default=4)
    ap.add_argument("--max-new-tokens", type=positive_int, default=16)
    ap.add_argument("--links", help=f"comma-separated, of {', '.join(LINKS)} (default 10gbe; --full: all)")
    ap.add_argument("--repeats", type=positive_int, default=30, help="all-sums per buffer size in the link measurement")
    ap.add_argument("--full", action="store_true", help=f"{FULL_STEPS} steps over every link")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.steps = args.steps or (FULL_STEPS if args.full else STEPS)
    if args.prompts < 2 or args.prompts % 2:
        ap.error(f"--prompts: an even number >= 2 (the two ranks' shares, and the half-batch run), got {args.prompts}")
    names = args.links.split(",") if args.links else list(LINKS) if args.full else ["10gbe"]
    if unknown := [n for n in names if n not in LINKS]:
        ap.error(f"--links: unknown {', '.join(unknown)} (known: {', '.join(LINKS)})")
    if shutil.which("taskset") is None:
        sys.exit("bench distributed: needs taskset (util-linux) to give each rank a core of its own")
    results = {"args": vars(args), "links": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg_path = tmp / "bench.yaml"
        cfg_path.write_text(yaml.safe_dump(config(args)))
        note(f"1 rank on 1 core: {args.steps} steps of builtin:tiny ({args.prompts} prompts x {args.group})")
        one = one_rank(cfg_path, tmp / "one")
        half_path = tmp / "half.yaml"
        half_path.write_text(yaml.safe_dump(config(args, prompts=args.prompts // 2)))
        note(f"1 rank on 1 core: the same with {args.prompts // 2} prompts")
        half = one_rank(half_path, tmp / "half")
        c1, c_half, size = one["time/step_s"], half["time/step_s"], adapter_size(tmp / "one")
        compute = {"c1_s": c1, "c_half_s": c_half}
        nbytes = 4 * size
        note(f"1 rank: median step {c1:.3f} s, half the batch {c_half:.3f} s; gradient {nbytes / 1e6:.2f} MB")
        for name in names:
            link_pair = open_link(name)
            with contextlib.closing(link_pair):
                note(f"{name}: all-sum of {nbytes / 1e6:.2f} MB and of 4 bytes, {args.repeats} times each")
                link = measure_link(link_pair, size, args.repeats, tmp)
                note(f"{name}: latency {link['latency_s'] * 1e6:.0f} us, bandwidth {link['bandwidth_Bps'] * 8 / 1e9:.2f} "
                     f"Gbit/s; 2 ranks: {args.steps} steps")
                out = tmp / f"two-{name}"
                two_ranks(link_pair, train_argv(cfg_path, out), tmp)
                two = steps_of(out)
            shape = link_pair.shape
            straggler = two["dist/straggler_s"] or 0.0
            projection = {n: project(compute, nbytes, link, straggler, n) for n in PROJECT}
            results["links"][name] = {"shape": shape, "link": link, "two_ranks": two, "projection": projection}
            note(f"{name}: measured 2-rank step {two['time/step_s']:.3f} s, projected {projection[2]['step_s']:.3f} s")
    results["compute"] = compute
    report(results, compute, nbytes, args)
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "one_rank": one, "half": half}, indent=2, default=str))


def report(results, compute, nbytes, args):
    print(f"global batch {args.prompts} prompts x {args.group} samples, {args.max_new_tokens} new tokens, "
          f"{args.steps} steps (medians after the first); each rank pinned to one core")
    print("model: step(n) = C1/n + 2(n-1)/n x bytes/B + 2(n-1) x L + S  (C1: the 1-rank step here; B, L: the "
          "link's bandwidth and latency, measured by all-sums over it; S: the 2-rank median dist/straggler_s)")
    print(f"C1 {compute['c1_s']:.3f} s; 1 rank on half the batch (C_half) {compute['c_half_s']:.3f} s; "
          f"bytes {nbytes}")
    for name, r in results["links"].items():
        link, two, proj = r["link"], r["two_ranks"], r["projection"]
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        print(f"link {name} ({shape}): L {link['latency_s'] * 1e6:.0f} us, B {link['bandwidth_Bps'] * 8 / 1e9:.2f} "
              f"Gbit/s, S {proj[2]['straggler_s']:.3f} s")
        for n in PROJECT:
            p = proj[n]
            print(f"  {n} Macs: step {p['step_s']:.3f} s = compute {p['compute_s']:.3f} + all-reduce "
                  f"{p['allreduce_s'] * 1e3:.2f} ms + straggler {p['straggler_s']:.3f}")
        measured = two["time/step_s"]
        off = proj[2]["step_s"] / measured - 1
        verdict = "within" if abs(off) <= TOLERANCE else "OUTSIDE"
        logged = (f"; logged all-reduce {two['dist/allreduce_s'] * 1e3:.2f} ms" if two["dist/allreduce_s"] is not None
                  else "")
        print(f"  2-rank step {measured:.3f} s against C_half {compute['c_half_s']:.3f} s: "
              f"{measured / compute['c_half_s']:.2f}x (being one of two ranks here)")
        print(f"  check: measured 2-rank step {measured:.3f} s, projected {proj[2]['step_s']:.3f} s: {off:+.0%} "
              f"({verdict} {TOLERANCE:.0%}){logged}")


if __name__ == "__main__":
    main()
