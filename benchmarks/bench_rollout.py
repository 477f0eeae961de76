"""Decode throughput: mlx-coach's rollout engine vs mlx_lm.batch_generate, same model and work.

Both engines get the same prompt token ids, the same number of sequences (prompts x group
size), sample at temperature 1 with no stop strings and EOS disabled, so every sequence
decodes exactly --max-tokens tokens. Ours prefills each prompt once and shares its cache
across the group; mlx_lm.batch_generate gets every sequence as its own prompt.

The machine's limit for the model, measured in the same run: a decode step of B sequences must at
least multiply B token vectors by every weight matrix (the layers' projections and the output head),
which reads every weight once. So decode tok/s is bounded by B / (time of those matrix products
alone, with the machine's BLAS at the decode shape): the matmul bound, which includes reading the
weights. Each engine's tok/s is also given as a fraction of it. Attention, sampling, the KV cache
and the elementwise work between the products are left out, so it is a ceiling no engine reaches;
one decode step, timed part by part (`decode_breakdown`), says what the rest costs.
(The rate the products read weights at one row is printed too. An earlier version also gave a bound
from the bandwidth of an element-wise copy; MLX's CPU copy runs on one thread while OpenBLAS reads
the weights on all of them, so both engines beat that "bound" on an idle machine, and it was dropped.)

Continuous batching (`--refill-prompts N`, on by default): more sequences than the batch holds
(`--refill-rows` rows), ending at different lengths (tokens whose id is a multiple of --refill-stop-every
act as EOS, so lengths spread from 1 to --max-tokens), decoded three ways side by side: ours with
rollout.continuous (finished rows refilled by waiting prompts at once), ours batch after batch (the next
prompts start when the whole batch is done), and mlx_lm.batch_generate (itself continuous) at the same row
cap. Reported: completion tokens per second of wall time (prefill included), and the mean rows busy per
decode forward.

`--refill-config CONFIG` runs that comparison alone on a training config's own rollout settings (chat
prompt, temperature, stops, the model's EOS) and its first --refill-prompts validation tasks.

    python benchmarks/bench_rollout.py                         # builtin tiny: a few minutes at most
    python benchmarks/bench_rollout.py --full                  # builtin tiny and SmolLM2-135M (if found)
    python benchmarks/bench_rollout.py --model path/to/model.gguf --json out.json
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_coach.runtime.blas import preloaded, reexec_with_openblas  # noqa: E402

if __name__ == "__main__":
    reexec_with_openblas([str(Path(__file__).resolve()), *sys.argv[1:]])

import mlx.core as mx  # noqa: E402

from mlx_coach.models.gguf import find_smollm2_gguf
from mlx_coach.models.loader import load_policy
from mlx_coach.engine.logprobs import sequence_logprobs  # noqa: E402
from mlx_coach.engine.rollout import RolloutConfig, generate_rollouts  # noqa: E402
from mlx_coach.rl.objective import sampler_gap, sampler_mismatch  # noqa: E402
from mlx_coach.engine.text import encode_prompt, token_bytes  # noqa: E402
from mlx_coach.telemetry.progress import bench_note  # noqa: E402

note = bench_note("rollout")


CODE = '''def fizzbuzz(n: int) -> list:
    """Return the FizzBuzz sequence from 1 to n as strings."""
    out = []
    for i in range(1, n + 1):
        if i % 15 == 0:
            out.append("FizzBuzz")
        elif i % 3 == 0:
            out.append("Fizz")
        elif i % 5 == 0:
            out.append("Buzz")
        else:
            out.append(str(i))
    return out
'''


def make_prompts(tokenizer, n, prompt_len):
    """n distinct prompts of exactly prompt_len tokens (plain encoding), decoded back to text."""
    prompts = []
    for i in range(n):
        ids = tokenizer.encode(f"# task {i}\n" + CODE * (1 + prompt_len // 40), add_special_tokens=False)
        ids = ids[:prompt_len]
        prompts.append(tokenizer.decode(ids))
    return prompts


def timed_rollouts(model, tokenizer, prompts, cfg):
    """Our engine's batch, and its figures per wall second (prefill included)."""
    tic = time.perf_counter()
    batch = generate_rollouts(model, tokenizer, prompts, cfg)
    wall = time.perf_counter() - tic
    return batch, {"tokens_per_wall_s": batch.decode_tokens / wall, "wall_s": wall,
                   "decode_tokens": batch.decode_tokens, "refills": batch.refills,
                   "rows_per_forward": batch.rows_per_forward}


def run_ours(model, tokenizer, prompts, args, continuous=True, full_length=True):
    cfg = RolloutConfig(
        group_size=args.group_size,
        max_new_tokens=args.max_tokens,
        temperature=1.0,
        stop=[],
        max_batch_tokens=args.max_batch_tokens,
        continuous=continuous,
    )
    batch, figures = timed_rollouts(model, tokenizer, prompts, cfg)
    assert not full_length or all(len(r.token_ids) == args.max_tokens for r in batch.rollouts)
    return {
        **figures,
        "decode_tps": batch.tokens_per_sec,
        "decode_s": batch.decode_s,
        "prefill_tokens": batch.prefill_tokens,
        "prefill_s": batch.prefill_s,
        "peak_batch": batch.peak_batch,
    }


def run_mlx_lm(model, tokenizer, prompts, args, rows=None, full_length=True):
    from mlx_lm import batch_generate
    from mlx_lm.sample_utils import make_sampler

    cfg = RolloutConfig()
    ids = [encode_prompt(tokenizer, p, cfg) for p in prompts for _ in range(args.group_size)]
    n = len(ids)
    tic = time.perf_counter()
    out = batch_generate(
        model,
        tokenizer,
        ids,
        max_tokens=args.max_tokens,
        sampler=make_sampler(temp=1.0),
        completion_batch_size=rows or n,
        prefill_batch_size=rows or n,
        return_token_ids=True,
    )
    wall = time.perf_counter() - tic
    assert not full_length or all(len(t) == args.max_tokens for t in out.token_ids)
    s = out.stats
    return {
        "tokens_per_wall_s": s.generation_tokens / wall,
        "decode_tps": s.generation_tps,
        "decode_tokens": s.generation_tokens,
        "decode_s": s.generation_time,
        "prefill_tokens": s.prompt_tokens,
        "prefill_s": s.prompt_time,
        "wall_s": wall,
        "peak_batch": n,
    }


def _median_time(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def weight_matrices(model):
    """The 2-D weights a decode step multiplies by: every Linear layer, and the head (the embedding
    when tied). The input embedding is a lookup, not a product."""
    import mlx.nn as nn

    mats = [m.weight for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not any(isinstance(m, nn.Linear) and name.endswith("lm_head") for name, m in model.named_modules()):
        mats.append(model.model.embed_tokens.weight)  # tied head
    return mats


def products_time(mats, rows):
    """Median seconds of multiplying `rows` random token vectors by every matrix in `mats`."""
    xs = {w.shape[1]: mx.random.normal((rows, w.shape[1])) for w in mats}
    mx.eval(list(xs.values()))
    return _median_time(lambda: mx.eval([xs[w.shape[1]] @ w.T for w in mats]))


def hardware_limits(model, rows):
    """Decode tok/s bound at `rows` sequences (the matmul bound) and its details."""
    mats = weight_matrices(model)

    t_mm, t_one = products_time(mats, rows), products_time(mats, 1)
    weight_bytes = sum(w.nbytes for w in mats)
    return rows / t_mm, {
        "gemm_gflops": 2 * rows * sum(w.size for w in mats) / t_mm / 1e9, "weight_gb": weight_bytes / 1e9,
        "weight_read_gb_per_s_at_one_row": weight_bytes / t_one / 1e9,
        "matmul_params": sum(w.size for w in mats), "rows": rows}


def decode_breakdown(model, rows, context, top_p=0.95):
    """Where one decode step's time goes, at `rows` sequences with `context` tokens already cached
    (medians of 5): the one-token forward with its KV cache (its matrix products, then the rest:
    attention, norms, activations, the cache), and `engine.sampling.sample` at temperature 1 (of which
    one exp over the vocabulary). Seconds per step; the engine's own step adds its bookkeeping."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_coach.engine.sampling import sample

    cache = make_prompt_cache(model)
    prompt = mx.random.randint(0, 1000, (rows, context))
    logits = model(prompt, cache=cache)[:, -1, :]
    mx.eval(logits, [c.state for c in cache])
    token = mx.argmax(logits, axis=-1)[:, None]
    # each forward appends one position to the cache: 6 calls move the context by 6 of `context`
    forward = _median_time(lambda: mx.eval(model(token, cache=cache)))
    u = mx.random.uniform(shape=(rows, 1))
    sampling = _median_time(lambda: mx.eval(sample(logits, 1.0, top_p, u)))
    exp = _median_time(lambda: mx.eval(mx.exp(logits - logits.max(axis=-1, keepdims=True))))
    products = products_time(weight_matrices(model), rows)
    step = forward + sampling
    return {"rows": rows, "context": context, "step_s": step, "forward_s": forward, "products_s": products,
            "forward_rest_s": forward - products, "sample_s": sampling, "exp_s": exp,
            "shares": {"products": products / step, "forward rest": (forward - products) / step,
                       "sampling": sampling / step, "of which exp": exp / step}}


def bench_model(spec, args):
    model, tokenizer, info = load_policy(spec, dtype=args.dtype)
    tokenizer.eos_token_ids = set()  # both engines: every sequence runs to max tokens
    prompts = make_prompts(tokenizer, args.prompts, args.prompt_len)
    warm = argparse.Namespace(**{**vars(args), "max_tokens": 4})
    note(f"{spec}: warm-up")
    run_ours(model, tokenizer, prompts, warm)
    run_mlx_lm(model, tokenizer, prompts, warm)
    ours, theirs = [], []
    for i in range(args.repeats):
        # alternate who goes first; a shared machine's load then hits both alike
        for name in (("ours", "mlx_lm") if i % 2 == 0 else ("mlx_lm", "ours")):
            note(f"{spec}: decode of {args.prompts * args.group_size} sequences x {args.max_tokens} tokens, "
                 f"pair {i + 1}/{args.repeats}, {name}")
            mx.random.seed(i)
            if name == "ours":
                ours.append(run_ours(model, tokenizer, prompts, args))
            else:
                theirs.append(run_mlx_lm(model, tokenizer, prompts, args))
    pair_ratios = [o["decode_tps"] / t["decode_tps"] for o, t in zip(ours, theirs)]

    def summary(runs):
        best = max(runs, key=lambda r: r["decode_tps"])
        return {**best, "decode_tps_median": statistics.median(r["decode_tps"] for r in runs)}

    ours, theirs = summary(ours), summary(theirs)
    note(f"{spec}: the matmul bound")
    bound, limits = hardware_limits(model, args.prompts * args.group_size)
    note(f"{spec}: one decode step, part by part")
    breakdown = decode_breakdown(model, args.prompts * args.group_size, args.prompt_len + args.max_tokens // 2)
    return {
        "limits": {**limits, "matmul_bound_tps": bound},
        "decode_step": breakdown,
        "ours_frac_of_bound": ours["decode_tps"] / bound,
        "mlx_lm_frac_of_bound": theirs["decode_tps"] / bound,
        "model": spec,
        "num_params": info["num_params"],
        "sequences": args.prompts * args.group_size,
        "ours": ours,
        "mlx_lm_batch_generate": theirs,
        "decode_ratio": ours["decode_tps"] / theirs["decode_tps"],
        "decode_ratio_median_of_pairs": statistics.median(pair_ratios),
        "wall_ratio": theirs["wall_s"] / ours["wall_s"],
    }


FIGURES = ("tokens_per_wall_s", "wall_s", "decode_tokens", "rows_per_forward")


def bench_mismatch(spec, args):
    """The sampler's log-probs against the training forward's on the same tokens, at the sampling temperature:
    `policy/sampler_mismatch` (token mean of |pi_train / pi_sampler - 1|) and the largest token's."""
    model, tokenizer, info = load_policy(spec, dtype=args.dtype)
    prompts = make_prompts(tokenizer, args.prompts, args.prompt_len)
    cfg = RolloutConfig(group_size=args.group_size, max_new_tokens=args.max_tokens, temperature=args.temperature,
                        stop=[])
    mx.random.seed(0)
    note(f"{spec}: sampling {args.prompts * args.group_size} sequences x up to {args.max_tokens} tokens")
    batch = generate_rollouts(model, tokenizer, prompts, cfg)
    rows = batch.rollouts
    note(f"{spec}: the training forward over them")
    logp, mask, _ = sequence_logprobs(model, [r.prompt_ids for r in rows], [r.token_ids for r in rows],
                                      temperature=args.temperature)
    T = logp.shape[1]
    sampled = mx.array([r.logprobs + [0.0] * (T - len(r.logprobs)) for r in rows])
    per_token = sampler_gap(logp, sampled) * mask
    return {"model": spec, "dtype": info["dtype"], "quantization": info.get("quantization"),
            "temperature": args.temperature, "tokens": int(mask.sum().item()),
            "sampler_mismatch": sampler_mismatch(logp, sampled, mask).item(), "max": per_token.max().item()}


def compare_ways(ways, repeats, base="batch after batch", label=""):
    """Run each way (name -> a function returning its figures) `repeats` times, alternating the order so
    that a shared machine's load hits all alike, every run seeded alike; the median of each figure (NaN
    where a way does not report it) and tokens per wall second as a ratio to `base`'s."""
    runs = {name: [] for name in ways}
    for i in range(repeats):
        for name in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
            note(f"{label}continuous batching, round {i + 1}/{repeats}, {name}")
            mx.random.seed(i)
            runs[name].append(ways[name]())
    summary = {name: {k: statistics.median(r.get(k, float("nan")) for r in rs) for k in FIGURES}
               for name, rs in runs.items()}
    for v in summary.values():
        v["ratio_to_batch_after_batch"] = v["tokens_per_wall_s"] / summary[base]["tokens_per_wall_s"]
    return summary


def bench_refill(spec, args):
    """Continuous batching vs batch after batch (and mlx-lm's continuous BatchGenerator), same row cap."""
    model, tokenizer, info = load_policy(spec, dtype=args.dtype)
    tokenizer.eos_token_ids = set(range(0, len(token_bytes(tokenizer)), args.refill_stop_every))
    prompts = make_prompts(tokenizer, args.refill_prompts, args.prompt_len)
    rows = args.refill_rows
    run = argparse.Namespace(**{**vars(args), "max_batch_tokens": rows * (args.prompt_len + args.max_tokens)})
    ways = {"continuous": lambda: run_ours(model, tokenizer, prompts, run, True, False),
            "batch after batch": lambda: run_ours(model, tokenizer, prompts, run, False, False),
            "mlx_lm.batch_generate": lambda: run_mlx_lm(model, tokenizer, prompts, run, rows, False)}
    warm = argparse.Namespace(**{**vars(run), "max_tokens": 4})
    run_ours(model, tokenizer, prompts[:2], warm, True, False)
    run_mlx_lm(model, tokenizer, prompts[:2], warm, rows, False)
    return {"model": spec, "sequences": args.refill_prompts * args.group_size, "rows": rows,
            "ways": compare_ways(ways, args.repeats, label=f"{spec}: ")}


def bench_refill_recipe(path, args):
    """Continuous batching vs batch after batch on a training config's own rollout settings (chat prompt,
    temperature, stops, natural EOS) and the first --refill-prompts of its validation tasks."""
    from dataclasses import replace

    from mlx_coach.config.tree import load_config
    from mlx_coach.rl.setup import select_tasks

    cfg = load_config(path)
    model, tokenizer, _ = load_policy(cfg.model.path, dtype=args.dtype or cfg.model.dtype)
    tasks = select_tasks(cfg.data)[1][: args.refill_prompts]
    prompts = [t.prompt for t in tasks]
    longest = max(len(encode_prompt(tokenizer, p, cfg.rollout)) for p in prompts)
    budget = args.refill_rows * (longest + cfg.rollout.max_new_tokens)
    generate_rollouts(model, tokenizer, prompts[:1], replace(cfg.rollout, max_new_tokens=4))  # warm-up

    def way(continuous):
        rc = replace(cfg.rollout, max_batch_tokens=budget, continuous=continuous)
        return lambda: timed_rollouts(model, tokenizer, prompts, rc)[1]

    ways = compare_ways({"continuous": way(True), "batch after batch": way(False)}, args.repeats, label=f"{path}: ")
    return {"config": str(path), "model": cfg.model.path, "prompts": len(prompts),
            "sequences": len(prompts) * cfg.rollout.group_size, "rows": args.refill_rows, "ways": ways}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="builtin:tiny, HF folder or .gguf (repeatable; default: "
                    "builtin:tiny, and with --full also SmolLM2-135M when its GGUF is installed)")
    ap.add_argument("--full", action="store_true", help="the long version: SmolLM2-135M beside builtin:tiny "
                    "(tens of minutes on a 2-core CPU)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="compute dtype (default: --refill-config's model.dtype, else the model's)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens decoded per sequence")
    ap.add_argument("--max-batch-tokens", type=int, default=1 << 20, help="ours: decode batch budget")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--refill-prompts", type=int, default=16, help="continuous batching: prompts (0 = skip)")
    ap.add_argument("--refill-rows", type=int, default=16, help="continuous batching: rows the batch holds")
    ap.add_argument("--refill-stop-every", type=int, default=48,
                    help="continuous batching: token ids that are multiples of this end a sequence")
    ap.add_argument("--refill-config", type=Path, help="continuous batching on this training config's rollout "
                    "settings and validation tasks instead (natural lengths; --model is not used)")
    ap.add_argument("--mismatch", action="store_true",
                    help="this section alone: each model's sampler log-probs against its training forward's "
                         "(policy/sampler_mismatch) on --prompts x --group-size samples of --max-tokens tokens")
    ap.add_argument("--temperature", type=float, default=1.0, help="--mismatch: the sampling temperature")
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each row as soon as it is measured, into a pipe or file too
    if not args.model:
        args.model = ["builtin:tiny"]
        if args.full and (gguf := find_smollm2_gguf()) is not None:
            args.model.append(str(gguf))

    results = {
        "machine": f"{platform.machine()} {platform.system()}, mlx {mx.__version__}, "
        f"device {mx.default_device()}, openblas preloaded: {preloaded()}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "model")},
        "runs": [],
    }
    print(results["machine"])
    if args.mismatch:  # this section alone
        results["mismatch"] = []
        print(f"{'model':<36} {'dtype':>9} {'bits':>5} {'tokens':>7} {'mismatch':>10} {'largest':>10}")
        for spec in args.model:
            r = bench_mismatch(spec, args)
            results["mismatch"].append(r)
            print(f"{Path(spec).name[-36:]:<36} {r['dtype']:>9} {(r['quantization'] or {}).get('bits', '-'):>5} "
                  f"{r['tokens']:>7} {r['sampler_mismatch']:>10.3g} {r['max']:>10.3g}")
        return _write(results, args.json)
    if args.refill_config:  # this section alone
        r = bench_refill_recipe(args.refill_config, args)
        results["refill_recipe"] = r
        print(f"continuous batching on {r['config']}'s rollout settings: {r['prompts']} validation prompts, "
              f"{r['sequences']} sequences, {r['rows']} rows at most; medians of --repeats runs")
        for name, v in r["ways"].items():
            print(f"{name:<24} {v['tokens_per_wall_s']:8.1f} tok/s of wall ({v['ratio_to_batch_after_batch']:.2f}x)  "
                  f"rows/forward {v['rows_per_forward']:.1f}  wall {v['wall_s']:.1f} s  tokens {v['decode_tokens']:.0f}")
        return _write(results, args.json)
    print("decode tok/s: best of --repeats runs (median in brackets); ratio = ours / mlx-lm, "
          "best and median over alternating pairs")
    print(f"{'model':<36} {'seqs':>5} {'ours tok/s':>18} {'mlx-lm tok/s':>18} {'ratio':>12}"
          f" {'ours wall':>10} {'mlx-lm wall':>12}")
    for spec in args.model:
        r = bench_model(spec, args)
        results["runs"].append(r)
        o, t = r["ours"], r["mlx_lm_batch_generate"]
        print(f"{Path(spec).name[-36:]:<36} {r['sequences']:>5} "
              f"{o['decode_tps']:>8.1f} ({o['decode_tps_median']:>7.1f}) "
              f"{t['decode_tps']:>8.1f} ({t['decode_tps_median']:>7.1f}) "
              f"{r['decode_ratio']:>5.2f} ({r['decode_ratio_median_of_pairs']:.2f}) "
              f"{o['wall_s']:>9.2f}s {t['wall_s']:>11.2f}s")
        lim = r["limits"]
        print(f"{'':<36} limit at {lim['rows']} rows: matmul {lim['matmul_bound_tps']:.0f} tok/s "
              f"({lim['gemm_gflops']:.0f} GFLOP/s on {lim['matmul_params'] / 1e6:.1f}M weights, {lim['weight_gb']:.2f} GB, "
              f"read at {lim['weight_read_gb_per_s_at_one_row']:.1f} GB/s at one row); "
              f"ours {r['ours_frac_of_bound']:.0%} of it, mlx-lm {r['mlx_lm_frac_of_bound']:.0%}")
        d = r["decode_step"]
        print(f"{'':<36} one decode step at {d['rows']} rows, context {d['context']}: {d['step_s'] * 1e3:.1f} ms = "
              + ", ".join(f"{name} {share:.0%}" for name, share in d["shares"].items())
              + f" (engine: {d['rows'] / r['ours']['decode_tps'] * 1e3:.1f} ms a step)")
    if args.refill_prompts:
        print(f"\ncontinuous batching: {args.refill_prompts} prompts x {args.group_size} samples, "
              f"{args.refill_rows} rows at most, ids that are multiples of {args.refill_stop_every} end a sequence; "
              "medians of --repeats runs")
        print(f"{'model':<36} {'way':<24} {'tok/s of wall':>14} {'ratio':>7} {'rows/forward':>13} {'tokens':>8}")
        results["refill"] = []
        for spec in args.model:
            r = bench_refill(spec, args)
            results["refill"].append(r)
            for name, v in r["ways"].items():
                print(f"{Path(spec).name[-36:]:<36} {name:<24} {v['tokens_per_wall_s']:>14.1f} "
                      f"{v['ratio_to_batch_after_batch']:>6.2f}x {v['rows_per_forward']:>13.1f} {v['decode_tokens']:>8.0f}")
    return _write(results, args.json)


def _write(results, path):
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
