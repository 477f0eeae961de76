"""`mlx-coach plan -c CONFIG [--set ...] [--memory GB,...]`: a run's predicted memory, before loading anything.

Prints the predicted MLX peak and peak RSS with their breakdown (runtime/memory_plan.py has the model), whether
the run fits this machine (physical memory; on a Mac also Metal's recommended working set) and, when it does
not, each setting that alone would make it fit and the value to give it. `--memory 8,16,32` gives the verdict
for Macs of those sizes instead.
"""

from mlx_coach.core.errors import UserError
from mlx_coach.runtime.memory_plan import GB, mac, suggestions
from mlx_coach.runtime.micro_batches import AUTO


def add_arguments(p):
    p.add_argument("-c", "--config", help="YAML config; defaults when omitted")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--memory", type=_sizes, metavar="GB[,GB...]",
                   help="the verdict for Macs of these memory sizes (e.g. 8,16,32) instead of this machine")


def _sizes(text):
    try:
        sizes = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(not (0 < s < 1e6) for s in sizes):
        raise UserError(f"--memory: expected sizes in GB separated by commas (e.g. 8,16,32), got {text!r}")
    return sizes


def _verdict(arch, shape, plan, capacity):
    if capacity.fits(plan):
        return f"{capacity.name}: fits"
    fixes = suggestions(arch, shape, capacity)
    how = "; ".join(f"{key}={value}" for key, value in fixes) or "no single setting is enough"
    return f"{capacity.name}: does not fit ({capacity.limit_text(plan)}); each of these alone fits: {how}"


def run(args):
    # imported here: the parser imports this module for add_arguments, and `--help` must stay fast
    from mlx_coach.config.tree import load_config
    from mlx_coach.models.size import machine, plan_run
    from mlx_coach.rl.setup import select_tasks

    cfg = load_config(args.config, args.set)
    tasks, _ = select_tasks(cfg.data)
    planned = plan_run(cfg, tasks)
    if planned is None:
        raise UserError(f"model.path: {cfg.model.path} is not on disk, so its size is unknown before it is "
                        "downloaded; fetch its config (huggingface-cli download REPO config.json) or give its local "
                        "folder, and plan again")
    arch, shape, plan = planned
    quant = arch.get("quantization")
    kind = f"{quant['bits']}-bit (group {quant['group_size']})" if quant else "not quantized"
    tuning = "full fine-tune" if shape.fine_tune == "full" else f"LoRA rank {shape.lora_rank}"
    print(f"model {cfg.model.path}: {arch.get('model_type', '?')}, {plan.params / 1e6:.1f}M parameters, {kind}, "
          f"{plan.dtype} compute; {tuning}, {plan.trainable / 1e6:.2f}M trainable")
    rows = shape.group_size * shape.prompts_per_step
    accum = (f"grad_accum auto: {shape.grad_accum} within optim.micro_batch_gb {cfg.optim.micro_batch_gb:g}"
             if cfg.optim.grad_accum == AUTO else f"grad_accum {shape.grad_accum}")
    print(f"rows {rows} ({shape.group_size} x {shape.prompts_per_step}), {-(-rows // shape.grad_accum)} per "
          f"micro-batch ({accum}); tokens {shape.prompt_tokens} prompt (longest, estimated) "
          f"+ {shape.max_new_tokens} new")
    for name, size in plan.parts.items():
        print(f"  {name:20} {size / GB:9.3f} GB")
    print(f"predicted peak: MLX {plan.mlx_peak / GB:.3f} GB (in the {plan.phase} phase), "
          f"RSS {plan.rss_peak / GB:.3f} GB")
    capacities = [mac(gb) for gb in args.memory] if args.memory else [machine()]
    if not args.memory:
        here = capacities[0]
        print(f"this machine: {here.physical / GB:.1f} GB physical memory"
              + (f", Metal working set {here.working_set / GB:.1f} GB" if here.working_set else ""))
    for capacity in capacities:
        print(_verdict(arch, shape, plan, capacity))
    return 0
